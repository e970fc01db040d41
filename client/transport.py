"""The client's control channel to its node daemon: a DEALER socket driven by an asyncio loop in a
background thread, so requests get replies and notifications arrive while training runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import zmq
import zmq.asyncio

from ckptd.client.errors import DaemonRequestError, DaemonUnavailableError
from ckptd.proto import messages

log = logging.getLogger(__name__)

NotificationHandler = Callable[[messages.Envelope], None]


class DaemonConnection:
    """Request/reply plus notifications over one ZeroMQ connection; thread-safe `request`."""

    def __init__(self, endpoint: str, on_notification: NotificationHandler) -> None:
        self.endpoint = endpoint
        self._on_notification = on_notification
        self._ids = itertools.count(1)
        self._pending: Dict[int, Tuple[asyncio.Future, float]] = {}
        """Requests waiting for their reply: (future, time.monotonic() when sent), by message id."""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._socket: Optional[zmq.asyncio.Socket] = None
        self._connect_error: Optional[zmq.ZMQError] = None
        self._thread = threading.Thread(target=self._run, name="ckptd-client-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._connect_error is not None:
            self._thread.join()
            raise DaemonUnavailableError(f"cannot connect to {endpoint}: {self._connect_error}") from None

    def request(self, msg_type: str, body: Dict[str, Any], timeout: Optional[float]) -> messages.Envelope:
        """Send a request and return its reply; raises DaemonRequestError on an error reply and
        DaemonUnavailableError when nothing answers within `timeout` or the connection is closed."""
        if not self._thread.is_alive():
            raise DaemonUnavailableError(f"the connection to {self.endpoint} is closed")
        future = asyncio.run_coroutine_threadsafe(self._request(msg_type, body), self._loop)
        try:
            reply = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DaemonUnavailableError(
                f"no answer from the ckptd daemon at {self.endpoint} within {timeout:g} s"
            ) from None
        if reply.type == messages.ERROR:
            raise DaemonRequestError(str(reply.body.get("code")), str(reply.body.get("message")))
        return reply

    async def _request(self, msg_type: str, body: Dict[str, Any]) -> messages.Envelope:
        msg_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[msg_id] = (future, time.monotonic())
        try:
            assert self._socket is not None
            await self._socket.send(messages.encode(msg_type, body, msg_id))
            return await future
        finally:
            self._pending.pop(msg_id, None)

    def fail_sent_before(self, moment: float, reason: str) -> None:
        """Fail every request still waiting for its reply that was sent before `moment`
        (time.monotonic()) with DaemonUnavailableError(`reason`): the daemon it went to is gone, and
        its reply would never come (the caller would otherwise wait out its whole timeout)."""

        def fail() -> None:
            for future, sent_at in list(self._pending.values()):
                if sent_at < moment and not future.done():
                    future.set_exception(DaemonUnavailableError(reason))

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(fail)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.connect(self.endpoint)
        except zmq.ZMQError as exc:  # a malformed endpoint, or an ipc path too long for a socket address
            self._connect_error = exc
            self._socket.close(0)
            self._ctx.term()
            self._loop.close()
            self._ready.set()
            return
        receiver = self._loop.create_task(self._receive_loop())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            receiver.cancel()
            self._loop.run_until_complete(asyncio.gather(receiver, return_exceptions=True))
            self._socket.close(0)
            self._ctx.term()
            self._loop.close()

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            try:
                envelope = messages.decode(frame)
            except messages.ProtocolError as exc:
                log.warning("ignored a malformed frame from the daemon: %s", exc)
                continue
            pending = self._pending.get(envelope.id) if envelope.id else None
            future = pending[0] if pending is not None else None
            if future is not None:
                if not future.done():
                    future.set_result(envelope)
            elif envelope.id == 0 and envelope.type != messages.ERROR:
                try:
                    self._on_notification(envelope)
                except Exception:
                    log.exception("notification handler failed on %s", envelope.type)
            else:
                log.debug("dropped a reply to a request that already timed out (id %d)", envelope.id)

    def close(self) -> None:
        """Stop the I/O thread and close the socket."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
