"""Regression tests for saves in quick succession and across daemon restarts and stalls (issue 11):
each committed checkpoint holds exactly one step's state, and every outcome a trainer is told is final.

Every test saves content-tagged state (every tensor of step N holds N) and checks the root with
`invariants.check_root`, which loads every committed checkpoint: a checkpoint that mixes two steps
passes its checksums, so only the content shows it.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch
from helpers import Daemon, Holder, short_endpoint, wait_for
from invariants import check_root

from ckptd.client import CheckpointClient, CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.topology import RankInfo
from ckptd.disk.durable import write_atomic
from ckptd.disk.removal import fence_save
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.topology import Topology

MODEL_ELEMENTS = 2_000_000  # 8 MB: two seconds of writing at 4 MB/s


def tagged(step: int, rank: int, model_elements: int = 1000) -> List[PreparedComponent]:
    """A rank's state at `step`: every tensor holds `step`."""
    return [
        PreparedComponent(
            StateComponent("model", Holder({"w": torch.full((model_elements,), float(step))}), SharingPattern.GLOBAL)
        ),
        PreparedComponent(
            StateComponent(
                "data", Holder({"x": torch.full((500 + rank,), float(step)), "step": step}), SharingPattern.PER_RANK
            )
        ),
        PreparedComponent(StateComponent("meta", Holder({"step": step}), SharingPattern.GLOBAL)),
    ]


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., CheckpointClient]]:
    """Ranks of one job as in-process clients (real sockets, real shared memory), closed at the end."""
    clients: List[CheckpointClient] = []

    def factory(
        daemon: Daemon, rank: int = 0, world_size: int = 1, job: str = "job", **options: object
    ) -> CheckpointClient:
        options = {"auto_start": False, "timeout": 60.0, "connect_timeout": 30.0, **options}
        client = CheckpointClient(
            str(daemon.root),
            RankInfo(rank, Topology.single_node(world_size), job_id=job),
            endpoint=daemon.endpoint,
            **options,
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close(timeout=5)


def assert_clean(root: Path) -> List[int]:
    report = check_root(root)
    assert not report.problems, "\n".join(report.problems)
    return report.committed


def test_a_restarted_daemon_never_shares_a_region_between_two_saves(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient], tmp_path: Path
) -> None:
    """The daemon that held step 1 is killed; step 2 goes to its successor, which writes it slowly.
    Settling the lost step 1 must not free the regions step 2 now holds: step 3 waits for them."""
    root, endpoint = tmp_path / "ckpt", short_endpoint()
    first = daemon_factory(root=root, endpoint=endpoint)
    rank0, rank1 = make_client(first, 0, 2), make_client(first, 1, 2)
    lost = rank0.save(1, tagged(1, 0, MODEL_ELEMENTS))  # rank 1 never hands over step 1: it stays in flight
    assert wait_for(lambda: "event=rank_durable step=1 rank=0" in first.log(), timeout=20), first.log()
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its hand-over waits for the next daemon
        pending = pool.submit(rank0.save, 2, tagged(2, 0, MODEL_ELEMENTS))
        second = daemon_factory("--max-write-mbps", "4", root=root, endpoint=endpoint)
        step2 = pending.result(60)
    with pytest.raises(CheckpointError, match="step 1 was not committed: .* was restarted"):
        lost.wait(30)
    step3 = rank0.save(3, tagged(3, 0, MODEL_ELEMENTS))  # must wait until the daemon has read step 2
    for step in (2, 3):
        rank1.save(step, tagged(step, 1))
    assert step2.wait(60).endswith("step_00000002")
    assert step3.wait(60).endswith("step_00000003")
    assert assert_clean(root) == [2, 3]
    assert second.process.poll() is None


def test_saves_ready_at_once_commit_one_at_a_time_in_step_order(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient]
) -> None:
    """Twelve saves become ready within milliseconds (rank 1 writes nothing and hands over last): each
    commits, `latest` ends at the newest, and retention keeps exactly the last three."""
    daemon = daemon_factory()
    retention = RetentionPolicy(keep_last=3)
    rank0 = make_client(daemon, 0, 2, retention=retention)
    rank1 = make_client(daemon, 1, 2, retention=retention)
    global_only = [
        (step, [c for c in tagged(step, 0) if c.component.sharing_pattern is SharingPattern.GLOBAL])
        for step in range(1, 13)
    ]
    handles = [rank0.save(step, state) for step, state in global_only]
    assert wait_for(lambda: daemon.log().count("event=rank_durable") == 12, timeout=30), daemon.log()
    handles += [rank1.save(step, state) for step, state in global_only]
    outcomes = []
    for handle in handles:
        try:
            outcomes.append(handle.wait(60))
        except CheckpointError as exc:
            outcomes.append(f"step {handle.step}: {exc}")
    assert all(o.endswith(f"step_{h.step:08d}") for o, h in zip(outcomes, handles)), outcomes
    assert assert_clean(daemon.root) == [10, 11, 12]
    assert (daemon.root / "latest").read_text().strip() == "step_00000012"
    committed = [int(s) for s in re.findall(r"event=committed step=(\d+)", daemon.log())]
    assert committed == sorted(committed) == list(range(1, 13)), committed


def test_concurrent_atomic_writes_of_one_path_never_collide(tmp_path: Path) -> None:
    """Writers of one small file (`latest`, the retention record) each use their own temp name."""
    target = tmp_path / "latest"
    errors: List[BaseException] = []

    def write(value: int) -> None:
        for _ in range(100):
            try:
                write_atomic(str(target), f"step_{value:08d}\n".encode())
            except OSError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert re.fullmatch(r"step_0000000\d\n", target.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_directory_with_its_final_name_is_reported_committed(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient]
) -> None:
    """Updating `latest` fails after the rename (here `latest` is a directory): the checkpoint is
    committed all the same, the trainer is told so, and the daemon goes on committing."""
    daemon = daemon_factory()
    (daemon.root / "latest").mkdir(parents=True)
    (daemon.root / "latest" / "blocker").write_text("x")
    client = make_client(daemon, retention=RetentionPolicy(keep_last=1))
    assert client.save(1, tagged(1, 0)).wait(30).endswith("step_00000001")
    assert "step(s) [1] are committed, but updating the root failed" in daemon.log()
    (daemon.root / "latest" / "blocker").unlink()
    (daemon.root / "latest").rmdir()
    assert client.save(2, tagged(2, 0)).wait(30).endswith("step_00000002")
    assert assert_clean(daemon.root) == [2]


def test_a_daemon_stalled_past_the_limit_never_commits_the_save_it_held(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient]
) -> None:
    """SIGSTOP in the middle of writing step 1, longer than daemon_timeout: the trainer is told step 1
    is not committed and reuses its staging memory for step 2 at once. When the daemon resumes, it
    reads step 2's bytes where step 1's were, so step 1 must never commit; step 2 does."""
    daemon = daemon_factory("--max-write-mbps", "4")
    client = make_client(daemon, daemon_timeout=1.5)
    stalled = client.save(1, tagged(1, 0, MODEL_ELEMENTS))
    assert wait_for(lambda: any(daemon.root.glob(".tmp-*/model/global.safetensors")), timeout=10)
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CheckpointError, match="step 1 was not committed: .* stopped answering"):
            stalled.wait(30)
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    assert client.save(2, tagged(2, 0, MODEL_ELEMENTS)).wait(60).endswith("step_00000002")
    assert wait_for(lambda: "event=aborted step=1" in daemon.log(), timeout=30), daemon.log()
    assert assert_clean(daemon.root) == [2]


def test_a_hand_over_the_daemon_reads_too_late_is_refused(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient]
) -> None:
    """The daemon is stalled before it reads step 1's hand-over; the client stops waiting after
    `timeout` and reuses the regions for step 2. The resumed daemon must refuse the stale part."""
    daemon = daemon_factory("--max-write-mbps", "4")
    client = make_client(daemon, timeout=1.5, daemon_timeout=60)
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CheckpointError, match="step 1 was not committed: .* did not take the hand-over"):
            client.save(1, tagged(1, 0, MODEL_ELEMENTS))
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    client.timeout = 60
    assert client.save(2, tagged(2, 0, MODEL_ELEMENTS)).wait(60).endswith("step_00000002")
    assert wait_for(lambda: "arrived after the client stopped waiting" in daemon.log(), timeout=10), daemon.log()
    time.sleep(0.5)  # the refused save's abort has cleaned up
    assert assert_clean(daemon.root) == [2]


def test_a_save_retention_deleted_before_its_trainer_heard_is_settled_committed(
    daemon_factory: Callable[..., Daemon], make_client: Callable[..., CheckpointClient]
) -> None:
    """Saves that commit together go through one retention pass before their outcomes are announced;
    a daemon killed in between leaves a trainer to settle a save that committed and is already gone.
    The retention file's record of what it deleted says so (found by the 300-trial torture run)."""
    daemon = daemon_factory()
    client = make_client(daemon, retention=RetentionPolicy(keep_last=1))
    for step in range(1, 5):
        client.save(step, tagged(step, 0)).wait(30)
    assert assert_clean(daemon.root) == [4]
    assert fence_save(str(daemon.root), 1, "job") == str(daemon.root / "step_00000001")
    assert fence_save(str(daemon.root), 1, "another-run") is None
    assert fence_save(str(daemon.root), 9, "job") is None
