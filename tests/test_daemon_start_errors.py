"""The daemon's own start (docs/troubleshooting.md, "The daemon's own start"): every documented start
error, provoked with a real `ckptd serve` process. Each one must exit within seconds with the
documented status (2: bad settings, 3: another daemon or the endpoint is in the way), log the
documented message naming the cause (no traceback), and leave the checkpoint root as it found it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest
from helpers import short_endpoint, start_daemon

from ckptd.proto import layout
from ckptd.proto.config import ExitCode
from ckptd.service.curve import write_secret

WITHIN_S = 10.0
"""A daemon that cannot start exits within this long."""


ENDPOINT_ADVICE = "; choose another endpoint (CKPTD_ENDPOINT, or a shorter XDG_RUNTIME_DIR for the default one)"

Snapshot = Dict[str, Tuple[str, Optional[bytes], int]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A checkpoint root that already holds a committed-looking checkpoint and a file of the user's."""
    root = tmp_path / "ckpt"
    step = root / layout.checkpoint_dir_name(7)
    (step / "model").mkdir(parents=True)
    (step / layout.MANIFEST_NAME).write_text('{"step": 7}\n')
    (step / "model" / "global.safetensors").write_bytes(b"\x00committed tensor bytes")
    (root / layout.LATEST_NAME).write_text(layout.checkpoint_dir_name(7) + "\n")
    (root / "KEEP-ME").write_text("the user's own file\n")
    return root


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A valid cluster secret (what `ckptd keygen FILE` writes)."""
    path = tmp_path / "cluster.secret"
    write_secret(str(path))
    return path


@contextmanager
def held_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that this test binds and listens on, so that nobody else can bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        yield held.getsockname()[1]


def snapshot(root: Path) -> Snapshot:
    """Every entry under `root`: its kind, a file's bytes, and a file's modification time."""
    entries: Snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_dir():
            entries[relative] = ("dir", None, 0)
        else:
            entries[relative] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
    return entries


def refused(root: Path, log_path: Path, *args: str, endpoint: Optional[str] = None) -> Tuple[int, str]:
    """Start `ckptd serve --root root *args`, which must exit on its own within WITHIN_S without a
    traceback and without touching the root; returns its exit status and its log."""
    endpoint = endpoint or short_endpoint()
    before = snapshot(root)
    started = time.monotonic()
    daemon = start_daemon(root, log_path, *args, endpoint=endpoint, wait=False)
    try:
        status = daemon.process.wait(WITHIN_S)
    except subprocess.TimeoutExpired:
        daemon.stop(timeout=5)
        raise AssertionError(f"the daemon was still running after {WITHIN_S:.0f} s; log:\n{daemon.log()}") from None
    elapsed = time.monotonic() - started
    log = daemon.log()
    assert elapsed < WITHIN_S, f"the daemon took {elapsed:.1f} s to give up; log:\n{log}"
    assert "Traceback" not in log, log
    assert snapshot(root) == before, f"the daemon changed the root; log:\n{log}"
    if endpoint.startswith("ipc://"):
        assert not os.path.exists(endpoint[len("ipc://") :]), "the daemon left its ipc socket behind"
    return status, log


def logged_error(log: str, message: str) -> bool:
    """Whether `log` has the daemon's ERROR line with `message` (a regular expression)."""
    return re.search(rf"ERROR ckptd pid=\d+: {message}", log) is not None


def test_an_endpoint_in_use_is_refused_with_status_3(root: Path, tmp_path: Path) -> None:
    with held_port() as port:
        endpoint = f"tcp://127.0.0.1:{port}"
        status, log = refused(root, tmp_path / "daemon.log", endpoint=endpoint)
    assert status == ExitCode.ALREADY_SERVED, log
    assert logged_error(
        log, re.escape(f"cannot listen on {endpoint}: Address already in use") + ".*" + re.escape(ENDPOINT_ADVICE)
    ), log


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://nonsense", "ipc:///tmp/" + "x" * 120 + ".sock"],
    ids=["malformed tcp address", "ipc path over 107 bytes"],
)
def test_an_endpoint_that_cannot_be_bound_is_refused_with_status_2(root: Path, tmp_path: Path, endpoint: str) -> None:
    status, log = refused(root, tmp_path / "daemon.log", endpoint=endpoint)
    assert status == ExitCode.USAGE, log
    assert logged_error(log, re.escape(f"cannot listen on {endpoint}: ") + ".+" + re.escape(ENDPOINT_ADVICE)), log


def test_a_node_outside_the_job_is_refused_with_status_2(root: Path, tmp_path: Path, secret: Path) -> None:
    with held_port() as port:
        status, log = refused(
            root,
            tmp_path / "daemon.log",
            "--node",
            "3",
            "--num-nodes",
            "2",
            "--leader",
            f"127.0.0.1:{port}",
            "--cluster-secret",
            str(secret),
        )
    assert status == ExitCode.USAGE, log
    assert logged_error(log, re.escape("node 3 is not in a job of 2 node(s)")), log


def test_a_leader_address_without_a_port_is_refused_with_status_2(root: Path, tmp_path: Path, secret: Path) -> None:
    status, log = refused(
        root, tmp_path / "daemon.log", "--num-nodes", "2", "--leader", "bad-address", "--cluster-secret", str(secret)
    )
    assert status == ExitCode.USAGE, log
    assert logged_error(log, re.escape("leader address 'bad-address' must be HOST:PORT with a port in 1-65535")), log


def test_a_missing_cluster_secret_is_refused_with_status_2(root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.secret"
    with held_port() as port:
        status, log = refused(
            root,
            tmp_path / "daemon.log",
            "--num-nodes",
            "2",
            "--leader",
            f"127.0.0.1:{port}",
            "--cluster-secret",
            str(missing),
        )
    assert status == ExitCode.USAGE, log
    assert logged_error(
        log,
        re.escape(
            f"cannot open the cluster secret {missing}: No such file or directory; create one with `ckptd keygen PATH`"
        ),
    ), log
    assert not missing.exists()


def test_a_metrics_port_in_use_is_refused_with_status_2(root: Path, tmp_path: Path) -> None:
    with held_port() as port:
        status, log = refused(root, tmp_path / "daemon.log", "--metrics-port", str(port))
    assert status == ExitCode.USAGE, log
    assert logged_error(log, re.escape(f"cannot serve metrics on port {port}: ") + ".*Address already in use"), log


def test_a_leader_port_in_use_stops_the_commit_channel_with_status_3(root: Path, tmp_path: Path, secret: Path) -> None:
    with held_port() as port:
        status, log = refused(
            root,
            tmp_path / "daemon.log",
            "--node",
            "0",
            "--num-nodes",
            "2",
            "--leader",
            f"127.0.0.1:{port}",
            "--cluster-secret",
            str(secret),
        )
    assert status == ExitCode.ALREADY_SERVED, log
    assert logged_error(
        log, re.escape("cannot start the commit channel between nodes: ") + ".*Address already in use"
    ), log
