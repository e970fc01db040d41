"""The per-node writer daemon: a ZeroMQ ROUTER control plane in asyncio, shard writes in threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import zmq
import zmq.asyncio

from ckptd.disk import runtime
from ckptd.disk.root import write_node_copy_record
from ckptd.disk.tiers import write_tiers_record
from ckptd.proto import messages
from ckptd.proto.cluster import parse_address
from ckptd.proto.config import CLUSTER_SECRET_ENV, ENDPOINT_ENV, LEADER_ENV
from ckptd.proto.errors import CodedError, ErrorCode, ProtocolError
from ckptd.proto.formats import CKPTD_VERSION
from ckptd.proto.messages import PlannedSave, SaveRequest
from ckptd.proto.ownership import CLAIM_TTL_S, RunIdentity
from ckptd.proto.tiers import TierSpec, TierSpecError, is_object_store, parse_tiers
from ckptd.service.cluster import ClusterConfig, ClusterFollower, ClusterLeader
from ckptd.service.coordinator import NodeCoordinator
from ckptd.service.curve import load_secret
from ckptd.service.errors import ClusterSecretError, DaemonConfigError, DaemonError, OwnershipRefused, SaveRejected
from ckptd.service.leader import CommitChannel, LocalCommitLeader, NodeCopyCommitter
from ckptd.service.loop_socket import LoopSocket
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.ownership import RootOwnership
from ckptd.service.partners import PartnerReceiver, PartnerSender, advertised_host
from ckptd.service.plans import SavePlans
from ckptd.service.regions import pid_alive, sweep_orphaned_regions
from ckptd.service.shard_headers import ShardHeaders
from ckptd.service.shard_writer import Throttle
from ckptd.service.store import CheckpointStore
from ckptd.service.tiers import NodeTierCopies, TierCopier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    """How a daemon serves one checkpoint root on one node.

    Each field's default is stated here and only here: `ckptd serve` builds one flag per field
    (`ckptd.proto.config.flag`) with this default, and a client's DaemonOptions leave a field to it."""

    root: str
    endpoint: Optional[str] = None
    node: int = 0
    max_write_mbps: Optional[float] = None
    save_timeout: float = 600.0
    write_threads: int = 4
    exit_when_idle: Optional[float] = None
    """Exit after this many idle seconds once no client process is alive (auto-started daemons)."""
    nice: int = 10
    """CPU niceness added at start: the writer mostly waits on the disk, and the CPU it does use
    (checksums, syscalls) should go to the training processes first."""
    num_nodes: int = 1
    leader: Optional[str] = None
    """HOST:PORT of node 0's commit leader (multi-node jobs)."""
    cluster_secret: Optional[str] = None
    """Path of the secret file every daemon of a multi-node job shares (`ckptd keygen`)."""
    peer_timeout: float = 10.0
    metrics_port: Optional[int] = None
    """Serve Prometheus metrics on 127.0.0.1:PORT (None: collect only)."""
    metrics_address: str = "127.0.0.1"
    claim_ttl: float = CLAIM_TTL_S
    """How long another host's claim on the root is honoured after its last renewal."""
    tier: Tuple[str, ...] = ()
    """Slower tiers filled from the root in the background, nearest first (`ckptd.proto.tiers`)."""
    tier_copy_mbps: Optional[float] = None
    """Cap on the bandwidth of the copies into the tiers, and of the partner copies, in MB/s."""
    node_local_root: bool = False
    """The root is on this node only (tmpfs, local NVMe): each node of a multi-node job commits its own
    files there under the job's manifest."""
    replicate_to_partner: bool = False
    """Also keep a copy of this node's files of each checkpoint on the next node (a ring); implies
    `node_local_root`."""
    partner_port: Optional[int] = None
    """TCP port for the partner copies this daemon receives (None: any free port)."""

    def tiers(self) -> Tuple[TierSpec, ...]:
        """The tiers, parsed and checked against the root; raises DaemonConfigError."""
        try:
            specs = parse_tiers(self.tier)
        except TierSpecError as exc:
            raise DaemonConfigError(str(exc)) from None
        root = os.path.realpath(self.root)
        for spec in specs:
            if is_object_store(spec.path):
                continue
            path = os.path.realpath(spec.path)
            if path == root or path.startswith(root + os.sep) or root.startswith(path + os.sep):
                raise DaemonConfigError(
                    f"tier {spec.name!r} at {spec.path} overlaps the root {self.root}: give each tier a directory of its own"
                )
        return specs

    def cluster(self) -> Optional[ClusterConfig]:
        """The multi-node settings, checked; None for a one-node job. Raises DaemonConfigError."""
        if self.num_nodes < 1 or not 0 <= self.node < self.num_nodes:
            raise DaemonConfigError(f"node {self.node} is not in a job of {self.num_nodes} node(s)")
        if self.num_nodes == 1:
            return None
        if not self.leader or not self.cluster_secret:
            raise DaemonConfigError(
                f"a job of {self.num_nodes} nodes needs --leader HOST:PORT (node 0's address) and --cluster-secret "
                f"FILE (made once with `ckptd keygen FILE`), or {LEADER_ENV} and {CLUSTER_SECRET_ENV}"
            )
        try:
            host, port = parse_address(self.leader)
            secret = load_secret(self.cluster_secret)
        except (ValueError, ClusterSecretError) as exc:
            raise DaemonConfigError(str(exc)) from None
        return ClusterConfig(
            self.node,
            self.num_nodes,
            host,
            port,
            secret,
            peer_timeout=self.peer_timeout,
            heartbeat_s=min(1.0, self.peer_timeout / 4),
            node_local_root=self.root_is_node_local,
        )

    @property
    def root_is_node_local(self) -> bool:
        """True when every node keeps its own root (`--node-local-root`, or partner copies)."""
        return self.node_local_root or self.replicate_to_partner

    def resolved_endpoint(self) -> str:
        """The endpoint to bind: the configured one, or the per-user default for the root."""
        return self.endpoint or runtime.default_endpoint(self.root)


def open_root(root: str) -> CheckpointStore:
    """The store for `root`, created if needed and checked writable; raises DaemonConfigError saying why not."""
    try:
        store = CheckpointStore(root)
        store.check_writable()
    except OSError as exc:
        inside = str(exc.filename or root).startswith(os.path.realpath(root))
        where = "" if inside else f" ({exc.filename})"
        raise DaemonConfigError(
            f"cannot use {root} as the checkpoint root: {exc.strerror or exc}{where}; choose a directory this user "
            "can create and write (CheckpointManager(provider, root) or ckptd serve --root)"
        ) from None
    return store


class RootLock:
    """Node-local exclusive lock: only one daemon serves a root on a node."""

    def __init__(self, root: str, node: int = 0) -> None:
        self.path = runtime.daemon_lock_path(root, node)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise DaemonError naming the daemon that holds it."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonError(
                f"another ckptd daemon (pid {holder}) already serves this root on this node (lock {self.path}); "
                "use that daemon, or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class _ClientLink:
    """A rank's connection as the coordinator sees it: somewhere to send notifications."""

    send: Callable[[bytes, str, Dict[str, Any]], Awaitable[None]]
    identity: bytes

    async def notify(self, msg_type: str, body: Dict[str, Any]) -> None:
        """Send a notification to the rank over the ROUTER socket."""
        await self.send(self.identity, msg_type, body)


class DaemonServer:
    """Serves save requests for one root until stopped (or idle, for auto-started daemons)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.store = open_root(config.root)
        self.endpoint = config.resolved_endpoint()
        self._lock = RootLock(self.store.root, config.node)
        self._ctx = zmq.asyncio.Context()
        self._socket: Optional[LoopSocket] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(config.write_threads, thread_name_prefix="ckptd-write")
        throttle = Throttle(config.max_write_mbps * 1e6 if config.max_write_mbps else None)
        self.cluster = config.cluster()
        self.metrics = DaemonMetrics()
        self.tier_specs = config.tiers()
        leads = self.cluster is None or self.cluster.is_leader
        self.tiers = (
            TierCopier(self.store, self.tier_specs, config.tier_copy_mbps, self.metrics)
            if self.tier_specs and leads
            else None
        )
        """Fills the slower tiers: on the node that commits (node 0 of a multi-node job)."""
        self.node_tiers: Optional[NodeTierCopies] = None
        """Copies this node's files into the tiers when the leader asks (followers with node-local roots)."""
        self.partner_in: Optional[PartnerReceiver] = None
        self.partner_out: Optional[PartnerSender] = None
        if config.replicate_to_partner and self.cluster is not None:
            host = self.cluster.leader_host if self.cluster.is_leader else advertised_host(self.cluster.leader_host)
            self.partner_in = PartnerReceiver(self.store.root, self.cluster.secret, config.partner_port, host)
            self.partner_out = PartnerSender(
                self.store, self.cluster.node, self.cluster.secret, self._successor, config.tier_copy_mbps
            )
        self.channel = self._commit_channel()
        if isinstance(self.channel, ClusterFollower):
            self.channel.summary = self.node_summary
        self._share_tier_copies()
        self.coordinator = NodeCoordinator(
            self.store,
            config.node,
            self._executor,
            throttle,
            config.save_timeout,
            self.channel,
            num_nodes=config.num_nodes,
            metrics=self.metrics,
        )
        self.ownership = RootOwnership(
            self.store.root, keeps_claim=config.node == 0 or config.root_is_node_local, claim_ttl=config.claim_ttl
        )
        self.instance = uuid.uuid4().hex
        """Changes at every start: clients notice a restarted daemon by it."""
        self._clients: Dict[int, float] = {}
        self._plans = SavePlans()
        self._last_activity = time.monotonic()
        self._stopping: Optional[asyncio.Event] = None

    def _commit_channel(self) -> CommitChannel:
        """Where the node's reports go: the commit leader in this process (one node, or node 0 of
        several, which also serves the other nodes), or a link to node 0's."""
        published = self._published if self.tiers is not None or self.partner_out is not None else None
        if self.cluster is None:
            return LocalCommitLeader(self.store, self._executor, self.metrics, published)
        if self.cluster.is_leader:
            return ClusterLeader(self.cluster, self.store, self._executor, self._ctx, self.metrics, published)
        node_copy = NodeCopyCommitter(self.store, self._executor, published) if self.cluster.node_local_root else None
        return ClusterFollower(self.cluster, self._ctx, node_copy)

    def _published(self, steps: List[int]) -> None:
        """Steps committed (and durable) in this node's root: queue their copies."""
        if self.tiers is not None:
            self.tiers.committed(steps)
        if self.partner_out is not None:
            self.partner_out.committed(steps)

    def _successor(self) -> Optional[str]:
        """Where the next node's daemon takes partner copies (once the leader knows)."""
        channel = self.channel
        return channel.successor() if isinstance(channel, (ClusterLeader, ClusterFollower)) else None

    def _share_tier_copies(self) -> None:
        """With node-local roots every node copies its own files into the tiers: the leader's copier
        orders the followers' share, and each follower copies when ordered."""
        if self.cluster is None or not self.cluster.node_local_root or not self.tier_specs:
            return
        if isinstance(self.channel, ClusterLeader):
            assert self.tiers is not None
            self.tiers.share_with(self.channel)
        elif isinstance(self.channel, ClusterFollower):
            self.node_tiers = NodeTierCopies(
                self.store,
                self.cluster.node,
                self.tier_specs,
                self.channel.answer_tier_copy,
                self.config.tier_copy_mbps,
            )
            self.channel.take_tier_orders(self.node_tiers.ordered)

    async def serve(self) -> None:
        """Lock the root, clean leftovers, bind, and serve until `stop()` or idle exit."""
        self._lock.acquire()
        if self.config.nice:
            os.nice(self.config.nice)
        try:
            self._clean_root()
            self._sweep_regions()
            write_node_copy_record(
                self.store.root, self.config.node if self.cluster is not None and self.cluster.node_local_root else None
            )
            if self.tier_specs and (self.tiers is not None or self.node_tiers is not None):
                write_tiers_record(self.store.root, self.tier_specs)
            if self.tiers is not None:
                self.tiers.start()
            if self.node_tiers is not None:
                self.node_tiers.start()
            if self.partner_in is not None:
                self.partner_in.start()
                if isinstance(self.channel, (ClusterLeader, ClusterFollower)):
                    self.channel.partner_endpoint = self.partner_in.endpoint
            self._socket = LoopSocket(self._bind(), asyncio.get_running_loop())
            if self.config.metrics_port is not None:
                try:
                    self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
                except OSError as exc:
                    raise DaemonConfigError(f"cannot serve metrics on port {self.config.metrics_port}: {exc}") from None
            try:
                await self.channel.start()
            except zmq.ZMQError as exc:
                raise DaemonError(f"cannot start the commit channel between nodes: {exc}") from None
            if self.partner_out is not None:
                self.partner_out.start()
            self._stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stop)
                except (NotImplementedError, RuntimeError):
                    pass
            log.info(
                "ckptd %s serving root %s on %s (pid %d)", CKPTD_VERSION, self.store.root, self.endpoint, os.getpid()
            )
            receiver = loop.create_task(self._receive_loop())
            watcher = loop.create_task(self._idle_watch())
            await self._stopping.wait()
            await self._drain()
            if self.tiers is not None:  # the copies of the last checkpoints, unless a tier stalls
                await asyncio.to_thread(self.tiers.drain, self.config.save_timeout)
            receiver.cancel()
            watcher.cancel()
        finally:
            await self.channel.close()
            if self.tiers is not None:
                self.tiers.close()
            if self.node_tiers is not None:
                self.node_tiers.close()
            if self.partner_out is not None:
                self.partner_out.close()
            if self.partner_in is not None:
                self.partner_in.close()
            self._shutdown()

    def _clean_root(self) -> None:
        """Remove what interrupted saves left behind, unless another live run owns the root (its saves
        in flight look like leftovers). On a shared root only node 0 cleans: other nodes' leftovers may
        be saves in flight. A node-local root is this node's alone."""
        if self.config.node != 0 and not self.config.root_is_node_local:
            return
        owner = self.ownership.live_claim_at_start()
        if owner is not None:
            log.warning(
                "not cleaning leftovers in %s: another live run owns it (%s)", self.store.root, owner.describe()
            )
            return
        self.store.remove_leftovers()
        self.store.repair_latest()

    def stop(self) -> None:
        """Ask the server to finish its saves in flight and exit."""
        if self._stopping is not None:
            self._stopping.set()

    def _bind(self) -> zmq.Socket:
        if self.endpoint.startswith("ipc://"):
            directory = os.path.dirname(self.endpoint[len("ipc://") :])
            os.makedirs(directory, mode=0o700, exist_ok=True)
        socket = zmq.Socket(self._ctx, zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 1000)
        if self.endpoint.startswith("ipc://"):
            try:  # beside the 0700 directory: drop connections from processes of other users
                socket.setsockopt(zmq.IPC_FILTER_UID, os.getuid())
            except (AttributeError, zmq.ZMQError):
                log.warning("this platform cannot attribute ipc connections to users; relying on socket permissions")
        socket.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME_BYTES)
        try:
            socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(0)
            error = DaemonError if exc.errno == errno.EADDRINUSE else DaemonConfigError
            raise error(
                f"cannot listen on {self.endpoint}: {exc}; choose another endpoint "
                f"({ENDPOINT_ENV}, or a shorter XDG_RUNTIME_DIR for the default one)"
            ) from None
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[len("ipc://") :], 0o600)
        return socket

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.save_timeout
        while self.coordinator.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _shutdown(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=1000)
        self._ctx.term()
        self._executor.shutdown(wait=True)
        self.coordinator.regions.close()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://") :])
            except FileNotFoundError:
                pass
        self._lock.release()
        log.info("ckptd stopped")

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            self._last_activity = time.monotonic()
            if len(frames) != 2:
                log.warning("dropped a message of %d frames (expected identity + payload)", len(frames))
                continue
            identity, payload = frames
            await self._handle(identity, payload)

    async def _handle(self, identity: bytes, payload: bytes) -> None:
        try:
            envelope = messages.decode(payload)
        except ProtocolError as exc:
            log.warning("rejected a frame: %s", exc.message)
            await self._send(identity, messages.ERROR, messages.error_body(exc.code, exc.message))
            return
        try:
            reply = await self._dispatch(identity, envelope)
        except Exception:  # the daemon must keep serving whatever one request does
            log.exception("internal error while handling a %s request", envelope.type)
            reply = messages.ERROR, messages.error_body(ErrorCode.INTERNAL, "internal daemon error; see the daemon log")
        await self._send(identity, reply[0], reply[1], envelope.id)

    async def _dispatch(self, identity: bytes, envelope: messages.Envelope) -> tuple[str, Dict[str, Any]]:
        if envelope.type == messages.HELLO:
            return await self._hello(identity, envelope.body)
        if envelope.type == messages.BYE:
            await self.ownership.leave(identity)
            self._plans.forget(identity)
            self.coordinator.regions.forget(identity)
            return messages.OK, {}
        if envelope.type == messages.SAVE:
            return await self._save(identity, envelope.body)
        if envelope.type == messages.SAVE_PLANNED:
            return await self._save(identity, envelope.body, planned=True)
        if envelope.type == messages.STATUS:
            return messages.OK, self.status()
        message = f"unknown message type {envelope.type!r}; expected one of hello, bye, save, save_planned, status"
        log.warning("rejected a frame: %s", message)
        return messages.ERROR, messages.error_body(ErrorCode.UNKNOWN_TYPE, message)

    async def _hello(self, identity: bytes, body: Dict[str, Any]) -> tuple[str, Dict[str, Any]]:
        try:
            hello = messages.Hello.from_wire(body)
            self._clients[hello.pid] = time.monotonic()
            if hello.run is not None:
                await self.ownership.admit(identity, hello.run)
        except (ProtocolError, OwnershipRefused) as exc:
            log.warning("refused a hello: %s", exc)
            return messages.ERROR, messages.error_body(exc.code, str(exc))
        return messages.OK, {
            "pid": os.getpid(),
            "instance": self.instance,
            "root": self.store.root,
            "protocol": messages.PROTOCOL_VERSION,
            "version": CKPTD_VERSION,
        }

    async def _save(self, identity: bytes, body: Dict[str, Any], planned: bool = False) -> tuple[str, Dict[str, Any]]:
        """A rank's part of a save: a full request (`planned` False) or a planned save of a plan that
        this client's earlier full request registered."""
        scopes: Optional[Dict[str, str]] = None
        headers = ShardHeaders()
        try:
            if planned:
                request, scopes, headers = self._plans.recall(identity, PlannedSave.from_wire(body))
                body = {"step": request.step, "rank": request.rank, "job": request.job}  # for the abort below
            else:
                request = SaveRequest.from_wire(body)
                if request.daemon is not None and request.daemon != self.instance:
                    raise SaveRejected(
                        ErrorCode.WRONG_DAEMON,
                        f"step {request.step} from rank {request.rank} was sent to daemon instance "
                        f"{request.daemon}; this daemon ({self.instance}) started since and read none of it",
                    )
            stopping = self._stopping is not None and self._stopping.is_set()
            if stopping and not self.coordinator.holds(request.job, request.step):
                raise SaveRejected(
                    ErrorCode.SHUTTING_DOWN,
                    f"the daemon is shutting down and takes no new save (step "
                    f"{request.step}); the saves it holds finish first",
                )
            self._clients[request.pid] = time.monotonic()
            run = RunIdentity(request.job, self.ownership.host, request.pid, request.rank, time.time())
            try:
                await self.ownership.admit(identity, run)
            except OwnershipRefused as exc:
                raise SaveRejected(exc.code, str(exc)) from None
            if request.skip_reason is not None:
                await self.coordinator.abort(
                    request.job, request.step, f"rank {request.rank} skipped step {request.step}: {request.skip_reason}"
                )
                return messages.ACCEPTED, {"step": request.step, "instance": self.instance}
            scopes = await self.coordinator.accept(_ClientLink(self._send, identity), request, scopes, headers)
            self._plans.remember(identity, request, scopes, headers)
        except CodedError as exc:  # ProtocolError or SaveRejected
            log.warning("rejected a save: %s", exc)
            step, rank, job = body.get("step"), body.get("rank"), body.get("job")
            if exc.code.aborts_save and type(step) is int and type(rank) is int and isinstance(job, str):
                await self.coordinator.abort(job, step, f"rank {rank} sent an invalid part: {exc}")
            return messages.ERROR, messages.error_body(exc.code, str(exc))
        return messages.ACCEPTED, {"step": request.step, "instance": self.instance}

    async def _send(self, identity: bytes, msg_type: str, body: Dict[str, Any], msg_id: int = 0) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send_multipart([identity, messages.encode(msg_type, body, msg_id)])
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a client: %s", msg_type, exc)

    def node_summary(self) -> Dict[str, Any]:
        """This node's saves in flight and last commit, as the leader's cluster status shows them."""
        sessions = self.coordinator.sessions()
        reported = [s.step for s in sessions if s.reported]
        last = self.coordinator.last_committed
        return {
            "saves_in_flight": [
                {
                    "step": s.step,
                    "ranks_expected": len(s.expected),
                    "ranks_durable": sum(1 for p in s.ranks.values() if p.durable),
                    "reported": s.reported,
                }
                for s in sessions
            ],
            "last_committed": last,
            "newest_reported": max(reported + ([last] if last is not None else []), default=None),
        }

    def status(self) -> Dict[str, Any]:
        """Saves in flight and the last commit, for `ckptd status` (with every node's view on node 0
        of a multi-node job)."""
        channel = self.channel
        cluster_view = None
        if isinstance(channel, ClusterLeader):
            cluster_view = {
                "leader": True,
                "nodes": channel.cluster_status(self.node_summary()),
                "traffic": channel.traffic.to_wire(),
                "timeline": channel.timeline(),
            }
        elif isinstance(channel, ClusterFollower):
            cluster_view = {
                "leader": False,
                "node": channel.node,
                "leader_endpoint": channel.leader_endpoint,
                "told": channel.told(),
            }
        return {
            "cluster": cluster_view,
            "pid": os.getpid(),
            "root": self.store.root,
            "endpoint": self.endpoint,
            "version": CKPTD_VERSION,
            "last_committed": self.coordinator.last_committed,
            "owner": None if self.ownership.owner is None else self.ownership.owner.describe(),
            "tiers": [] if self.tiers is None else self.tiers.status(),
            "partner": None if self.partner_out is None else self.partner_out.status(),
            "saves": [
                {
                    "step": s.step,
                    "ranks_received": sorted(s.ranks),
                    "ranks_expected": sorted(s.expected),
                    "ranks_durable": sorted(r for r, p in s.ranks.items() if p.durable),
                    "bytes_written": s.bytes_written,
                    "bytes_expected": s.bytes_expected,
                    "seconds": round(time.time() - s.started_at, 3),
                }
                for s in self.coordinator.sessions()
            ],
        }

    def _sweep_regions(self) -> None:
        for name in sweep_orphaned_regions():
            log.info("unlinked staging region %s of a client that is gone", name)

    async def _idle_watch(self) -> None:
        limit = self.config.exit_when_idle
        interval = 1.0 if limit is None else min(1.0, limit / 4)
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            await self.ownership.tick()
            if time.monotonic() - last_sweep > 60 and not self.coordinator.busy:
                self._sweep_regions()
                self._plans.forget_gone(pid_alive)
                self.coordinator.regions.forget_gone(pid_alive)
                last_sweep = time.monotonic()
            if limit is None:
                continue
            for pid in [p for p in self._clients if not pid_alive(p)]:
                del self._clients[pid]
            idle = time.monotonic() - self._last_activity
            copying = self.tiers is not None and self.tiers.busy
            if not self.coordinator.busy and not copying and not self._clients and idle >= limit:
                log.info("no saves in flight and no live clients for %.0f s: exiting", idle)
                self._sweep_regions()
                self.stop()
                return
