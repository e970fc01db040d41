"""Property-based fuzzing of a live daemon: random and mutated frames each get an error reply (or
are dropped with a log line), the daemon keeps serving good saves, and its memory stays bounded.

CI sends a bounded number of frames; `--run-slow` sends 20,000."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict

import msgpack
import pytest
import torch
import zmq
from helpers import Daemon, Holder, raw_save_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.client import CheckpointClient, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.topology import RankInfo
from ckptd.proto import messages
from ckptd.proto.topology import Topology

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=64),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=30,
)


def valid_save(step: int, rank: int, root: str) -> Dict[str, Any]:
    return raw_save_body(root, step, rank, world_size=2, job="fuzz")


@st.composite
def frames(draw: Callable[..., Any], root: str) -> bytes:
    kind = draw(st.sampled_from(["bytes", "value", "envelope", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "value":
        return msgpack.packb(draw(values), use_bin_type=True)
    if kind == "envelope":
        return msgpack.packb(
            {
                "v": draw(st.one_of(st.just(1), scalars)),
                "type": draw(st.one_of(st.sampled_from(["hello", "save", "status", "released", "x"]), scalars)),
                "id": draw(st.one_of(st.integers(0, 2**40), scalars)),
                "body": draw(values),
            },
            use_bin_type=True,
        )
    body = valid_save(draw(st.integers(0, 3)), draw(st.integers(0, 1)), root)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["top", "part", "tensors"]))
        parts = body.get("parts")
        if target != "top" and not (isinstance(parts, list) and parts and isinstance(parts[0], dict) and parts[0]):
            target = "top"
        if target == "top":
            key = draw(st.sampled_from(sorted(body) + ["extra"]))
            body[key] = draw(values) if draw(st.booleans()) else draw(st.sampled_from([-1, 2**62, "../../x", [], {}]))
        elif target == "part":
            key = draw(st.sampled_from(sorted(body["parts"][0])))
            body["parts"][0][key] = draw(values)
        else:
            body["parts"][0].update(
                region=f"ckptd-{os.getuid()}-{os.getpid()}-x",
                region_size=draw(st.integers(0, 2**63)),
                tensors=[
                    [
                        draw(st.text(max_size=8)),
                        draw(st.sampled_from(["F32", "U8", "Q9"])),
                        draw(st.lists(st.integers(-2, 2**40), max_size=3)),
                        draw(st.integers(-5, 2**40)),
                        draw(st.integers(-5, 2**40)),
                    ]
                ],
            )
    return messages.encode(messages.SAVE, body, draw(st.integers(1, 2**31)))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize(
    "examples", [pytest.param(2000, id="bounded"), pytest.param(20000, id="long", marks=pytest.mark.slow)]
)
def test_fuzzed_frames_get_errors_and_the_daemon_keeps_serving(
    daemon_factory: Callable[..., Daemon], examples: int
) -> None:
    daemon = daemon_factory("--save-timeout", "1")
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.endpoint)
    replies = {"error": 0, "other": 0}
    rss_before = rss_kb(daemon.process.pid)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frame=frames(str(daemon.root)))
    def send(frame: bytes) -> None:
        socket.send(frame)
        assert socket.poll(10_000), "the daemon stopped answering"
        reply = messages.decode(socket.recv())
        replies["error" if reply.type == messages.ERROR else "other"] += 1
        assert reply.type in (
            messages.ERROR,
            messages.OK,
            messages.ACCEPTED,
            messages.ABORTED,
            messages.RELEASED,
            messages.COMMITTED,
        )

    try:
        send()
    finally:
        socket.close()
        context.term()
    assert replies["error"] > examples // 2
    assert daemon.process.poll() is None
    client = CheckpointClient(
        str(daemon.root),
        RankInfo(0, Topology.single_node(1), job_id="fuzz"),
        endpoint=daemon.endpoint,
        auto_start=False,
        timeout=30,
    )
    try:
        component = PreparedComponent(StateComponent("model", Holder({"w": torch.ones(8)}), SharingPattern.GLOBAL))
        assert client.save(100, [component]).wait(30).endswith("step_00000100")
    finally:
        client.close()
    assert rss_kb(daemon.process.pid) - rss_before < 100_000, "daemon memory grew by more than 100 MB"
