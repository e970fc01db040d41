"""The commit channel between the node daemons of a multi-node job (DESIGN.md commit steps 3-5).

The node-0 daemon runs `ClusterLeader`: it binds an authenticated TCP socket (CURVE, see
service/curve.py), collects every node's `NodeReport`, commits through `LocalCommitLeader`, and
announces COMMITTED or ABORTED to every node. Every other daemon runs `ClusterFollower`, which
forwards its node's report or abort and resolves its ranks when the leader decides.

Both sides exchange heartbeats. A follower that goes silent aborts every save still waiting for it;
a follower that loses the leader (or sees it restart) aborts the saves it reported, because their
outcome can no longer reach it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from ckptd.proto import cluster, messages
from ckptd.proto.cluster import NodeReport, TierCopyDone, TierCopyOrder
from ckptd.proto.errors import ErrorCode, ProtocolError
from ckptd.proto.messages import Outcome
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.topology import Topology
from ckptd.service.curve import AllowJobDaemons, CurveKeys
from ckptd.service.leader import (
    TIMELINE_KEPT,
    Announce,
    LocalCommitLeader,
    NodeCopyCommitter,
    Published,
    SaveKey,
    nobody_listens,
)
from ckptd.service.loop_socket import LoopSocket
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.store import CheckpointStore
from ckptd.service.tiers import CopyStopped, OtherNodesFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Where this daemon sits in a multi-node job and how it reaches the others."""

    node: int
    num_nodes: int
    leader_host: str
    leader_port: int
    secret: bytes
    peer_timeout: float = 10.0
    """Seconds without a heartbeat after which a peer daemon counts as gone."""
    heartbeat_s: float = 1.0
    node_local_root: bool = False
    """Each node's root is its own (`--node-local-root`): every node commits its copy of each checkpoint."""

    @property
    def is_leader(self) -> bool:
        """True on node 0, whose daemon commits."""
        return self.node == 0


@dataclass
class _Peer:
    identity: bytes
    instance: str
    last_seen: float
    alive: bool = True
    partner: Optional[str] = None
    """Where the node's daemon takes partner copies (`--replicate-to-partner`)."""
    summary: Dict[str, Any] = field(default_factory=dict)
    """What the node said of itself in its last heartbeat (`NodeSummary`)."""


@dataclass
class Traffic:
    """Frames and bytes through one side's socket, by message type (for `ckptd status` and bench_scale)."""

    received: Dict[str, List[int]] = field(default_factory=dict)
    sent: Dict[str, List[int]] = field(default_factory=dict)

    def count(self, direction: Dict[str, List[int]], msg_type: str, nbytes: int) -> None:
        """One frame of `nbytes` of type `msg_type`."""
        counts = direction.setdefault(msg_type, [0, 0])
        counts[0] += 1
        counts[1] += nbytes

    def to_wire(self) -> Dict[str, Any]:
        """{"received": {type: [frames, bytes]}, "sent": ...}."""
        return {"received": dict(self.received), "sent": dict(self.sent)}


TOPOLOGIES_KEPT = 16
TIER_COPY_ANSWER_S = 3600.0
"""A follower alive but silent about a tier copy this long (a hung disk) no longer holds up the tiers."""

NodeSummary = Callable[[], Dict[str, Any]]
"""A node's view of itself for the cluster status: its saves in flight (step, ranks expected, ranks
durable, reported) and its last committed step."""


class _Endpoint:
    """One side's socket and the background tasks that serve it."""

    def __init__(self) -> None:
        self._socket: Optional[LoopSocket] = None
        self._tasks: Set[asyncio.Task] = set()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._socket is not None:
            self._socket.close(linger=1000)
            self._socket = None


class ClusterLeader(_Endpoint):
    """The node-0 side: receives reports over TCP and commits for the whole job."""

    def __init__(
        self,
        config: ClusterConfig,
        store: CheckpointStore,
        executor: concurrent.futures.Executor,
        ctx: zmq.asyncio.Context,
        metrics: Optional[DaemonMetrics] = None,
        on_published: Optional[Published] = None,
    ) -> None:
        super().__init__()
        self._config = config
        self._announce_local: Announce = nobody_listens
        self._commit = LocalCommitLeader(store, executor, metrics, on_published)
        self._commit.deliver_outcomes_to(self._announce_everywhere)
        self._ctx = ctx
        self._keys = CurveKeys.derive(config.secret)
        self._peers: Dict[int, _Peer] = {}
        self._auth: Optional[AsyncioAuthenticator] = None
        self.instance = uuid.uuid4().hex
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._copies = threading.Condition()
        self._copy_answers: Dict[TierCopyOrder, Dict[int, TierCopyDone]] = {}
        """Tier copies ordered from the followers and not yet collected, with their answers."""
        self.partner_endpoint: Optional[str] = None
        """Where this daemon takes partner copies, told to the last node (its predecessor in the ring)."""
        self.traffic = Traffic()
        self.tier_copy_answer_s = TIER_COPY_ANSWER_S
        """How long the followers' share of a tier copy may take before the copy is given up."""
        self._topologies: Dict[str, Topology] = {}
        """The job topologies followers have sent in full, by digest (later reports name them only)."""
        self._gone: Set[int] = set()
        """Followers whose heartbeats stopped (kept apart so that a report costs O(1), not O(nodes))."""

    def _remember_topology(self, topology: Topology) -> None:
        self._topologies[topology.digest] = topology
        while len(self._topologies) > TOPOLOGIES_KEPT:
            del self._topologies[next(iter(self._topologies))]

    def timeline(self) -> List[Dict[str, Any]]:
        """The last saves' moments at the leader (`LocalCommitLeader.timeline`)."""
        return self._commit.timeline()

    def cluster_status(self, own: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Every node's daemon as the leader sees it (this node's from `own`): alive, seconds since its
        last heartbeat, its saves in flight and durable ranks, and how many steps it lags the newest
        step any node reported."""
        now = time.monotonic()
        rows = [{"node": 0, "alive": True, "heartbeat_age_s": 0.0, **own}]
        for node in range(1, self._config.num_nodes):
            peer = self._peers.get(node)
            if peer is None:
                rows.append({"node": node, "alive": False, "heartbeat_age_s": None, "joined": False})
                continue
            rows.append(
                {"node": node, "alive": peer.alive, "heartbeat_age_s": round(now - peer.last_seen, 3), **peer.summary}
            )
        newest = max((row.get("newest_reported") or -1 for row in rows), default=-1)
        for row in rows:
            reported = row.get("newest_reported")
            row["lag_steps"] = None if newest < 0 else newest - (reported if reported is not None else -1)
        return rows

    def successor(self) -> Optional[str]:
        """Where node 1's daemon takes partner copies, once it has said."""
        return self._successor_of(self._config.node)

    def _successor_of(self, node: int) -> Optional[str]:
        following = (node + 1) % self._config.num_nodes
        if following == 0:
            return self.partner_endpoint
        peer = self._peers.get(following)
        return peer.partner if peer is not None and peer.alive else None

    def deliver_outcomes_to(self, announce: Announce) -> None:
        """Where this node's outcomes go (every other node's go over the wire)."""
        self._announce_local = announce

    @property
    def endpoint(self) -> str:
        """The TCP endpoint followers connect to."""
        return f"tcp://*:{self._config.leader_port}"

    async def start(self) -> None:
        """Bind the authenticated socket and start serving followers."""
        self._loop = asyncio.get_running_loop()
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=AllowJobDaemons(self._keys.client_public))
        socket = zmq.Socket(self._ctx, zmq.ROUTER)
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self._keys.server_secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self._keys.server_public)
        socket.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME_BYTES)
        socket.setsockopt(zmq.LINGER, 1000)
        try:
            socket.bind(self.endpoint)
        except zmq.ZMQError:
            socket.close(0)
            raise
        self._socket = LoopSocket(socket, self._loop)
        log.info("commit leader for %d nodes listening on %s (CURVE)", self._config.num_nodes, self.endpoint)
        self._spawn(self._receive_loop())
        self._spawn(self._watch_peers())

    async def close(self) -> None:
        """Stop serving followers."""
        self._stop()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    async def report(self, report: NodeReport) -> None:
        """A node (this one, or a follower over TCP) has every local rank's shards durable."""
        key = (report.job, report.step)
        if report.node != self._config.node and report.node_local != self._config.node_local_root:
            await self._commit.abort(report.job, report.step, _root_mode_mismatch(report.node, report.node_local))
            return
        if self._gone:
            reported = self._commit.reported_for(key)
            gone = sorted(n for n in self._gone if n != report.node and n not in reported)
        else:
            gone = []
        if gone:
            await self._commit.abort(report.job, report.step, self._gone_reason(report.step, gone))
            return
        await self._commit.report(report)

    async def abort(self, job: str, step: int, reason: str) -> None:
        """Abort a save on every node."""
        await self._commit.abort(job, step, reason)

    def order_copies(self, order: TierCopyOrder) -> None:
        """Ask every follower to copy its files of a step into a tier (from the copier's thread)."""
        with self._copies:
            self._copy_answers[order] = {}
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn, self._send_everywhere(cluster.TIER_COPY, order.to_wire()))

    def wait_for_copies(self, order: TierCopyOrder, stopping: Callable[[], bool]) -> List[str]:
        """The files the followers copied for `order`, once every one has answered; raises
        OtherNodesFailed when one failed, restarted, is gone (no heartbeat for the peer timeout, or
        never joined within it) or has not answered within `tier_copy_answer_s`, CopyStopped when
        `stopping()`."""
        ordered = time.monotonic()
        followers = range(1, self._config.num_nodes)
        with self._copies:
            try:
                while True:
                    answers = self._copy_answers[order]
                    failed = [answer.error for answer in answers.values() if answer.error]
                    if failed:
                        raise OtherNodesFailed(failed[0])
                    if len(answers) == len(followers):
                        return [path for answer in answers.values() for path in answer.files]
                    late = time.monotonic() - ordered > self._config.peer_timeout
                    gone = [
                        n
                        for n in followers
                        if n not in answers and (not self._peers[n].alive if n in self._peers else late)
                    ]
                    if gone:
                        raise OtherNodesFailed(
                            f"node(s) {gone} did not answer the copy of step {order.step} into tier {order.tier!r}"
                        )
                    if time.monotonic() - ordered > self.tier_copy_answer_s:
                        silent = [n for n in followers if n not in answers]
                        raise OtherNodesFailed(
                            f"node(s) {silent} did not finish copying step {order.step} into tier {order.tier!r} "
                            f"within {self.tier_copy_answer_s:g} s; the tier gets the next step it wants"
                        )
                    if stopping():
                        raise CopyStopped()
                    self._copies.wait(0.2)
            finally:
                self._copy_answers.pop(order, None)

    def _copy_answered(self, answer: TierCopyDone) -> None:
        with self._copies:
            answers = self._copy_answers.get(answer.order)
            if answers is not None:
                answers[answer.node] = answer
                self._copies.notify_all()

    def _copies_lost(self, node: int) -> None:
        """A follower restarted: the copies it was ordered will never be answered."""
        with self._copies:
            for order, answers in self._copy_answers.items():
                answers.setdefault(
                    node, TierCopyDone(order, node, error=f"node {node}'s daemon restarted during the copy")
                )
            self._copies.notify_all()

    async def _send_everywhere(self, msg_type: str, body: Dict[str, Any]) -> None:
        frame = messages.encode(msg_type, body)  # once, whatever the number of nodes
        for peer in list(self._peers.values()):
            await self._send_frame(peer.identity, msg_type, frame)

    async def _announce_everywhere(self, outcome: Outcome) -> None:
        await self._announce_local(outcome)
        await self._send_everywhere(*outcome.to_wire(with_manifest=self._config.node_local_root))

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped a daemon frame of %d parts", len(frames))
                continue
            identity, payload = frames
            try:
                envelope = messages.decode(payload)
                self.traffic.count(self.traffic.received, envelope.type, len(payload))
                reply = await self._dispatch(identity, envelope)
            except ProtocolError as exc:
                log.warning("rejected a frame from a follower: %s", exc.message)
                reply = messages.ERROR, messages.error_body(exc.code, exc.message)
                envelope = None
            except Exception:  # the leader must keep serving whatever one frame does
                log.exception("internal error while handling a follower's frame")
                reply = messages.ERROR, messages.error_body(ErrorCode.INTERNAL, "internal error in the commit leader")
                envelope = None
            if reply is not None:
                await self._send(identity, reply[0], reply[1], envelope.id if envelope else 0)

    async def _dispatch(self, identity: bytes, envelope: messages.Envelope) -> Optional[Tuple[str, Dict[str, Any]]]:
        body = envelope.body
        if envelope.type in (cluster.NODE_HELLO, cluster.HEARTBEAT):
            node, instance = body.get("node"), body.get("instance")
            if type(node) is not int or not 0 < node < self._config.num_nodes or not isinstance(instance, str):
                raise ProtocolError(
                    ErrorCode.INVALID_REQUEST, f"node must be 1..{self._config.num_nodes - 1} and instance a string"
                )
            await self._seen(node, identity, instance)
            peer = self._peers[node]
            partner, summary = body.get("partner"), body.get("summary")
            peer.partner = partner if isinstance(partner, str) else None
            if isinstance(summary, dict):
                peer.summary = summary
            return messages.OK, {"instance": self.instance, "successor": self._successor_of(node)}
        if envelope.type == cluster.NODE_REPORT:
            report = NodeReport.from_wire(body, self._topologies)
            self._remember_topology(report.topology)
            self._check_sender(identity, report.node)
            await self.report(report)
            return None
        if envelope.type == cluster.TIER_COPIED:
            answer = TierCopyDone.from_wire(body)
            self._check_sender(identity, answer.node)
            self._copy_answered(answer)
            return None
        if envelope.type == cluster.NODE_ABORT:
            job, step, reason = body.get("job"), body.get("step"), body.get("reason")
            if not (isinstance(job, str) and type(step) is int and isinstance(reason, str)):
                raise ProtocolError(ErrorCode.INVALID_REQUEST, "node_abort needs job, step and reason")
            await self.abort(job, step, reason)
            return None
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown daemon message type {envelope.type!r}")

    def _check_sender(self, identity: bytes, node: int) -> None:
        peer = self._peers.get(node)
        if peer is None or peer.identity != identity:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"a report for node {node} came from a connection that did not say hello as that node",
            )

    async def _seen(self, node: int, identity: bytes, instance: str) -> None:
        peer = self._peers.get(node)
        now = time.monotonic()
        self._gone.discard(node)  # alive again, restarted or not
        if peer is None or peer.instance != instance:
            if peer is not None:
                log.warning("node %d's daemon restarted: aborting the saves still waiting for it", node)
                await self._abort_waiting_for(node, f"node {node}'s daemon restarted while the save was in flight")
                self._copies_lost(node)
            log.info("node %d's daemon joined (instance %s)", node, instance[:8])
            self._peers[node] = _Peer(identity, instance, now)
            return
        if not peer.alive:
            log.info("node %d's daemon answers again", node)
        peer.identity, peer.last_seen, peer.alive = identity, now, True

    async def _watch_peers(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            now = time.monotonic()
            for node, peer in self._peers.items():
                if peer.alive and now - peer.last_seen > self._config.peer_timeout:
                    peer.alive = False
                    self._gone.add(node)
                    log.error("node %d's daemon sent no heartbeat for %.0f s", node, now - peer.last_seen)
                    await self._abort_waiting_for(node, None)

    async def _abort_waiting_for(self, node: int, reason: Optional[str]) -> None:
        for (job, step), reported in self._commit.reported_nodes().items():
            if node not in reported:
                await self._commit.abort(job, step, reason or self._gone_reason(step, [node]))

    def _gone_reason(self, step: int, nodes: list) -> str:
        return (
            f"step {step} aborted: the ckptd daemon of node(s) {nodes} stopped answering the commit leader "
            f"(no heartbeat for {self._config.peer_timeout:g} s)"
        )

    async def _send(self, identity: bytes, msg_type: str, body: Dict[str, Any], msg_id: int = 0) -> None:
        await self._send_frame(identity, msg_type, messages.encode(msg_type, body, msg_id))

    async def _send_frame(self, identity: bytes, msg_type: str, frame: bytes) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send_multipart([identity, frame])
            self.traffic.count(self.traffic.sent, msg_type, len(frame))
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a follower: %s", msg_type, exc)


class ClusterFollower(_Endpoint):
    """A node-N daemon's side (N > 0): reports to the leader, resolves its ranks with its decisions
    (after committing this node's own copy when the root is node-local)."""

    def __init__(
        self, config: ClusterConfig, ctx: zmq.asyncio.Context, node_copy: Optional[NodeCopyCommitter] = None
    ) -> None:
        super().__init__()
        self._config = config
        self._announce: Announce = nobody_listens
        self._ctx = ctx
        self._keys = CurveKeys.derive(config.secret)
        self._node_copy = node_copy
        self._tier_orders: Optional[Callable[[TierCopyOrder], None]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.partner_endpoint: Optional[str] = None
        """Where this daemon takes partner copies (said in every heartbeat)."""
        self._successor: Optional[str] = None
        self._told_at: Dict[SaveKey, float] = {}
        self._told: Set[Tuple[str, Optional[str]]] = set()
        """(topology digest, leader instance) pairs sent in full: later reports name them only."""
        self.summary: Optional[NodeSummary] = None
        """This node's view of itself, sent in every heartbeat for the leader's cluster status."""
        self._awaiting: Dict[SaveKey, Optional[RetentionPolicy]] = {}
        """Saves reported and not yet decided, with the retention policy their ranks asked for."""
        self._leader_instance: Optional[str] = None
        self._last_seen = time.monotonic()
        self._leader_alive = True
        self.instance = uuid.uuid4().hex

    def deliver_outcomes_to(self, announce: Announce) -> None:
        """Where the leader's decisions for this node go."""
        self._announce = announce

    def _mark_told(self, outcome: Outcome) -> None:
        self._told_at[(outcome.job, outcome.step)] = time.monotonic()
        while len(self._told_at) > TIMELINE_KEPT:
            del self._told_at[next(iter(self._told_at))]

    def told(self) -> List[Dict[str, Any]]:
        """When the last outcomes reached this node (time.monotonic(), comparable with the leader's
        timeline on one host), oldest first."""
        return [{"job": job, "step": step, "at": at} for (job, step), at in self._told_at.items()]

    def successor(self) -> Optional[str]:
        """Where the next node's daemon takes partner copies, as the leader last said."""
        return self._successor

    def take_tier_orders(self, ordered: Callable[[TierCopyOrder], None]) -> None:
        """Where the leader's orders to copy this node's files into a tier go (node-local roots)."""
        self._tier_orders = ordered

    def answer_tier_copy(self, answer: TierCopyDone) -> None:
        """Tell the leader how a tier copy it ordered went (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn, self._send(cluster.TIER_COPIED, answer.to_wire()))

    @property
    def node(self) -> int:
        """This daemon's node."""
        return self._config.node

    @property
    def leader_endpoint(self) -> str:
        """The leader's TCP endpoint."""
        host = self._config.leader_host
        return (
            f"tcp://[{host}]:{self._config.leader_port}" if ":" in host else f"tcp://{host}:{self._config.leader_port}"
        )

    async def start(self) -> None:
        """Connect to the leader (ZeroMQ retries until it is up) and start the heartbeats."""
        self._loop = asyncio.get_running_loop()
        socket = zmq.Socket(self._ctx, zmq.DEALER)
        socket.setsockopt(zmq.CURVE_SERVERKEY, self._keys.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self._keys.client_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self._keys.client_secret)
        socket.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME_BYTES)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.setsockopt(zmq.SNDHWM, 1000)
        socket.connect(self.leader_endpoint)
        self._socket = LoopSocket(socket, self._loop)
        self._last_seen = time.monotonic()
        log.info("node %d reports to the commit leader at %s (CURVE)", self._config.node, self.leader_endpoint)
        await self._send(cluster.NODE_HELLO, self._hello())
        self._spawn(self._receive_loop())
        self._spawn(self._heartbeat_loop())

    async def close(self) -> None:
        """Stop talking to the leader."""
        self._stop()

    async def report(self, report: NodeReport) -> None:
        """Forward this node's report; abort at once if the leader is known to be gone."""
        key = (report.job, report.step)
        if not self._leader_alive:
            await self._resolve_locally(key, self._leader_gone_reason(report.step))
            return
        self._awaiting[key] = report.retention
        told = (report.topology.digest, self._leader_instance)
        body = replace(report, node_local=self._config.node_local_root).to_wire(with_topology=told not in self._told)
        self._told.add(told)
        await self._send(cluster.NODE_REPORT, body)

    async def abort(self, job: str, step: int, reason: str) -> None:
        """Abort here at once, and ask the leader to abort the save on every node."""
        await self._resolve_locally((job, step), reason)
        await self._send(cluster.NODE_ABORT, {"job": job, "step": step, "reason": reason})

    def _hello(self) -> Dict[str, Any]:
        hello: Dict[str, Any] = {"node": self._config.node, "instance": self.instance, "partner": self.partner_endpoint}
        if self.summary is not None:
            hello["summary"] = self.summary()
        return hello

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            payload = await self._socket.recv()
            try:
                envelope = messages.decode(payload)
            except ProtocolError as exc:
                log.warning("dropped a frame from the leader: %s", exc.message)
                continue
            self._last_seen = time.monotonic()
            if not self._leader_alive:
                log.info("the commit leader answers again")
            self._leader_alive = True
            if envelope.type == messages.OK:
                await self._on_leader_instance(str(envelope.body.get("instance", "")))
                successor = envelope.body.get("successor")
                self._successor = successor if isinstance(successor, str) else None
            elif envelope.type in (messages.COMMITTED, messages.ABORTED):
                outcome = Outcome.from_wire(envelope.type, envelope.body)
                if outcome is not None:
                    self._mark_told(outcome)
                    retention = self._awaiting.pop((outcome.job, outcome.step), None)
                    if outcome.committed and self._node_copy is not None:
                        outcome = await self._node_copy.commit(outcome, retention)
                    await self._announce(outcome)
            elif envelope.type == cluster.TIER_COPY:
                self._on_tier_order(envelope.body)
            elif envelope.type == messages.ERROR:
                log.error("the commit leader refused a message: %s", envelope.body.get("message"))
                self._told.clear()  # it may have missed a topology: the next report sends it in full

    def _on_tier_order(self, body: Dict[str, Any]) -> None:
        try:
            order = TierCopyOrder.from_wire(body)
        except ProtocolError as exc:
            log.warning("dropped a tier copy order from the leader: %s", exc.message)
            return
        if self._tier_orders is None:
            self.answer_tier_copy(
                TierCopyDone(order, self._config.node, error=f"node {self._config.node} serves no tiers")
            )
            return
        self._tier_orders(order)

    async def _on_leader_instance(self, instance: str) -> None:
        if self._leader_instance is not None and instance != self._leader_instance:
            log.warning("the commit leader restarted: aborting the saves it had not decided")
            for job, step in list(self._awaiting):
                await self._resolve_locally(
                    (job, step),
                    f"step {step} aborted: node 0's daemon (the commit leader) restarted before it decided this save",
                )
        self._leader_instance = instance

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._send(cluster.HEARTBEAT, self._hello())
            await asyncio.sleep(self._config.heartbeat_s)
            silent = time.monotonic() - self._last_seen
            if self._leader_alive and silent > self._config.peer_timeout:
                self._leader_alive = False
                log.error("the commit leader sent nothing for %.0f s", silent)
                for job, step in list(self._awaiting):
                    await self._resolve_locally((job, step), self._leader_gone_reason(step))

    def _leader_gone_reason(self, step: int) -> str:
        return (
            f"step {step} aborted: node 0's daemon (the commit leader) at {self.leader_endpoint} stopped "
            f"answering (nothing for {self._config.peer_timeout:g} s); if it committed the save before it "
            "stopped, the checkpoint is in the root"
        )

    async def _resolve_locally(self, key: SaveKey, reason: str) -> None:
        self._awaiting.pop(key, None)
        await self._announce(Outcome(key[0], key[1], committed=False, reason=reason))

    async def _send(self, msg_type: str, body: Dict[str, Any]) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send(messages.encode(msg_type, body))
        except zmq.Again:
            log.warning("the connection to the commit leader is backed up; dropped a %s", msg_type)
        except zmq.ZMQError as exc:
            log.warning("could not send %s to the commit leader: %s", msg_type, exc)


def _root_mode_mismatch(node: int, node_local: bool) -> str:
    ours, theirs = ("a shared root", "--node-local-root") if node_local else ("--node-local-root", "a shared root")
    return (
        f"node {node}'s daemon runs with {theirs} and node 0's with {ours}: start every node's daemon with "
        "the same root mode"
    )
