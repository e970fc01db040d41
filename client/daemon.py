"""Finding the node daemon for a root, and starting one when nothing answers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Optional, Tuple

from ckptd.client.errors import DaemonRequestError, DaemonUnavailableError, RootInUseError
from ckptd.client.transport import DaemonConnection, NotificationHandler
from ckptd.disk import runtime
from ckptd.proto import messages
from ckptd.proto.config import ENDPOINT_ENV, DaemonArgs, ExitCode, serve_argv, with_fallbacks
from ckptd.proto.errors import ErrorCode
from ckptd.proto.ownership import RunIdentity

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
IDLE_EXIT_S = 30.0
"""An auto-started daemon exits once its clients are gone and it has been idle this long (unless
`daemon_args` says otherwise)."""
OTHER_DAEMON_GRACE_S = 2.0
"""After the daemon we started exits, how long another daemon for the root may take to answer."""
CLAIM_POLL_S = 0.5
"""How often to ask again while the daemon watches another host's claim on the root."""


def resolve_endpoint(root: str, endpoint: Optional[str] = None) -> str:
    """The explicit endpoint, else $CKPTD_ENDPOINT, else the per-user default for `root`."""
    return endpoint or os.environ.get(ENDPOINT_ENV) or runtime.default_endpoint(root)


def _exit_reason(path: str) -> str:
    """What a daemon that exited at start logged last: the message of its last line, and where the log is."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return f"(no log at {path})"
    if not lines:
        return f"(empty log {path})"
    message = lines[-1].split(": ", 1)[1] if " pid=" in lines[-1] and ": " in lines[-1] else lines[-1]
    return f"{message} (log: {path})"


def start_daemon(root: str, endpoint: str, daemon_args: DaemonArgs = ()) -> subprocess.Popen:
    """Start a detached daemon that exits on its own once its clients are gone and it is idle.

    It runs in its own session so that killing the training job's process group does not kill
    the writer that owns the checkpoint being committed. `daemon_args` may ask for other options.
    """
    os.makedirs(runtime.runtime_dir(), mode=0o700, exist_ok=True)
    log_path = runtime.daemon_log_path(endpoint)
    command = [
        sys.executable,
        "-m",
        "ckptd.service",
        "serve",
        "--root",
        root,
        "--endpoint",
        endpoint,
        *serve_argv(with_fallbacks(daemon_args, exit_when_idle=IDLE_EXIT_S)),
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
    daemon_args: DaemonArgs = (),
    run: Optional[RunIdentity] = None,
) -> Tuple[DaemonConnection, str]:
    """Connect and say hello (as a client of `run`, which the daemon admits or refuses with
    RootInUseError); if nothing answers and `may_start`, start a daemon; wait up to `wait_s`.
    Returns the connection and the answering daemon's instance id."""
    connection = DaemonConnection(endpoint, on_notification)
    try:
        return connection, ensure_serving(
            connection, root, may_start=may_start, wait_s=wait_s, daemon_args=daemon_args, run=run
        )
    except BaseException:
        connection.close()
        raise


def ensure_serving(
    connection: DaemonConnection,
    root: str,
    *,
    may_start: bool,
    wait_s: float,
    daemon_args: DaemonArgs = (),
    run: Optional[RunIdentity] = None,
) -> str:
    """Say hello until a daemon answers (starting one if `may_start`); returns its instance id.

    If the daemon we started exits, another one may still answer (a racing start on this node); when
    none does within `OTHER_DAEMON_GRACE_S`, raise with the reason the daemon logged, not after `wait_s`."""
    started: Optional[subprocess.Popen] = None
    exited_at: Optional[float] = None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return hello(connection, root, PROBE_TIMEOUT_S, run)
        except DaemonUnavailableError:
            pass
        except DaemonRequestError as exc:
            if exc.code != ErrorCode.ROOT_CLAIM_PENDING or time.monotonic() > deadline:
                raise
            log.info("%s", exc)
            time.sleep(CLAIM_POLL_S)
            continue
        if may_start and started is None:
            started = start_daemon(root, connection.endpoint, daemon_args)
        elif started is not None and started.poll() is not None:
            exited_at = exited_at or time.monotonic()
            if started.returncode == ExitCode.USAGE or time.monotonic() - exited_at >= OTHER_DAEMON_GRACE_S:
                raise DaemonUnavailableError(
                    f"the ckptd daemon started for {root} exited with status {started.returncode}: "
                    f"{_exit_reason(runtime.daemon_log_path(connection.endpoint))}"
                )
        if time.monotonic() > deadline:
            hint = (
                "start one with `ckptd serve --root ...`"
                if not may_start
                else "see the daemon log in " + runtime.runtime_dir()
            )
            raise DaemonUnavailableError(
                f"no ckptd daemon answered at {connection.endpoint} within {wait_s:g} s; {hint}"
            )


def hello(connection: DaemonConnection, root: str, timeout: float, run: Optional[RunIdentity] = None) -> str:
    """Register this process (as a client of `run`) with the daemon; returns the daemon's instance id
    (new at every start). Raises RootInUseError when another live run owns the root."""
    body = messages.Hello(os.getpid(), os.path.realpath(root), run).to_wire()
    try:
        reply = connection.request(messages.HELLO, body, timeout=timeout)
    except DaemonRequestError as exc:
        if exc.code == ErrorCode.ROOT_IN_USE:
            raise RootInUseError(str(exc)) from None
        raise
    return str(reply.body.get("instance", ""))


def bye(connection: DaemonConnection, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Tell the daemon this client is done, so that its run gives the root up once its last client has."""
    try:
        connection.request(messages.BYE, {}, timeout=timeout)
    except (DaemonUnavailableError, DaemonRequestError) as exc:
        log.debug("the goodbye to %s went unanswered: %s", connection.endpoint, exc)
