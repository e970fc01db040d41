"""Resume equivalence of the DDP examples, as real torchrun jobs (gloo) with the daemon they auto-start.

Each scenario trains N steps without interruption and, separately, N/2 steps that end with a save
handed over without waiting and every rank SIGKILLing itself; a fresh job then resumes from the
latest checkpoint and trains the rest. Losses must match step for step (==), and the final model
and optimizer state bitwise. The DDP example with its global loader also resumes on 1 rank after
2 and must consume the same global sample sequence; with per-rank loaders that resume is refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from helpers import wait_for

from ckptd.client import RankInfo, Topology
from ckptd.client.loading import read_manifest, read_scopes, select_scopes
from ckptd.disk.runtime import daemon_lock_path, daemon_log_path, default_endpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DDP_TRAIN = EXAMPLES / "ddp_train.py"
STATEFUL_LOADER = EXAMPLES / "stateful_loader.py"
JOB_TIMEOUT_S = 300
pytestmark = pytest.mark.timeout(600)  # the first test also sets up every scenario (11 torchrun jobs)


@dataclass(frozen=True)
class Plan:
    """One example's schedule: N steps, a save every k, the crash at N/2 (a save step)."""

    script: Path
    steps: int
    save_every: int
    extra: Tuple[str, ...] = ()

    @property
    def crash_at(self) -> int:
        """The step after which the crashing job SIGKILLs itself."""
        return self.steps // 2

    def args(self) -> List[str]:
        """The example's arguments shared by every job of the scenario."""
        return ["--steps", str(self.steps), "--save-every", str(self.save_every), *self.extra]


DDP_PLANS = {loader: Plan(DDP_TRAIN, 8, 2, ("--loader", loader)) for loader in ("per-rank", "global")}
LOADER_PLAN = Plan(STATEFUL_LOADER, 16, 4)  # 6 steps per epoch: the crash at 8 is mid-epoch


@dataclass
class Job:
    """A torchrun launch whose output goes to a file."""

    process: subprocess.Popen
    log: Path

    def finish(self) -> str:
        """Wait for the job; returns its output."""
        try:
            self.process.wait(JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name} timed out:\n{self.log.read_text()[-6000:]}") from None
        return self.log.read_text()

    def kill(self) -> None:
        """SIGKILL the launcher and its ranks (their own session; an auto-started daemon has another)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_job(base: Path, name: str, script: Path, nproc: int, *args: str) -> Job:
    """Launch `script` on `nproc` ranks under torchrun, one thread per rank."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    log = base / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    return Job(process, log)


def succeeded(job: Job) -> str:
    """The output of a job that must exit 0."""
    output = job.finish()
    assert job.process.returncode == 0, f"{job.log.name} failed ({job.process.returncode}):\n{output[-6000:]}"
    return output


def crashed(job: Job) -> str:
    """The output of a job whose ranks must have SIGKILLed themselves."""
    output = job.finish()
    assert job.process.returncode != 0 and "simulating a crash" in output, output[-6000:]
    assert "Signal 9 (SIGKILL)" in output, output[-6000:]
    return output


def records(prefix: Path, world: int) -> List[Dict[str, Any]]:
    """What each rank wrote with --record."""
    return [torch.load(f"{prefix}.rank{rank}", weights_only=True) for rank in range(world)]


def assert_bitwise_equal(left: Any, right: Any, path: str = "") -> None:
    """Nested state dicts are equal, tensors bit for bit (dtype, shape and every byte)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype and left.shape == right.shape, path
        as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (left, right)]
        assert torch.equal(*as_bytes), f"{path} differs"
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), path
        for key in left:
            assert_bitwise_equal(left[key], right[key], f"{path}/{key}")
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right), path
        for index, (a, b) in enumerate(zip(left, right)):
            assert_bitwise_equal(a, b, f"{path}/{index}")
    else:
        assert left == right, f"{path}: {left!r} != {right!r}"


class AutoStartedDaemons:
    """The daemons the examples auto-start, one per checkpoint root; stopped when the module ends."""

    def __init__(self) -> None:
        self.roots: List[Path] = []

    def track(self, root: Path) -> Path:
        """Remember `root`, whose daemon an example will start; returns it."""
        self.roots.append(root)
        return root

    def stop_all(self) -> None:
        """SIGTERM each daemon still serving a tracked root; none may have logged a traceback."""
        pids = [pid for pid in map(self._pid, self.roots) if pid is not None]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in pids), timeout=30), pids
        for root in self.roots:
            log = Path(daemon_log_path(default_endpoint(str(root))))
            if log.exists():
                assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")

    @staticmethod
    def _pid(root: Path) -> Optional[int]:
        """The pid in the root's daemon lock, if that process is still a daemon serving `root`."""
        try:
            pid = int(Path(daemon_lock_path(str(root))).read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if b"serve" in command and str(root).encode() in command else None


@dataclass
class Scenario:
    """One example's jobs and what they recorded: uninterrupted, crashed at N/2, resumed on 2 ranks;
    a copy of the checkpoint root as the crash left it, resumed on 1 rank (`one_rank`)."""

    plan: Plan
    base: Path
    reference: List[Dict[str, Any]]
    crashed: List[Dict[str, Any]]
    resumed: List[Dict[str, Any]]
    resume_output: str
    at_crash: Path
    one_rank: Optional[Job]


class ScenarioRun:
    """Launches a scenario's jobs in two stages, so that the stages of several scenarios overlap
    (each job is mostly one process importing torch: alone it would leave a core idle)."""

    def __init__(self, base: Path, plan: Plan, daemons: AutoStartedDaemons, one_rank: bool) -> None:
        self.base, self.plan, self.one_rank = base, plan, one_rank
        self.reference_root, self.root = daemons.track(base / "reference_ckpt"), daemons.track(base / "ckpt")
        self.at_crash = daemons.track(base / "at_crash_ckpt")
        self.jobs: Dict[str, Job] = {}

    def start(self) -> None:
        """The uninterrupted job and the one that crashes at N/2, side by side."""
        self.jobs["reference"] = start_job(
            self.base,
            "reference",
            self.plan.script,
            2,
            "--root",
            str(self.reference_root),
            "--record",
            str(self.base / "reference"),
            *self.plan.args(),
        )
        self.jobs["crash"] = start_job(
            self.base,
            "crash",
            self.plan.script,
            2,
            "--root",
            str(self.root),
            "--record",
            str(self.base / "crashed"),
            "--crash-at",
            str(self.plan.crash_at),
            *self.plan.args(),
        )

    def resume(self) -> None:
        """Once the crash is over and its last save committed: resume it on 2 ranks, and a copy on 1."""
        crashed(self.jobs["crash"])
        # the save of step N/2 was handed over before the SIGKILL: the daemon commits it on its own
        latest, expected = self.root / "latest", f"step_{self.plan.crash_at:08d}"
        assert wait_for(lambda: latest.is_file() and latest.read_text().strip() == expected, timeout=60), sorted(
            p.name for p in self.root.iterdir()
        )
        shutil.copytree(self.root, self.at_crash)
        self.jobs["resumed"] = start_job(
            self.base,
            "resumed",
            self.plan.script,
            2,
            "--root",
            str(self.root),
            "--record",
            str(self.base / "resumed"),
            "--resume",
            *self.plan.args(),
        )
        if self.one_rank:
            self.jobs["one_rank"] = start_job(
                self.base,
                "one_rank",
                self.plan.script,
                1,
                "--root",
                str(self.at_crash),
                "--record",
                str(self.base / "one"),
                "--resume",
                *self.plan.args(),
            )

    def finish(self) -> Scenario:
        """Wait for the 2-rank jobs (the 1-rank one is judged by its test) and read their records."""
        resume_output = succeeded(self.jobs["resumed"])
        succeeded(self.jobs["reference"])
        reference, crashed_run, resumed = (records(self.base / name, 2) for name in ("reference", "crashed", "resumed"))
        return Scenario(
            self.plan,
            self.base,
            reference,
            crashed_run,
            resumed,
            resume_output,
            self.at_crash,
            self.jobs.get("one_rank"),
        )


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Scenario]]:
    """Every scenario of this module, run once with their jobs overlapping; the daemons the examples
    auto-started are stopped at the end."""
    daemons = AutoStartedDaemons()
    plans = {"ddp_per_rank": DDP_PLANS["per-rank"], "ddp_global": DDP_PLANS["global"], "stateful_loader": LOADER_PLAN}
    runs = {
        name: ScenarioRun(tmp_path_factory.mktemp(name), plan, daemons, one_rank=name.startswith("ddp"))
        for name, plan in plans.items()
    }
    try:
        for run in runs.values():
            run.start()
        for run in runs.values():
            run.resume()
        yield {name: run.finish() for name, run in runs.items()}
    finally:
        for run in runs.values():
            for job in run.jobs.values():
                job.kill()
        daemons.stop_all()


def assert_resume_equivalent(scenario: Scenario) -> None:
    """The crashed-and-resumed job trained exactly what the uninterrupted one did."""
    half = scenario.plan.crash_at
    runs = zip(scenario.reference, scenario.crashed, scenario.resumed)
    for rank, (reference, crashed_run, resumed) in enumerate(runs):
        assert [s for s, _ in reference["steps"]] == list(range(1, scenario.plan.steps + 1)), rank
        assert crashed_run["steps"] == reference["steps"][:half], rank
        assert resumed["start_step"] == half, rank
        assert resumed["steps"] == reference["steps"][half:], rank  # (step, loss) pairs, floats compared with ==
        assert resumed["batches"] == reference["batches"][half:], rank
        assert_bitwise_equal(resumed["model"], reference["model"], f"rank {rank} model")
        assert_bitwise_equal(resumed["optimizer"], reference["optimizer"], f"rank {rank} optimizer")
    # the GLOBAL history is rank 0's: the resumed job got the crashed job's first half back
    assert scenario.resumed[0]["losses"] == scenario.reference[0]["losses"]
    assert scenario.reference[0]["steps"] != scenario.reference[1]["steps"]  # the ranks really differ


@pytest.mark.parametrize("loader", ["per-rank", "global"])
def test_ddp_train_resume_matches_an_uninterrupted_run(loader: str, scenarios: Dict[str, Scenario]) -> None:
    scenario = scenarios[f"ddp_{loader.replace('-', '_')}"]
    assert_resume_equivalent(scenario)
    assert f"resumed at step {scenario.plan.crash_at} from" in scenario.resume_output
    manifest = read_manifest(str(scenario.at_crash / f"step_{scenario.plan.crash_at:08d}"))
    assert manifest.components["data"].pattern.value == ("GLOBAL" if loader == "global" else "PER_RANK")
    assert manifest.components["optimizer"].pattern.value == "REPLICATED"


def test_ddp_global_loader_resumes_on_one_rank_with_the_same_global_batches(scenarios: Dict[str, Scenario]) -> None:
    scenario = scenarios["ddp_global"]
    plan, half = scenario.plan, scenario.plan.crash_at
    assert scenario.one_rank is not None
    output = succeeded(scenario.one_rank)
    assert "saved with 2 ranks, resuming with 1: RNG state re-seeded per rank" in output, output
    (one,) = records(scenario.base / "one", 1)
    assert one["start_step"] == half
    assert one["losses"][:half] == scenario.reference[0]["losses"][:half]
    rank0, rank1 = (dict(r["batches"]) for r in scenario.reference)
    assert one["batches"] == [(step, rank0[step] + rank1[step]) for step in range(half + 1, plan.steps + 1)]
    assert all(len(ids) == 64 for _, ids in one["batches"])


def test_ddp_per_rank_loader_refuses_to_resume_on_another_world_size(scenarios: Dict[str, Scenario]) -> None:
    job = scenarios["ddp_per_rank"].one_rank
    assert job is not None
    output = job.finish()
    assert job.process.returncode != 0, output
    assert (
        "component 'data' is PER_RANK and was saved with world size 2 on 1 node(s) (ranks per node: 2), "
        "but this job has world size 1 on 1 node(s)"
    ) in output, output[-6000:]


def test_stateful_loader_resume_matches_an_uninterrupted_run(scenarios: Dict[str, Scenario]) -> None:
    scenario = scenarios["stateful_loader"]
    assert_resume_equivalent(scenario)
    batches = [ids for _, ids in scenario.reference[0]["batches"]]
    assert batches[:6] != batches[6:12]  # the run crossed epochs, and the sampler reshuffled


def test_stateful_loader_checkpoint_holds_each_workers_state(scenarios: Dict[str, Scenario]) -> None:
    scenario = scenarios["stateful_loader"]
    directory = str(scenario.at_crash / f"step_{scenario.plan.crash_at:08d}")
    manifest = read_manifest(directory)
    record = manifest.components["data"]
    assert record.pattern.value == "PER_RANK" and set(record.scopes) == {"rank-00000", "rank-00001"}
    for rank in range(2):
        scopes = select_scopes(manifest, "data", record, RankInfo(rank, Topology.single_node(2)))
        state = read_scopes(directory, scopes)
        assert state["epoch"] == 1  # step 8 of 6-step epochs
        snapshot = state["loader"]["_snapshot"]
        assert snapshot["_main_snapshot"]["_sampler_iter_state"] == {"samples_yielded": 16}
        workers = snapshot["_worker_snapshots"]
        assert set(workers) == {"worker_0", "worker_1"}
        for worker in workers.values():
            generator = worker["dataset_state"]["torch_rng"]
            assert isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
        assert not torch.equal(
            workers["worker_0"]["dataset_state"]["torch_rng"], workers["worker_1"]["dataset_state"]["torch_rng"]
        )
