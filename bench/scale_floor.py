"""The floor under the commit latency of bench_scale.py: one bare broadcast to N-1 receivers.

A sender in node 0's namespace sends one frame (the size of a COMMITTED outcome) to N-1 receiver
processes, one in each other node's namespace, over TCP with CURVE, as the commit leader does. Each
receiver only notes when the frame arrived (time.monotonic(), one host). The figure is the median,
over rounds, of the time from the first send to the last arrival: the least any daemon built that
way pays to tell every node, before it does anything with the news.

Receivers come in three kinds:

  zmq.asyncio   pyzmq's asyncio socket, awaited in a loop (ckptd's clients use it)
  LoopSocket    ckptd.service.loop_socket, one loop reader on the socket's FD (ckptd's daemon)
  blocking      a plain blocking recv, no event loop (the least a Python process can do)

bench_scale.py runs it in the namespaces it made for the daemons, once they are stopped:

    python bench/scale_floor.py send ENDPOINT RECEIVERS SERVER_SECRET ROUNDS FRAME_BYTES
    python bench/scale_floor.py recv KIND ENDPOINT SERVER_PUBLIC CLIENT_PUBLIC CLIENT_SECRET
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Callable, List

import zmq
import zmq.asyncio

KINDS = ("zmq.asyncio", "LoopSocket", "blocking")
REPORT, QUIT = b"report", b"quit"
ROUND_GAP_S = 0.05


def _dealer(ctx: zmq.Context, endpoint: str, server_public: str, public: str, secret: str) -> zmq.Socket:
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_public.encode())
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(endpoint)
    return socket


def _arrival(frame: bytes, arrivals: List[float], reply: Callable[[bytes], None]) -> bool:
    """Note one frame; answer a report request; False on QUIT."""
    now = time.monotonic()
    if frame == QUIT:
        return False
    if frame == REPORT:
        reply(json.dumps(arrivals).encode())
        arrivals.clear()
    else:
        arrivals.append(now)
    return True


def receive(kind: str, endpoint: str, server_public: str, public: str, secret: str) -> None:
    """Note the arrival of every frame until QUIT, with receiver `kind`."""
    arrivals: List[float] = []
    if kind == "blocking":
        socket = _dealer(zmq.Context(), endpoint, server_public, public, secret)
        socket.send(b"hello")
        while _arrival(socket.recv(), arrivals, socket.send):
            pass
        return

    async def run() -> None:
        if kind == "zmq.asyncio":
            socket = _dealer(zmq.asyncio.Context(), endpoint, server_public, public, secret)
            await socket.send(b"hello")
            while _arrival(await socket.recv(), arrivals, socket.send):
                pass
            return
        from ckptd.service.loop_socket import LoopSocket  # imported only here: the daemon's package is slow to import

        loop_socket = LoopSocket(
            _dealer(zmq.Context(), endpoint, server_public, public, secret), asyncio.get_running_loop()
        )
        loop_socket.send(b"hello")
        while _arrival(await loop_socket.recv(), arrivals, loop_socket.send):
            pass

    asyncio.run(run())


def send(endpoint: str, receivers: int, server_secret: str, rounds: int, frame_bytes: int) -> None:
    """Broadcast `rounds` frames to `receivers` receivers; print the median ms from the first send
    to the last arrival."""
    ctx = zmq.Context()
    socket = ctx.socket(zmq.ROUTER)
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_SECRETKEY, server_secret.encode())
    socket.bind(endpoint)
    identities = [socket.recv_multipart()[0] for _ in range(receivers)]
    time.sleep(0.5)  # every receiver is waiting
    frame, started = b"x" * frame_bytes, []
    for _ in range(rounds):
        started.append(time.monotonic())
        for identity in identities:
            socket.send_multipart([identity, frame])
        time.sleep(ROUND_GAP_S)
    for identity in identities:
        socket.send_multipart([identity, REPORT])
    last = [0.0] * rounds
    for _ in identities:
        arrivals = json.loads(socket.recv_multipart()[1])
        for n, at in enumerate(arrivals):
            last[n] = max(last[n], at - started[n])
    for identity in identities:
        socket.send_multipart([identity, QUIT])
    socket.close(linger=1000)
    print(json.dumps({"every_receiver_ms": round(statistics.median(last) * 1000, 2)}))


if __name__ == "__main__":
    role, rest = sys.argv[1], sys.argv[2:]
    if role == "send":
        send(rest[0], int(rest[1]), rest[2], int(rest[3]), int(rest[4]))
    else:
        receive(*rest)
