"""The framework integrations (Lightning, transformers, Accelerate) with the real packages: 2 gloo ranks
trained uninterrupted, killed right after a save was handed over, and resumed from the newest committed
checkpoint (tests/workers/framework_job.py). After the resume every step's loss and batch equal the
uninterrupted run's (==), and the final model and optimizer are bitwise equal; every committed
checkpoint holds the model of its own step; a framework version outside the supported range is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from test_examples_ddp_resume import AutoStartedDaemons, assert_bitwise_equal
from workers.framework_job import BEST_STEPS, CRASH_AT, STEPS, WORLD

from ckptd.client import RankInfo, SharingPattern, Topology
from ckptd.client.loading import read_manifest, read_scopes, select_scopes
from ckptd.client.sharded import read_sharded
from ckptd.disk.root import checkpoint_path, checkpoint_steps

WORKER = Path(__file__).parent / "workers" / "framework_job.py"
SUPPORTED = {
    "lightning": "lightning>=2.2,<2.7",
    "lightning-sharded": "lightning>=2.2,<2.7",
    "transformers": "transformers>=5.0,<6",
    "accelerate": "accelerate>=1.0,<2",
}
LIGHTNING_COMPONENTS = ("model", "optimizers", "lr_schedulers", "loops", "callbacks", "hyper_parameters", "trainer")
PATTERNS = {
    "lightning": {name: "GLOBAL" for name in LIGHTNING_COMPONENTS},
    "lightning-sharded": {
        name: "SHARDED" if name in ("model", "optimizers") else "GLOBAL" for name in LIGHTNING_COMPONENTS
    },
    "transformers": {
        "model": "REPLICATED",
        "optimizer": "REPLICATED",
        "lr_scheduler": "REPLICATED",
        "rng": "PER_RANK",
        "trainer_state": "GLOBAL",
    },
    "accelerate": {
        "model": "REPLICATED",
        "optimizer": "REPLICATED",
        "scheduler": "REPLICATED",
        "dataloader": "PER_RANK",
        "rng": "PER_RANK",
        "accelerator": "GLOBAL",
    },
}
pytestmark = pytest.mark.timeout(400)


def ckptd_root(workdir: Path, run: str, framework: str) -> Path:
    """Where the worker's run keeps its ckptd checkpoints (the crashed and resumed runs share one)."""
    base = workdir / ("reference" if run == "reference" else "job")
    return base / "hf" / "ckptd" if framework == "transformers" else base / "ckpt"


def run_worker(framework: str, workdir: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Run the worker's three runs; each run's per-rank records."""
    daemons = AutoStartedDaemons()
    for run in ("reference", "job"):
        daemons.track(ckptd_root(workdir, run, framework))
    if framework == "transformers":
        daemons.track(workdir / "best" / "hf" / "ckptd")
    try:
        result = subprocess.run(
            [sys.executable, str(WORKER), framework, str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    finally:
        daemons.stop_all()
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output[-8000:]
    return {
        run: [torch.load(workdir / f"{run}.rank{rank}", weights_only=False) for rank in range(WORLD)]
        for run in ("reference", "crash", "resume")
    }


def model_state_in(checkpoint: str, framework: str, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The model a committed checkpoint holds, read with ckptd's own readers (checksums verified); a
    SHARDED one whole, its chunks filling tensors shaped as in `like`."""
    manifest = read_manifest(checkpoint)
    record = manifest.components["model"]
    if record.pattern is SharingPattern.SHARDED:
        target = {f"net.{key}": torch.zeros_like(value) for key, value in like.items()}
        state = read_sharded(checkpoint, "model", record, target, verify=True)
    else:
        rank0 = RankInfo(0, manifest.topology)
        state = read_scopes(checkpoint, select_scopes(manifest, "model", record, rank0, ()), verify=True)
    if framework.startswith("lightning"):  # the LightningModule's state dict; the worker records its `net`
        return {key.removeprefix("net."): value for key, value in state.items()}
    return state


@pytest.mark.parametrize("framework", ["lightning", "lightning-sharded", "transformers", "accelerate"])
def test_a_killed_job_resumes_with_the_uninterrupted_losses(framework: str, tmp_path: Path) -> None:
    records = run_worker(framework, tmp_path)
    crash_at = CRASH_AT[framework]
    for rank in range(WORLD):
        reference, crashed, resumed = (records[run][rank] for run in ("reference", "crash", "resume"))
        assert sorted(crashed["losses"]) == list(range(1, crash_at + 1)), f"rank {rank}"
        assert sorted(resumed["losses"]) == list(range(crash_at + 1, STEPS + 1)), (
            f"rank {rank} did not resume right after the save handed over at the kill"
        )
        for step in range(1, STEPS + 1):
            trained = crashed if step <= crash_at else resumed
            assert trained["batches"][step] == reference["batches"][step], f"rank {rank} step {step}: another batch"
            assert trained["losses"][step] == reference["losses"][step], f"rank {rank} step {step}: another loss"
        assert_bitwise_equal(reference["final"], resumed["final"], f"rank {rank} final state")

    root = ckptd_root(tmp_path, "job", framework)
    steps = checkpoint_steps(str(root), with_manifest=True)
    assert steps and steps[-1] == STEPS, steps
    for step in steps:  # each holds its own step's model, as the uninterrupted run had it then
        checkpoint = checkpoint_path(str(root), step)
        reference = records["reference"][0]["states"][step]
        assert_bitwise_equal(reference, model_state_in(checkpoint, framework, reference), f"step {step}")
        patterns = {key: c.pattern.value for key, c in read_manifest(checkpoint).components.items()}
        assert patterns == PATTERNS[framework], patterns
        saved_by = 1 if framework == "lightning" else WORLD  # CkptdCheckpointIO saves rank 0's dict alone
        assert read_manifest(checkpoint).topology == Topology.single_node(saved_by)

    error = (tmp_path / "version_error.txt").read_text()
    assert error.startswith("UnsupportedFrameworkError: "), error
    assert SUPPORTED[framework] in error and "is installed" in error, error
    CHECKS[framework](tmp_path, steps)


def check_lightning_pointers(workdir: Path, steps: List[int]) -> None:
    """ModelCheckpoint's files are pointers, and the daemon kept exactly the steps they name
    (save_top_k=2 by train_loss, mapped onto keep_best, plus the newest, which last.ckpt names)."""
    pointers = {p.name: json.loads(p.read_text()) for p in (workdir / "job" / "lightning").iterdir()}
    assert "last.ckpt" in pointers and pointers["last.ckpt"]["step"] == STEPS, pointers
    named = {pointer["step"] for pointer in pointers.values()}
    assert len(pointers) == 3 and set(steps) == named, (pointers, steps)


def check_lightning(workdir: Path, steps: List[int]) -> None:
    """The pointers as above, and what pointers to steps that did not commit load."""
    check_lightning_pointers(workdir, steps)
    # a last* pointer to a step that never committed loads the newest committed one; any other such
    # pointer, and a file that is no pointer, is refused by name
    loaded = json.loads((workdir / "pointers.json").read_text())
    assert loaded["last-v1.ckpt"] == STEPS, loaded
    assert loaded["epoch=9-step=21.ckpt"].startswith("CheckpointError: "), loaded
    assert f"step {STEPS + 1} was never committed" in loaded["epoch=9-step=21.ckpt"], loaded
    assert (
        loaded["plain.ckpt"].startswith("CheckpointError: ")
        and "is not a ckptd checkpoint pointer" in loaded["plain.ckpt"]
    )


def check_transformers(workdir: Path, steps: List[int]) -> None:
    """save_total_limit=2 became keep_last=2; the exported model loads with from_pretrained and
    computes the same logits as the trained one."""
    assert steps == [18, 20], steps
    assert not list((workdir / "job" / "hf").glob("checkpoint-*")), "the Trainer wrote a checkpoint folder itself"
    exported = torch.load(workdir / "export.pt", weights_only=False)
    assert exported["files"] == ["config.json", "model.safetensors"], exported["files"]
    assert torch.equal(exported["exported"], exported["trained"])
    check_transformers_best(workdir)


def check_transformers_best(workdir: Path) -> None:
    """load_best_model_at_end with metric_for_best_model and save_total_limit=1: the daemon kept the best
    step by that metric and the newest, the manifest holds the score, and the model the Trainer ends
    with is the best step's, loaded from ckptd, on every rank."""
    records = [torch.load(workdir / f"best.rank{rank}", weights_only=False) for rank in range(WORLD)]
    evaluations = records[0]["final"]["evaluations"]
    assert sorted(evaluations) == [2, 4, 6, BEST_STEPS], evaluations
    best = max(evaluations, key=lambda step: evaluations[step])  # greater_is_better=True
    assert best != BEST_STEPS, f"the best step is the newest, so keep-best is not seen apart: {evaluations}"
    root = workdir / "best" / "hf" / "ckptd"
    assert checkpoint_steps(str(root), with_manifest=True) == [best, BEST_STEPS]
    metrics = read_manifest(checkpoint_path(str(root), best)).metrics
    assert metrics["eval_loss"] == pytest.approx(evaluations[best]), metrics
    for rank, record in enumerate(records):
        assert_bitwise_equal(record["states"][best], record["final"]["model"], f"rank {rank}: the best model")
        assert not torch.equal(
            record["states"][BEST_STEPS]["model.embed_tokens.weight"],
            record["final"]["model"]["model.embed_tokens.weight"],
        ), f"rank {rank}: the model did not change after the best step"


def check_accelerate(workdir: Path, steps: List[int]) -> None:
    """No retention was asked for: every save step and the last are kept."""
    assert steps == [3, 6, 9, 12, 15, 18, 20], steps


def check_lightning_sharded(workdir: Path, steps: List[int]) -> None:
    """The pointers as for CkptdCheckpointIO; and one rank, resuming the 2-rank job's last checkpoint,
    holds the whole model and optimizer state the uninterrupted 2-rank run ended with."""
    check_lightning_pointers(workdir, steps)
    reference = torch.load(workdir / "reference.rank0", weights_only=False)["final"]
    resharded = torch.load(workdir / "reshard.rank0", weights_only=False)["final"]
    assert_bitwise_equal(reference, resharded, "loaded on 1 rank")


CHECKS = {
    "lightning": check_lightning,
    "lightning-sharded": check_lightning_sharded,
    "transformers": check_transformers,
    "accelerate": check_accelerate,
}
