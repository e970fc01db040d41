"""Single-device training (one process, CPU) with asynchronous checkpoints through ckptd.

Run it with plain Python (or `torchrun --nproc-per-node 1`, which needs nothing else):

    OMP_NUM_THREADS=1 python examples/single_device.py --steps 40 --crash-at 22
    OMP_NUM_THREADS=1 python examples/single_device.py --steps 40 --resume

With one process every component is GLOBAL (one copy, written and loaded by rank 0), except the
RNG state, which is PER_RANK: it is the habit to keep, since the random streams of a trainer differ
per rank as soon as there is more than one. The first run checkpoints every 5 steps and SIGKILLs
itself after step 22; the daemon (started by this process if none answers, in its own session)
still commits step 20, and the second run resumes from it with the losses an uninterrupted run has.

The common options, the crash and the `--record` file come from example_support.py, next to this file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from example_support import Recorder, crash, example_parser, rank0_say, report  # options, --crash-at, --record
from torch import nn

from ckptd.client import CheckpointManager, RNGState, SaveHandle, SharingPattern, StateComponent

DIM = 16
HIDDEN = 64


class ShuffledLoader:
    """A resumable loader over a synthetic regression set: a fresh shuffle every epoch, batches in order.

    The shuffle of epoch `e` is a pure function of `seed` and `e`, so (epoch, position) is all the
    state needed to continue exactly where a run stopped.
    """

    def __init__(self, size: int = 48, batch_size: int = 8, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, DIM, generator=g)
        self.targets = torch.tanh(self.inputs @ torch.randn(DIM, DIM, generator=g) / DIM**0.5)
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch; moves to a new shuffle once the epoch is used up."""
        if (self.position + 1) * self.batch_size > len(self.inputs):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        index = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return self.inputs[index], self.targets[index]

    def state_dict(self) -> Dict[str, Any]:
        """Where the loader stands."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a saved position (of a loader over the same data)."""
        if state["seed"] != self.seed:
            raise ValueError(f"loader state of seed {state['seed']} loaded into a loader of seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]


class Progress:
    """The step counter."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> Dict[str, Any]:
        """The step reached."""
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue after the saved step."""
        self.step = state["step"]


class Trainer:
    """Owns the training state and declares it to ckptd through `get_state_components()`."""

    def __init__(self, total_steps: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(DIM, HIDDEN),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(HIDDEN, DIM),
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.data = ShuffledLoader()
        self.progress = Progress()

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("optimizer", self.optimizer, SharingPattern.GLOBAL),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("data", self.data, SharingPattern.GLOBAL),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),  # dropout's stream
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
        ]

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its loss."""
        x, y = self.data.next_batch()
        loss = nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        return loss.item()


def main() -> None:
    args = example_parser(
        "Single-device training with asynchronous ckptd checkpoints.", root="./single_device_checkpoints"
    ).parse_args()
    say = rank0_say()  # a plain print: one process, no process group
    trainer = Trainer(args.steps)
    torch.manual_seed(1000)  # dropout's stream, after the weights are drawn
    manager = CheckpointManager(trainer, args.root)  # starts the daemon if none answers
    resumed_from: Optional[str] = None
    if args.resume and manager.latest_checkpoint() is not None:
        resumed_from = manager.load_checkpoint()
        say(f"resumed at step {trainer.progress.step} from {resumed_from}")
    recorder = Recorder(args.record, 0, {"rank": 0, "losses": [], "resumed_from": resumed_from}, suffix=".pt")

    pending: List[SaveHandle] = []
    while trainer.progress.step < args.steps:
        loss = trainer.train_step()
        step = trainer.progress.step
        recorder.add("losses", (step, loss))
        if step % args.save_every == 0:
            pending.append(manager.save_checkpoint(step, metrics={"loss": loss}))  # returns once staged
            say(f"step {step:3d}  loss {loss:.4f}  saving")
        if step == args.crash_at:
            crash(step, say)  # SIGKILL; the daemon still commits the saves handed over

    manager.close()  # waits for the saves in flight
    for note in report(pending, wait=True):  # "step N committed -> DIR", or why it failed
        say(note)
    recorder.write(trainer.model, trainer.optimizer)


if __name__ == "__main__":
    main()
