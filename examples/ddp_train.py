"""DDP training on CPU (gloo) with asynchronous checkpoints through ckptd.

Run it with two ranks (this is what `./dev demo` does):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/ddp_train.py --crash-at 22
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/ddp_train.py --resume

The first run checkpoints every 5 steps and SIGKILLs every rank after step 22. The checkpoint of
step 20 was handed over before that, so the daemon commits it anyway and the second run resumes
from it. Local rank 0 starts the node's daemon if none answers; it exits on its own once idle.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ckptd.client import CheckpointError, CheckpointManager, RNGState, SaveHandle, SharingPattern, StateComponent

DIM = 256
HIDDEN = 1024


class SyntheticData:
    """A deterministic, per-rank stream of regression batches; its position is the state to resume."""

    def __init__(self, rank: int, batch_size: int = 32, seed: int = 1234) -> None:
        self.rank, self.batch_size, self.seed = rank, batch_size, seed
        self.position = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position (a pure function of seed, rank and position)."""
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.rank + self.position)
        self.position += 1
        x = torch.randn(self.batch_size, DIM, generator=g)
        return x, torch.tanh(x.roll(1, dims=1))

    def state_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["rank"] != self.rank:
            raise ValueError(f"data position of rank {state['rank']} loaded on rank {self.rank}")
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

    def __init__(self, rank: int, total_steps: int) -> None:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        self.model = nn.Sequential(
            nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(HIDDEN, DIM),
        )  # about 1.6M parameters: 6 MB of weights, 19 MB with AdamW's moments
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.data = SyntheticData(rank)
        self.rng = RNGState()
        self.state = TrainerState()
        torch.manual_seed(1000 + rank)  # dropout draws differ per rank: that is why RNG state is PER_RANK

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        return [
            StateComponent("model", self.model, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", self.scheduler, SharingPattern.REPLICATED),
            StateComponent("data", self.data, SharingPattern.PER_RANK),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
            StateComponent("trainer", self.state, SharingPattern.GLOBAL),
        ]

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns this rank's loss."""
        x, y = self.data.next_batch()
        loss = nn.functional.mse_loss(self.ddp(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.losses.append(loss.item())
        return self.state.losses[-1]


def report(handles: List[SaveHandle]) -> List[str]:
    """Remove the handles that have resolved from `handles`; describe each, never blocking."""
    notes = []
    for handle in [h for h in handles if h.done()]:
        handles.remove(handle)
        try:
            notes.append(f"step {handle.step} committed -> {os.path.relpath(handle.wait())}")
        except CheckpointError as exc:
            notes.append(f"step {handle.step} FAILED: {exc}")
    return notes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DDP training with asynchronous ckptd checkpoints.")
    parser.add_argument("--root", default="./demo_checkpoints", help="checkpoint root (default ./demo_checkpoints)")
    parser.add_argument("--steps", type=int, default=40, help="train until this step (default 40)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps (default 5)")
    parser.add_argument("--crash-at", type=int, metavar="STEP", help="SIGKILL every rank after this step")
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint first")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say: Callable[[str], None] = (lambda msg: print(f"[rank 0] {msg}", flush=True)) if rank == 0 else (lambda msg: None)

    trainer = Trainer(rank, args.steps)
    manager = CheckpointManager(trainer, args.root, auto_start=True)  # local rank 0 starts the daemon if needed
    if args.resume:
        if manager.latest_checkpoint() is None:
            say(f"nothing to resume under {args.root}; starting at step 0")
        else:
            path = manager.load_checkpoint()  # every component, into the existing objects
            say(f"resumed at step {trainer.state.step} from {os.path.relpath(path)} "
                f"(loss then {trainer.state.losses[-1]:.4f})")

    pending: List[SaveHandle] = []
    step_times: List[float] = []
    while trainer.state.step < args.steps:
        started = time.perf_counter()
        loss = trainer.train_step()
        step_times.append(time.perf_counter() - started)
        step = trainer.state.step
        if step % args.save_every == 0:
            started = time.perf_counter()
            handle = manager.save_checkpoint(step, metrics={"loss": loss})  # returns once staged
            blocked_ms = (time.perf_counter() - started) * 1e3
            notes = report(pending)  # earlier saves that committed (or failed) meanwhile
            pending.append(handle)
            mean_ms = sum(step_times) / len(step_times) * 1e3
            say(f"step {step:3d}  loss {loss:.4f}  save blocked {blocked_ms:6.1f} ms  "
                f"(train step {mean_ms:5.1f} ms)" + "".join(f"  | {n}" for n in notes))
            step_times.clear()
        if step == args.crash_at:
            say(f"step {step}: simulating a crash, every rank SIGKILLs itself")
            os.kill(os.getpid(), signal.SIGKILL)

    manager.close()  # waits for the saves in flight to commit
    for note in report(pending):
        say(note)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
