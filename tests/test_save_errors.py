"""Errors a trainer meets while saving, each provoked for real against a daemon (docs/troubleshooting.md):
the error type, a message that names the cause, within seconds, and no checkpoint touched."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch
from helpers import Daemon, Holder

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointManager,
    PreparedComponent,
    SharingPattern,
    StateComponent,
)
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology


def model(value: float) -> List[PreparedComponent]:
    """8 MB of state: two seconds of writing at 4 MB/s."""
    state = {"w": torch.full((2_000_000,), value)}
    return [PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))]


@contextlib.contextmanager
def client_of(daemon: Daemon, **options: object) -> Iterator[CheckpointClient]:
    """One rank's client of `daemon`, closed at the end."""
    options = {"auto_start": False, "timeout": 60.0, **options}
    client = CheckpointClient(
        str(daemon.root), RankInfo(0, Topology.single_node(1), job_id="errors"), endpoint=daemon.endpoint, **options
    )
    try:
        yield client
    finally:
        client.close(timeout=10)


def committed(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_saving_a_step_already_in_flight_is_refused(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--max-write-mbps", "4")
    with client_of(daemon) as client:
        first = client.save(1, model(1.0))
        with pytest.raises(CheckpointError, match="a save of step 1 is already in flight on this rank"):
            client.save(1, model(2.0))
        assert first.wait(30).endswith("step_00000001")
    assert committed(daemon.root) == ["step_00000001"]


def test_staging_memory_still_held_after_timeout_is_a_clear_error(daemon: Daemon) -> None:
    with client_of(daemon, timeout=1.0, daemon_timeout=60) as client:
        first = client.save(1, model(1.0))
        os.kill(daemon.process.pid, signal.SIGSTOP)  # the daemon cannot release step 1's memory
        started = time.monotonic()
        try:
            with pytest.raises(
                CheckpointError,
                match="staging regions still busy after 1 s: the daemon has not finished writing the previous save",
            ):
                client.save(2, model(2.0))
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        assert time.monotonic() - started < 5
        assert first.wait(30).endswith("step_00000001")
    assert committed(daemon.root) == ["step_00000001"]


def test_waiting_less_than_a_save_takes_says_so_and_the_save_goes_on(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--max-write-mbps", "4")
    with client_of(daemon) as client:
        handle = client.save(1, model(1.0))
        with pytest.raises(CheckpointError, match="checkpoint of step 1 not committed within 0.1 s"):
            handle.wait(0.1)
        assert handle.wait(30).endswith("step_00000001")
    assert committed(daemon.root) == ["step_00000001"]


def test_the_saved_topology_of_an_empty_root_is_a_clear_error(tmp_path: Path) -> None:
    provider = type("Provider", (), {"get_state_components": lambda self: []})()
    manager = CheckpointManager(
        provider,
        str(tmp_path / "ckpt"),
        connect=False,
        auto_start=False,
        rank_info=RankInfo(0, Topology.single_node(1), job_id="errors"),
    )
    with pytest.raises(CheckpointError, match=f"no committed checkpoint under {tmp_path / 'ckpt'}"):
        manager.saved_topology()
