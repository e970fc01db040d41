"""A long run stays flat: a trainer saving a small state every step, and the daemon committing each
one, keep their resident memory and open file descriptors level (issue 11). CI runs 6,000 saves;
`--run-slow` runs 10,000."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
from helpers import Daemon
from invariants import check_root

WORKER = Path(__file__).parent / "workers" / "long_run_trainer.py"
SAMPLE_EVERY = 500
WARM_UP = 1_000
"""Saves before the first sample that counts: allocators and caches settle in the first few hundred."""
MAX_FD_FLOOR_RISE = 2
"""How far the fewest open fds of the last third of the samples may sit above those of the first third. A
sample may catch a save's files or a connection's socket open, which only adds to the floor; a leak of
one fd per thousand saves raises the floor by about three over 5,000 measured saves."""
MAX_GROWTH_KIB = 6 * 1024
"""A client that kept every SaveHandle grew about 3 KB per save: 15 MB over the 5,000 saves CI measures."""


def resident_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture
def memory_root() -> Iterator[Path]:
    """A root on tmpfs: this test is about the processes, not the disk, and fsync is free there."""
    root = Path("/dev/shm") / f"ckptd-long-run-{uuid.uuid4().hex[:8]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    "saves",
    [pytest.param(6_000, id="bounded"), pytest.param(10_000, id="long", marks=[pytest.mark.slow])],
)
def test_thousands_of_saves_keep_both_processes_flat(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, memory_root: Path, saves: int
) -> None:
    daemon = daemon_factory(root=memory_root)
    samples_path = tmp_path / "trainer.jsonl"
    trainer = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(daemon.root),
            daemon.endpoint,
            str(saves),
            str(SAMPLE_EVERY),
            str(samples_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon_samples: List[Dict[str, int]] = []
    seen = 0
    while trainer.poll() is None:
        lines = samples_path.read_text().splitlines() if samples_path.exists() else []
        if len(lines) > seen:  # sample the daemon whenever the trainer sampled itself
            seen = len(lines)
            daemon_samples.append(
                {
                    "step": json.loads(lines[-1])["step"],
                    "rss_kib": resident_kib(daemon.process.pid),
                    "fds": open_fds(daemon.process.pid),
                }
            )
        time.sleep(0.05)
    stderr = trainer.stderr.read() if trainer.stderr else ""
    assert trainer.returncode == 0, stderr[-4000:]
    trainer_samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert trainer_samples[-1]["step"] == saves and trainer_samples[-1]["failures"] == 0, trainer_samples[-1]

    for name, samples in (("trainer", trainer_samples), ("daemon", daemon_samples)):
        measured = [s for s in samples if s["step"] >= WARM_UP]
        assert len(measured) >= 5, (name, samples)
        growth = measured[-1]["rss_kib"] - measured[0]["rss_kib"]
        assert growth <= MAX_GROWTH_KIB, (
            f"{name} resident memory grew {growth} KiB over {saves - WARM_UP} saves: {samples}"
        )
        third = len(measured) // 3
        first_floor = min(s["fds"] for s in measured[:third])
        last_floor = min(s["fds"] for s in measured[-third:])
        assert last_floor - first_floor <= MAX_FD_FLOOR_RISE, f"{name} open fds: {samples}"

    report = check_root(daemon.root)
    assert not report.problems, report.problems
    assert report.committed[-1] == saves and len(report.committed) <= 4, report.committed
