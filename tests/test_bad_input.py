"""Malformed and hostile frames sent to a live daemon get specific error replies; it keeps serving."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import msgpack
import pytest
import pytest_asyncio
import torch
import zmq
import zmq.asyncio
from helpers import Daemon, Holder, raw_save_body

from ckptd.client import CheckpointClient, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.topology import RankInfo
from ckptd.proto import messages
from ckptd.proto.ownership import CLAIM_FILE
from ckptd.proto.topology import Topology


def save_body(daemon: Daemon, key: str = "model", **overrides: Any) -> Dict[str, Any]:
    body = raw_save_body(str(daemon.root), key=key)
    body.update(overrides)
    return body


async def exchange(socket: zmq.asyncio.Socket, frame: bytes) -> messages.Envelope:
    await socket.send(frame)
    assert await socket.poll(10_000), "the daemon did not answer"
    return messages.decode(await socket.recv())


@pytest_asyncio.fixture
async def raw_socket(daemon: Daemon) -> Any:
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.endpoint)
    yield socket
    socket.close()
    context.term()


CASES: List[Any] = [
    ("not msgpack", lambda d: b"\xc1\xff garbage", "bad_message", "not valid msgpack"),
    ("not a map", lambda d: msgpack.packb([1, 2, 3]), "bad_message", "must be a msgpack map"),
    (
        "unknown version",
        lambda d: msgpack.packb({"v": 99, "type": "save", "id": 1, "body": {}}),
        "unsupported_version",
        "protocol version 99",
    ),
    ("unknown type", lambda d: messages.encode("explode", {}, 1), "unknown_type", "unknown message type 'explode'"),
    ("hostile key", lambda d: messages.encode("save", save_body(d, key="../../x"), 1), "invalid_name", "'../../x'"),
    (
        "absolute key",
        lambda d: messages.encode("save", save_body(d, key="/etc/passwd"), 1),
        "invalid_name",
        "/etc/passwd",
    ),
    ("wrong field type", lambda d: messages.encode("save", save_body(d, step="one"), 1), "invalid_request", "'step'"),
    ("foreign root", lambda d: messages.encode("save", save_body(d, root="/tmp"), 1), "wrong_root", "not '/tmp'"),
    (
        "region outside shm",
        lambda d: messages.encode(
            "save",
            save_body(
                d,
                parts=[
                    {
                        **save_body(d)["parts"][0],
                        "region": "../../etc/shadow",
                        "region_size": 8,
                        "tensors": [["t", "F32", [2], 0, 8]],
                    }
                ],
            ),
            1,
        ),
        "invalid_name",
        "not a ckptd shared-memory region",
    ),
    (
        "missing region",
        lambda d: messages.encode(
            "save",
            save_body(
                d,
                parts=[
                    {
                        **save_body(d)["parts"][0],
                        "region": f"ckptd-{os.getuid()}-{os.getpid()}-gone",
                        "region_size": 8,
                        "tensors": [["t", "F32", [2], 0, 8]],
                    }
                ],
            ),
            1,
        ),
        "bad_region",
        "cannot open",
    ),
    (
        "another client's region",
        lambda d: messages.encode(
            "save",
            save_body(
                d,
                parts=[
                    {
                        **save_body(d)["parts"][0],
                        "region": f"ckptd-{os.getuid()}-1-abc",
                        "region_size": 8,
                        "tensors": [["t", "F32", [2], 0, 8]],
                    }
                ],
            ),
            1,
        ),
        "bad_region",
        "not one of the sending client's own regions",
    ),
    (
        "tensor outside its region",
        lambda d: messages.encode(
            "save",
            save_body(
                d,
                parts=[
                    {
                        **save_body(d)["parts"][0],
                        "region": f"ckptd-{os.getuid()}-{os.getpid()}-x",
                        "region_size": 8,
                        "tensors": [["t", "F32", [4], 0, 16]],
                    }
                ],
            ),
            1,
        ),
        "invalid_request",
        "region holds 8",
    ),
    (
        "chunk outside its tensor",
        lambda d: messages.encode(
            "save",
            save_body(
                d,
                parts=[
                    {
                        **save_body(d)["parts"][0],
                        "pattern": "SHARDED",
                        "region": f"ckptd-{os.getuid()}-{os.getpid()}-x",
                        "region_size": 16,
                        "tensors": [["w", "F32", [2, 2], 0, 16]],
                        "chunks": {"w": [[3, 2], [2, 0]]},
                    }
                ],
            ),
            1,
        ),
        "invalid_request",
        "does not fit the global shape [3, 2]",
    ),
    (
        "chunks on a GLOBAL part",
        lambda d: messages.encode(
            "save", save_body(d, parts=[{**save_body(d)["parts"][0], "chunks": {"w": [[2], [0]]}}]), 1
        ),
        "invalid_request",
        "only a SHARDED component has chunks",
    ),
    ("rank outside world", lambda d: messages.encode("save", save_body(d, rank=5), 1), "invalid_request", "rank 5"),
    (
        "no lease",
        lambda d: messages.encode("save", save_body(d, parts=[{**save_body(d)["parts"][0], "lease": None}]), 1),
        "invalid_request",
        "'lease'",
    ),
    (
        "expired part",
        lambda d: messages.encode("save", save_body(d, expires_at=time.monotonic() - 1), 1),
        "expired",
        "after the client stopped waiting",
    ),
    (
        "addressed to an earlier daemon",
        lambda d: messages.encode("save", {**save_body(d), "daemon": "0123abcd"}, 1),
        "wrong_daemon",
        "was sent to daemon instance 0123abcd",
    ),
    ("hello without pid", lambda d: messages.encode("hello", {"root": str(d.root)}, 1), "invalid_request", "'pid'"),
    (
        "hello with a malformed run",
        lambda d: messages.encode(
            "hello",
            {"pid": 1, "root": str(d.root), "run": {"job": "", "host": "h", "pid": 1, "rank": 0, "started_at": 0.0}},
            1,
        ),
        "invalid_request",
        "job id",
    ),
    (
        "hello with a run missing fields",
        lambda d: messages.encode("hello", {"pid": 1, "root": str(d.root), "run": {"job": "j"}}, 1),
        "invalid_request",
        "'host'",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("name,frame,code,fragment", CASES, ids=[c[0] for c in CASES])
async def test_bad_frame_gets_a_specific_error(
    daemon: Daemon, raw_socket: zmq.asyncio.Socket, name: str, frame: Any, code: str, fragment: str
) -> None:
    reply = await exchange(raw_socket, frame(daemon))
    assert reply.type == messages.ERROR, reply
    assert reply.body["code"] == code, reply.body
    assert fragment in reply.body["message"], reply.body
    status = await exchange(raw_socket, messages.encode("status", {}, 2))
    assert status.type == messages.OK and status.body["pid"] == daemon.process.pid


@pytest.mark.asyncio
async def test_daemon_keeps_serving_good_saves_after_bad_input(daemon: Daemon, raw_socket: zmq.asyncio.Socket) -> None:
    for _, frame, _, _ in CASES:
        assert (await exchange(raw_socket, frame(daemon))).type == messages.ERROR
    # the same run as the raw frames: the bad frames claimed the root for it, as any frame of a run does
    client = CheckpointClient(
        str(daemon.root),
        RankInfo(0, Topology.single_node(1), job_id="raw"),
        endpoint=daemon.endpoint,
        auto_start=False,
        timeout=30,
    )
    try:
        state = {"w": torch.randn(16)}
        component = PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))
        path = client.save(2, [component]).wait(30)
    finally:
        client.close()
    assert path.endswith("step_00000002")
    assert daemon.process.poll() is None
    # (and the claim of the run the raw socket still belongs to)
    assert sorted(p.name for p in daemon.root.iterdir()) == [CLAIM_FILE, "latest", "step_00000002"]
