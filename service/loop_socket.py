"""A ZeroMQ socket served by the asyncio loop through one reader on its file descriptor.

pyzmq's own asyncio sockets (`zmq.asyncio`) make a future, a timer handle and several extra loop
iterations per message. On a machine whose cores are shared by many daemons that overhead is what a
commit waits on: with 63 receivers on 2 cores, the last one got a broadcast 7.0 ms after the first
send with this class against 10.5 ms with `zmq.asyncio` (bench/bench_scale.py's floor, which
measures both beside ckptd). The daemon's sockets, the ranks' and the cluster channel's, use it.
"""

from __future__ import annotations

import asyncio
from typing import List, Optional, Sequence, cast

import zmq


class LoopSocket:
    """`socket` read through `loop.add_reader` on its FD; sends never block (they raise zmq.Again).

    ZeroMQ's FD only signals that the socket's state may have changed, and any call on the socket may
    consume that signal: every receive and send re-reads `EVENTS`, so a waiting receive is woken even
    when a send took the signal. One coroutine receives at a time (each socket has one receive loop);
    the reader always reads `EVENTS` first, which also clears the FD, so the loop never spins on it."""

    def __init__(self, socket: zmq.Socket, loop: asyncio.AbstractEventLoop) -> None:
        self._socket = socket
        self._loop = loop
        self._waiter: Optional[asyncio.Future] = None
        self._fd = socket.fileno()
        loop.add_reader(self._fd, self._wake)

    def _readable(self) -> bool:
        return bool(cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def _wake(self) -> None:
        waiter = self._waiter
        if self._readable() and waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _until_readable(self) -> None:
        while not self._readable():
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def recv(self) -> bytes:
        """The next single-part message."""
        await self._until_readable()
        return self._socket.recv(zmq.NOBLOCK)

    async def recv_multipart(self) -> List[bytes]:
        """The next message, all its parts."""
        await self._until_readable()
        return self._socket.recv_multipart(zmq.NOBLOCK)

    def send(self, frame: bytes) -> None:
        """Queue `frame`, or raise zmq.Again when the peer's queue is full."""
        try:
            self._socket.send(frame, zmq.NOBLOCK)
        finally:
            self._wake()

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        """Queue a multipart message, or raise zmq.Again when the peer's queue is full."""
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        finally:
            self._wake()

    def close(self, linger: int) -> None:
        """Stop reading and close the socket."""
        self._loop.remove_reader(self._fd)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self._socket.close(linger=linger)
