"""The commit leader's side of coordinated tier copies, without sockets: how long it waits for the
followers' share of a copy, and what it says when one fails, is gone or stays silent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import time
from pathlib import Path
from typing import Iterator, List

import pytest
import zmq.asyncio
from test_commit_logic import node_report

from ckptd.proto.cluster import TierCopyDone, TierCopyOrder
from ckptd.proto.messages import Outcome
from ckptd.service.cluster import ClusterConfig, ClusterLeader
from ckptd.service.store import CheckpointStore
from ckptd.service.tiers import CopyStopped, OtherNodesFailed


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[ClusterLeader]:
    config = ClusterConfig(0, 3, "127.0.0.1", 1, secrets.token_bytes(32), peer_timeout=0.5, node_local_root=True)
    ctx = zmq.asyncio.Context()
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        leader = ClusterLeader(config, CheckpointStore(str(tmp_path / "root")), executor, ctx)
        for node in (1, 2):  # both followers joined (as their hello would say)
            asyncio.run(leader._seen(node, f"id{node}".encode(), f"instance{node}"))
        yield leader
    ctx.term()


def test_the_followers_share_of_a_copy_is_collected_once_all_have_answered(leader: ClusterLeader) -> None:
    order = TierCopyOrder("shared", 3, "a1")
    leader.order_copies(order)
    leader._copy_answered(TierCopyDone(order, 1, ("rng/rank-00001.safetensors",)))
    leader._copy_answered(TierCopyDone(order, 2, ("rng/rank-00002.safetensors",)))
    assert sorted(leader.wait_for_copies(order, lambda: False)) == [
        "rng/rank-00001.safetensors",
        "rng/rank-00002.safetensors",
    ]


def test_a_failed_silent_or_stopped_copy_is_given_up_with_the_reason(leader: ClusterLeader) -> None:
    failed = TierCopyOrder("shared", 4, "b2")
    leader.order_copies(failed)
    leader._copy_answered(TierCopyDone(failed, 2, error="node 2 could not copy its files: disk full"))
    with pytest.raises(OtherNodesFailed, match="node 2 could not copy its files: disk full"):
        leader.wait_for_copies(failed, lambda: False)

    silent = TierCopyOrder("shared", 5, "c3")  # both alive (heartbeats go on) but node 2 never answers
    leader.tier_copy_answer_s = 0.3
    leader.order_copies(silent)
    leader._copy_answered(TierCopyDone(silent, 1, ("a",)))
    started = time.monotonic()
    with pytest.raises(OtherNodesFailed, match=r"node\(s\) \[2\] did not finish copying step 5 into tier 'shared'"):
        leader.wait_for_copies(silent, lambda: False)
    assert time.monotonic() - started < 5

    stopped = TierCopyOrder("shared", 6, "d4")
    leader.tier_copy_answer_s = 60
    leader.order_copies(stopped)
    with pytest.raises(CopyStopped):
        leader.wait_for_copies(stopped, lambda: True)


@pytest.mark.asyncio
async def test_a_follower_that_went_silent_and_restarted_no_longer_counts_as_gone(tmp_path: Path) -> None:
    config = ClusterConfig(0, 2, "127.0.0.1", 1, secrets.token_bytes(32), peer_timeout=0.2, heartbeat_s=0.05)
    ctx = zmq.asyncio.Context()
    announced: List[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        leader = ClusterLeader(config, CheckpointStore(str(tmp_path / "root")), executor, ctx)

        async def record(outcome: Outcome) -> None:
            announced.append(outcome)

        leader.deliver_outcomes_to(record)
        await leader._seen(1, b"id1", "first")
        watcher = asyncio.get_running_loop().create_task(leader._watch_peers())
        try:
            await asyncio.sleep(0.5)  # node 1 sends nothing: the leader counts it gone
            assert leader.cluster_status({})[1]["alive"] is False
            await leader._seen(1, b"id1b", "second")  # its daemon restarted and said hello
            await leader.report(node_report(3, 0))  # node 0 reports before node 1 does
            await asyncio.sleep(0.1)
            assert announced == [], announced  # not aborted as waiting for a gone node
        finally:
            watcher.cancel()
    ctx.term()
