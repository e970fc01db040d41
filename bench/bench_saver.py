"""The interface every row implements: a Saver saves the live state (returning a Pending save),
names the background process that writes for it, and loads the last save back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from bench_state import RowContext
from bench_system import files_under


class RowNotApplicable(Exception):
    """This row cannot run here (for example O_DIRECT on a filesystem without it): printed as n/a."""


def _not_reported() -> Optional[float]:
    return None


@dataclass
class Pending:
    """An in-flight save as the bench sees it: is it durable yet, wait until it is, and when (a
    perf_counter time) it was staged, for savers that report that separately (else None)."""

    done: Callable[[], bool]
    wait: Callable[[], Any]
    staged_at: Callable[[], Optional[float]] = _not_reported


def finished() -> Pending:
    """The Pending of a save that was durable when its call returned."""
    return Pending(lambda: True, lambda: None)


class Saver:
    """One row: how it saves, what process writes in the background, how it loads."""

    blocking = True
    background = False  # a blocking row that can also run its save in a background thread
    has_load = False
    config: Dict[str, Any] = {}

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        self.ctx = ctx
        self.torch = ctx.torch
        self.workdir = workdir
        self.last_output: Optional[str] = None

    def save(self, i: int) -> Pending:
        """Start save number `i` of the live state."""
        raise NotImplementedError

    def background_save(self, i: int) -> Optional[Pending]:
        """For the throughput phase of a blocking row: the same save in a background thread, or None."""
        return None

    def writer_pid(self) -> Optional[int]:
        """The separate process that writes in the background, if there is one."""
        return None

    def ready_after(self, since: float) -> Optional[float]:
        """Seconds from `since` (before construction) until the saver's own buffers were ready, for
        savers that allocate in the background; None for the others."""
        return None

    def load(self) -> None:
        """Load the last save into the live state."""
        raise NotImplementedError

    def load_files(self) -> List[str]:
        """The files a load of the last save reads (to drop from the page cache before a cold load)."""
        assert self.last_output is not None
        return files_under(self.last_output)

    def close(self) -> None:
        """Release what the saver holds (buffers, processes)."""
