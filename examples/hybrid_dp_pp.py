"""Hybrid data x pipeline parallel training on CPU (gloo) with asynchronous checkpoints through ckptd.

Run it with four ranks, two pipeline replicas of two stages each:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        examples/hybrid_dp_pp.py --crash-at 22
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        examples/hybrid_dp_pp.py --resume

    rank = 2 * replica + stage      replica 0: ranks 0 -> 1      replica 1: ranks 2 -> 3

Each replica is a two-stage pipeline (activations and their gradients travel by `dist.send` and
`dist.recv`) that reads its own shard of the data. After the backward pass, each stage's
gradients are averaged over the ranks that hold the same stage (its data-parallel group: {0, 2}
for stage 0, {1, 3} for stage 1), so those ranks keep identical weights and optimizer state.

The patterns follow from that. PER_GROUP means: identical inside the named group, different
across groups; the group's lowest rank writes one copy and every member loads it.
- stage weights and optimizer: PER_GROUP over "stage" (the ranks that hold the same stage);
- loader position: PER_GROUP over "replica" (both stages of a pipeline read the same batches);
- LR scheduler: REPLICATED (one schedule everywhere, checked at every save);
- RNG: PER_RANK (every rank's dropout draws its own stream); step counter: GLOBAL.

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
STAGES = 2
MICRO_BATCHES = 2


class ShardedLoader:
    """A resumable loader over one shard of a synthetic regression set, reshuffled every epoch.

    The shuffle of epoch `e` is a pure function of `seed` and `e`, and shard `s` of `n` takes every
    n-th example of it, so (epoch, position) is all the state needed to continue where a run stopped.
    """

    def __init__(self, shard: int, num_shards: int, size: int = 48, batch_size: int = 8, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, DIM, generator=g)
        self.targets = torch.tanh(self.inputs @ torch.randn(DIM, DIM, generator=g) / DIM**0.5)
        self.shard, self.num_shards, self.batch_size, self.seed = shard, num_shards, batch_size, seed
        self.epoch, self.position = 0, 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch of this shard; moves to a new shuffle once the epoch is used up."""
        if (self.position + 1) * self.batch_size * self.num_shards > len(self.inputs):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.shard :: self.num_shards]
        index = mine[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return self.inputs[index], self.targets[index]

    def state_dict(self) -> Dict[str, Any]:
        """Where the loader stands, and which shard it reads."""
        return {
            "seed": self.seed,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a saved position of the same shard."""
        saved = (state["seed"], state["shard"], state["num_shards"])
        if saved != (self.seed, self.shard, self.num_shards):
            raise ValueError(
                f"loader state of (seed, shard, shards) {saved} loaded into {(self.seed, self.shard, self.num_shards)}"
            )
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


def new_groups(world: int) -> Tuple[List[Any], List[Any]]:
    """The data-parallel group of each stage and the ranks of each pipeline replica (every rank
    creates every group, in the same order, as torch.distributed requires)."""
    replicas = world // STAGES
    stage_groups = [dist.new_group([r * STAGES + s for r in range(replicas)]) for s in range(STAGES)]
    replica_groups = [dist.new_group([r * STAGES + s for s in range(STAGES)]) for r in range(replicas)]
    return stage_groups, replica_groups


class HybridRank:
    """One stage of one pipeline replica: owns its part of the state and declares it to ckptd."""

    def __init__(self, rank: int, world: int, total_steps: int) -> None:
        self.replica, self.stage = divmod(rank, STAGES)
        self.replicas = world // STAGES
        stage_groups, replica_groups = new_groups(world)
        self.stage_group, self.replica_group = stage_groups[self.stage], replica_groups[self.replica]
        self.previous, self.next = rank - 1, rank + 1  # neighbours in this replica's pipeline
        self.model = build_stage(self.stage)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        self.data = ShardedLoader(self.replica, self.replicas)
        self.progress = Progress()

    def get_state_components(self) -> List[StateComponent]:
        """What to checkpoint and how each piece relates across ranks (called at every save and load)."""
        return [
            StateComponent("model", self.model, SharingPattern.PER_GROUP, process_group_name="stage"),
            StateComponent("optimizer", self.optimizer, SharingPattern.PER_GROUP, process_group_name="stage"),
            StateComponent("scheduler", self.scheduler, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("data", self.data, SharingPattern.PER_GROUP, process_group_name="replica"),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
        ]

    def get_process_groups(self) -> Dict[str, Any]:
        """This rank's group for each name its PER_GROUP components use."""
        return {"stage": self.stage_group, "replica": self.replica_group}

    def train_step(self) -> float:
        """One pipelined, data-parallel optimizer step; returns the loss averaged over the replicas
        (on every rank)."""
        inputs, targets = self.data.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        if self.stage == 0:
            self._first_stage(inputs.chunk(MICRO_BATCHES))
            loss = torch.zeros(())
        else:
            loss = self._last_stage(targets.chunk(MICRO_BATCHES)) / self.replicas
        self._average_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        dist.all_reduce(loss)  # only the last stages contribute
        return loss.item()

    def _first_stage(self, inputs: Tuple[torch.Tensor, ...]) -> None:
        outputs = []
        for micro in inputs:
            outputs.append(self.model(micro))
            dist.send(outputs[-1].detach(), dst=self.next)
        for output in reversed(outputs):
            grad = torch.empty_like(output)
            dist.recv(grad, src=self.next)
            output.backward(grad)

    def _last_stage(self, targets: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        received, losses = [], []
        for micro in targets:
            activation = torch.empty(len(micro), HIDDEN)
            dist.recv(activation, src=self.previous)
            received.append(activation.requires_grad_())
            losses.append(nn.functional.mse_loss(self.model(activation), micro) / MICRO_BATCHES)
        for activation, loss in zip(reversed(received), reversed(losses)):
            loss.backward()
            dist.send(activation.grad, dst=self.previous)
        return sum(loss.detach() for loss in losses)

    def _average_gradients(self) -> None:
        for param in self.model.parameters():
            dist.all_reduce(param.grad, group=self.stage_group)
            param.grad /= self.replicas


def main() -> None:
    args = example_parser(
        "Data x pipeline parallel training with ckptd checkpoints.", root="./hybrid_checkpoints"
    ).parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % STAGES or world < 2 * STAGES:
        raise SystemExit(f"run this example with a multiple of {STAGES} ranks, at least {2 * STAGES}")
    say = rank0_say()

    trainer = HybridRank(rank, world, args.steps)
    torch.manual_seed(1000 + rank)  # every rank's dropout draws its own stream: RNG state is PER_RANK
    manager = CheckpointManager(trainer, args.root)  # local rank 0 starts the daemon if none answers
    resumed_from: Optional[str] = None
    if args.resume and manager.latest_checkpoint() is not None:
        resumed_from = manager.load_checkpoint()  # every rank loads the same checkpoint
        say(f"resumed at step {trainer.progress.step} from {resumed_from}")
    recorder = Recorder(args.record, rank, {"rank": rank, "losses": [], "resumed_from": resumed_from}, suffix=".pt")

    pending: List[SaveHandle] = []
    while trainer.progress.step < args.steps:
        loss = trainer.train_step()
        step = trainer.progress.step
        recorder.add("losses", (step, loss))
        if step % args.save_every == 0:
            pending.append(manager.save_checkpoint(step, metrics={"loss": loss}))  # returns once staged
            say(f"step {step:3d}  loss {loss:.4f}  saving")
        if step == args.crash_at:
            crash(step, say)  # barrier, SIGKILL; the daemon still commits the saves handed over

    manager.close()  # waits for the saves in flight
    for note in report(pending, wait=True):  # "step N committed -> DIR", or why it failed
        say(note)
    recorder.write(trainer.model, trainer.optimizer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
