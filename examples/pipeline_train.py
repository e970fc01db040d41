"""Two-stage pipeline-parallel training on CPU (gloo) with asynchronous checkpoints through ckptd.

Run it with two ranks, one per stage:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/pipeline_train.py --crash-at 22
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/pipeline_train.py --resume

Rank 0 holds the first half of the model, rank 1 the second half. Each step splits the batch into
micro-batches; stage 0 sends their activations to stage 1 with `dist.send`, stage 1 computes the
loss and sends the gradients of those activations back (all forwards, then all backwards, like
GPipe). Each stage's weights and optimizer state differ, so they are PER_RANK; the LR schedule is
the same on both stages (REPLICATED, and checked to be so); both ranks read the same batches (the
first stage uses the inputs, the last the targets), so the loader is GLOBAL.

The common options, the crash and the `--record` file come from example_support.py, next to this file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from example_support import Recorder, crash, example_parser, rank0_say, report  # options, --crash-at, --record
from torch import nn

from ckptd.client import CheckpointManager, RNGState, SaveHandle, SharingPattern, StateComponent

DIM = 16
HIDDEN = 64
MICRO_BATCHES = 2


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
    """The step counter (the same on every rank)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> Dict[str, Any]:
        """The step reached."""
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue after the saved step."""
        self.step = state["step"]


def build_stage(stage: int) -> nn.Sequential:
    """This stage's half of the model: the whole model is drawn from one seed, each stage keeps its part."""
    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.Linear(DIM, HIDDEN),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, DIM),
    )
    return layers[:3] if stage == 0 else layers[3:]


class PipelineStage:
    """One stage of the pipeline: owns its part of the state and declares it to ckptd."""

    def __init__(self, rank: int, total_steps: int) -> None:
        self.stage, self.peer = rank, 1 - rank
        self.model = build_stage(self.stage)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.data = ShuffledLoader()
        self.progress = Progress()

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        return [
            StateComponent("model", self.model, SharingPattern.PER_RANK),
            StateComponent("optimizer", self.optimizer, SharingPattern.PER_RANK),
            StateComponent("scheduler", self.scheduler, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("data", self.data, SharingPattern.GLOBAL),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),  # each stage's dropout stream
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
        ]

    def train_step(self) -> float:
        """One pipelined optimizer step; returns the batch loss (on every rank)."""
        inputs, targets = self.data.next_batch()
        if self.stage == 0:
            self._first_stage(inputs.chunk(MICRO_BATCHES))
            loss = torch.zeros(())
        else:
            loss = self._last_stage(targets.chunk(MICRO_BATCHES))
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        dist.broadcast(loss, src=1)
        return loss.item()

    def _first_stage(self, inputs: Tuple[torch.Tensor, ...]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        outputs = []
        for micro in inputs:
            outputs.append(self.model(micro))
            dist.send(outputs[-1].detach(), dst=self.peer)
        for output in reversed(outputs):
            grad = torch.empty_like(output)
            dist.recv(grad, src=self.peer)
            output.backward(grad)

    def _last_stage(self, targets: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        received, losses = [], []
        for micro in targets:
            activation = torch.empty(len(micro), HIDDEN)
            dist.recv(activation, src=self.peer)
            received.append(activation.requires_grad_())
            losses.append(nn.functional.mse_loss(self.model(activation), micro) / MICRO_BATCHES)
        for activation, loss in zip(reversed(received), reversed(losses)):
            loss.backward()
            dist.send(activation.grad, dst=self.peer)
        return sum(loss.detach() for loss in losses)


def main() -> None:
    args = example_parser(
        "Two-stage pipeline training with asynchronous ckptd checkpoints.", root="./pipeline_checkpoints"
    ).parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("run this example with exactly 2 ranks (--nproc-per-node 2)")
    say = rank0_say()

    stage = PipelineStage(rank, args.steps)
    torch.manual_seed(1000 + rank)  # each stage's dropout draws its own stream: RNG state is PER_RANK
    manager = CheckpointManager(stage, args.root)  # local rank 0 starts the daemon if none answers
    resumed_from: Optional[str] = None
    if args.resume and manager.latest_checkpoint() is not None:
        resumed_from = manager.load_checkpoint()  # every rank loads the same checkpoint
        say(f"resumed at step {stage.progress.step} from {resumed_from}")
    recorder = Recorder(args.record, rank, {"rank": rank, "losses": [], "resumed_from": resumed_from}, suffix=".pt")

    pending: List[SaveHandle] = []
    while stage.progress.step < args.steps:
        loss = stage.train_step()
        step = stage.progress.step
        recorder.add("losses", (step, loss))
        if step % args.save_every == 0:
            pending.append(manager.save_checkpoint(step, metrics={"loss": loss}))  # returns once staged
            say(f"step {step:3d}  loss {loss:.4f}  saving")
        if step == args.crash_at:
            crash(step, say)  # barrier, SIGKILL; the daemon still commits the saves handed over

    manager.close()  # waits for the saves in flight
    for note in report(pending, wait=True):  # "step N committed -> DIR", or why it failed
        say(note)
    recorder.write(stage.model, stage.optimizer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
