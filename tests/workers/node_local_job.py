"""One rank of a job whose daemons keep node-local roots (tests/test_node_local.py), launched without
torchrun (env:// rendezvous; GROUP_RANK names the node).

Modes:
  save N    save steps 1..N, each waited for; every tensor is tagged with its step (and rank or node).
  load      fresh state of zeros, `load_checkpoint()` of the newest step, every tensor checked against
            its tag; writes {"step", "tier", "path"} to --out/load_rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import Holder

from ckptd.client import CheckpointManager, SharingPattern, StateComponent, assembly


def tagged_state(step: int, rank: int, node: int) -> Dict[str, Dict[str, Any]]:
    """Every component's state at `step`: each tensor holds a value only that step (and rank or node) has."""
    return {
        "model": {"w": torch.full((256,), float(step)), "b": torch.full((8,), step + 0.5)},
        "optimizer": {"m": torch.full((128,), step * 2.0), "lr": 0.1 * step},
        "rng": {"r": torch.full((16,), step * 100.0 + rank)},
        "node_cache": {"n": torch.full((8,), step * 1000.0 + node)},
    }


class Provider:
    def __init__(self, state: Dict[str, Dict[str, Any]]) -> None:
        self.holders = {key: Holder(value) for key, value in state.items()}

    def get_state_components(self) -> List[StateComponent]:
        patterns = {
            "model": SharingPattern.REPLICATED,
            "optimizer": SharingPattern.GLOBAL,
            "rng": SharingPattern.PER_RANK,
            "node_cache": SharingPattern.PER_NODE,
        }
        return [StateComponent(key, self.holders[key], pattern) for key, pattern in patterns.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("steps", type=int, nargs="?", default=0)
    parser.add_argument("--root", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--tier", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assembly.TRANSFER_CHUNK = 512  # files gathered from other nodes travel in many chunks, as large ones do
    dist.init_process_group("gloo")
    rank, node = dist.get_rank(), int(os.environ["GROUP_RANK"])
    provider = Provider(tagged_state(0, rank, node))
    manager = CheckpointManager(provider, args.root, endpoint=args.endpoint, auto_start=False, tiers=tuple(args.tier))
    if args.mode == "save":
        for step in range(1, args.steps + 1):
            for key, value in tagged_state(step, rank, node).items():
                provider.holders[key].value = value
            manager.save_checkpoint(step).wait(120)
    else:
        for holder in provider.holders.values():
            holder.value = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in holder.value.items()
            }
        loaded = manager.load_checkpoint()
        expected = tagged_state(loaded.step, rank, node)
        for key, state in expected.items():
            got = provider.holders[key].value
            assert got.keys() == state.keys(), (key, got.keys())
            for name, value in state.items():
                same = torch.equal(got[name], value) if isinstance(value, torch.Tensor) else got[name] == value
                assert same, f"rank {rank}: {key}.{name} is not step {loaded.step}'s: {got[name]!r}"
        result = {"step": loaded.step, "tier": loaded.tier, "path": str(loaded)}
        (Path(args.out) / f"load_rank{rank}.json").write_text(json.dumps(result))
    manager.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
