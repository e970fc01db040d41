"""A small multi-rank training job run under torchrun by the tests.

Modes:
  save      train a few steps (DDP, AdamW, LR scheduler), save twice without waiting, record
            what was saved (and the next RNG draws) as a reference for the load phase.
  load      fresh processes with different initial state: load each saved step, compare
            bitwise with the reference, check every RNG stream continues identically.
  diverge   save once cleanly, then let rank 1's REPLICATED copy differ in one element (and,
            next, in one non-tensor value): every rank's save must fail; `latest` stays.
  lose-node save step 1, then hand over step 2 (with a large PER_RANK extra, so that writing takes
            a while) and mark it in --out; the test kills a node's daemon meanwhile: every rank's
            handle must raise CheckpointError, and step 1 must still load.

--pair-stride S: the PER_GROUP "pair" groups are {r, r+S}: 1 keeps pairs on one node of two ranks,
2 makes them span two nodes. --spread: the model (REPLICATED) is split across the nodes' daemons.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fidelity_cases import assert_state_equal

from ckptd.client import CheckpointError, CheckpointManager, RNGState, SharingPattern, StateComponent


class CountingLoader:
    """Dataloader-like stateful: a per-rank stream of batches with a resumable position."""

    def __init__(self, rank: int, seed: int) -> None:
        self.rank, self.seed, self.position, self.epoch = rank, seed, 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.rank * 100 + self.position)
        self.position += 1
        return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "rank": self.rank,
            "seed": self.seed,
            "position": self.position,
            "epoch": self.epoch,
            "order": tuple(range(self.position)),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rank, self.seed, self.position, self.epoch = (
            state["rank"],
            state["seed"],
            state["position"],
            state["epoch"],
        )


class Holder:
    """Stateful around a plain state dict."""

    def __init__(self, value: Dict[str, Any]) -> None:
        self.value = value

    def state_dict(self) -> Dict[str, Any]:
        return self.value

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.value = state


class Trainer:
    """Declares its state the way users do: `get_state_components()` and `get_process_groups()`."""

    def __init__(self, rank: int, world: int, init_seed: int, pair_stride: int = 1, spread: bool = False) -> None:
        self.rank = rank
        self.spread = spread
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.loader = CountingLoader(rank, seed=init_seed)
        self.rng = RNGState()
        members = [(r, r + pair_stride) for r in range(world) if (r // pair_stride) % 2 == 0]
        groups = [dist.new_group(list(pair)) for pair in members]
        mine = next(i for i, pair in enumerate(members) if rank in pair)
        self.pair_group = groups[mine]
        first = members[mine][0]
        self.pair_state = Holder({"members": members[mine], "table": torch.full((3, 2), float(first) + init_seed)})
        self.extra: Dict[str, Any] = {}
        self.node_state = Holder(
            {"hostname_hash": 12345 + init_seed, "cache": torch.arange(5, dtype=torch.int64) * init_seed}
        )
        self.trainer_state = Holder({"step": 0, "lr_history": [], "best_loss": float("inf")})

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent(
                "model", self.model, SharingPattern.REPLICATED, validate_replication=True, spread=self.spread
            ),
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("dataloader", self.loader, SharingPattern.PER_RANK),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
            StateComponent("pair_state", self.pair_state, SharingPattern.PER_GROUP, process_group_name="pair"),
            StateComponent("node_cache", self.node_state, SharingPattern.PER_NODE),
            StateComponent("trainer", self.trainer_state, SharingPattern.GLOBAL),
        ] + [StateComponent("extra", Holder(self.extra), SharingPattern.PER_RANK)] * bool(self.extra)

    def get_process_groups(self) -> Dict[str, Any]:
        return {"pair": self.pair_group}

    def train_step(self) -> float:
        x, y = self.loader.next_batch()
        x = x + 0.01 * torch.randn_like(x)  # consumes the torch RNG stream like dropout would
        loss = nn.functional.mse_loss(self.ddp(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        state = self.trainer_state.value
        state["step"] += 1
        state["lr_history"].append(self.scheduler.get_last_lr()[0])
        state["best_loss"] = min(state["best_loss"], 1.0)  # identical on every rank (GLOBAL)
        return float(loss)

    def snapshot(self) -> Dict[str, Any]:
        """Deep copies of every component's state, as saved."""
        return {c.key: copy.deepcopy(c.stateful.state_dict()) for c in self.get_state_components() if c.key != "rng"}


def rng_draws() -> Dict[str, Any]:
    return {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(3).tolist(),
    }


def run_save(args: argparse.Namespace, rank: int, world: int) -> Dict[str, Any]:
    trainer = Trainer(rank, world, init_seed=0, pair_stride=args.pair_stride, spread=args.spread)
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(100 + rank)
    references: Dict[int, Any] = {}
    handles = []
    blocked = []
    with CheckpointManager(trainer, args.root, endpoint=args.endpoint, auto_start=args.endpoint is None) as manager:
        for step in range(1, 5):
            trainer.train_step()
            if step in (3, 4):
                start = time.perf_counter()
                handles.append(manager.save_checkpoint(step))
                blocked.append(time.perf_counter() - start)
                references[step] = {"state": trainer.snapshot(), "draws": rng_draws()}
        paths = [h.wait(120) for h in handles]
    torch.save(references, Path(args.out) / f"reference_rank{rank}.pt")
    return {"paths": paths, "blocked_s": blocked}


def run_load(args: argparse.Namespace, rank: int, world: int) -> Dict[str, Any]:
    trainer = Trainer(rank, world, init_seed=7, pair_stride=args.pair_stride, spread=args.spread)
    references = torch.load(Path(args.out) / f"reference_rank{rank}.pt", weights_only=False)
    manager = CheckpointManager(trainer, args.root, connect=False)
    checked = []
    for step, path in ((3, os.path.join(args.root, "step_00000003")), (4, None)):
        loaded = manager.load_checkpoint(path)
        assert loaded.endswith(f"step_{step:08d}"), loaded
        reference = references[step]
        assert_state_equal(rng_draws(), reference["draws"], path=f"step {step} rng draws")
        for key, expected in reference["state"].items():
            actual = next(c.stateful for c in trainer.get_state_components() if c.key == key).state_dict()
            assert_state_equal(expected, actual, path=f"step {step} {key}")
            checked.append(f"{step}/{key}")
        checked.append(f"{step}/rng")
    return {"checked": checked}


def run_diverge(args: argparse.Namespace, rank: int, world: int) -> Dict[str, Any]:
    trainer = Trainer(rank, world, init_seed=0, pair_stride=args.pair_stride, spread=args.spread)
    errors: Dict[str, str] = {}
    with CheckpointManager(trainer, args.root, endpoint=args.endpoint, auto_start=False) as manager:
        trainer.train_step()
        first = manager.save_checkpoint(1).wait(120)
        trainer.train_step()
        exp_avg = trainer.optimizer.state[trainer.model[2].weight]["exp_avg"]
        original = exp_avg[1, 3].item()
        if rank == 1:
            exp_avg[1, 3] = original + 1e-3
        try:
            manager.save_checkpoint(2).wait(120)
        except CheckpointError as exc:
            errors["tensor"] = str(exc)
        if rank == 1:
            exp_avg[1, 3] = original
            trainer.optimizer.param_groups[0]["weight_decay"] = 0.5
        try:
            manager.save_checkpoint(3).wait(120)
        except CheckpointError as exc:
            errors["state"] = str(exc)
    return {"first": first, "errors": errors, "latest": manager.latest_checkpoint()}


def run_lose_node(args: argparse.Namespace, rank: int, world: int) -> Dict[str, Any]:
    trainer = Trainer(rank, world, init_seed=0, pair_stride=args.pair_stride, spread=args.spread)
    result: Dict[str, Any] = {}
    # daemon_timeout: the ranks of the node whose daemon is killed settle its save after 3 s (the
    # default 10 s only makes the test wait)
    with CheckpointManager(trainer, args.root, endpoint=args.endpoint, auto_start=False, daemon_timeout=3.0) as manager:
        trainer.train_step()
        result["first"] = manager.save_checkpoint(1).wait(120)
        trainer.train_step()
        trainer.extra["blob"] = torch.randn(4 * 2**20 // 4)  # 4 MiB per rank: slow behind a throttled daemon
        handle = manager.save_checkpoint(2)
        (Path(args.out) / f"handed_over_rank{rank}").touch()
        try:
            result["second"] = handle.wait(120)
        except CheckpointError as exc:
            result["error"] = str(exc)
        trainer.extra.clear()
        result["latest"] = manager.latest_checkpoint()
    result["loaded"] = CheckpointManager(trainer, args.root, connect=False).load_checkpoint()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "diverge", "lose-node"])
    parser.add_argument("--pair-stride", type=int, default=1)
    parser.add_argument("--spread", action="store_true", help="the model's REPLICATED copy is spread across nodes")
    parser.add_argument("--root", required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"save": run_save, "load": run_load, "diverge": run_diverge, "lose-node": run_lose_node}[args.mode](
        args, rank, world
    )
    dist.barrier()
    dist.destroy_process_group()
    (Path(args.out) / f"{args.mode}_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
