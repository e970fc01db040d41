"""Crash consistency under SIGKILL at random moments: the daemon killed while writing or committing,
a trainer killed after handing over, a rank killed before handing over.

Each daemon trial checks DESIGN.md's invariants: every directory with a final name verifies, `latest`
names the newest of them, a restarted daemon removes the interrupted save's leftovers, and the next
save commits. CI runs a bounded number of trials; `--run-slow` runs 200."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import Daemon, Holder, short_endpoint, wait_for

from ckptd.client import CheckpointClient, CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.loading import committed_checkpoints
from ckptd.client.topology import RankInfo
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto.topology import Topology


def components(step: int) -> list[PreparedComponent]:
    return [
        PreparedComponent(
            StateComponent("model", Holder({"w": torch.full((500_000,), float(step))}), SharingPattern.GLOBAL)
        ),
        PreparedComponent(
            StateComponent(
                "optim", Holder({"m": torch.full((300_000,), -float(step)), "s": step}), SharingPattern.PER_RANK
            )
        ),
        PreparedComponent(StateComponent("meta", Holder({"step": step}), SharingPattern.GLOBAL)),
    ]


def check_invariants(root: Path, recovered: bool = True) -> None:
    """Every final directory verifies; `latest` names one of them, and after recovery the newest."""
    final = committed_checkpoints(str(root))
    for directory in final:
        assert verify_checkpoint(directory) == [], f"{directory} does not verify"
    if not final:
        assert not (root / "latest").exists()
        return
    latest = (root / "latest").read_text().strip()
    assert latest in {os.path.basename(d) for d in final}
    if recovered:
        assert latest == os.path.basename(final[0])


@pytest.mark.parametrize(
    "trials", [pytest.param(8, id="bounded"), pytest.param(200, id="long", marks=pytest.mark.slow)]
)
def test_daemon_killed_at_random_moments_never_breaks_a_committed_checkpoint(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, trials: int
) -> None:
    rng = random.Random(1234)
    endpoint = short_endpoint()
    root = tmp_path / "ckpt"
    daemon = daemon_factory("--max-write-mbps", "40", root=root, endpoint=endpoint)
    client = CheckpointClient(
        str(root),
        RankInfo(0, Topology.single_node(1)),
        endpoint=endpoint,
        auto_start=False,
        timeout=60,
        connect_timeout=30,
    )
    killed_during = {"committed": 0, "lost": 0}
    try:
        step = 0
        for _ in range(trials):
            step += 1
            handle = client.save(step, components(step))  # ~3.2 MB: ~80 ms of writing at 40 MB/s
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(daemon.process.pid, signal.SIGKILL)
            daemon.process.wait()
            check_invariants(root, recovered=False)  # killed between rename and pointer update: one behind
            daemon = daemon_factory("--max-write-mbps", "40", root=root, endpoint=endpoint)
            try:
                handle.wait(30)
                killed_during["committed"] += 1
            except CheckpointError as exc:
                assert "was not committed" in str(exc) or "aborted" in str(exc), exc
                killed_during["lost"] += 1
            assert not list(root.glob(".tmp-*")), "the restarted daemon removes the interrupted save"
            check_invariants(root)
            step += 1
            assert client.save(step, components(step)).wait(30).endswith(f"step_{step:08d}")
            check_invariants(root)
    finally:
        client.close(timeout=5)
    assert killed_during["lost"] > 0, killed_during  # some kills landed in the middle of a save


TRAINER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from ckptd.client import CheckpointClient, PreparedComponent, StateComponent, SharingPattern, RankInfo, Topology
    class Holder:
        def __init__(self, v): self.v = v
        def state_dict(self): return self.v
        def load_state_dict(self, v): self.v = v
    root, endpoint, rank, world, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    client = CheckpointClient(root, RankInfo(rank, Topology.single_node(world), job_id="kill"), endpoint=endpoint,
                              auto_start=False, timeout=60)
    if mode == "die-before":
        os.kill(os.getpid(), signal.SIGKILL)
    state = [PreparedComponent(StateComponent("model", Holder({"w": torch.full((2_000_000,), float(rank))}),
                                              SharingPattern.PER_RANK))]
    handle = client.save(1, state)
    if mode == "die-after":
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        print("COMMITTED", handle.wait(60), flush=True)
    except Exception as exc:
        print("FAILED", exc, flush=True)
""")


def run_trainers(tmp_path: Path, daemon: Daemon, modes: list[str]) -> list[subprocess.Popen]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    return [
        subprocess.Popen(
            [sys.executable, str(script), str(daemon.root), daemon.endpoint, str(rank), str(len(modes)), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, mode in enumerate(modes)
    ]


def test_trainer_killed_after_handing_over_still_commits(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_factory("--max-write-mbps", "8")  # 16 MB: the write outlives the killed trainer
    ranks = run_trainers(tmp_path, daemon, ["die-after", "wait"])
    assert ranks[0].wait(60) == -signal.SIGKILL
    out, err = ranks[1].communicate(timeout=60)
    assert out.startswith("COMMITTED"), out + err
    assert verify_checkpoint(str(daemon.root / "step_00000001")) == []
    assert wait_for(
        lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"ckptd-{os.getuid()}-{ranks[0].pid}-")]
    )


def test_rank_killed_before_handing_over_aborts_every_other_rank(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory("--save-timeout", "2")
    ranks = run_trainers(tmp_path, daemon, ["wait", "die-before", "wait"])
    assert ranks[1].wait(60) == -signal.SIGKILL
    for rank in (0, 2):
        out, err = ranks[rank].communicate(timeout=60)
        assert out.startswith("FAILED") and "rank(s) [1] did not hand over their part of step 1" in out, out + err
    assert not any(p.name.startswith("step_") for p in daemon.root.iterdir())
    assert wait_for(lambda: not list(daemon.root.glob(".tmp-*")))
