"""LoopSocket (service/loop_socket.py), the cluster channel's socket, over real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import zmq

from ckptd.service.loop_socket import LoopSocket

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Tuple[zmq.Socket, zmq.Socket]]:
    """A ROUTER bound on ipc:// and a DEALER connected to it (plain sockets, one context)."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    endpoint = f"ipc://{tmp_path}/pair.sock"
    router.bind(endpoint)
    dealer.connect(endpoint)
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


@pytest.mark.asyncio
async def test_frames_sent_before_and_after_the_first_receive_arrive_whole_and_in_order(pair) -> None:
    router, dealer = pair
    loop_dealer = LoopSocket(dealer, asyncio.get_running_loop())
    try:
        loop_dealer.send(b"hello")
        identity, hello = router.recv_multipart()
        assert hello == b"hello"
        router.send_multipart([identity, b"queued"])  # before anyone waits
        assert await asyncio.wait_for(loop_dealer.recv(), 5) == b"queued"

        waiting = asyncio.ensure_future(loop_dealer.recv_multipart())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        router.send_multipart([identity, b"one", b"two"])
        assert await asyncio.wait_for(waiting, 5) == [b"one", b"two"]
    finally:
        loop_dealer.close(linger=0)


@pytest.mark.asyncio
async def test_a_waiting_receive_wakes_even_when_a_send_took_the_socket_signal(pair) -> None:
    """Any call on a ZeroMQ socket may consume its FD's signal. Here the peer's answer arrives while
    the loop is busy, and a send on the same socket takes the signal before the loop looks: the
    waiting receive must still get the answer."""
    router, dealer = pair
    loop_dealer = LoopSocket(dealer, asyncio.get_running_loop())
    try:
        for n in range(5):
            waiting = asyncio.ensure_future(loop_dealer.recv())
            await asyncio.sleep(0)  # the receive now waits on the loop's reader
            loop_dealer.send(b"ping %d" % n)
            identity, ping = router.recv_multipart()
            router.send_multipart([identity, b"pong %d" % n])
            time.sleep(0.05)  # the answer arrives and signals the FD; the loop is busy here
            loop_dealer.send(b"nudge")  # takes the signal before the loop polls
            assert await asyncio.wait_for(waiting, 2) == b"pong %d" % n
            assert router.recv_multipart()[1] == b"nudge"
    finally:
        loop_dealer.close(linger=0)


@pytest.mark.asyncio
async def test_a_send_with_no_peer_raises_again_and_close_cancels_a_waiting_receive() -> None:
    ctx = zmq.Context()
    lonely = ctx.socket(zmq.DEALER)  # connected to nobody
    loop_socket = LoopSocket(lonely, asyncio.get_running_loop())
    try:
        with pytest.raises(zmq.Again):
            loop_socket.send(b"anyone?")
        waiting = asyncio.ensure_future(loop_socket.recv())
        await asyncio.sleep(0.01)
    finally:
        loop_socket.close(linger=0)
        ctx.term()
    with pytest.raises(asyncio.CancelledError):
        await waiting
