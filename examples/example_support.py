"""Scaffolding the examples share: their common options, `--crash-at`, `--record` and progress lines.

Nothing here is ckptd usage: every example declares its state, builds its CheckpointManager and
calls save_checkpoint / load_checkpoint in its own file. This module only lets the resume tests
(tests/test_examples_resume.py, tests/test_examples_ddp_resume.py) kill a run half way and compare
it, resumed, with an uninterrupted one. The examples run as scripts (`python examples/x.py`, or
under torchrun), so Python finds this module in the script's own directory.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional

import torch
import torch.distributed as dist
from torch import nn

from ckptd.client import CheckpointError, SaveHandle

Say = Callable[[str], None]
"""Prints one progress line (see `rank0_say`)."""


def example_parser(description: str, root: str, steps: int = 40, save_every: int = 5) -> argparse.ArgumentParser:
    """The options every example takes: --root, --steps, --save-every, --crash-at, --resume and --record.

    An example adds its own options to the parser, then calls `parse_args()`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=root, help=f"checkpoint root (default {root})")
    parser.add_argument("--steps", type=int, default=steps, help=f"train until this step (default {steps})")
    parser.add_argument(
        "--save-every", type=int, default=save_every, help=f"checkpoint every N steps (default {save_every})"
    )
    parser.add_argument(
        "--crash-at",
        type=int,
        metavar="STEP",
        help="SIGKILL every rank right after this step's save_checkpoint returned",
    )
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint first")
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="each rank saves its losses and final state as FILE.rank<R>[.pt], for the resume tests",
    )
    return parser


def rank0_say() -> Say:
    """A print for progress lines: "[rank 0] ..." on rank 0, nothing on the other ranks.

    In a process without a process group (single_device.py) a plain print, without the prefix.
    Call it after `dist.init_process_group`.
    """
    if not dist.is_initialized():
        return lambda message: print(message, flush=True)
    if dist.get_rank() != 0:
        return lambda message: None
    return lambda message: print(f"[rank 0] {message}", flush=True)


def report(handles: List[SaveHandle], wait: bool = False) -> List[str]:
    """Take the saves that have resolved out of `handles` and describe each, without blocking.

    With `wait`, take every save, waiting for each in turn. A description reads "step N committed
    -> DIR" (DIR relative to the working directory) or "step N FAILED: <the reason>".
    """
    notes = []
    for handle in [h for h in handles if wait or h.done()]:
        handles.remove(handle)
        try:
            notes.append(f"step {handle.step} committed -> {os.path.relpath(handle.wait())}")
        except CheckpointError as exc:
            notes.append(f"step {handle.step} FAILED: {exc}")
    return notes


def crash(step: int, say: Say) -> NoReturn:
    """`--crash-at STEP`: SIGKILL this process right after `step`'s save_checkpoint returned.

    Under a process group every rank calls it, and a barrier comes first: once every rank's save
    has returned, the daemon owns the checkpoint and commits it with every trainer dead. The message
    comes before the barrier: after it, the first rank to die gets the others terminated by torchrun,
    maybe before they could print.
    """
    if dist.is_initialized():
        say(f"step {step}: simulating a crash, every rank SIGKILLs itself")
        dist.barrier()
    else:
        say(f"step {step}: simulating a crash (SIGKILL)")
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not end this process")


class Recorder:
    """`--record FILE`: what this rank trained, for comparing runs bitwise, torch.save'd to FILE.rank<R><suffix>.

    `record` is the start of it; `add` appends to the lists in it. Without --record (`path` None)
    nothing is written.
    """

    def __init__(self, path: Optional[str], rank: int, record: Dict[str, Any], suffix: str = "") -> None:
        self.path = f"{path}.rank{rank}{suffix}" if path else None
        self.record = record

    def add(self, key: str, item: Any) -> None:
        """Append `item` to the list under `key`."""
        self.record[key].append(item)

    def write(
        self, model: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None, **fields: Any
    ) -> None:
        """Write the record: at the end of a run with copies of the final model and optimizer state
        and any further `fields`, or without them just before a simulated crash."""
        if self.path is None:
            return
        self.record.update(fields)
        if model is not None:
            self.record["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if optimizer is not None:
            self.record["optimizer"] = copy.deepcopy(optimizer.state_dict())
        torch.save(self.record, self.path)


def leave_after_fsdp() -> NoReturn:
    """End a process that ran FSDP2 over gloo: tear the process groups down, flush, and exit 0 without
    the interpreter's own teardown. There, objects torch still caches (device meshes and the process
    groups they hold) are destroyed late, and about one run in fifty aborted with "terminate called
    without an active exception" on the 2-core development VM (torch 2.13, gloo, CPU)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
