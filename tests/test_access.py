"""Access control on the node: the socket lives in a directory only its user can enter, and the
daemon drops ipc connections from other users even when the socket itself is reachable."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from helpers import Daemon

from ckptd.disk import runtime


def test_default_socket_directory_is_private(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    root = tmp_path / "ckpt"
    endpoint = runtime.default_endpoint(str(root))
    daemon = daemon_factory(root=root, endpoint=endpoint)
    socket_path = Path(endpoint[len("ipc://") :])
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert daemon.process.poll() is None


OTHER_USER = textwrap.dedent("""
    import os, sys, zmq
    from ckptd.proto import messages
    os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter's files may be private
    path = sys.argv[1][len("ipc://"):]
    print("REACHABLE" if os.access(path, os.R_OK | os.W_OK) else "UNREACHABLE")
    ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(sys.argv[1])
    s.send(messages.encode("status", {}, 1))
    print("ANSWERED" if s.poll(2000) else "NO ANSWER")
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
def test_other_users_get_no_answer_even_through_a_reachable_socket(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="ckptd-shared-", dir="/tmp"))  # outside pytest's private tmp
    try:
        os.chmod(shared, 0o777)
        endpoint = f"ipc://{shared}/d.sock"
        daemon_factory(endpoint=endpoint)
        os.chmod(shared / "d.sock", 0o666)  # a careless chmod: the uid filter still holds
        script = shared / "other.py"
        script.write_text(OTHER_USER)
        os.chmod(script, 0o644)
        result = subprocess.run([sys.executable, str(script), endpoint], capture_output=True, text=True, timeout=60)
        assert result.stdout.split() == ["REACHABLE", "NO", "ANSWER"], result.stdout + result.stderr
        mine = subprocess.run(
            [sys.executable, "-c", OTHER_USER.replace("os.setgid(65534); os.setuid(65534)", "pass"), endpoint],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert mine.stdout.split() == ["REACHABLE", "ANSWERED"], mine.stdout + mine.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)
