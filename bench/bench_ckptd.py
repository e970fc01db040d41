"""The ckptd rows: a CheckpointManager with an auto-started daemon, saving the statefuls as GLOBAL
components, plainly (`ckptd`) or with save_checkpoint(step, overlap=True) (`ckptd overlap`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from bench_saver import Pending, Saver
from bench_state import RowContext
from bench_system import pid_gone


def _provider(statefuls: Dict[str, Any]) -> Any:
    """A state provider with one GLOBAL component per stateful."""
    from ckptd.client import SharingPattern, StateComponent

    class Provider:
        def get_state_components(self) -> List[Any]:
            return [StateComponent(key, s, SharingPattern.GLOBAL) for key, s in statefuls.items()]

    return Provider()


def _staged_time(handle: Any) -> Callable[[], Optional[float]]:
    """Watch handle.wait_staged() in a thread; return what says when (perf_counter) it returned."""
    staged: Dict[str, float] = {}

    def waiter() -> None:
        handle.wait_staged()
        staged["t"] = time.perf_counter()

    threading.Thread(target=waiter, name="bench-wait-staged", daemon=True).start()
    return lambda: staged.get("t")


def _stop_daemon(pid: int) -> None:
    """SIGTERM the daemon and wait up to 15 s for it to exit."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


class CkptdSaver(Saver):
    """CheckpointManager(provider, root, auto_start=True); save_checkpoint, handle.wait(), load_checkpoint()."""

    blocking = False
    has_load = True
    overlap = False

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        from ckptd.client import CheckpointManager
        from ckptd.disk import runtime

        provider = _provider(ctx.statefuls)
        self.root = os.path.join(workdir, "ckpt")
        os.makedirs(self.root)
        self.manager = CheckpointManager(provider, self.root, auto_start=True)
        self._lock_path = runtime.daemon_lock_path(self.root)
        self._daemon_pid: Optional[int] = None

    def save(self, i: int) -> Pending:
        if self.overlap:
            handle = self.manager.save_checkpoint(i + 1, overlap=True)
        else:
            handle = self.manager.save_checkpoint(i + 1)
        watch_staged = self.overlap and hasattr(handle, "wait_staged")
        staged_at = _staged_time(handle) if watch_staged else None

        def wait() -> None:
            self.last_output = handle.wait()

        return Pending(handle.done, wait) if staged_at is None else Pending(handle.done, wait, staged_at)

    def ready_after(self, since: float) -> Optional[float]:
        self.manager.wait_staging_allocated()
        ready_at = self.manager.client.staging_allocated_at
        return None if ready_at is None else ready_at - since

    def writer_pid(self) -> Optional[int]:
        if self._daemon_pid is None:
            try:
                with open(self._lock_path) as f:
                    text = f.read().strip()
                self._daemon_pid = int(text) if text.isdigit() else None
            except OSError:
                return None
        return self._daemon_pid

    def load(self) -> None:
        self.manager.load_checkpoint()

    def close(self) -> None:
        self.manager.close()
        pid = self.writer_pid()
        if pid is not None and not pid_gone(pid):
            # The auto-started daemon (a process this row started) would exit by itself after its
            # idle timeout; stop it now so it does not linger into the next row.
            _stop_daemon(pid)


class CkptdOverlapSaver(CkptdSaver):
    """The same with save_checkpoint(step, overlap=True): staged when handle.wait_staged() returns."""

    overlap = True
