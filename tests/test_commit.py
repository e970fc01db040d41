"""Commit protocol on one node with a real daemon: gating, snapshot consistency, back-pressure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import Daemon, Holder, wait_for

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointSkipped,
    PreparedComponent,
    SharingPattern,
    StateComponent,
)
from ckptd.client.loading import latest_checkpoint, read_manifest, read_scope, select_scope
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology


def components(**values: object) -> list[PreparedComponent]:
    return [PreparedComponent(StateComponent(k, Holder(v), SharingPattern.PER_RANK)) for k, v in values.items()]


def replicated(value: object) -> list[PreparedComponent]:
    return [PreparedComponent(StateComponent("weights", Holder(value), SharingPattern.REPLICATED))]


def final_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.exists() else []


def test_commit_waits_for_every_rank(daemon: Daemon, client_factory: Callable[..., CheckpointClient]) -> None:
    rank0, rank1 = client_factory(0, 2), client_factory(1, 2)
    handle0 = rank0.save(5, components(state={"x": torch.ones(4)}))
    time.sleep(0.5)
    assert not handle0.done()
    assert final_dirs(daemon.root) == []
    assert not list(daemon.root.rglob("checkpoint_manifest.json"))
    assert not (daemon.root / "latest").exists()

    handle1 = rank1.save(5, components(state={"x": torch.zeros(4)}))
    path = handle0.wait(30)
    assert handle1.wait(30) == path
    assert final_dirs(daemon.root) == ["step_00000005"]
    assert (daemon.root / "latest").read_text().strip() == "step_00000005"
    manifest = read_manifest(path)
    assert set(manifest.components["state"].scopes) == {"rank-00000", "rank-00001"}
    assert not [p for p in daemon.root.iterdir() if p.name.startswith(".tmp")]


def test_snapshot_is_taken_at_save_time(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_factory("--max-write-mbps", "2")  # 4 MB takes ~2 s to write
    client = CheckpointClient(
        str(daemon.root), RankInfo(0, Topology.single_node(1)), endpoint=daemon.endpoint, auto_start=False, timeout=60
    )
    try:
        weights = torch.arange(1_000_000, dtype=torch.float32)
        nested = {"w": weights, "meta": {"epoch": 1}}
        handle = client.save(1, [PreparedComponent(StateComponent("model", Holder(nested), SharingPattern.GLOBAL))])
        weights.mul_(-1)  # training keeps going right after the save returns
        nested["meta"]["epoch"] = 2
        assert not handle.done()
        assert wait_for(lambda: any(daemon.root.glob(".tmp-*/model/global.safetensors")), timeout=10)
        assert not handle.done()  # the throttled write is still running
        path = handle.wait(60)
    finally:
        client.close()
    manifest = read_manifest(path)
    scope = select_scope(manifest, "model", manifest.components["model"], RankInfo(0, Topology.single_node(1)))
    restored = read_scope(path, scope)
    assert torch.equal(restored["w"], torch.arange(1_000_000, dtype=torch.float32))
    assert restored["meta"] == {"epoch": 1}


def test_busy_pool_waits_or_skips(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--max-write-mbps", "4")
    info = RankInfo(0, Topology.single_node(1))
    waiter = CheckpointClient(str(daemon.root), info, endpoint=daemon.endpoint, auto_start=False, timeout=60)
    try:
        big = {"w": torch.ones(1_000_000)}
        first = waiter.save(1, replicated(big))
        started = time.monotonic()
        second = waiter.save(2, replicated(big))  # waits until step 1's region is released
        assert first.done() or time.monotonic() - started > 0.5
        assert os.path.basename(first.wait(60)) == "step_00000001"
        assert os.path.basename(second.wait(60)) == "step_00000002"
    finally:
        waiter.close()

    skipper = CheckpointClient(
        str(daemon.root), info, endpoint=daemon.endpoint, auto_start=False, timeout=60, when_busy="skip"
    )
    try:
        in_flight = skipper.save(3, replicated(big))
        skipped = skipper.save(4, replicated(big))
        assert skipped.done()
        with pytest.raises(CheckpointSkipped, match="step 4 skipped"):
            skipped.wait(1)
        assert os.path.basename(in_flight.wait(60)) == "step_00000003"
    finally:
        skipper.close()
    assert final_dirs(daemon.root) == ["step_00000001", "step_00000002", "step_00000003"]
    assert latest_checkpoint(str(daemon.root)).endswith("step_00000003")


def test_duplicate_and_committed_steps_are_refused(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient]
) -> None:
    client = client_factory()
    client.save(1, components(a={"v": 1})).wait(30)
    with pytest.raises(CheckpointError, match="already committed"):
        client.save(1, components(a={"v": 2}))
    assert read_manifest(str(daemon.root / "step_00000001")).step == 1


def test_missing_rank_aborts_after_timeout(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--save-timeout", "1")
    client = CheckpointClient(
        str(daemon.root), RankInfo(0, Topology.single_node(2)), endpoint=daemon.endpoint, auto_start=False, timeout=30
    )
    try:
        handle = client.save(7, components(a={"t": torch.ones(3)}))
        with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] did not hand over"):
            handle.wait(30)
    finally:
        client.close()
    assert wait_for(lambda: not any(daemon.root.glob(".tmp-*")), timeout=10)
    assert final_dirs(daemon.root) == []


def test_unusable_root_is_refused_quickly_and_the_daemon_recovers(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient]
) -> None:
    client = client_factory()
    shutil.rmtree(daemon.root)
    daemon.root.write_text("a file where the checkpoint root should be")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="cannot create the directory for step 1"):
        client.save(1, components(a={"t": torch.ones(2)}))
    assert time.monotonic() - started < 10
    daemon.root.unlink()  # the root was removed while the daemon serves it: it is created again
    assert client.save(2, components(a={"t": torch.ones(2)})).wait(30).endswith("step_00000002")


DEAD_RUN = """
import sys, time, torch
from ckptd.client import CheckpointClient, PreparedComponent, RankInfo, SharingPattern, StateComponent, Topology

class Holder:
    def state_dict(self): return {"t": torch.ones(2)}
    def load_state_dict(self, state): pass

client = CheckpointClient(sys.argv[1], RankInfo(0, Topology.single_node(2), job_id="run-1"), endpoint=sys.argv[2],
                          auto_start=False, timeout=30)
client.save(5, [PreparedComponent(StateComponent("a", Holder(), SharingPattern.GLOBAL))])
print("handed over", flush=True)
time.sleep(600)
"""


def test_a_restarted_job_supersedes_the_dead_runs_unfinished_save(daemon: Daemon) -> None:
    def client(rank: int, job: str) -> CheckpointClient:
        return CheckpointClient(
            str(daemon.root),
            RankInfo(rank, Topology.single_node(2), job_id=job),
            endpoint=daemon.endpoint,
            auto_start=False,
            timeout=30,
        )

    # run-1's rank 0 hands over its part of step 5 and is killed; its rank 1 crashed before saving
    dead_run = subprocess.Popen(
        [sys.executable, "-c", DEAD_RUN, str(daemon.root), daemon.endpoint], stdout=subprocess.PIPE, text=True
    )
    assert dead_run.stdout is not None and dead_run.stdout.readline().strip() == "handed over"
    dead_run.kill()
    dead_run.wait()
    new_rank0, new_rank1 = client(0, "run-2"), client(1, "run-2")
    try:
        first = new_rank0.save(5, components(a={"t": torch.zeros(2)}))
        second = new_rank1.save(5, components(a={"t": torch.zeros(2)}))
        assert first.wait(30) == second.wait(30)
        assert "superseded: a new run of the job (id run-2) saves step 5" in daemon.log()
        # a step aborted in one run (here: rank 0's pool was busy) may be saved again by the next run
        new_rank0.skip(6, "staging pool busy")
        with pytest.raises(CheckpointError, match="step 6 aborted: .*already aborted: rank 0 skipped step 6"):
            new_rank1.save(6, components(a={"t": torch.zeros(2)})).wait(10)
    finally:
        for c in (new_rank0, new_rank1):
            c.close(timeout=5)  # run-2 ends: its clients say goodbye, and the root is free for run-3
    next_run = [client(0, "run-3"), client(1, "run-3")]
    try:
        handles = [c.save(6, components(a={"t": torch.ones(2)})) for c in next_run]
        assert handles[0].wait(30).endswith("step_00000006") and handles[1].wait(30) == handles[0].wait(30)
    finally:
        for c in next_run:
            c.close(timeout=5)
    assert final_dirs(daemon.root) == ["step_00000005", "step_00000006"]
    path = str(daemon.root / "step_00000005")
    manifest = read_manifest(path)
    assert manifest.job == "run-2"
    scope = select_scope(manifest, "a", manifest.components["a"], RankInfo(0, Topology.single_node(2)))
    assert torch.equal(read_scope(path, scope)["t"], torch.zeros(2))  # run-2's bytes, not the dead run's


def test_staging_regions_are_reused_and_grow_without_leaking(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient]
) -> None:
    client = client_factory()
    state = {"w": torch.ones(1000)}
    client.save(1, components(model=state)).wait(30)
    (first,) = client.staging.names()
    client.save(2, components(model=state)).wait(30)
    assert client.staging.names() == [first]  # same region, reused
    state["w"] = torch.ones(5_000_000)  # the state grew: a larger region replaces the old one
    client.save(3, components(model=state)).wait(30)
    (second,) = client.staging.names()
    assert second != first
    assert not os.path.exists(f"/dev/shm/{first}") and os.path.exists(f"/dev/shm/{second}")
    assert client.staging.staged_bytes() >= 20_000_000
    client.close()
    assert not os.path.exists(f"/dev/shm/{second}")


def test_the_manifest_records_rank_0s_metrics_whichever_rank_hands_over_first(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    rank0, rank1 = client_factory(rank=0, world_size=2), client_factory(rank=1, world_size=2)
    # save() returns once the daemon has taken the part: rank 1's arrives first
    late = rank1.save(1, components(a={"t": torch.ones(2)}), metrics={"loss": 1.0, "only_rank1": 1.0})
    path = rank0.save(1, components(a={"t": torch.ones(2)}), metrics={"loss": 0.5}).wait(30)
    assert late.wait(30) == path
    assert read_manifest(path).metrics == {"loss": 0.5}
