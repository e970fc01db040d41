"""Daemon lifecycle: one daemon per root, leftovers removed at start, auto-start that outlives the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

from helpers import Daemon, wait_for

from ckptd.disk import runtime
from ckptd.service.regions import pid_alive


def test_second_daemon_for_the_same_root_exits_with_a_clear_error(daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory()
    second = daemon_factory(root=first.root, wait=False)
    assert second.process.wait(30) == 3
    assert "already serves this root" in second.log() and str(first.process.pid) in second.log()
    assert first.process.poll() is None


def test_restart_removes_leftovers_of_an_interrupted_save(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    leftover = root / ".tmp-step_00000009-deadbeef" / "model"
    leftover.mkdir(parents=True)
    (leftover / "global.safetensors").write_bytes(b"partial")
    (root / "latest.tmp").write_text("step_00000009")
    daemon = daemon_factory(root=root)
    assert sorted(p.name for p in root.iterdir()) == []
    assert "removed leftover" in daemon.log()


TRAINER = textwrap.dedent("""
    import sys, torch
    from ckptd.client import CheckpointManager, StateComponent, SharingPattern
    class Provider:
        def __init__(self):
            self.model = torch.nn.Linear(1000, 1000)
        def get_state_components(self):
            return [StateComponent("model", self.model, SharingPattern.GLOBAL)]
    manager = CheckpointManager(Provider(), sys.argv[1], daemon_args=["--exit-when-idle", "1", "--max-write-mbps", "4"])
    handle = manager.save_checkpoint(1)
    print("handed over", handle.done(), flush=True)
    # exits without waiting: the daemon owns the rest of the save
""")


def test_auto_started_daemon_finishes_the_save_after_the_trainer_exits_then_idles_out(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "handed over False" in result.stdout
    lock = Path(env["XDG_RUNTIME_DIR"]) / "ckptd" / f"{runtime.root_token(str(root))}.lock"
    daemon_pid = int(lock.read_text())
    assert wait_for(lambda: (root / "latest").exists(), timeout=60), "the save never committed"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert wait_for(lambda: not pid_alive(daemon_pid) or _zombie(daemon_pid), timeout=30), (
        "daemon did not exit when idle"
    )
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ckptd-{os.getuid()}-") and _owner_gone(n)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _owner_gone(name: str) -> bool:
    pid = name.split("-")[2]
    return pid.isdigit() and not pid_alive(int(pid))
