"""Finding the node daemon for a root, and starting one when nothing answers."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from typing import Optional, Sequence, Tuple

from ckptd.client.errors import DaemonUnavailableError
from ckptd.client.transport import DaemonConnection, NotificationHandler
from ckptd.proto import layout, messages

log = logging.getLogger(__name__)

ENDPOINT_ENV = "CKPTD_ENDPOINT"
PROBE_TIMEOUT_S = 1.0
IDLE_EXIT_S = 30.0
DAEMON_EXIT_USAGE = 2
"""`ckptd serve` exit status for settings it refuses (service/cli.py EXIT_USAGE)."""


def resolve_endpoint(root: str, endpoint: Optional[str] = None) -> str:
    """The explicit endpoint, else $CKPTD_ENDPOINT, else the per-user default for `root`."""
    return endpoint or os.environ.get(ENDPOINT_ENV) or layout.default_endpoint(root)


def daemon_log_path(endpoint: str) -> str:
    """Where a daemon auto-started on `endpoint` logs (one file per endpoint: a machine playing
    several nodes of a job runs several daemons for one root)."""
    token = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    return os.path.join(layout.runtime_dir(), f"daemon-{token}.log")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return f"(no log at {path})"
    return lines[-1] if lines else f"(empty log {path})"


def start_daemon(root: str, endpoint: str, extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start a detached daemon that exits on its own once its clients are gone and it is idle.

    It runs in its own session so that killing the training job's process group does not kill
    the writer that owns the checkpoint being committed.
    """
    os.makedirs(layout.runtime_dir(), mode=0o700, exist_ok=True)
    log_path = daemon_log_path(endpoint)
    command = [
        sys.executable, "-m", "ckptd.service", "serve", "--root", root, "--endpoint", endpoint,
        "--exit-when-idle", str(IDLE_EXIT_S), *extra_args,
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, close_fds=True
        )
    log.info("started ckptd daemon pid %d for %s on %s (log %s)", process.pid, root, endpoint, log_path)
    return process


def connect(
    root: str,
    endpoint: str,
    on_notification: NotificationHandler,
    *,
    may_start: bool,
    wait_s: float = 60.0,
    daemon_args: Sequence[str] = (),
) -> Tuple[DaemonConnection, str]:
    """Connect and say hello; if nothing answers and `may_start`, start a daemon; wait up to `wait_s`.
    Returns the connection and the answering daemon's instance id."""
    connection = DaemonConnection(endpoint, on_notification)
    try:
        return connection, ensure_serving(connection, root, may_start=may_start, wait_s=wait_s, daemon_args=daemon_args)
    except DaemonUnavailableError:
        connection.close()
        raise


def ensure_serving(
    connection: DaemonConnection, root: str, *, may_start: bool, wait_s: float, daemon_args: Sequence[str] = ()
) -> str:
    """Say hello until a daemon answers (starting one if `may_start`); returns its instance id."""
    started: Optional[subprocess.Popen] = None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return hello(connection, root, PROBE_TIMEOUT_S)
        except DaemonUnavailableError:
            pass
        if may_start and started is None:
            started = start_daemon(root, connection.endpoint, daemon_args)
        elif started is not None and started.poll() == DAEMON_EXIT_USAGE:
            raise DaemonUnavailableError(
                f"the ckptd daemon started for {root} refused its settings: {_last_line(daemon_log_path(connection.endpoint))}"
            )
        elif started is not None and started.poll() not in (None, 0):
            log.warning("the daemon we started exited with %s; another one may own the root", started.returncode)
        if time.monotonic() > deadline:
            hint = "start one with `ckptd serve --root ...`" if not may_start else "see the daemon log in " + layout.runtime_dir()
            raise DaemonUnavailableError(f"no ckptd daemon answered at {connection.endpoint} within {wait_s:g} s; {hint}")


def hello(connection: DaemonConnection, root: str, timeout: float) -> str:
    """Register this process with the daemon; returns the daemon's instance id (new at every start)."""
    reply = connection.request(messages.HELLO, {"pid": os.getpid(), "root": os.path.realpath(root)}, timeout=timeout)
    return str(reply.body.get("instance", ""))
