"""Real multi-rank jobs (gloo; ranks with torchrun's environment, tests/helpers.py torchrun): save with
every sharing pattern, reload bitwise, check the files on disk, and refuse a checkpoint whose
REPLICATED copies differ."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest
from helpers import start_daemon, torchrun
from safetensors import safe_open

from ckptd.client.loading import read_manifest, verify_file

WORKER = Path(__file__).parent / "workers" / "train_job.py"


def _results(out: Path, mode: str, world: int) -> Dict[int, Any]:
    return {r: json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(world)}


def _run_with_daemon(base: Path, mode: str, world: int) -> Dict[int, Any]:
    """Start a daemon for base/ckpt, run the worker in `mode` on `world` ranks, return each rank's result."""
    root, out = base / "ckpt", base / "out"
    out.mkdir()
    daemon = start_daemon(root, base / "daemon.log")
    try:
        torchrun(WORKER, world, mode, "--root", str(root), "--endpoint", daemon.endpoint, "--out", str(out))
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    return _results(out, mode, world)


@pytest.fixture(scope="module")
def four_rank_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A 4-rank job that trained under AdamW + StepLR and saved steps 3 and 4 without waiting."""
    base = tmp_path_factory.mktemp("four_rank")
    saved = _run_with_daemon(base, "save", 4)
    return {"root": base / "ckpt", "out": base / "out", "saved": saved}


def test_fresh_processes_load_every_component_bitwise(four_rank_checkpoints: Dict[str, Any]) -> None:
    root, out = four_rank_checkpoints["root"], four_rank_checkpoints["out"]
    for rank, result in four_rank_checkpoints["saved"].items():
        assert [os.path.basename(p) for p in result["paths"]] == ["step_00000003", "step_00000004"], rank
    torchrun(WORKER, 4, "load", "--root", str(root), "--out", str(out))
    loaded = _results(out, "load", 4)
    components = {"model", "optimizer", "scheduler", "dataloader", "rng", "pair_state", "node_cache", "trainer"}
    for rank in range(4):
        assert set(loaded[rank]["checked"]) == {f"{s}/{c}" for s in (3, 4) for c in components}, rank


def test_files_on_disk_follow_the_dedup_table(four_rank_checkpoints: Dict[str, Any]) -> None:
    root = four_rank_checkpoints["root"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    expected_scopes = {
        "model": {"global"},
        "optimizer": {"global"},
        "scheduler": {"global"},
        "trainer": {"global"},
        "dataloader": {f"rank-{r:05d}" for r in range(4)},
        "rng": {f"rank-{r:05d}" for r in range(4)},
        "pair_state": {"group-pair-00000", "group-pair-00002"},
        "node_cache": {"node-00000"},
    }
    for step in (3, 4):
        directory = root / f"step_{step:08d}"
        manifest = read_manifest(str(directory))
        assert manifest.step == step and manifest.topology.world_size == 4
        assert manifest.groups == {"pair": [[0, 1], [2, 3]]}
        assert {k: set(c.scopes) for k, c in manifest.components.items()} == expected_scopes
        assert manifest.components["pair_state"].scopes["group-pair-00002"].readers == [2, 3]
        assert manifest.components["model"].scopes["global"].readers == [0, 1, 2, 3]
        listed = {f.path for f in manifest.files()}
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        assert on_disk == listed | {"checkpoint_manifest.json"}
        for record in manifest.files():
            path = verify_file(str(directory), record)
            assert os.path.getsize(path) == record.size
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as shard:
                    assert set(shard.keys()) == set(record.tensors)
                    for name in shard.keys():
                        assert list(shard.get_tensor(name).shape) == record.tensors[name]["shape"]
        assert manifest.versions["torch"] and manifest.versions["ckptd"]
        assert manifest.timings["total_s"] > 0


def test_replication_mismatch_fails_every_rank_and_keeps_latest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for rank, result in _run_with_daemon(tmp_path, "diverge", 2).items():
        tensor_error, state_error = result["errors"].get("tensor"), result["errors"].get("state")
        assert tensor_error and state_error, (rank, result)
        assert "'optimizer'" in tensor_error and "'state/2/exp_avg'" in tensor_error and "[1]" in tensor_error
        assert "'optimizer'" in state_error and "non-tensor state" in state_error and "[1]" in state_error
        assert result["latest"].endswith("step_00000001")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
