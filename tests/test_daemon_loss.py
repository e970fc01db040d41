"""A daemon killed in the middle of a save: the trainer's handle fails with the reason instead of
hanging, the previous checkpoint stays intact, and the next save after a restart commits."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import Daemon, Holder, saved_state, wait_for

from ckptd.client import CheckpointClient, CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.loading import latest_checkpoint, read_manifest, verify_file
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology


def model(value: float) -> list[PreparedComponent]:
    state = {"w": torch.full((2_000_000,), value)}  # 8 MB: seconds to write at 2 MB/s
    return [PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))]


def client_of(daemon: Daemon, **options: Any) -> CheckpointClient:
    """Rank 0 of a one-rank job, talking to `daemon` (never starting one)."""
    return CheckpointClient(
        str(daemon.root),
        RankInfo(0, Topology.single_node(1)),
        endpoint=daemon.endpoint,
        auto_start=False,
        connect_timeout=30,
        **options,
    )


@pytest.mark.parametrize("restart_at_once", [False, True], ids=["stays-dead", "restarted"])
def test_killed_daemon_fails_the_handle_and_the_next_save_commits(
    daemon_factory: Callable[..., Daemon], restart_at_once: bool
) -> None:
    daemon = daemon_factory("--max-write-mbps", "2")
    client = client_of(daemon, timeout=60)
    try:
        client.save(
            1, [PreparedComponent(StateComponent("model", Holder({"w": torch.ones(4)}), SharingPattern.GLOBAL))]
        ).wait(30)
        handle = client.save(2, model(2.0))
        assert wait_for(lambda: any(daemon.root.glob(".tmp-*/model/global.safetensors")), timeout=10)
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        started = time.monotonic()
        if restart_at_once:
            daemon = daemon_factory(root=daemon.root, endpoint=daemon.endpoint)
        with pytest.raises(
            CheckpointError, match="step 2 was not committed: the ckptd daemon .* (stopped answering|was restarted)"
        ):
            handle.wait(60)
        assert time.monotonic() - started < 30
        assert latest_checkpoint(str(daemon.root)).endswith("step_00000001")
        first = daemon.root / "step_00000001"
        for record in read_manifest(str(first)).files():
            verify_file(str(first), record)
        if not restart_at_once:
            daemon = daemon_factory(root=daemon.root, endpoint=daemon.endpoint)
        assert not list(daemon.root.glob(".tmp-*")), "the restarted daemon removes the interrupted save"
        assert client.save(3, model(3.0)).wait(60).endswith("step_00000003")
    finally:
        client.close(timeout=5)
    assert sorted(p.name for p in Path(daemon.root).iterdir()) == ["latest", "step_00000001", "step_00000003"]


def test_a_hand_over_the_killed_daemon_never_answered_fails_once_a_new_daemon_answers(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The daemon dies between taking a save request and answering it: the rank's save() fails as
    soon as the restarted daemon answers the watchdog, not after the whole `timeout`, and that step
    never commits; the next save does, holding its own step."""
    daemon = daemon_factory()
    client = client_of(daemon, timeout=120, daemon_timeout=60)  # the restart, not silence, must end the wait
    outcome: list = []
    try:
        client.save(1, model(1.0)).wait(30)
        os.kill(daemon.process.pid, signal.SIGSTOP)  # takes the next request into its socket, never answers

        def hand_over() -> None:
            try:
                outcome.append(client.save(2, model(2.0)))
            except CheckpointError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=hand_over)
        thread.start()
        time.sleep(1.0)  # the request is sent
        assert not outcome, "the stopped daemon answered"
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        started = time.monotonic()
        daemon = daemon_factory(root=daemon.root, endpoint=daemon.endpoint)
        thread.join(60)
        assert not thread.is_alive() and time.monotonic() - started < 30, "save() waited out its timeout"
        (failed,) = outcome
        if not isinstance(failed, CheckpointError):
            with pytest.raises(CheckpointError):
                failed.wait(30)
        assert client.save(3, model(3.0)).wait(60).endswith("step_00000003")
        third = read_manifest(str(daemon.root / "step_00000003"))
        assert third.step == 3
    finally:
        client.close(timeout=5)
    assert not (daemon.root / "step_00000002").exists()
    assert torch.equal(saved_state(str(daemon.root / "step_00000003"), "model")["w"], torch.full((2_000_000,), 3.0)), (
        "step 3 holds its own step"
    )


def test_a_save_after_a_restart_the_client_did_not_see_is_addressed_again_and_commits(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Between saves (nothing in flight: no watchdog asks) the daemon is restarted. The next request,
    addressed to the old instance, is refused unread by the new one; the client addresses it again."""
    daemon = daemon_factory()
    client = client_of(daemon, timeout=60)
    try:
        client.save(1, model(1.0)).wait(30)
        daemon.stop()
        daemon = daemon_factory(root=daemon.root, endpoint=daemon.endpoint)
        assert client.save(2, model(2.0)).wait(60).endswith("step_00000002")
    finally:
        client.close(timeout=5)
    assert "read none of it" in daemon.log(), "the request was not addressed to the old daemon"
    assert torch.equal(saved_state(str(daemon.root / "step_00000002"), "model")["w"], torch.full((2_000_000,), 2.0))
