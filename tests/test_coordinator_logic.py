"""The node coordinator without a daemon: parts handed over through `accept`, written into a real
CheckpointStore on a temporary root, committed by an in-process LocalCommitLeader; the ranks are
links that record what the coordinator tells them (no sockets)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Tuple

import msgpack
import pytest
import pytest_asyncio

from ckptd.disk.manifests import read_manifest
from ckptd.proto import messages
from ckptd.proto.errors import ErrorCode
from ckptd.proto.messages import ComponentPart, SaveRequest
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.topology import Topology
from ckptd.service.coordinator import NodeCoordinator
from ckptd.service.errors import SaveRejected
from ckptd.service.leader import LocalCommitLeader
from ckptd.service.shard_writer import Throttle
from ckptd.service.store import CheckpointStore

TWO_RANKS = Topology.single_node(2)


class RecordingLink:
    """A rank as the coordinator sees it: every notification it is sent, in order."""

    def __init__(self) -> None:
        self.identity = os.urandom(5)
        self.received: List[Tuple[str, Dict[str, Any]]] = []

    async def notify(self, msg_type: str, body: Dict[str, Any]) -> None:
        self.received.append((msg_type, body))

    def types(self) -> List[str]:
        return [msg_type for msg_type, _ in self.received]


def part_of(root: Path, step: int, rank: int, writer: bool) -> SaveRequest:
    """Rank `rank`'s part of a GLOBAL component holding only non-tensor state (no staging region)."""
    component = ComponentPart(
        "trainer", SharingPattern.GLOBAL, writer=writer, state=msgpack.packb({"step": step}) if writer else None
    )
    return SaveRequest(
        root=str(root),
        step=step,
        rank=rank,
        pid=os.getpid(),
        topology=TWO_RANKS,
        parts=(component,),
        job="run",
        metrics={"rank": float(rank)},
        expires_at=time.monotonic() + 60,
    )


@pytest_asyncio.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[NodeCoordinator]:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        channel = LocalCommitLeader(store, executor)
        yield NodeCoordinator(store, 0, executor, Throttle(None), 30.0, channel)
        await channel.close()


async def settled(link: RecordingLink, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not {messages.COMMITTED, messages.ABORTED} & set(link.types()):
        assert time.monotonic() < deadline, link.received
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_every_rank_is_told_the_commit_once_every_rank_has_handed_over(
    coordinator: NodeCoordinator, tmp_path: Path
) -> None:
    rank1, rank0 = RecordingLink(), RecordingLink()
    await coordinator.accept(
        rank1, part_of(tmp_path / "ckpt", 4, 1, writer=False)
    )  # the non-writer first: nothing to write
    assert coordinator.holds("run", 4) and coordinator.busy
    await coordinator.accept(rank0, part_of(tmp_path / "ckpt", 4, 0, writer=True))
    await settled(rank0)
    await settled(rank1)
    for link in (rank0, rank1):
        assert link.types()[-1] == messages.COMMITTED, link.received
    path = rank0.received[-1][1]["path"]
    manifest = read_manifest(path)
    assert manifest.step == 4 and manifest.metrics == {"rank": 0.0}
    assert msgpack.unpackb(Path(path, "trainer", "global.msgpack").read_bytes()) == {"step": 4}
    assert not coordinator.busy and coordinator.last_committed == 4


@pytest.mark.asyncio
async def test_refusals_say_whether_they_abort_the_step(coordinator: NodeCoordinator, tmp_path: Path) -> None:
    rank0 = RecordingLink()
    await coordinator.accept(rank0, part_of(tmp_path / "ckpt", 5, 0, writer=True))
    with pytest.raises(SaveRejected, match="rank 0 already handed over its part of step 5") as duplicate:
        await coordinator.accept(RecordingLink(), part_of(tmp_path / "ckpt", 5, 0, writer=True))
    assert duplicate.value.code is ErrorCode.DUPLICATE and not duplicate.value.code.aborts_save
    with pytest.raises(SaveRejected, match="GLOBAL is written by rank 0, but the client claims writer=True") as wrong:
        await coordinator.accept(RecordingLink(), part_of(tmp_path / "ckpt", 5, 1, writer=True))
    assert wrong.value.code is ErrorCode.INVALID_REQUEST and wrong.value.code.aborts_save
    await coordinator.abort("run", 5, "rank 1 sent an invalid part")
    await settled(rank0)
    assert rank0.received[-1] == (messages.ABORTED, {"job": "run", "step": 5, "reason": "rank 1 sent an invalid part"})
    with pytest.raises(SaveRejected, match="already aborted: rank 1 sent an invalid part") as late:
        await coordinator.accept(RecordingLink(), part_of(tmp_path / "ckpt", 5, 1, writer=False))
    assert late.value.code is ErrorCode.ABORTED
