"""Loads a ckptd SHARDED checkpoint with torch.distributed.checkpoint.load, under torchrun (gloo, CPU), for
tests/test_dcp_interop.py.

The checkpoint is one tests/workers/fsdp_job.py saved: component "train" holds {"model": ..., "optim": ...}
as get_state_dict returns them. Each rank builds fresh models (another seed) on --layout and, in order:
  1. loads model and optimizer state through DCP with CkptdStorageReader and CkptdLoadPlanner, after
     setting other hyperparameters on AdamW (the saved param_groups must replace them), and writes
     the full state (gathered with full_state_dict=True) to <out>/full_loaded.safetensors (rank 0);
  2. loads the model state only with DCP's default planner into another fresh model, and writes its
     full state to <out>/model_only_loaded.safetensors (rank 0);
  3. tries model and optimizer state with the default planner (the param_groups are non-tensor values);
  4. with --tampered, tries that checkpoint (a chunk altered after the save).
Each rank writes its loaded param_groups and the errors of 3 and 4 to <out>/report_rank<R>.json.
(fsdp_job imports as a plain module: torchrun runs this script with its folder first on sys.path.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsdp_job import build, full_state, leave
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ckptd.client.dcp import CkptdLoadPlanner, CkptdStorageReader
from ckptd.client.errors import CheckpointError


def error_of(load: Callable[[], None]) -> Optional[Dict[str, Any]]:
    """The failure of a DCP load (its message and the exception types each rank raised), or None."""
    try:
        load()
    except CheckpointException as exc:
        types = sorted({type(failure[0]).__name__ for failure in exc.failures.values()})
        return {"message": str(exc), "types": types}
    except CheckpointError as exc:
        return {"message": str(exc), "types": [type(exc).__name__]}
    return None


def load_whole(checkpoint: str, layout: str, rank: int, out: Path) -> Dict[str, Any]:
    model, optim = build(layout, 1000 + rank)
    for group in optim.param_groups:  # the load must bring back the saved hyperparameters
        group.update(lr=0.5, betas=(0.5, 0.6), weight_decay=0.25)
    model_sd, optim_sd = get_state_dict(model, optim)  # creates AdamW's state, as a resuming trainer does
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=CkptdStorageReader(checkpoint, "train"), planner=CkptdLoadPlanner())
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = full_state(model, optim)
    if rank == 0:
        save_file(full, str(out / "full_loaded.safetensors"))
    group = optim.param_groups[0]
    return {
        "lr": group["lr"],
        "betas": list(group["betas"]),
        "betas_type": type(group["betas"]).__name__,
        "weight_decay": group["weight_decay"],
        "foreach": group["foreach"],
    }


def load_model_only(checkpoint: str, layout: str, rank: int, out: Path) -> None:
    model, _ = build(layout, 2000 + rank)
    model_sd = get_model_state_dict(model)
    dcp.load({"model": model_sd}, storage_reader=CkptdStorageReader(checkpoint, "train"))
    set_model_state_dict(model, model_sd)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file(
            {f"model/{k}": v.detach().clone().contiguous() for k, v in full.items()},
            str(out / "model_only_loaded.safetensors"),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tampered")
    parser.add_argument("--layout", default="fsdp")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out)
    report: Dict[str, Any] = {"param_group": load_whole(args.checkpoint, args.layout, rank, out)}
    load_model_only(args.checkpoint, args.layout, rank, out)

    model, optim = build(args.layout, 3000 + rank)
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    report["default_planner_error"] = error_of(
        lambda: dcp.load(state, storage_reader=CkptdStorageReader(args.checkpoint, "train"))
    )
    if args.tampered:
        report["tampered_error"] = error_of(
            lambda: dcp.load(
                state, storage_reader=CkptdStorageReader(args.tampered, "train"), planner=CkptdLoadPlanner()
            )
        )
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    leave()


if __name__ == "__main__":
    main()
