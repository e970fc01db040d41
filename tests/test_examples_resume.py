"""Resume equivalence of the examples (single device, pipeline parallel, hybrid DP x PP).

For each example, on real processes with the daemon each run auto-starts: train N steps without
interruption; separately train to N/2, save without waiting and SIGKILL every rank; start again,
load `latest` and train to N. The resumed run must see the same loss at every step, and end with
bitwise the same parameters and optimizer state, as the uninterrupted one.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from helpers import wait_for

from ckptd.client.daemon import resolve_endpoint
from ckptd.client.loading import read_manifest
from ckptd.disk.runtime import daemon_lock_path, daemon_log_path
from ckptd.proto.layout import checkpoint_dir_name
from ckptd.proto.patterns import SharingPattern

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS, SAVE_EVERY = 8, 2
HALF = STEPS // 2

Scopes = Dict[str, Tuple[int, List[int]]]
"""scope name -> (writer rank, readers)"""


def _same_scope(world: int) -> Scopes:
    return {"global": (0, list(range(world)))}


def _per_rank(world: int) -> Scopes:
    return {f"rank-{r:05d}": (r, [r]) for r in range(world)}


@dataclass(frozen=True)
class Example:
    """An example script, how many ranks it runs on (0: plain python) and what its manifest must show."""

    script: str
    nproc: int
    patterns: Dict[str, Tuple[SharingPattern, Scopes]]
    groups: Dict[str, List[List[int]]]

    @property
    def world(self) -> int:
        """Ranks in the job."""
        return max(self.nproc, 1)


SINGLE = Example(
    "single_device.py",
    0,
    {
        **{
            key: (SharingPattern.GLOBAL, _same_scope(1))
            for key in ("model", "optimizer", "scheduler", "data", "progress")
        },
        "rng": (SharingPattern.PER_RANK, _per_rank(1)),
    },
    {},
)
PIPELINE = Example(
    "pipeline_train.py",
    2,
    {
        **{key: (SharingPattern.PER_RANK, _per_rank(2)) for key in ("model", "optimizer", "rng")},
        "scheduler": (SharingPattern.REPLICATED, _same_scope(2)),
        **{key: (SharingPattern.GLOBAL, _same_scope(2)) for key in ("data", "progress")},
    },
    {},
)
STAGE_SCOPES: Scopes = {"group-stage-00000": (0, [0, 2]), "group-stage-00001": (1, [1, 3])}
HYBRID = Example(
    "hybrid_dp_pp.py",
    4,
    {
        "model": (SharingPattern.PER_GROUP, STAGE_SCOPES),
        "optimizer": (SharingPattern.PER_GROUP, STAGE_SCOPES),
        "data": (SharingPattern.PER_GROUP, {"group-replica-00000": (0, [0, 1]), "group-replica-00002": (2, [2, 3])}),
        "scheduler": (SharingPattern.REPLICATED, _same_scope(4)),
        "rng": (SharingPattern.PER_RANK, _per_rank(4)),
        "progress": (SharingPattern.GLOBAL, _same_scope(4)),
    },
    {"stage": [[0, 2], [1, 3]], "replica": [[0, 1], [2, 3]]},
)


@dataclass
class Runs:
    """The records of the uninterrupted and the resumed run, per rank, and the crashed run's root."""

    example: Example
    full: Dict[int, Dict[str, Any]]
    resumed: Dict[int, Dict[str, Any]]
    crash_root: Path


def launch(example: Example, root: Path, log: Path, *args: str) -> subprocess.Popen:
    """Start the example (under torchrun for several ranks) without waiting; output goes to `log`."""
    script = str(EXAMPLES / example.script)
    launcher = [sys.executable]
    if example.nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={example.nproc}"]
    command = [*launcher, script, "--root", str(root), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *args]
    with open(log, "wb") as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    """Wait for a launched run; its exit status."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{log.name} timed out:\n{tail(log)}") from None


def tail(log: Path) -> str:
    """The end of a run's output, for failure messages."""
    return log.read_text(errors="replace")[-6000:]


def records(prefix: Path, world: int) -> Dict[int, Dict[str, Any]]:
    """What each rank wrote with --record."""
    return {r: torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(world)}


def daemon_log(root: Path) -> str:
    """What the daemon auto-started for `root` logged (empty if it logged nothing)."""
    log = Path(daemon_log_path(resolve_endpoint(str(root))))
    return log.read_text(errors="replace") if log.exists() else ""


def stop_daemon(root: Path) -> None:
    """SIGTERM the daemon a run auto-started for `root` if it still holds its lock, remove its lock file and
    log, and fail if it logged a traceback."""
    lock = daemon_lock_path(str(root))
    if not os.path.exists(lock):
        return
    with open(lock, "rb") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: no daemon serves the root any more
        except BlockingIOError:
            pid = int(held.read())
            os.kill(pid, signal.SIGTERM)
            assert wait_for(lambda: exited(pid), timeout=30), f"daemon {pid} did not exit"
    logged = daemon_log(root)
    for leftover in (lock, daemon_log_path(resolve_endpoint(str(root)))):  # this root is gone after the test
        if os.path.exists(leftover):
            os.unlink(leftover)
    assert "Traceback" not in logged, logged


def exited(pid: int) -> bool:
    """True once `pid` is gone or a zombie (its parent, a killed trainer, is no longer there to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module", params=[SINGLE, PIPELINE, HYBRID], ids=["single", "pipeline", "hybrid"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Uninterrupted and crashing runs side by side, then the resumed run; daemons stopped afterwards."""
    example: Example = request.param
    base = tmp_path_factory.mktemp(example.script.removesuffix(".py"))
    full_root, crash_root = base / "full", base / "crash"
    try:
        yield run_three(example, base, full_root, crash_root)
    finally:
        for root in (full_root, crash_root):
            stop_daemon(root)


def run_three(example: Example, base: Path, full_root: Path, crash_root: Path) -> Runs:
    """The uninterrupted run and the crashing run (concurrently), then the resumed run."""
    logs = {name: base / f"{name}.log" for name in ("full", "crash", "resume")}
    launched: List[subprocess.Popen] = []
    try:
        launched.append(launch(example, full_root, logs["full"], "--record", str(base / "full")))
        launched.append(
            launch(example, crash_root, logs["crash"], "--crash-at", str(HALF), "--record", str(base / "crash"))
        )
        assert finish(launched[0], logs["full"]) == 0, tail(logs["full"])
        assert_killed(example, finish(launched[1], logs["crash"]), logs["crash"])
        assert not list(base.glob("crash.rank*.pt")), "the crashing run got to the end"

        half = checkpoint_dir_name(HALF)  # handed over right before the kill: the daemon commits it anyway
        latest = crash_root / "latest"
        assert wait_for(lambda: latest.exists() and latest.read_text().strip() == half, timeout=60), (
            f"{tail(logs['crash'])}\ndaemon log:\n{daemon_log(crash_root)}"
        )
        assert sorted(p.name for p in crash_root.glob("step_*")) == [checkpoint_dir_name(s) for s in (2, 4)]

        launched.append(launch(example, crash_root, logs["resume"], "--resume", "--record", str(base / "resume")))
        assert finish(launched[2], logs["resume"]) == 0, tail(logs["resume"])
    finally:
        for process in launched:
            stop(process)
    return Runs(example, records(base / "full", example.world), records(base / "resume", example.world), crash_root)


def stop(process: subprocess.Popen) -> None:
    """End a launch that a failed assertion left running (torchrun passes SIGTERM on to its ranks)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_killed(example: Example, status: int, log: Path) -> None:
    """The crashing run died by SIGKILL (torchrun reports its ranks' signal and exits non-zero)."""
    output = tail(log)
    assert "simulating a crash" in output, output
    if example.nproc:
        assert status != 0 and "Signal 9 (SIGKILL)" in output, (status, output)
    else:
        assert status == -signal.SIGKILL, (status, output)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 and 0.0, or two NaN payloads, count as different)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(expected: Any, actual: Any, where: str) -> None:
    """Nested state dicts equal: tensors byte for byte (same dtype and shape), everything else with ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape), where
        assert torch.equal(bits(expected), bits(actual)), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), where
        for key in expected:
            assert_bitwise_equal(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), where
        for index, (e, a) in enumerate(zip(expected, actual)):
            assert_bitwise_equal(e, a, f"{where}/{index}")
    else:
        assert type(expected) is type(actual) and expected == actual, f"{where}: {expected!r} != {actual!r}"


def test_resumed_run_sees_the_same_loss_at_every_step(runs: Runs) -> None:
    for rank in range(runs.example.world):
        full, resumed = runs.full[rank]["losses"], runs.resumed[rank]["losses"]
        assert [step for step, _ in full] == list(range(1, STEPS + 1)), rank
        assert [step for step, _ in resumed] == list(range(HALF + 1, STEPS + 1)), rank
        assert resumed == full[HALF:], f"rank {rank}: resumed {resumed} != uninterrupted {full[HALF:]}"


def test_resumed_run_ends_with_bitwise_the_same_parameters_and_optimizer_state(runs: Runs) -> None:
    for rank in range(runs.example.world):
        full, resumed = runs.full[rank], runs.resumed[rank]
        assert full["model"] and full["optimizer"]["state"], rank
        assert_bitwise_equal(full["model"], resumed["model"], f"rank {rank} model")
        assert_bitwise_equal(full["optimizer"], resumed["optimizer"], f"rank {rank} optimizer")


def test_it_resumed_from_the_checkpoint_saved_right_before_the_kill(runs: Runs) -> None:
    expected = str(runs.crash_root / checkpoint_dir_name(HALF))
    for rank in range(runs.example.world):
        assert runs.full[rank]["resumed_from"] is None, rank
        resumed_from: Optional[str] = runs.resumed[rank]["resumed_from"]
        assert resumed_from is not None and os.path.samefile(resumed_from, expected), (rank, resumed_from)


def test_the_manifest_shows_the_declared_patterns(runs: Runs) -> None:
    manifest = read_manifest(str(runs.crash_root / checkpoint_dir_name(HALF)))
    assert manifest.step == HALF and manifest.topology.world_size == runs.example.world
    assert manifest.groups == runs.example.groups
    found = {
        key: (record.pattern, {name: (s.writer_rank, s.readers) for name, s in record.scopes.items()})
        for key, record in manifest.components.items()
    }
    assert found == runs.example.patterns


def test_ranks_that_load_one_copy_hold_identical_state(runs: Runs) -> None:
    """The declared patterns are true of the state: every reader of a model or optimizer scope (for
    the hybrid example, both ranks of a stage's group) ends both runs with the same bits."""
    manifest = read_manifest(str(runs.crash_root / checkpoint_dir_name(HALF)))
    for key in ("model", "optimizer"):
        for name, scope in manifest.components[key].scopes.items():
            for record in (runs.full, runs.resumed):
                for reader in scope.readers:
                    where = f"{key} {name} rank {reader}"
                    assert_bitwise_equal(record[scope.writer_rank][key], record[reader][key], where)
    if runs.example is HYBRID:  # the stages themselves differ: the PER_GROUP copies are not one state
        assert runs.full[0]["model"].keys() != runs.full[1]["model"].keys()
