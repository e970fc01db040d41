"""Set-up mistakes get the daemon's own reason within seconds (issue 12): when the daemon that local
rank 0 starts cannot serve, CheckpointManager raises at construction with what the daemon logged,
instead of waiting out its connect timeout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
from helpers import Daemon, Holder, short_endpoint, with_own_dev_shm

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointManager,
    DaemonUnavailableError,
    RankInfo,
    SharingPattern,
    StateComponent,
    Topology,
)
from ckptd.disk.verify import verify_checkpoint

WITHIN_S = 8.0
"""A start failure is reported within this long (the daemon's start plus a two-second grace)."""


class Provider:
    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", Holder({"w": torch.ones(4)}), SharingPattern.GLOBAL)]


def construct(root: Path | str, **options: Any) -> None:
    """Build a manager that auto-starts its daemon; it must fail to."""
    manager = CheckpointManager(
        Provider(), str(root), rank_info=RankInfo(0, Topology.single_node(1), job_id="setup"), **options
    )
    manager.close()
    raise AssertionError("the manager was built, but its daemon should not have been able to serve")


def failure(root: Path | str, match: str, **options: Any) -> None:
    """Construction raises DaemonUnavailableError matching `match`, within WITHIN_S."""
    started = time.monotonic()
    with pytest.raises(DaemonUnavailableError, match=match):
        construct(root, **options)
    elapsed = time.monotonic() - started
    assert elapsed < WITHIN_S, f"the reason took {elapsed:.1f} s"


def test_a_root_that_is_a_file_is_refused_with_the_os_error(tmp_path: Path) -> None:
    root = tmp_path / "not-a-dir"
    root.write_text("x")
    failure(root, rf"exited with status 2: cannot use {root} as the checkpoint root: Not a directory;")
    assert root.read_text() == "x"


def test_a_root_that_cannot_be_created_is_refused_with_the_os_error() -> None:
    failure(
        "/proc/ckptd-root",
        r"cannot use /proc/ckptd-root as the checkpoint root: (No such file or directory|Permission denied)",
    )


def test_an_endpoint_path_too_long_is_refused(tmp_path: Path) -> None:
    endpoint = "ipc:///tmp/" + "x" * 150
    failure(
        tmp_path / "ckpt",
        r"cannot connect to ipc:///tmp/x+: (File name too long|.*longer than 107 characters)",
        endpoint=endpoint,
    )


def test_a_root_another_daemon_serves_names_that_daemon(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    other = daemon_factory()
    with CheckpointManager(
        Provider(),
        str(other.root),
        endpoint=other.endpoint,
        auto_start=False,
        rank_info=RankInfo(0, Topology.single_node(1), job_id="owner"),
    ) as owner:
        committed = owner.save_checkpoint(1).wait(30)
    failure(
        other.root,
        rf"exited with status 3: another ckptd daemon \(pid {other.process.pid}\) already serves this root",
        endpoint=short_endpoint(),
    )
    assert verify_checkpoint(committed) == []
    assert other.process.poll() is None


def test_a_bad_cluster_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"short")
    os.chmod(secret, 0o600)
    failure(
        tmp_path / "ckpt",
        r"exited with status 2: .*secret",
        daemon_args=["--num-nodes", "2", "--leader", "127.0.0.1:1", "--cluster-secret", str(secret)],
    )


def test_world_size_without_a_process_group_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        CheckpointError,
        match="WORLD_SIZE is 2, but torch.distributed is not initialized: call "
        r"torch.distributed.init_process_group\(...\) before",
    ):
        CheckpointManager(Provider(), str(tmp_path / "ckpt"), auto_start=False, connect=False)
    assert not (tmp_path / "ckpt").exists()


def test_single_process_runs_never_share_a_job_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not even under torchrun's default rendezvous id, which is the same for every job."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "1")
    first, second = (
        CheckpointManager(Provider(), str(tmp_path / "ckpt"), auto_start=False, connect=False) for _ in range(2)
    )
    assert first.rank_info.job_id != second.rank_info.job_id
    assert "none" not in (first.rank_info.job_id, second.rank_info.job_id)


@pytest.mark.parametrize(
    "build,error,match",
    [
        (
            lambda: StateComponent("m", Holder({}), SharingPattern.GLOBAL, process_group_name="tp"),
            ValueError,
            "component 'm': process_group_name applies only to PER_GROUP",
        ),
        (
            lambda: StateComponent("m", Holder({}), SharingPattern.PER_RANK, spread=True),
            ValueError,
            "component 'm': spread applies only to REPLICATED, not PER_RANK",
        ),
        (
            lambda: StateComponent("m", Holder({}), SharingPattern.GLOBAL, metadata={"lr": [1]}),
            ValueError,
            "component 'm': metadata must map strings to str/int/float/bool/None",
        ),
    ],
    ids=["group name without PER_GROUP", "spread without REPLICATED", "metadata value"],
)
def test_a_misdeclared_component_is_refused_when_built(
    build: Callable[[], StateComponent], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


class TwoOfOneKey:
    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", Holder({}), SharingPattern.GLOBAL)] * 2


@pytest.mark.parametrize(
    "provider,options,error,match",
    [
        (object(), {}, TypeError, r"the provider needs get_state_components\(\)"),
        (TwoOfOneKey(), {}, CheckpointError, r"duplicate component keys: \['model', 'model'\]"),
        (Provider(), {"when_busy": "drop"}, ValueError, "when_busy must be 'wait' or 'skip', not 'drop'"),
        (Provider(), {"daemon_timeout": 0}, ValueError, "daemon_timeout must be positive, not 0"),
    ],
    ids=["provider without components", "duplicate keys", "when_busy", "daemon_timeout"],
)
def test_a_misdeclared_manager_is_refused_at_construction(
    tmp_path: Path, provider: Any, options: dict, error: type, match: str
) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=match):
        CheckpointManager(
            provider,
            str(tmp_path / "ckpt"),
            endpoint=short_endpoint(),
            auto_start=False,
            rank_info=RankInfo(0, Topology.single_node(1), job_id="setup"),
            **options,
        )
    assert time.monotonic() - started < WITHIN_S
    assert not (tmp_path / "ckpt").exists()


def test_no_daemon_at_the_endpoint_is_reported_after_the_connect_timeout(tmp_path: Path) -> None:
    endpoint = short_endpoint()
    started = time.monotonic()
    with pytest.raises(
        DaemonUnavailableError,
        match=rf"no ckptd daemon answered at {endpoint} within 2 s; start one "
        r"with `ckptd serve --root \.\.\.`",
    ):
        CheckpointClient(
            str(tmp_path / "ckpt"),
            RankInfo(0, Topology.single_node(1), job_id="setup"),
            endpoint=endpoint,
            auto_start=False,
            connect_timeout=2,
        )
    assert time.monotonic() - started < 2 + WITHIN_S
    assert not (tmp_path / "ckpt").exists()


FULL_SHM_TRAINER = """
import sys, torch
from ckptd.client import CheckpointError, CheckpointManager, RankInfo, SharingPattern, StateComponent, Topology

class Holder:
    def state_dict(self): return {"w": torch.ones(4 * 2**20 // 4)}
    def load_state_dict(self, state): pass

class Provider:
    def get_state_components(self): return [StateComponent("model", Holder(), SharingPattern.GLOBAL)]

manager = CheckpointManager(Provider(), sys.argv[1], endpoint=sys.argv[2], auto_start=False, timeout=10,
                            rank_info=RankInfo(0, Topology.single_node(1), job_id="shm"))
try:
    manager.save_checkpoint(2).wait(30)
except CheckpointError as exc:
    sys.stdout.write(f"{type(exc).__name__}: {exc}\\n")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to give the trainer a 1 MiB /dev/shm of its own",
)
def test_a_full_dev_shm_fails_the_save_naming_the_staging_region(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    with CheckpointManager(
        Provider(),
        str(daemon.root),
        endpoint=daemon.endpoint,
        auto_start=False,
        rank_info=RankInfo(0, Topology.single_node(1), job_id="shm"),
    ) as before:
        committed = before.save_checkpoint(1).wait(30)
    trainer = with_own_dev_shm("size=1m", sys.executable, "-c", FULL_SHM_TRAINER, str(daemon.root), daemon.endpoint)
    started = time.monotonic()
    result = subprocess.run(trainer, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"CheckpointError: cannot allocate a 4 MiB staging region in /dev/shm: 1 MiB free; "
        r"/dev/shm needs room for this rank's state",
        result.stdout,
    ), (result.stdout, result.stderr)
    assert time.monotonic() - started < 60
    assert [p.name for p in daemon.root.glob("step_*")] == ["step_00000001"]
    assert verify_checkpoint(committed) == []
