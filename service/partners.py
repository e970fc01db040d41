"""Partner copies (`--replicate-to-partner`): each node's daemon sends its files of every checkpoint
it commits to the next node's daemon (node i to node i+1, a ring), which keeps them, with the
manifest, in `<root>/partner/`: a checkpoint root of its own, written with the commit protocol
(files checked and fsynced, manifest last, directory renamed into place).

A replaced node's state then survives on a fast tier: a load on the restarted job gathers the
files its node lacks from the ranks whose node holds them (`ckptd.client.assembly`).

The copies travel over TCP with CURVE keys derived from the job's secret, like the commit channel:
`PartnerReceiver` binds the port this daemon announces to the leader, `PartnerSender` sends to the
address the leader names for the next node. Both run in threads of their own with blocking
sockets: a copy is a stream of large frames that never touches the daemon's event loop. A sender
that falls behind skips to the newest committed step; retention in the partner root keeps the steps
the node's own root keeps.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import msgpack
import zmq
from zmq.auth.thread import ThreadAuthenticator

from ckptd.disk import removal
from ckptd.disk.files import FileProblem, check_listed_file
from ckptd.disk.manifests import hold_for_loading, manifest_path, read_manifest
from ckptd.disk.root import checkpoint_steps, partner_root
from ckptd.proto import layout
from ckptd.proto.manifest import FileRecord, Manifest, ManifestError
from ckptd.proto.retention import RetentionPolicy
from ckptd.service.curve import AllowJobDaemons, CurveKeys
from ckptd.service.shard_writer import Throttle
from ckptd.service.store import CheckpointStore

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
MAX_FRAME_BYTES = 64 << 20
"""The largest frame the receiver takes: a chunk, or a begin frame with its manifest."""
REPLY_TIMEOUT_MS = 30_000
"""A partner that does not answer a frame within this long counts as gone (the copy is retried
with the next committed step)."""

BEGIN, CHUNK, END_FILE, COMMIT = "begin", "chunk", "end_file", "commit"


class PartnerError(Exception):
    """A partner copy failed: the receiver refused a frame, or did not answer."""


def advertised_host(leader_host: str) -> str:
    """The address of this host that the leader's host reaches (the interface a route to it leaves
    by); no packet is sent."""
    with socket.socket(socket.AF_INET6 if ":" in leader_host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((leader_host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _curve_server(ctx: zmq.Context, keys: CurveKeys) -> zmq.Socket:
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


class PartnerReceiver:
    """Keeps the previous node's files of each checkpoint in `<root>/partner/`."""

    def __init__(self, root: str, secret: bytes, port: Optional[int], host: str) -> None:
        self._root = root
        self._store = CheckpointStore(partner_root(root))
        self._keys = CurveKeys.derive(secret)
        self._port = port or 0
        self._host = host
        self._ctx = zmq.Context()
        self._auth: Optional[ThreadAuthenticator] = None
        self._sock: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._incoming: Optional[_Incoming] = None
        self.endpoint = ""

    def start(self) -> None:
        """Remove interrupted copies, bind, and serve in a thread."""
        for path in self._store.remove_leftovers():
            log.info("partner copies: removed %s, left by an interrupted copy", path)
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        allowed = self._keys.client_public
        self._auth.configure_curve_callback(domain="*", credentials_provider=AllowJobDaemons(allowed))
        self._sock = _curve_server(self._ctx, self._keys)
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        if self._port:
            self._sock.bind(f"tcp://*:{self._port}")
            port = self._port
        else:
            port = self._sock.bind_to_random_port("tcp://*")
        self.endpoint = f"tcp://[{self._host}]:{port}" if ":" in self._host else f"tcp://{self._host}:{port}"
        log.info("partner copies arrive on %s (CURVE)", self.endpoint)
        self._thread = threading.Thread(target=self._run, name="ckptd-partner-in", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (an unfinished copy is a leftover the next start removes)."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join(2.0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                frames = [frame.buffer for frame in self._sock.recv_multipart(copy=False)]  # no copy of a chunk
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            try:
                reply = self._handle(frames)
            except PartnerError as exc:
                log.warning("refused a partner copy frame: %s", exc)
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the receiver must keep serving whatever one frame does
                log.exception("internal error while receiving a partner copy")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            try:
                self._sock.send(msgpack.packb(reply))
            except zmq.ZMQError:
                return

    def _handle(self, frames: List[memoryview]) -> Dict[str, Any]:
        try:
            header = msgpack.unpackb(frames[0])
            kind = header["type"]
        except Exception:
            raise PartnerError("a frame without a readable header") from None
        if kind == BEGIN:
            return self._begin(header)
        incoming = self._incoming
        if incoming is None or header.get("step") != incoming.step:
            raise PartnerError(f"a {kind} frame for a copy that was not begun")
        if kind == CHUNK and len(frames) == 2:
            return self._chunk(incoming, header, frames[1])
        if kind == END_FILE:
            return self._end_file(incoming, header)
        if kind == COMMIT:
            return self._commit(incoming)
        raise PartnerError(f"unknown partner frame type {kind!r}")

    def _begin(self, header: Dict[str, Any]) -> Dict[str, Any]:
        step, node, text = header.get("step"), header.get("node"), header.get("manifest")
        if type(step) is not int or type(node) is not int or not isinstance(text, str):
            raise PartnerError("begin needs step, node and manifest")
        try:
            manifest = Manifest.from_json(text)
        except ManifestError as exc:
            raise PartnerError(f"the manifest of step {step} is damaged: {exc}") from None
        if manifest.step != step:
            raise PartnerError(f"the manifest is step {manifest.step}'s, not {step}'s")
        self._abandon()
        if self._store.is_committed(step):
            return {"ok": True, "have": True}
        tmp_dir = os.path.join(self._store.root, layout.tmp_dir_name(step, f"partner{node}"))
        removal.remove_tree(tmp_dir)
        os.makedirs(tmp_dir)
        self._incoming = _Incoming(step, node, text, {record.path: record for record in manifest.files()}, tmp_dir)
        return {"ok": True, "have": False}

    def _chunk(self, incoming: _Incoming, header: Dict[str, Any], data: memoryview) -> Dict[str, Any]:
        path = header.get("path")
        record = incoming.records.get(path) if isinstance(path, str) else None
        if record is None:
            raise PartnerError(f"{path!r} is not a file of step {incoming.step}")
        if incoming.receiving is None or incoming.receiving[0] != record.path:
            if incoming.receiving is not None:
                incoming.receiving[1].close()
            destination = os.path.join(incoming.directory, record.path)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            incoming.receiving = (record.path, open(destination, "wb"))
        handle = incoming.receiving[1]
        if header.get("offset") != handle.tell() or handle.tell() + len(data) > record.size:
            raise PartnerError(f"{record.path}: a chunk out of order or past the file's size")
        handle.write(data)
        return {"ok": True}

    def _end_file(self, incoming: _Incoming, header: Dict[str, Any]) -> Dict[str, Any]:
        if incoming.receiving is None or incoming.receiving[0] != header.get("path"):
            raise PartnerError(f"end of {header.get('path')!r}, which was not being received")
        path, handle = incoming.receiving
        incoming.receiving = None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        try:
            check_listed_file(os.path.join(incoming.directory, path), incoming.records[path])
        except FileProblem as exc:
            raise PartnerError(f"{path} arrived damaged: {exc.reason}") from None
        return {"ok": True}

    def _commit(self, incoming: _Incoming) -> Dict[str, Any]:
        if incoming.receiving is not None:
            raise PartnerError(f"commit while {incoming.receiving[0]} was still being received")
        self._incoming = None
        self._store.commit(incoming.directory, incoming.step, incoming.manifest)
        self._store.publish([incoming.step])
        log.info("partner copies: holding node %d's files of step %d", incoming.node, incoming.step)
        self._keep_what_the_root_keeps()
        return {"ok": True}

    def _keep_what_the_root_keeps(self) -> None:
        """As many partner steps as the node's own root holds (at least the newest)."""
        try:
            self._store.apply_retention(RetentionPolicy(keep_last=max(1, len(checkpoint_steps(self._root)))))
        except OSError as exc:
            log.error("partner copies: retention pass failed (it runs again after the next copy): %s", exc)

    def _abandon(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            return
        if incoming.receiving is not None:
            incoming.receiving[1].close()
        removal.remove_tree(incoming.directory)


@dataclass
class _Incoming:
    """The partner copy being received."""

    step: int
    node: int
    manifest: str
    """Its manifest's JSON, written last."""
    records: Dict[str, FileRecord]
    """The files it may hold, by path: the manifest's."""
    directory: str
    """Its tmp directory."""
    receiving: Optional[Tuple[str, BinaryIO]] = None
    """The file being written, and its handle."""


class PartnerSender:
    """Sends this node's files of the newest committed checkpoint to the next node's daemon."""

    def __init__(
        self,
        source: CheckpointStore,
        node: int,
        secret: bytes,
        successor: Callable[[], Optional[str]],
        max_mbps: Optional[float] = None,
    ) -> None:
        self._source = source
        self._throttle = Throttle(max_mbps * 1e6 if max_mbps else None)
        self._node = node
        self._keys = CurveKeys.derive(secret)
        self._successor = successor
        self._ctx = zmq.Context()
        self._cond = threading.Condition()
        self._pending: Optional[int] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.last_sent: Optional[int] = None
        self.last_error: Optional[str] = None

    def start(self) -> None:
        """Start the sending thread (the newest committed step is sent first)."""
        steps = self._source.committed_steps()
        if steps:
            self.committed(steps)
        self._thread = threading.Thread(target=self._run, name="ckptd-partner-out", daemon=True)
        self._thread.start()

    def committed(self, steps: List[int]) -> None:
        """Steps just committed in this node's root: the newest is sent next (older ones waiting are skipped)."""
        with self._cond:
            newest = max(steps)
            if self._pending is None or newest > self._pending:
                self._pending = newest
                self._cond.notify_all()

    def close(self) -> None:
        """Stop sending."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(2.0)
        self._ctx.destroy(linger=0)

    def status(self) -> Dict[str, Any]:
        """What `ckptd status` shows for the partner copies."""
        return {
            "successor": self._successor(),
            "last_sent": self.last_sent,
            "pending": self._pending,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._pending is None or self._successor() is None):
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                step, self._pending = self._pending, None
            endpoint = self._successor()
            assert step is not None and endpoint is not None
            try:
                self._send(endpoint, step)
                self.last_sent, self.last_error = step, None
            except (PartnerError, OSError, FileProblem, ManifestError, zmq.ZMQError) as exc:
                if self._stopping:
                    return
                self.last_error = f"sending step {step} to the partner at {endpoint} failed: {exc}"
                log.error("%s; the next committed step is sent as usual", self.last_error)

    def _send(self, endpoint: str, step: int) -> None:
        source_dir = self._source.final_path(step)
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self._keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self._keys.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._keys.client_secret)
        sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            with hold_for_loading(source_dir):  # retention leaves it alone while it is sent
                manifest = read_manifest(source_dir)
                with open(manifest_path(source_dir), encoding="utf-8") as f:
                    text = f.read()
                if self._request(sock, {"type": BEGIN, "step": step, "node": self._node, "manifest": text}).get("have"):
                    return
                sent = 0
                for record in manifest.files():
                    path = os.path.join(source_dir, record.path)
                    if not os.path.exists(path):
                        continue  # another node's file
                    sent += self._send_file(sock, step, path, record)
                self._request(sock, {"type": COMMIT, "step": step})
            log.info("partner copies: sent step %d (%.0f MB) to %s", step, sent / 1e6, endpoint)
        finally:
            sock.close(0)

    def _send_file(self, sock: zmq.Socket, step: int, path: str, record: FileRecord) -> int:
        with open(path, "rb") as f:
            offset = 0
            while True:
                if self._stopping:
                    raise PartnerError("the daemon is stopping")
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                self._throttle.consume(len(data))
                self._request(sock, {"type": CHUNK, "step": step, "path": record.path, "offset": offset}, data)
                offset += len(data)
        self._request(sock, {"type": END_FILE, "step": step, "path": record.path})
        return offset

    def _request(self, sock: zmq.Socket, header: Dict[str, Any], data: Optional[bytes] = None) -> Dict[str, Any]:
        frames = [msgpack.packb(header)] + ([data] if data is not None else [])
        sock.send_multipart(frames, copy=False)
        try:
            reply = msgpack.unpackb(sock.recv())
        except zmq.Again:
            raise PartnerError(f"no answer within {REPLY_TIMEOUT_MS / 1000:g} s") from None
        if not reply.get("ok"):
            raise PartnerError(str(reply.get("error")))
        return dict(reply)
