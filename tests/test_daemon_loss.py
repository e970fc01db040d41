"""A daemon killed in the middle of a save: the trainer's handle fails with the reason instead of
hanging, the previous checkpoint stays intact, and the next save after a restart commits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import Daemon, Holder, wait_for

from ckptd.client import CheckpointClient, CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.loading import latest_checkpoint, read_manifest, verify_file
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology


def model(value: float) -> list[PreparedComponent]:
    state = {"w": torch.full((2_000_000,), value)}  # 8 MB: seconds to write at 2 MB/s
    return [PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))]


@pytest.mark.parametrize("restart_at_once", [False, True], ids=["stays-dead", "restarted"])
def test_killed_daemon_fails_the_handle_and_the_next_save_commits(
    daemon_factory: Callable[..., Daemon], restart_at_once: bool
) -> None:
    daemon = daemon_factory("--max-write-mbps", "2")
    client = CheckpointClient(
        str(daemon.root),
        RankInfo(0, Topology.single_node(1)),
        endpoint=daemon.endpoint,
        auto_start=False,
        timeout=60,
        connect_timeout=30,
    )
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
