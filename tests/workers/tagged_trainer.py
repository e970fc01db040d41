"""A trainer whose every saved value names its step, for the torture test (tests/test_torture.py).

Every tensor of the state is filled in place with the step number before each save (the same tensor
objects every step, like a real model), and every non-tensor value stored under a key "step" is the
step, so a checkpoint that mixes two steps is visible in its content (tests/invariants.py).

Run it as one plain process (one rank: a GLOBAL model of --model-mb MB plus a tiny GLOBAL {"step": N}),
or under torchrun (gloo; GLOBAL, REPLICATED and PER_RANK components, the PER_RANK one shaped and named
differently on every rank). It saves every step without waiting for the commits, records every save's
outcome in a JSON-lines event log per rank (<log-dir>/events-rank<R>.jsonl) and keeps going after a
CheckpointError. Anything else (another exception type, or a CheckpointError without a message) is
recorded as a "fatal" event and the trainer exits with status 3.

Control files (checked every step, agreed on by every rank):
  --stop-file   when it exists: wait for the saves in flight, close the manager, exit 0.
  --pause-file  while it exists: wait for the saves in flight, record a "paused" event carrying the
                file's content (a token), and save nothing until it is removed.

--load-only: load `latest` in this fresh process with `CheckpointManager(..., connect=False)`, check
that every value holds the loaded step, record a "loaded" event and exit (0 when the content matches).

Event kinds: start, loaded, load_error, saved, save_error, committed, failed, unresolved, paused,
resumed, stopped, fatal. Errors carry "type", "checkpoint_error" (an instance of CheckpointError) and
"message".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptd.client import (
    CheckpointError,
    CheckpointManager,
    SaveHandle,
    SharingPattern,
    StateComponent,
)
from ckptd.proto.retention import RetentionPolicy

EXIT_FATAL = 3
"""Exit status after a fatal event (an exception that is not a CheckpointError with a reason)."""
EXIT_BAD_LOAD = 4
"""Exit status of --load-only when the loaded content does not hold the loaded step."""
MAX_PENDING = 16
"""Saves whose outcome is still unknown before the trainer waits for the oldest (bounded memory)."""
WAIT_S = 60.0
"""How long the trainer waits for a handle before recording it as unresolved."""


class EventLog:
    """Append-only JSON-lines file; each event is one write(2) of one line, so a SIGKILL never leaves
    half a line behind."""

    def __init__(self, path: Path, rank: int) -> None:
        self.rank = rank
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, event: str, **fields: Any) -> None:
        """Record one event with a wall-clock time, this process's pid and its rank."""
        record = {"event": event, "t": time.time(), "pid": os.getpid(), "rank": self.rank, **fields}
        os.write(self._fd, (json.dumps(record, default=str) + "\n").encode())

    def failure(self, event: str, exc: BaseException, **fields: Any) -> None:
        """Record an exception: its type, whether it is a CheckpointError, and its message."""
        self.write(
            event,
            type=type(exc).__name__,
            checkpoint_error=isinstance(exc, CheckpointError),
            message=str(exc),
            **fields,
        )

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class TaggedState:
    """A stateful around a dict of tensors plus a "step" value; loading copies into the existing tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.step = 0

    def tag(self, step: int) -> None:
        """Fill every tensor in place with `step` (the same objects every step, like a model's weights)."""
        for tensor in self.tensors.values():
            tensor.fill_(step)
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        """The live tensors and the step."""
        return {**self.tensors, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy the loaded tensors into the existing ones (shapes must match) and take the step."""
        missing = set(self.tensors) - set(state)
        if missing:
            raise KeyError(f"the loaded state lacks tensors {sorted(missing)}")
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])
        self.step = int(state["step"])


class StepCounter:
    """A tiny GLOBAL component: {"step": N}."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """{"step": N}."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the loaded step."""
        self.step = int(state["step"])


def float_tensors(total_mb: float, parts: int, prefix: str) -> dict[str, torch.Tensor]:
    """`parts` float32 tensors of `total_mb` MB in all (float32 holds every step below 2**24 exactly)."""
    numel = max(1, int(total_mb * 2**20 / 4 / parts))
    return {f"{prefix}{index}": torch.zeros(numel + index, dtype=torch.float32) for index in range(parts)}


class Trainer:
    """The provider: declares the tagged components for this rank and world size."""

    def __init__(self, rank: int, world: int, model_mb: float) -> None:
        self.rank, self.world = rank, world
        self.model = TaggedState(float_tensors(model_mb, 4, "layer"))
        self.counter = StepCounter()
        self.optim: TaggedState | None = None
        self.shard: TaggedState | None = None
        if world > 1:
            self.optim = TaggedState(
                {**float_tensors(model_mb / 2, 2, "moment"), "count": torch.zeros(16, dtype=torch.int64)}
            )
            shard = float_tensors(model_mb / 4, 1, f"rank{rank}_shard")  # a different name on every rank
            shard["rows"] = torch.zeros(3 + rank, 5 + 2 * rank, dtype=torch.int64)  # and a different shape
            self.shard = TaggedState(shard)

    def parts(self) -> list[Any]:
        """Every stateful this trainer tags."""
        return [part for part in (self.model, self.counter, self.optim, self.shard) if part is not None]

    def get_state_components(self) -> list[StateComponent]:
        """GLOBAL model and step counter; at several ranks also REPLICATED optimizer state and PER_RANK shard."""
        components = [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("trainer", self.counter, SharingPattern.GLOBAL),
        ]
        if self.optim is not None and self.shard is not None:
            components += [
                StateComponent("optim", self.optim, SharingPattern.REPLICATED, validate_replication=True),
                StateComponent("shard", self.shard, SharingPattern.PER_RANK),
            ]
        return components

    def tag(self, step: int) -> None:
        """Make every saved value of this rank equal `step`."""
        for part in self.parts():
            if isinstance(part, TaggedState):
                part.tag(step)
            else:
                part.step = step

    def wrong_values(self, step: int) -> list[str]:
        """Where the live state does not hold `step` (after a load)."""
        wrong = []
        for part in self.parts():
            if part.step != step:
                wrong.append(f"{type(part).__name__}.step = {part.step}")
            for name, tensor in getattr(part, "tensors", {}).items():
                if not bool(torch.all(tensor == step)):
                    wrong.append(f"{name} holds {sorted({int(v) for v in tensor.flatten()[::997].tolist()})[:6]}")
        return wrong


def rank_and_world() -> tuple[int, int]:
    """Start gloo under torchrun (before the manager: it gathers the topology); (0, 1) otherwise."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank, so that every rank takes the same decision at the same step."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_reason(exc: CheckpointError) -> None:
    """A CheckpointError must say why; one without a message is as bad as a foreign exception."""
    if not str(exc).strip():
        raise AssertionError(f"{type(exc).__name__} raised without a reason")


class Saver:
    """Saves every step and records each save's outcome once it is known."""

    def __init__(self, manager: CheckpointManager, journal: EventLog) -> None:
        self.manager = manager
        self.journal = journal
        self.pending: deque[SaveHandle] = deque()

    def save(self, step: int) -> None:
        """Stage `step`; a CheckpointError is recorded and training goes on."""
        try:
            handle = self.manager.save_checkpoint(step)
        except CheckpointError as exc:
            check_reason(exc)
            self.journal.failure("save_error", exc, step=step)
            return
        self.journal.write("saved", step=step, blocked_s=round(handle.blocked_s, 4))
        self.pending.append(handle)

    def collect(self, block: bool = False) -> None:
        """Record the outcome of every finished save; with `block`, wait for all of them. Waits for the
        oldest also when too many are pending, so memory stays bounded."""
        while self.pending:
            handle = self.pending[0]
            if not handle.done() and not block and len(self.pending) <= MAX_PENDING:
                return
            self.pending.popleft()
            self.outcome(handle)

    def outcome(self, handle: SaveHandle) -> None:
        """Wait (bounded) for one handle and record committed / failed / unresolved."""
        try:
            path = handle.wait(WAIT_S)
        except CheckpointError as exc:
            if not handle.done():
                self.journal.write("unresolved", step=handle.step, waited_s=WAIT_S, message=str(exc))
                return
            check_reason(exc)
            self.journal.failure("failed", exc, step=handle.step)
            return
        self.journal.write("committed", step=handle.step, path=path)


def load_latest(manager: CheckpointManager, trainer: Trainer, journal: EventLog) -> int | None:
    """Resume from `latest` if there is one; record what was loaded and whether it holds its step.
    Returns the loaded step (None when nothing was loaded)."""
    if not any_rank(manager.latest_checkpoint() is not None):
        return None
    loaded = load_and_record(manager, trainer, journal)
    return loaded[0] if loaded is not None else None


def load_and_record(
    manager: CheckpointManager, trainer: Trainer, journal: EventLog, **extra: Any
) -> tuple[int, list[str]] | None:
    """Load the newest committed checkpoint and record the step it holds and where its content is
    wrong; None (recorded as a load error) when nothing loads."""
    try:
        path = manager.load_checkpoint()
    except CheckpointError as exc:
        check_reason(exc)
        journal.failure("load_error", exc, latest=manager.latest_checkpoint())
        return None
    step, wrong = loaded_state(trainer, path)
    journal.write("loaded", step=step, path=path, content_ok=not wrong, wrong=wrong[:8], **extra)
    return step, wrong


def loaded_state(trainer: Trainer, path: str) -> tuple[int, list[str]]:
    """The step the trainer loaded from `path`, and where its state (or the directory's name) disagrees."""
    step = trainer.counter.step
    wrong = trainer.wrong_values(step)
    named = os.path.basename(path.rstrip("/"))
    if named != f"step_{step:08d}":
        wrong.append(f"{named} holds step {step}")
    return step, wrong


def first_step(manager: CheckpointManager, loaded: int | None) -> int:
    """The step to save next: after the loaded one, or, when nothing could be loaded, after whatever
    `latest` names (steps keep increasing across restarts)."""
    if loaded is not None:
        return loaded + 1
    latest = manager.latest_checkpoint()
    if latest is None:
        return 1
    try:
        return int(os.path.basename(latest.rstrip("/")).split("_")[-1]) + 1
    except ValueError:
        return 1


def pause_token(path: Path) -> str | None:
    """The content of the pause file, or None when there is none."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def train(args: argparse.Namespace, rank: int, world: int, journal: EventLog) -> None:
    """Resume, then save every step until the stop file appears; close the manager cleanly."""
    trainer = Trainer(rank, world, args.model_mb)
    options: dict[str, Any] = {"daemon_timeout": args.daemon_timeout} if args.daemon_timeout > 0 else {}
    manager = CheckpointManager(
        trainer,
        args.root,
        endpoint=args.endpoint,
        auto_start=False,
        connect=False,
        timeout=args.timeout,
        retention=RetentionPolicy(keep_last=args.keep_last),
        **options,
    )
    loaded = load_latest(manager, trainer, journal)
    step = first_step(manager, loaded)
    journal.write(
        "start", step=step, world=world, resumed_from=loaded, incarnation=args.incarnation, job=manager.rank_info.job_id
    )
    saver = Saver(manager, journal)
    stop_file, pause_file = Path(args.stop_file), Path(args.pause_file)
    rng = random.Random(os.getpid())
    while not any_rank(stop_file.exists()):
        if any_rank(pause_file.exists()):
            saver.collect(block=True)
            journal.write("paused", token=pause_token(pause_file), next_step=step)
            while any_rank(pause_file.exists() and not stop_file.exists()):
                time.sleep(0.05)
            journal.write("resumed", next_step=step)
            continue
        time.sleep(rng.uniform(args.step_ms[0], args.step_ms[1]) / 1000)  # "training"
        trainer.tag(step)
        saver.save(step)
        saver.collect()
        step += 1
    saver.collect(block=True)
    manager.close()
    journal.write("stopped", next_step=step)


def load_only(args: argparse.Namespace, rank: int, world: int, journal: EventLog) -> int:
    """Load `latest` in a fresh process without a daemon; 0 when it holds exactly its step."""
    trainer = Trainer(rank, world, args.model_mb)
    manager = CheckpointManager(trainer, args.root, connect=False)
    loaded = load_and_record(manager, trainer, journal, fresh=True)
    return 0 if loaded is not None and not loaded[1] else EXIT_BAD_LOAD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--stop-file", default="")
    parser.add_argument("--pause-file", default="")
    parser.add_argument("--model-mb", type=float, default=32.0)
    parser.add_argument("--timeout", type=float, default=20.0, help="CheckpointManager timeout")
    parser.add_argument(
        "--daemon-timeout",
        type=float,
        default=3.0,
        help="CheckpointManager daemon_timeout; 0 leaves it out (a client without the option)",
    )
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--step-ms", type=float, nargs=2, default=(20.0, 50.0), help="sleep range per step")
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--incarnation", type=int, default=0, help="recorded in the start event")
    args = parser.parse_args(argv)
    if not args.load_only and not (args.stop_file and args.pause_file):
        parser.error("--stop-file and --pause-file are needed unless --load-only")
    return args


def main() -> int:
    """Run the trainer; every failure that is not a CheckpointError with a reason is fatal."""
    args = parse_args()
    rank, world = rank_and_world()
    journal = EventLog(Path(args.log_dir) / f"events-rank{rank}.jsonl", rank)
    try:
        if args.load_only:
            status = load_only(args, rank, world, journal)
        else:
            train(args, rank, world, journal)
            status = 0
    except BaseException as exc:
        journal.failure("fatal", exc, traceback=traceback.format_exc())
        return EXIT_FATAL
    if dist.is_initialized():
        dist.destroy_process_group()
    journal.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
