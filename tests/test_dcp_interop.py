"""torch.distributed.checkpoint.load reads a ckptd SHARDED component (ckptd.client.dcp): an FSDP2 job saved on
2 ranks through a real daemon loads bitwise in fresh jobs (gloo, CPU; helpers.torchrun) on 2 and 1 ranks, DCP doing
the resharding; its non-tensor state comes back without pickle; a tampered chunk, a default planner asked
for non-tensor values and a component DCP cannot read each give a clear error. One save and two torchrun
loads serve every test."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Union

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import torchrun
from safetensors.torch import load_file
from test_sharded import STEPS, assert_bitwise, save_job
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from ckptd.client.dcp import CkptdLoadPlanner, CkptdStorageReader
from ckptd.client.errors import CheckpointError
from ckptd.client.loading import read_manifest

WORKER = Path(__file__).parent / "workers" / "dcp_job.py"
SAVED_GROUP = {"lr": 0.01, "betas": [0.9, 0.999], "betas_type": "tuple", "weight_decay": 0.01, "foreach": None}
"""The AdamW param group fsdp_job saves (the DCP worker sets other values before it loads)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Step STEPS of an FSDP2 job on 2 ranks, saved through a real daemon, and a copy with one byte of a
    chunk in rank-00001's shard flipped."""
    saved = save_job(tmp_path_factory.mktemp("dcp"), 2, "fsdp")
    saved["checkpoint"] = saved["root"] / f"step_{STEPS:08d}"
    tampered = saved["root"].parent / "tampered"
    shutil.copytree(saved["checkpoint"], tampered)
    shard = tampered / read_manifest(str(tampered)).components["train"].scopes["rank-00001"].tensor_file.path
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last chunk's last byte
    shard.write_bytes(bytes(data))
    saved["tampered"] = tampered
    return saved


@pytest.fixture(scope="module")
def dcp_load(saved: Dict[str, Any]) -> Callable[[int], Dict[str, Any]]:
    """Runs tests/workers/dcp_job.py on `world` ranks (FSDP2) once per world size; its outputs (a failed
    run fails every test that asks for it, with its own error)."""
    runs: Dict[int, Union[Dict[str, Any], AssertionError]] = {}

    def run(world: int) -> Dict[str, Any]:
        if world not in runs:
            out = saved["root"].parent / f"dcp-load-{world}"
            out.mkdir()
            try:
                torchrun(
                    WORKER,
                    world,
                    "--checkpoint",
                    str(saved["checkpoint"]),
                    "--tampered",
                    str(saved["tampered"]),
                    "--layout",
                    "fsdp",
                    "--out",
                    str(out),
                )
            except AssertionError as failed:
                runs[world] = failed
            else:
                runs[world] = {
                    "full": load_file(str(out / "full_loaded.safetensors")),
                    "model_only": load_file(str(out / "model_only_loaded.safetensors")),
                    "reports": [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(world)],
                }
        result = runs[world]
        if isinstance(result, AssertionError):
            raise result
        return result

    return run


@pytest.mark.parametrize("world", [2, 1])
def test_dcp_load_restores_model_and_optimizer_bitwise(
    saved: Dict[str, Any], dcp_load: Callable[[int], Dict[str, Any]], world: int
) -> None:
    loaded = dcp_load(world)
    assert_bitwise(saved, loaded["full"])
    # the saved param_groups replaced the hyperparameters the worker set, with their Python types
    assert [report["param_group"] for report in loaded["reports"]] == [SAVED_GROUP] * world


@pytest.mark.parametrize("world", [2, 1])
def test_a_model_only_load_works_with_the_default_planner(
    saved: Dict[str, Any], dcp_load: Callable[[int], Dict[str, Any]], world: int
) -> None:
    model = dcp_load(world)["model_only"]
    full = load_file(str(saved["out"] / "full_saved.safetensors"))
    expected = {k: v for k, v in full.items() if k.startswith("model/")}
    assert set(model) == set(expected) and len(model) == 8
    assert all(torch.equal(model[k], expected[k]) for k in model)


@pytest.mark.parametrize("world", [2, 1])
def test_the_default_planner_is_refused_non_tensor_values(
    dcp_load: Callable[[int], Dict[str, Any]], world: int
) -> None:
    for report in dcp_load(world)["reports"]:
        error = report["default_planner_error"]
        assert error is not None and error["types"] == ["CheckpointError"], error
        assert "planner=CkptdLoadPlanner()" in error["message"] and "pickle" in error["message"], error
        assert "optim.param_groups.0.lr" in error["message"], error


@pytest.mark.parametrize("world", [2, 1])
def test_a_tampered_chunk_is_named_and_the_load_refused(dcp_load: Callable[[int], Dict[str, Any]], world: int) -> None:
    for report in dcp_load(world)["reports"]:
        error = report["tampered_error"]
        assert error is not None and error["types"] == ["VerificationError"], error
        assert "tampered/train/rank-00001.safetensors: chunk" in error["message"], error
        assert "checksum" in error["message"], error


def dcp_name(full_name: str) -> str:
    """The DCP key of a tensor of full_saved.safetensors (whose optimizer names skip "state")."""
    if full_name.startswith("optim/"):
        full_name = "optim/state/" + full_name[len("optim/") :]
    return full_name.replace("/", ".")


def test_metadata_names_tensors_as_dcp_flattens_them(saved: Dict[str, Any]) -> None:
    metadata = CkptdStorageReader(saved["checkpoint"], "train").read_metadata()
    entries = metadata.state_dict_metadata
    full = load_file(str(saved["out"] / "full_saved.safetensors"))
    tensors = {fqn for fqn, entry in entries.items() if isinstance(entry, TensorStorageMetadata)}
    fqns = {dcp_name(name): tensor for name, tensor in full.items()}
    assert tensors == set(fqns)
    for fqn, tensor in fqns.items():
        entry = entries[fqn]
        assert isinstance(entry, TensorStorageMetadata)
        assert entry.size == tensor.shape and entry.properties.dtype == tensor.dtype
    embed = entries["model.embed.weight"]
    assert isinstance(embed, TensorStorageMetadata)
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in embed.chunks] == [((0, 0), (19, 10)), ((19, 0), (18, 10))]
    assert metadata.storage_data[MetadataIndex("model.embed.weight", (19, 0))].file == "train/rank-00001.safetensors"
    others = {fqn for fqn, entry in entries.items() if isinstance(entry, BytesStorageMetadata)}
    assert "optim.param_groups.0.betas" in others and "optim.param_groups.0.params" in others
    assert all(fqn.startswith("optim.param_groups.0.") for fqn in others)
    assert set(entries) == tensors | others
    assert metadata.planner_data["optim.param_groups.0.lr"] == ("optim", "param_groups", 0, "lr")
    assert metadata.planner_data["optim.state.up.weight.exp_avg"] == ("optim", "state", "up.weight", "exp_avg")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_one_process_loads_the_whole_state_into_plain_tensors(saved: Dict[str, Any]) -> None:
    """Without a process group (no_dist), into plain tensors laid out from the metadata: what an offline
    conversion does."""
    reader = CkptdStorageReader(saved["checkpoint"], "train")
    metadata = reader.read_metadata()
    state: Dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        empty = (
            torch.full(entry.size, -1.0, dtype=entry.properties.dtype)
            if isinstance(entry, TensorStorageMetadata)
            else None
        )
        set_element(state, metadata.planner_data[fqn], empty)
    dcp.load(state, storage_reader=reader, planner=CkptdLoadPlanner(), no_dist=True)
    flat = {f"model/{k}": v for k, v in state["model"].items()}
    flat.update({f"optim/{p}/{k}": v for p, s in state["optim"]["state"].items() for k, v in s.items()})
    assert_bitwise(saved, flat)
    group = state["optim"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and type(group["betas"]) is tuple
    assert group["foreach"] is None and group["amsgrad"] is False and group["lr"] == 0.01
    assert group["params"] == [
        "embed.weight",
        "up.weight",
        "up.bias",
        "down.weight",
        "down.bias",
        "norm.weight",
        "norm.bias",
    ]


def test_a_component_that_is_not_sharded_is_refused(saved: Dict[str, Any]) -> None:
    with pytest.raises(CheckpointError, match="'data'.* is PER_RANK, not sharded.*CheckpointManager"):
        CkptdStorageReader(saved["checkpoint"], "data")


def test_a_missing_component_is_named(saved: Dict[str, Any]) -> None:
    with pytest.raises(CheckpointError, match=r"no component 'model'; it holds \['data', 'train'\]"):
        CkptdStorageReader(saved["checkpoint"], "model")


def test_checkpoint_ids_are_checkpoint_directories(saved: Dict[str, Any]) -> None:
    assert CkptdStorageReader.validate_checkpoint_id(saved["checkpoint"])
    assert not CkptdStorageReader.validate_checkpoint_id(saved["root"])  # a root, not a checkpoint


def test_the_planner_decodes_only_ckptd_values() -> None:
    planner = CkptdLoadPlanner()
    index = MetadataIndex("optim.param_groups.0.lr")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
    with pytest.raises(CheckpointError, match="not a ckptd-encoded value"):
        planner.load_bytes(item, io.BytesIO(b"PK\x03\x04 a zip file, as torch.save writes"))
