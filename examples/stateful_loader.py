"""DDP training from torchdata's StatefulDataLoader (worker processes included) with ckptd checkpoints.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/stateful_loader.py --crash-at 8
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/stateful_loader.py --resume

Each rank reads its DistributedSampler shard of a small deterministic map-style dataset through a
`torchdata.stateful_dataloader.StatefulDataLoader` with two worker processes. The dataset adds
augmentation noise drawn from each worker's own torch generator, and its `state_dict()` (which the
loader calls inside the workers) holds that generator's state. The loader's `state_dict()` thus
covers the sampler position, the workers' seed and every worker's dataset state; together with
the epoch it is this rank's PER_RANK "data" component. A resumed run gets the same batches, with
the same noise, in the same order as an uninterrupted one, mid-epoch and across epoch boundaries.

The loader draws its workers' base seed from its own generator, re-seeded from (seed, epoch) at
the start of every epoch, so creating an iterator never consumes the global torch generator
(whose state, part of the PER_RANK "rng" component, drives dropout).

Options: --root DIR, --steps N (default 16), --save-every N (default 4), --crash-at STEP (SIGKILL
every rank right after that step's save_checkpoint returns), --resume (load the latest
checkpoint), --record FILE (each rank writes FILE.rank<R> with torch.save: its (step, loss)
pairs, the sample ids of each step and, at the end, its model and optimizer state).
The common options, the crash and the `--record` file come from example_support.py, next to this file.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from example_support import Recorder, crash, example_parser, rank0_say, report  # options, --crash-at, --record
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptd.client import CheckpointManager, RNGState, SaveHandle, SharingPattern, StateComponent

DIM = 32
HIDDEN = 128
SAMPLES = 96  # 48 per rank: 6 batches of 8, so a 16-step run crosses two epoch boundaries
BATCH = 8
NUM_WORKERS = 2


class NoisyRegression(Dataset):
    """Sample i is a pure function of (seed, i) plus augmentation noise from the worker's generator.

    `state_dict()`/`load_state_dict()` run inside each worker process (StatefulDataLoader calls
    them there): the state is that worker's torch generator, so the noise resumes exactly.
    """

    def __init__(self, seed: int = 99) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        x = torch.randn(DIM, generator=torch.Generator().manual_seed(self.seed + index))
        noisy = x + 0.05 * torch.randn(DIM)  # the worker's own generator: worker state to checkpoint
        return noisy, torch.tanh(x.roll(1)), index

    def state_dict(self) -> Dict[str, Any]:
        return {"torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(torch.as_tensor(state["torch_rng"], dtype=torch.uint8).clone())


class EpochLoader:
    """Endless batches from a StatefulDataLoader over a DistributedSampler, epoch after epoch.

    State: the epoch and the loader's own state dict (sampler position, workers' base seed and
    per-worker dataset state). PER_RANK: every rank reads its own shard.
    """

    def __init__(self, rank: int, world_size: int, seed: int = 7) -> None:
        self.seed = seed
        dataset = NoisyRegression()
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.generator = torch.Generator()
        self.loader = StatefulDataLoader(
            dataset,
            batch_size=BATCH,
            sampler=self.sampler,
            num_workers=NUM_WORKERS,
            generator=self.generator,
        )
        self.epoch = 0
        self._batches: Optional[Iterator[Any]] = None

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """The next batch, starting the next epoch when this one is exhausted; with its sample ids."""
        while True:
            if self._batches is None:
                self.sampler.set_epoch(self.epoch)
                self.generator.manual_seed(self.seed + self.epoch)  # the epoch's worker seeds
                self._batches = iter(self.loader)
            try:
                x, y, ids = next(self._batches)
                return x, y, ids.tolist()
            except StopIteration:
                self.epoch += 1
                self._batches = None

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.loader.load_state_dict(state["loader"])  # applied by the next iter(): workers start from it
        self._batches = None


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
    """A small DDP model fed by an EpochLoader; declares its state through `get_state_components()`."""

    def __init__(self, rank: int, world_size: int, total_steps: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Dropout(0.1), nn.Linear(HIDDEN, DIM))
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.data = EpochLoader(rank, world_size)
        self.rng = RNGState()
        self.state = TrainerState()
        torch.manual_seed(1000 + rank)  # dropout draws differ per rank

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks."""
        return [
            StateComponent("model", self.model, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("scheduler", self.scheduler, SharingPattern.REPLICATED),
            StateComponent("data", self.data, SharingPattern.PER_RANK),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
            StateComponent("trainer", self.state, SharingPattern.GLOBAL),
        ]

    def train_step(self) -> Tuple[float, List[int]]:
        """One optimizer step on the next batch; returns this rank's loss and the batch's sample ids."""
        x, y, ids = self.data.next_batch()
        loss = nn.functional.mse_loss(self.ddp(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.losses.append(loss.item())
        return self.state.losses[-1], ids


def main() -> None:
    args = example_parser(
        "DDP training from a StatefulDataLoader with ckptd checkpoints.",
        root="./loader_checkpoints",
        steps=16,
        save_every=4,
    ).parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say = rank0_say()

    trainer = Trainer(rank, dist.get_world_size(), args.steps)
    manager = CheckpointManager(trainer, args.root, auto_start=True)
    if args.resume and manager.latest_checkpoint() is not None:
        path = manager.load_checkpoint()
        say(f"resumed at step {trainer.state.step} (epoch {trainer.data.epoch}) from {os.path.relpath(path)}")
    recorder = Recorder(args.record, rank, {"start_step": trainer.state.step, "steps": [], "batches": []})

    pending: List[SaveHandle] = []
    while trainer.state.step < args.steps:
        loss, ids = trainer.train_step()
        step = trainer.state.step
        recorder.add("steps", (step, loss))
        recorder.add("batches", (step, ids))
        if step % args.save_every == 0:
            pending.append(manager.save_checkpoint(step, metrics={"loss": loss}))  # returns once staged
            say(f"step {step:3d}  epoch {trainer.data.epoch}  loss {loss:.4f}  saved without waiting")
        if step == args.crash_at:
            recorder.write()  # the steps so far; the resumed run records the rest
            crash(step, say)  # barrier, SIGKILL; the daemon still commits the saves handed over

    manager.close()  # waits for the saves in flight to commit
    for note in report(pending, wait=True):
        say(note)
    recorder.write(trainer.model, trainer.optimizer, losses=list(trainer.state.losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
