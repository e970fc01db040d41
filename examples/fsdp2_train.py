"""FSDP2 training on CPU (gloo) with asynchronous SHARDED checkpoints through ckptd, resumable at
another world size.

Run it with two ranks, kill it, and resume on two or on four:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/fsdp2_train.py --crash-at 12
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        examples/fsdp2_train.py --resume

The model is a small language model sharded with `fully_shard` (FSDP2): its parameters and AdamW's
moments are DTensors, each rank holding a row block of every tensor. What is saved, and how (see
`Trainer.get_state_components`):

- model: the FSDP2 module itself, SHARDED. Each rank writes the chunks it holds; a resumed job of
  any size reads only the parts of the saved chunks that overlap what it holds now.
- optimizer: SHARDED, keyed by parameter name through `get_optimizer_state_dict` /
  `set_optimizer_state_dict` (`OptimizerState`), so it reshards like the model.
- data: PER_RANK. Rank r of W trains on global samples r, r + W, r + 2W, ...; at another world size
  `reshard_samples` starts every rank after the last sample the old job drew, so no sample is
  trained twice or skipped.
- trainer: the step counter and loss history, GLOBAL.

Local rank 0 starts the node's daemon if none answers; it exits on its own once idle. The common
options, the crash and the `--record` file come from example_support.py, next to this file;
`--record FILE` writes each rank's (step, loss) pairs and trained sample ids, and at the end the full
model and optimizer state (gathered with full_state_dict=True on rank 0).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from example_support import (  # options, --crash-at, --record
    Recorder,
    Say,
    crash,
    example_parser,
    leave_after_fsdp,
    rank0_say,
    report,
)
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptd.client import CheckpointManager, SaveHandle, SharingPattern, StateComponent, Topology

VOCAB, WIDTH, LAYERS, CONTEXT = 1000, 256, 4, 32
SAMPLES_PER_STEP = 4  # per rank


class TinyLM(nn.Module):
    """Embedding, a stack of MLP blocks, and an output layer; about 2.5M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
            for _ in range(LAYERS)
        )
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class OptimizerState:
    """The optimizer's state keyed by parameter name (DCP's helpers), so it loads at another sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> Dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class InterleavedSamples:
    """Rank r of W trains on global samples start + r, start + r + W, ... (sample k: a pure function of k)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.start, self.drawn = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, List[int]]:
        """The next SAMPLES_PER_STEP samples of this rank, and their global ids."""
        ids = []
        for _ in range(SAMPLES_PER_STEP):
            ids.append(self.start + self.drawn * self.world_size + self.rank)
            self.drawn += 1
        tokens = [torch.randint(0, VOCAB, (CONTEXT + 1,), generator=torch.Generator().manual_seed(k)) for k in ids]
        return torch.stack(tokens), ids

    def state_dict(self) -> Dict[str, Any]:
        return {"start": self.start, "drawn": self.drawn, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.start, self.drawn = state["start"], state["drawn"]


def reshard_samples(saved: List[Dict[str, Any]], old: Topology, new: Topology, rank: int) -> Dict[str, Any]:
    """The saved positions of every old rank -> this rank's at the new world size: go on after the
    highest sample id any old rank was to draw next (each drew as many as the others)."""
    resume_at = max(s["start"] + s["drawn"] * s["world_size"] for s in saved)
    return {"start": resume_at, "drawn": 0, "world_size": new.world_size}


class TrainerState:
    """Step counter and loss history (GLOBAL: rank 0's copy is saved, every rank loads it)."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: List[float] = []

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.losses = state["step"], list(state["losses"])


class Trainer:
    """Owns the training state and declares it to ckptd through `get_state_components()`."""

    def __init__(self, rank: int, world_size: int) -> None:
        torch.manual_seed(0)  # the same initial weights on every rank; fully_shard keeps each rank's rows
        self.model = TinyLM()
        for block in self.model.blocks:
            fully_shard(block, mesh=init_device_mesh("cpu", (world_size,)))
        fully_shard(self.model, mesh=init_device_mesh("cpu", (world_size,)))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.data = InterleavedSamples(rank, world_size)
        self.state = TrainerState()

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        return [
            StateComponent("model", self.model, SharingPattern.SHARDED),
            StateComponent("optimizer", OptimizerState(self.model, self.optimizer), SharingPattern.SHARDED),
            StateComponent("data", self.data, SharingPattern.PER_RANK, reshard=reshard_samples),
            StateComponent("trainer", self.state, SharingPattern.GLOBAL),
        ]

    def train_step(self) -> tuple[float, List[int]]:
        """One optimizer step on the next batch; returns the loss averaged over ranks and the sample ids."""
        tokens, ids = self.data.next_batch()
        logits = self.model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        self.state.step += 1
        self.state.losses.append(mean.item() / dist.get_world_size())
        return self.state.losses[-1], ids

    def full_state(self) -> Dict[str, Any]:
        """The whole model and optimizer state on rank 0 (empty elsewhere), for --record."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optimizer = get_state_dict(self.model, self.optimizer, options=options)
        return {"full_model": model, "full_optimizer": optimizer}


def resume(manager: CheckpointManager, trainer: Trainer, say: Say) -> None:
    """Load the newest checkpoint, whatever world size saved it."""
    latest = manager.latest_checkpoint()
    if latest is None:
        say(f"nothing to resume under {os.path.relpath(manager.root)}; starting at step 0")
        return
    get_optimizer_state_dict(trainer.model, trainer.optimizer)  # creates AdamW's state, for ckptd to fill
    path = manager.load_checkpoint()
    saved_world = manager.saved_topology(path).world_size
    say(
        f"resumed at step {trainer.state.step} from {os.path.relpath(path)} "
        f"(saved by {saved_world} ranks, now {dist.get_world_size()})"
    )


def main() -> None:
    parser = example_parser("FSDP2 training with asynchronous SHARDED ckptd checkpoints.", "./fsdp2_checkpoints", 24, 4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say = rank0_say()

    trainer = Trainer(rank, dist.get_world_size())
    manager = CheckpointManager(trainer, args.root, auto_start=True)  # local rank 0 starts the daemon if needed
    if args.resume:
        resume(manager, trainer, say)
    recorder = Recorder(args.record, rank, {"start_step": trainer.state.step, "steps": [], "batches": []})

    pending: List[SaveHandle] = []
    while trainer.state.step < args.steps:
        loss, ids = trainer.train_step()
        step = trainer.state.step
        recorder.add("steps", (step, loss))
        recorder.add("batches", (step, ids))
        if step % args.save_every == 0:
            started = time.perf_counter()
            handle = manager.save_checkpoint(step, metrics={"loss": loss})  # returns once staged
            blocked_ms = (time.perf_counter() - started) * 1e3
            notes = report(pending)
            pending.append(handle)
            say(
                f"step {step:3d}  loss {loss:.4f}  save blocked {blocked_ms:6.1f} ms"
                + "".join(f"  | {n}" for n in notes)
            )
        if step == args.crash_at:
            recorder.write()
            crash(step, say)

    manager.close()  # waits for the saves in flight to commit
    for note in report(pending, wait=True):
        say(note)
    recorder.write(**trainer.full_state())
    leave_after_fsdp()  # destroy_process_group, then exit without the interpreter's teardown


if __name__ == "__main__":
    main()
