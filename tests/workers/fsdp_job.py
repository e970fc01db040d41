"""A sharded training job run under torchrun (gloo, CPU) by tests/test_sharded.py.

The model is a tiny language model with a tied embedding and dimensions that the meshes do not divide
(vocabulary 37, width 10). Its state and AdamW's go in one SHARDED component, as
`torch.distributed.checkpoint.state_dict.get_state_dict` returns them; a PER_RANK "data" component
holds each rank's position in an interleaved sample stream and reshards to another world size.

Modes:
  save   build the model on --layout, train --steps steps, save the last step, wait for the commit, and
         write the full state (gathered with full_state_dict=True) to <out>/full_saved.safetensors
         (rank 0) and each rank's next sample index to <out>/save_rank<R>.json.
  load   build a fresh model (another seed) on --layout, load `latest`, write the full state to
         <out>/full_loaded.safetensors (rank 0) and each rank's next sample index to
         <out>/load_rank<R>.json.
  train  train --steps steps, saving every step (--overlap: in overlap mode; --keep-last: with
         retention); with --resume, load `latest` first and go on from its step. Each step's loss goes
         to <out>/losses_rank0.jsonl.
  dtensor-in-global
         put a DTensor in a GLOBAL component and record the error save_checkpoint raises.

--spread adds "tables", four tensors REPLICATED and spread over the nodes (load records whether they
came back).

Layouts: fsdp (FSDP2 over every rank), hsdp (FSDP2 on a 2 x N/2 mesh: replicate x shard), fsdp-tp (a
2 x N/2 mesh: FSDP2 over dp, tensor parallel over tp), plain (no sharding; one process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NoReturn

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ckptd.client import CheckpointError, CheckpointManager, RetentionPolicy, SharingPattern, StateComponent
from ckptd.proto.topology import Topology

VOCAB, WIDTH, HIDDEN = 37, 10, 22


class TinyLM(nn.Module):
    """Embedding -> MLP -> LM head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(self.norm(x))


class TrainState:
    """Model and optimizer as one Stateful, through DCP's state-dict helpers (keyed by parameter name)."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> Dict[str, Any]:
        model, optim = get_state_dict(self.model, self.optim)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_state_dict(self.model, self.optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


class InterleavedSamples:
    """Rank r of w draws global sample indices start + r, start + r + w, ... (a sampler's position)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.start, self.drawn = rank, world, 0, 0

    def next_index(self) -> int:
        index = self.start + self.drawn * self.world + self.rank
        self.drawn += 1
        return index

    def peek(self) -> int:
        return self.start + self.drawn * self.world + self.rank

    def state_dict(self) -> Dict[str, Any]:
        return {"start": self.start, "drawn": self.drawn, "world": self.world}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.start, self.drawn = state["start"], state["drawn"]


class Tables:
    """Four tensors identical on every rank (REPLICATED, spread over the nodes): arange-filled when
    saved, zeros before a load, so a load shows whether it restored them."""

    def __init__(self, filled: bool) -> None:
        self.tables = {f"t{i}": torch.arange(1000 * (i + 1), dtype=torch.float32) * float(filled) for i in range(4)}

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.tables)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, tensor in state.items():
            self.tables[name].copy_(tensor)

    def restored(self) -> bool:
        return all(torch.equal(t, Tables(True).tables[n]) for n, t in self.tables.items())


def reshard_samples(saved: List[Dict[str, Any]], old: Topology, new: Topology, rank: int) -> Dict[str, Any]:
    """Every old rank drew the same count: the stream goes on at the first index nobody drew."""
    consumed = max(s["start"] + s["drawn"] * s["world"] for s in saved)
    return {"start": consumed, "drawn": 0, "world": new.world_size}


def build(layout: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    world = dist.get_world_size()
    if layout == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif layout == "hsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    elif layout == "fsdp-tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    elif layout != "plain":
        raise SystemExit(f"unknown layout {layout}")
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optim


def train_step(model: nn.Module, optim: torch.optim.Optimizer, samples: InterleavedSamples) -> float:
    index = samples.next_index()
    tokens = torch.Generator().manual_seed(index)
    batch = torch.randint(0, VOCAB, (4, 6), generator=tokens)
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    loss.backward()
    optim.step()
    optim.zero_grad()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    return float(reduced) / dist.get_world_size()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state, whole, flattened to names (rank 0; {} elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optim, options=options)
    flat = {f"model/{k}": v for k, v in model_sd.items()}
    for fqn, state in optim_sd.get("state", {}).items():
        for name, value in state.items():
            flat[f"optim/{fqn}/{name}"] = value
    return {k: v.detach().clone().contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def components(state: TrainState, samples: InterleavedSamples, split: bool) -> List[StateComponent]:
    """One SHARDED component for model and optimizer (DCP's state-dict helpers), or with `split` the
    module and the optimizer themselves as two (so that overlap mode defers copying their tensors)."""
    data = StateComponent("data", samples, SharingPattern.PER_RANK, reshard=reshard_samples)
    if split:
        return [
            StateComponent("model", state.model, SharingPattern.SHARDED),
            StateComponent("optim", state.optim, SharingPattern.SHARDED),
            data,
        ]
    return [StateComponent("train", state, SharingPattern.SHARDED), data]


class Provider:
    def __init__(self, parts: List[StateComponent]) -> None:
        self.parts = parts

    def get_state_components(self) -> List[StateComponent]:
        return self.parts


def leave() -> NoReturn:
    """Tear the process groups down and exit 0 without the interpreter's teardown: objects torch
    caches after FSDP2 (device meshes and their gloo groups) are destroyed there, and about one run in
    fifty aborted ("terminate called without an active exception"; see
    examples/example_support.leave_after_fsdp)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "train", "dtensor-in-global"])
    parser.add_argument("--layout", default="fsdp")
    parser.add_argument("--root", required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--split", action="store_true", help="model and optimizer as two SHARDED components")
    parser.add_argument("--overlap", action="store_true", help="save_checkpoint(overlap=True)")
    parser.add_argument("--keep-last", type=int, default=0, help="retention: keep the newest N (0: all)")
    parser.add_argument("--spread", action="store_true", help="add a REPLICATED component spread over the nodes")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    seed = 0 if args.mode in ("save", "train") else 1000 + rank
    model, optim = build(args.layout, seed)
    if args.layout == "fsdp-tp":  # the ranks of a tensor-parallel group read the same samples
        samples = InterleavedSamples(rank // (world // 2), 2)
    else:
        samples = InterleavedSamples(rank, world)
    provider = Provider(components(TrainState(model, optim), samples, args.split))
    tables = Tables(filled=args.mode != "load")
    if args.spread:
        provider.parts.append(StateComponent("tables", tables, SharingPattern.REPLICATED, spread=True))
    connect = args.mode != "load"
    options: Dict[str, Any] = {"endpoint": args.endpoint, "auto_start": False} if connect else {"connect": False}
    if args.keep_last:
        options["retention"] = RetentionPolicy(keep_last=args.keep_last)

    if args.mode == "save":
        with CheckpointManager(provider, args.root, **options) as manager:
            for _ in range(args.steps):
                train_step(model, optim, samples)
            manager.save_checkpoint(args.steps).wait(120)
        full = full_state(model, optim)
        if rank == 0:
            save_file(full, str(out / "full_saved.safetensors"))
        (out / f"save_rank{rank}.json").write_text(json.dumps({"next_index": samples.peek()}))
    elif args.mode == "load":
        optim_state_ready = get_state_dict(model, optim)  # creates AdamW's state, as a resuming trainer does
        del optim_state_ready
        loaded = CheckpointManager(provider, args.root, **options).load_checkpoint()
        full = full_state(model, optim)
        if rank == 0:
            save_file(full, str(out / "full_loaded.safetensors"))
        result = {"next_index": samples.peek(), "path": loaded, "tables_restored": tables.restored()}
        (out / f"load_rank{rank}.json").write_text(json.dumps(result))
    elif args.mode == "train":
        with CheckpointManager(provider, args.root, **options) as manager:
            first = 1
            if args.resume:
                get_state_dict(model, optim)
                path = manager.load_checkpoint()
                first = int(os.path.basename(path).split("_")[1]) + 1
            handles = []
            with open(out / "losses_rank0.jsonl", "a") as log:
                for step in range(first, args.steps + 1):
                    loss = train_step(model, optim, samples)
                    if rank == 0:
                        log.write(json.dumps({"step": step, "loss": loss}) + "\n")
                        log.flush()
                    handles.append(manager.save_checkpoint(step, overlap=args.overlap))
            with open(out / f"planned_rank{rank}.jsonl", "a") as log:  # which saves reused their save plan
                for handle in handles:
                    handle.wait(120)
                    log.write(json.dumps({"step": handle.step, "planned": handle.planned}) + "\n")
    else:
        bad = Provider([StateComponent("model", model, SharingPattern.GLOBAL)])
        error = ""
        with CheckpointManager(bad, args.root, **options) as manager:
            try:
                manager.save_checkpoint(1)
            except CheckpointError as exc:
                error = f"{type(exc).__name__}: {exc}"
        (out / f"error_rank{rank}.json").write_text(json.dumps({"error": error}))
    leave()


if __name__ == "__main__":
    main()
