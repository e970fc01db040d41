"""One live run per checkpoint root (issue 12): a second live job pointed at a root another live job
uses is refused at construction with a RootInUseError naming the other run, and neither job's
checkpoints are touched; a restarted run supersedes its dead predecessor; a run that closes its
manager hands the root over; a root shared across hosts is guarded by a renewed claim file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
from helpers import Daemon, Holder, wait_for
from invariants import check_root

from ckptd.client import CheckpointManager, RankInfo, RootInUseError, SharingPattern, StateComponent, Topology
from ckptd.client.loading import read_manifest
from ckptd.proto import layout
from ckptd.proto.ownership import CLAIM_FILE, RootClaim, RunIdentity

TRAINER = Path(__file__).parent / "workers" / "tagged_trainer.py"
REFUSED_WITHIN_S = 5.0
CLAIM_TTL_S = 3.0
"""The daemons of the cross-host tests honour another host's claim this long after its last renewal."""


class Provider:
    def __init__(self, value: float = 7.0) -> None:
        self.state = {"w": torch.full((4,), value)}

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", Holder(self.state), SharingPattern.GLOBAL)]


def manager(daemon: Daemon, job: str, **options: Any) -> CheckpointManager:
    return CheckpointManager(
        Provider(),
        str(daemon.root),
        endpoint=daemon.endpoint,
        auto_start=False,
        rank_info=RankInfo(0, Topology.single_node(1), job_id=job),
        timeout=30,
        **options,
    )


def refused(daemon: Daemon, job: str, match: str) -> RootInUseError:
    """Constructing a manager for `job` raises RootInUseError matching `match` within REFUSED_WITHIN_S."""
    started = time.monotonic()
    with pytest.raises(RootInUseError, match=match) as info:
        manager(daemon, job).close()
    elapsed = time.monotonic() - started
    assert elapsed < REFUSED_WITHIN_S, f"the refusal took {elapsed:.1f} s"
    return info.value


class TaggedTrainer:
    """tests/workers/tagged_trainer.py as one live job: saves every step, each tensor holding its step."""

    def __init__(self, daemon: Daemon, work: Path) -> None:
        work.mkdir()
        self.events = work / "events-rank0.jsonl"
        self.stop_file = work / "stop"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(TRAINER),
                "--root",
                str(daemon.root),
                "--endpoint",
                daemon.endpoint,
                "--log-dir",
                str(work),
                "--stop-file",
                str(self.stop_file),
                "--pause-file",
                str(work / "pause"),
                "--model-mb",
                "1",
                "--keep-last",
                "100",
            ],
            stdout=open(work / "out.log", "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def read(self) -> List[Dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines()]

    def committed(self) -> List[int]:
        return [e["step"] for e in self.read() if e["event"] == "committed"]

    def job(self) -> str:
        return next(e["job"] for e in self.read() if e["event"] == "start")

    def wait_committed(self, count: int) -> None:
        assert wait_for(lambda: len(self.committed()) >= count, timeout=60), self.read()[-5:]

    def stop(self) -> None:
        self.stop_file.touch()
        assert self.process.wait(90) == 0
        assert not [e for e in self.read() if e["event"] in ("save_error", "failed", "fatal", "unresolved")]


def test_a_second_live_job_is_refused_at_construction_naming_the_first(daemon: Daemon, tmp_path: Path) -> None:
    first = TaggedTrainer(daemon, tmp_path / "job1")
    try:
        first.wait_committed(3)
        error = refused(daemon, "job-2", "is in use by another live run")
        message = str(error)
        assert (
            f"run {first.job()} (rank 0, pid {first.process.pid} on host {socket.gethostname()}, started 20" in message
        )
        assert "Give this run its own root, or stop that run first" in message
        seen = len(first.committed())
        first.wait_committed(seen + 3)  # the first job never noticed
    finally:
        first.stop()
    report = check_root(daemon.root)  # every checkpoint verifies and holds exactly its own step
    assert not report.problems, report.problems
    assert report.committed == sorted(first.committed())
    for step in report.committed:
        assert read_manifest(str(daemon.root / layout.checkpoint_dir_name(step))).job == first.job()
    assert not (daemon.root / CLAIM_FILE).exists(), "the first job gave the root up when it stopped"


def test_a_run_that_closes_its_manager_hands_the_root_over(daemon: Daemon) -> None:
    with manager(daemon, "first") as first:
        one = first.save_checkpoint(1).wait(30)
        refused(daemon, "second", "run first")
    with manager(daemon, "second") as second:  # the same process, now that the first run closed
        two = second.save_checkpoint(2).wait(30)
    assert read_manifest(one).job == "first" and read_manifest(two).job == "second"


def test_a_restarted_run_supersedes_its_killed_predecessor(daemon: Daemon, tmp_path: Path) -> None:
    dead = TaggedTrainer(daemon, tmp_path / "job1")
    dead.wait_committed(2)
    dead.process.send_signal(signal.SIGKILL)
    dead.process.wait()
    started = time.monotonic()
    with manager(daemon, "restarted") as restarted:  # the root is free at once: no live client is left
        assert time.monotonic() - started < REFUSED_WITHIN_S
        step = max(dead.committed()) + 100
        path = restarted.save_checkpoint(step).wait(30)
    assert read_manifest(path).job == "restarted"
    report = check_root(daemon.root, content=False)
    assert not report.problems, report.problems
    assert set(dead.committed()) <= set(report.committed)


class ForeignClaim:
    """A claim on the root as a run on another host keeps it: rewritten every `interval` s while renewing."""

    def __init__(self, root: Path, job: str = "elsewhere", interval: float = 0.3) -> None:
        self.path = root / CLAIM_FILE
        self.run = RunIdentity(job, "other-host", 4242, 0, time.time() - 60)
        self.interval = interval
        self.renewals = 0
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def write(self) -> None:
        self.renewals += 1
        claim = RootClaim(self.run, (4242,), "other-boot", 4243, time.time(), self.renewals)
        tmp = self.path.with_suffix(".test-tmp")
        tmp.write_text(claim.to_json())
        os.rename(tmp, self.path)

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def stop_renewing(self) -> None:
        self._stop.set()
        self._thread.join()


def test_a_live_run_on_another_host_keeps_the_shared_root(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    in_flight = root / (layout.tmp_dir_name(9, "abc") + "/model")
    in_flight.mkdir(parents=True)  # the other run's save in flight
    claim = ForeignClaim(root)
    daemon = daemon_factory("--claim-ttl", str(CLAIM_TTL_S))
    assert in_flight.is_dir(), "a daemon starting on a root a live run owns removed that run's save in flight"
    assert "another live run owns it" in daemon.log()
    try:
        refused(daemon, "here", "in use by another live run: run elsewhere .*pid 4242 on host other-host")
    finally:
        claim.stop_renewing()
    # the other host's run died: its claim is no longer renewed, and once CLAIM_TTL_S has passed the root is free
    started = time.monotonic()
    with manager(daemon, "here") as mine:
        waited = time.monotonic() - started
        assert waited < CLAIM_TTL_S + REFUSED_WITHIN_S
        path = mine.save_checkpoint(3).wait(30)
    assert read_manifest(path).job == "here"
    claim_now = RootClaim.from_json((root / CLAIM_FILE).read_text()) if (root / CLAIM_FILE).exists() else None
    assert claim_now is None or claim_now.run.job == "here"


def test_a_stale_claim_of_another_host_does_not_hold_the_root(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    claim = ForeignClaim(root)
    claim.stop_renewing()
    data = json.loads((root / CLAIM_FILE).read_text())
    data["renewed_at"] = time.time() - 10 * CLAIM_TTL_S  # last renewed long ago
    (root / CLAIM_FILE).write_text(json.dumps(data))
    daemon = daemon_factory("--claim-ttl", str(CLAIM_TTL_S))
    started = time.monotonic()
    with manager(daemon, "here") as mine:
        assert time.monotonic() - started < REFUSED_WITHIN_S
        mine.save_checkpoint(1).wait(30)
        claim_now = RootClaim.from_json((root / CLAIM_FILE).read_text())
        assert claim_now is not None and claim_now.run.job == "here" and claim_now.pids == (os.getpid(),)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"run": {"job": 1}}', json.dumps({"run": None, "pids": []})])
def test_a_malformed_claim_is_ignored(daemon: Daemon, text: str) -> None:
    assert RootClaim.from_json(text) is None
    (daemon.root / CLAIM_FILE).write_text(text)
    with manager(daemon, "here") as mine:
        mine.save_checkpoint(1).wait(30)
    assert "ignored a malformed root claim" in daemon.log()
