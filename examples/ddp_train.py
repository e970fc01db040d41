"""DDP training on CPU (gloo) with asynchronous checkpoints through ckptd.

Run it with two ranks (this is what `./dev demo` does):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/ddp_train.py --crash-at 22
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/ddp_train.py --resume

The first run checkpoints every 5 steps and SIGKILLs every rank after step 22. The checkpoint of
step 20 was handed over before that, so the daemon commits it anyway and the second run resumes
from it. Local rank 0 starts the node's daemon if none answers; it exits on its own once idle.

What is saved, and how (see `Trainer.get_state_components`): model and optimizer REPLICATED with
`validate_replication=True` (DDP keeps them identical; a copy that drifted refuses the
checkpoint), scheduler REPLICATED, RNG PER_RANK (dropout draws differ per rank), the step counter
and loss history GLOBAL. The data position's pattern is decided at run time by `--loader`:

- `per-rank` (default): every rank has its own stream of batches, so its position is PER_RANK.
- `global`: one logical loader over a global sample sequence hands rank r its slice of each global
  batch of 64 samples. Its position is the same on every rank, so it is GLOBAL (rank 0's copy).

With `--loader global` a job may resume on another world size (`--nproc-per-node 1` after 2):
everything but the RNG state loads at any topology and the global batch sequence continues where
it stopped. PER_RANK state cannot load on another topology (ckptd refuses, naming both), so the
example leaves the RNG component out of that one load and re-seeds each rank's generators from
(rank, step) instead; dropout then draws differently from an uninterrupted run. With
`--loader per-rank` the data position is PER_RANK too, and ckptd's error stops such a resume.

`--record FILE` makes each rank write `FILE.rank<R>` (torch.save) at the end of the run, or just
before the simulated crash: the (step, loss) pairs and the sample ids of every step this process
trained, the step it started from, and at the end its model and optimizer state. The tests use it.
The common options, the crash and the `--record` file come from example_support.py, next to this file.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Tuple, Union

import torch
import torch.distributed as dist
from example_support import Recorder, Say, crash, example_parser, rank0_say, report  # options, --crash-at, --record
from torch import nn

from ckptd.client import CheckpointManager, RNGState, SaveHandle, SharingPattern, StateComponent

DIM = 256
HIDDEN = 1024
GLOBAL_BATCH = 64  # samples per step over all ranks with --loader global, whatever the world size

Batch = Tuple[torch.Tensor, torch.Tensor, List[int]]


class SyntheticData:
    """A deterministic, per-rank stream of regression batches; its position is the state to resume."""

    def __init__(self, rank: int, batch_size: int = 32, seed: int = 1234) -> None:
        self.rank, self.batch_size, self.seed = rank, batch_size, seed
        self.position = 0

    def next_batch(self) -> Batch:
        """The batch at the current position (a pure function of seed, rank and position) and its id."""
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.rank + self.position)
        ids = [self.position]
        self.position += 1
        x = torch.randn(self.batch_size, DIM, generator=g)
        return x, torch.tanh(x.roll(1, dims=1)), ids

    def state_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["rank"] != self.rank:
            raise ValueError(f"data position of rank {state['rank']} loaded on rank {self.rank}")
        self.seed, self.position = state["seed"], state["position"]


class GlobalBatches:
    """One logical loader for the whole job: global batch b holds samples b*G .. b*G+G-1 of a global
    sequence (sample k is a pure function of seed and k), and rank r of W trains on its r-th slice.

    Its state, the number of global batches consumed, is the same on every rank and independent of
    the world size, so it is GLOBAL and a resumed job of any size that divides G continues the
    same global sequence."""

    def __init__(self, rank: int, world_size: int, global_batch: int = GLOBAL_BATCH, seed: int = 4321) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split over {world_size} ranks")
        self.rank, self.world_size, self.global_batch, self.seed = rank, world_size, global_batch, seed
        self.position = 0

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch, and the global sample ids in it."""
        per_rank = self.global_batch // self.world_size
        first = self.position * self.global_batch + self.rank * per_rank
        ids = list(range(first, first + per_rank))
        self.position += 1
        x = torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(self.seed + k)) for k in ids])
        return x, torch.tanh(x.roll(1, dims=1)), ids

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "global_batch": self.global_batch, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"saved global batch {state['global_batch']} differs from {self.global_batch}")
        self.seed, self.position = state["seed"], state["position"]


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

    def __init__(self, rank: int, world_size: int, total_steps: int, loader: str) -> None:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        self.model = nn.Sequential(
            nn.Linear(DIM, HIDDEN),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(HIDDEN, HIDDEN),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(HIDDEN, DIM),
        )  # about 1.6M parameters: 6 MB of weights, 19 MB with AdamW's moments
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.rank = rank
        self.data: Union[SyntheticData, GlobalBatches] = (
            GlobalBatches(rank, world_size) if loader == "global" else SyntheticData(rank)
        )
        self.rng = RNGState()
        self.state = TrainerState()
        self.include_rng = True  # False only while loading a checkpoint saved at another world size
        torch.manual_seed(1000 + rank)  # dropout draws differ per rank: that is why RNG state is PER_RANK

    def data_pattern(self) -> SharingPattern:
        """GLOBAL when one logical loader feeds every rank (its position is the job's), else PER_RANK."""
        return SharingPattern.GLOBAL if isinstance(self.data, GlobalBatches) else SharingPattern.PER_RANK

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        components = [
            StateComponent("model", self.model, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("scheduler", self.scheduler, SharingPattern.REPLICATED),
            StateComponent("data", self.data, self.data_pattern()),
            StateComponent("trainer", self.state, SharingPattern.GLOBAL),
        ]
        if self.include_rng:
            components.append(StateComponent("rng", self.rng, SharingPattern.PER_RANK))
        return components

    def reseed(self) -> None:
        """Fresh per-rank generators for a job whose saved RNG state belongs to another world size."""
        torch.manual_seed(1000 + self.rank + 1_000_003 * self.state.step)

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


def resume(manager: CheckpointManager, trainer: Trainer, say: Say) -> None:
    """Load the newest checkpoint; on another world size, without the PER_RANK RNG state."""
    latest = manager.latest_checkpoint()
    if latest is None:
        say(f"nothing to resume under {os.path.relpath(manager.root)}; starting at step 0")
        return
    saved_world = manager.saved_topology(latest).world_size
    world = dist.get_world_size()
    other_world = saved_world != world and trainer.data_pattern() is SharingPattern.GLOBAL
    trainer.include_rng = not other_world
    try:
        path = manager.load_checkpoint()  # every declared component, into the existing objects
    finally:
        trainer.include_rng = True
    if other_world:
        trainer.reseed()
        say(f"saved with {saved_world} ranks, resuming with {world}: RNG state re-seeded per rank")
    say(f"resumed at step {trainer.state.step} from {os.path.relpath(path)} (loss then {trainer.state.losses[-1]:.4f})")


def main() -> None:
    parser = example_parser("DDP training with asynchronous ckptd checkpoints.", root="./demo_checkpoints")
    parser.add_argument(
        "--loader",
        choices=("per-rank", "global"),
        default="per-rank",
        help="per-rank: a loader per rank (PER_RANK state); global: one loader slicing global "
        "batches across ranks (GLOBAL state, resumable at another world size)",
    )
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say = rank0_say()

    trainer = Trainer(rank, dist.get_world_size(), args.steps, args.loader)
    manager = CheckpointManager(trainer, args.root, auto_start=True)  # local rank 0 starts the daemon if needed
    if args.resume:
        resume(manager, trainer, say)
    recorder = Recorder(args.record, rank, {"start_step": trainer.state.step, "steps": [], "batches": []})

    pending: List[SaveHandle] = []
    step_times: List[float] = []
    while trainer.state.step < args.steps:
        started = time.perf_counter()
        loss, ids = trainer.train_step()
        step_times.append(time.perf_counter() - started)
        step = trainer.state.step
        recorder.add("steps", (step, loss))
        recorder.add("batches", (step, ids))
        if step % args.save_every == 0:
            started = time.perf_counter()
            handle = manager.save_checkpoint(step, metrics={"loss": loss})  # returns once staged
            blocked_ms = (time.perf_counter() - started) * 1e3
            notes = report(pending)  # earlier saves that committed (or failed) meanwhile
            pending.append(handle)
            mean_ms = sum(step_times) / len(step_times) * 1e3
            say(
                f"step {step:3d}  loss {loss:.4f}  save blocked {blocked_ms:6.1f} ms  "
                f"(train step {mean_ms:5.1f} ms)" + "".join(f"  | {n}" for n in notes)
            )
            step_times.clear()
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
