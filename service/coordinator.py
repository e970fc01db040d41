"""The node side of a save: accept each local rank's part, write its shards, report to the leader."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Set

from ckptd.disk.files import beside_regions
from ckptd.disk.safetensors import shard_metadata
from ckptd.proto import layout, messages
from ckptd.proto.cluster import NodeReport, ScopeFiles
from ckptd.proto.errors import ErrorCode
from ckptd.proto.formats import check_tensor_layout
from ckptd.proto.manifest import FileRecord
from ckptd.proto.messages import ComponentPart, Outcome, SaveRequest
from ckptd.proto.patterns import Placement, SharingPattern, place
from ckptd.proto.sharding import Box, checksum_blocks, chunk_index_entry
from ckptd.service.errors import RegionError, SaveRejected
from ckptd.service.leader import CommitChannel, SaveKey
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.regions import MappedRegion, RegionMaps
from ckptd.service.shard_headers import ShardHeaders
from ckptd.service.shard_writer import Throttle, describe_kept_shard, write_file, write_shard
from ckptd.service.store import CheckpointStore

log = logging.getLogger(__name__)


class RankLink(Protocol):
    """How the coordinator reaches the rank that handed over a part (the server's connection to it)."""

    @property
    def identity(self) -> bytes:
        """The connection's identity: what the daemon keeps for a client (its mapped regions) is keyed by it."""

    async def notify(self, msg_type: str, body: Dict[str, Any]) -> None:
        """Send a notification (released, committed, aborted) to the rank."""


MAX_SAVES_IN_FLIGHT = 16
"""Bound on concurrent saves per node: each holds a tmp directory and mapped regions."""


@dataclass
class RankPart:
    """What one local rank handed over for one step."""

    request: SaveRequest
    link: RankLink
    regions: Dict[str, MappedRegion]
    scopes: Dict[str, str]
    """Component key -> the scope this rank's copy goes to (placed once, when the part is checked)."""
    headers: ShardHeaders
    """Its shards' headers: its save plan's, encoded once for every save of the plan."""
    durable: bool = False


@dataclass
class SaveSession:
    """Checkpoint `step` as seen by this node while its local ranks hand over and it writes."""

    step: int
    request: SaveRequest
    tmp_dir: str
    expected: Set[int]
    started_at: float = field(default_factory=time.time)
    ranks: Dict[int, RankPart] = field(default_factory=dict)
    files: Dict[str, Dict[str, ScopeFiles]] = field(default_factory=dict)
    writes_in_flight: int = 0
    bytes_expected: int = 0
    bytes_written: int = 0
    outcome: Optional[Outcome] = None
    timer: Optional[asyncio.TimerHandle] = None
    write_seconds: float = 0.0
    last_part_at: float = 0.0
    reported: bool = False
    fsync_seconds: float = 0.0
    _progress: threading.Lock = field(default_factory=threading.Lock)

    def add_written(self, nbytes: int) -> None:
        """Count bytes on disk (called by the writer threads as each chunk lands)."""
        with self._progress:
            self.bytes_written += nbytes

    def add_fsync(self, seconds: float) -> None:
        """Record one component's fsync time (called by the writer threads; the longest counts)."""
        with self._progress:
            self.fsync_seconds = max(self.fsync_seconds, seconds)


class NodeCoordinator:
    """Accepts save parts from this node's ranks and drives them to durable shards (DESIGN.md steps 1-3)."""

    def __init__(
        self,
        store: CheckpointStore,
        node: int,
        executor: concurrent.futures.Executor,
        throttle: Throttle,
        save_timeout: float,
        channel: CommitChannel,
        num_nodes: int = 1,
        metrics: Optional[DaemonMetrics] = None,
    ) -> None:
        self._store = store
        self._node = node
        self._executor = executor
        self._throttle = throttle
        self._save_timeout = save_timeout
        self._sessions: Dict[int, SaveSession] = {}
        self._aborted: Dict[SaveKey, str] = {}
        self._num_nodes = num_nodes
        self.metrics = metrics or DaemonMetrics()
        self.leader = channel
        channel.deliver_outcomes_to(self._on_outcome)
        self.last_committed: Optional[int] = store.latest_step()  # the daemon repairs `latest` before serving
        self.regions = RegionMaps()
        """The clients' staging regions, mapped once and kept between their saves."""
        self._root_beside_regions = beside_regions(store.root)
        """The root shares the regions' filesystem (/dev/shm): regions become shard files, uncopied."""

    @property
    def busy(self) -> bool:
        """True while any save is in flight on this node."""
        return bool(self._sessions)

    def holds(self, job: str, step: int) -> bool:
        """True while run `job`'s save of `step` is in flight here (and not yet decided)."""
        session = self._sessions.get(step)
        return session is not None and session.request.job == job and session.outcome is None

    def sessions(self) -> List[SaveSession]:
        """Saves in flight, oldest first."""
        return [self._sessions[s] for s in sorted(self._sessions)]

    def check_parts(self, request: SaveRequest) -> Dict[str, str]:
        """Check each component part against its placement rule and its own layout (what a plan keeps
        from save to save); returns the scope each part goes to. Raises SaveRejected."""
        return {part.key: self._check_part(request, part).scope for part in request.parts}

    async def accept(
        self,
        link: RankLink,
        request: SaveRequest,
        scopes: Optional[Dict[str, str]] = None,
        headers: Optional[ShardHeaders] = None,
    ) -> Dict[str, str]:
        """Validate and take over one rank's part; returns where each component part goes (`scopes`:
        what `check_parts` returned for a request of the same structure, which then is not checked
        again). `headers`: the shard headers of the save plan the request belongs to, if any. Raises
        SaveRejected or ProtocolError."""
        step = request.step
        reason = self._aborted.get((request.job, step))
        if reason is not None:
            raise SaveRejected(ErrorCode.ABORTED, f"checkpoint of step {step} was already aborted: {reason}")
        if os.path.realpath(request.root) != self._store.root:
            raise SaveRejected(
                ErrorCode.WRONG_ROOT,
                f"this daemon serves {self._store.root!r}, not {request.root!r}; "
                "point the client at the daemon for its root (CKPTD_ENDPOINT or the default endpoint)",
            )
        if request.topology.node_of(request.rank) != self._node:
            raise SaveRejected(
                ErrorCode.WRONG_NODE,
                f"rank {request.rank} belongs to node {request.topology.node_of(request.rank)}, this daemon serves node {self._node}",
            )
        session = await self._session_for(request)
        if (
            time.monotonic() > request.expires_at
        ):  # checked once its tmp directory exists: see disk/removal.py fence_save
            raise SaveRejected(
                ErrorCode.EXPIRED,
                f"rank {request.rank}'s part of step {step} arrived after the client "
                "stopped waiting for it (the daemon was stalled or overloaded)",
            )
        if request.rank in session.ranks:
            raise SaveRejected(ErrorCode.DUPLICATE, f"rank {request.rank} already handed over its part of step {step}")
        if scopes is None:
            scopes = self.check_parts(request)
        for component in request.parts:
            self._check_save_fields(request, component)
        regions = self._map_regions(link, request)
        self.metrics.staged_bytes_mapped.inc(sum(r.size for r in regions.values()))
        part = RankPart(request, link, regions, scopes, headers if headers is not None else ShardHeaders())
        session.ranks[request.rank] = part
        session.last_part_at = time.time()
        session.bytes_expected += sum(p.region_size for p in request.parts if p.writer)
        asyncio.get_running_loop().create_task(self._write_rank(session, part))
        return scopes

    async def _session_for(self, request: SaveRequest) -> SaveSession:
        """The session this rank's part joins: the running one, or a new one (superseding a dead run's)."""
        step = request.step
        session = self._sessions.get(step)
        if session is not None and session.request.job != request.job:
            await self.leader.abort(
                session.request.job,
                step,
                f"superseded: a new run of the job (id {request.job}) "
                f"saves step {step}; the run that started this save is gone",
            )
            if self._sessions.get(step) is session:  # its writes are still finishing; it cleans up after them
                del self._sessions[step]
            session = None
        if session is not None:
            if request.topology != session.request.topology:
                raise SaveRejected(
                    ErrorCode.INVALID_REQUEST,
                    f"rank {request.rank} reports {request.topology.describe()}, "
                    f"earlier ranks reported {session.request.topology.describe()}",
                )
            return session
        if self._store.is_committed(step):
            raise SaveRejected(
                ErrorCode.CONFLICT,
                f"a checkpoint of step {step} is already committed at {self._store.final_path(step)}",
            )
        if request.topology.num_nodes != self._num_nodes:
            raise SaveRejected(
                ErrorCode.UNSUPPORTED,
                f"this daemon was started for a job of {self._num_nodes} node(s) "
                f"(ckptd serve --num-nodes), but the job spans {request.topology.num_nodes}; start "
                "one daemon per node with the job's node count",
            )
        if len(self._sessions) >= MAX_SAVES_IN_FLIGHT:
            raise SaveRejected(
                ErrorCode.BUSY,
                f"{len(self._sessions)} saves are already in flight on this node "
                f"(steps {sorted(self._sessions)}); wait for them to commit or time out",
            )
        try:
            return self._open_session(request)
        except OSError as exc:
            raise SaveRejected(
                ErrorCode.IO_ERROR,
                f"cannot create the directory for step {step} under {self._store.root}: {exc.strerror or exc}",
            ) from None

    def _open_session(self, request: SaveRequest) -> SaveSession:
        tmp_dir = self._store.create_tmp_dir(request.step, request.job)
        expected = set(request.topology.node_ranks(self._node))
        session = SaveSession(request.step, request, tmp_dir, expected)
        session.timer = asyncio.get_running_loop().call_later(self._save_timeout, self._expire, request.step)
        self._sessions[request.step] = session
        self.metrics.saves_started.inc()
        self.metrics.saves_in_flight.set(len(self._sessions))
        log.info("event=save_started step=%d job=%s ranks_expected=%s", request.step, request.job, sorted(expected))
        return session

    def _map_regions(self, link: RankLink, request: SaveRequest) -> Dict[str, MappedRegion]:
        regions: Dict[str, MappedRegion] = {}
        try:
            for part in request.parts:
                if part.writer and part.region is not None:
                    own = f"{layout.REGION_PREFIX}{os.getuid()}-{request.pid}-"
                    if not part.region.startswith(own):
                        raise SaveRejected(
                            ErrorCode.BAD_REGION,
                            f"region {part.region!r} is not one of the sending client's own regions ({own}*)",
                        )
                    if part.region in regions:
                        raise SaveRejected(
                            ErrorCode.INVALID_REQUEST, f"region {part.region!r} is named by two components"
                        )
                    regions[part.region] = self.regions.acquire(
                        link.identity, part.key, part.region, part.header_room + part.region_size, request.pid
                    )
        except RegionError as exc:
            raise SaveRejected(ErrorCode.BAD_REGION, str(exc)) from None
        return regions

    def _check_part(self, request: SaveRequest, part: ComponentPart) -> Placement:
        """Check one component part against the placement rule and its own layout; returns its placement."""
        where = f"rank {request.rank}, component {part.key!r}"
        if part.validate_replication and part.pattern is not SharingPattern.REPLICATED:
            raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: validate_replication applies only to REPLICATED")
        try:
            placement = place(
                part.pattern, request.rank, request.topology, part.group_name, part.group_ranks, spread=part.spread
            )
        except ValueError as exc:
            raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: {exc}") from None
        if part.writer != (placement.writer_rank == request.rank):
            raise SaveRejected(
                ErrorCode.INVALID_REQUEST,
                f"{where}: {part.pattern.value} is written by rank "
                f"{placement.writer_rank}, but the client claims writer={part.writer}",
            )
        if not part.writer:
            return placement
        if part.region is None and any(t.nbytes for t in part.tensors):
            raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: tensors listed without a staging region")
        names = [t.name for t in part.tensors]
        if len(set(names)) != len(names):
            raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: duplicate tensor names")
        try:
            check_tensor_layout(part.tensors, part.region_size)
        except ValueError as exc:
            raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: {exc}") from None
        if part.pattern is SharingPattern.SHARDED:
            _check_chunks(part, where)
        return placement

    @staticmethod
    def _check_save_fields(request: SaveRequest, part: ComponentPart) -> None:
        """Check what a part carries anew with every save (planned or not)."""
        where = f"rank {request.rank}, component {part.key!r}"
        if part.validate_replication and part.digests is None:
            raise SaveRejected(
                ErrorCode.INVALID_REQUEST, f"{where}: validate_replication needs digests from every rank"
            )
        if part.writer and part.state is None:
            raise SaveRejected(
                ErrorCode.INVALID_REQUEST, f"{where}: the writer must send the component's non-tensor state"
            )

    async def _write_rank(self, session: SaveSession, part: RankPart) -> None:
        """Write every component this rank hands over, in parallel threads; then release its regions."""
        request = part.request
        loop = asyncio.get_running_loop()
        session.writes_in_flight += 1
        error: Optional[str] = None
        started = time.monotonic()
        try:
            writers = [comp for comp in request.parts if comp.writer]
            scopes = [part.scopes[c.key] for c in writers]
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, self._write_component, session, part, comp, scope)
                    for comp, scope in zip(writers, scopes)
                ),
                return_exceptions=True,
            )
            for comp, scope, result in zip(writers, scopes, results):
                if isinstance(result, BaseException):
                    raise result
                if result is not None:
                    session.files.setdefault(comp.key, {})[scope] = result
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "")
            error = (
                f"writing step {session.step} for rank {request.rank} failed: {exc.strerror or exc}"
                f"{f' [{code}]' if code else ''} ({exc.filename or session.tmp_dir})"
            )
            log.error(error)
        except Exception as exc:
            error = f"writing step {session.step} for rank {request.rank} failed: {exc!r}"
            log.exception(error)
        finally:
            session.writes_in_flight -= 1
            seconds = time.monotonic() - started
            session.write_seconds = max(session.write_seconds, seconds)
            self.regions.release(part.regions.values())
            self.metrics.staged_bytes_mapped.dec(sum(r.size for r in part.regions.values()))
            part.durable = error is None
            if error is None and session.outcome is None:  # an aborted save's writes stop early
                log.info(
                    "event=rank_durable step=%d rank=%d bytes=%d seconds=%.3f",
                    session.step,
                    request.rank,
                    sum(p.region_size for p in request.parts if p.writer),
                    seconds,
                )
            leases = tuple(
                (c.region, c.lease) for c in request.parts if c.region is not None and c.region in part.regions
            )
            await part.link.notify(messages.RELEASED, messages.Released(session.step, leases).to_wire())
        if error is not None:
            await self.leader.abort(request.job, session.step, error)
        elif self._ready_to_report(session):
            session.reported = True
            await self.leader.report(self._report(session))
        if session.outcome is not None and session.writes_in_flight == 0:
            self._close_session(session)

    def _write_component(
        self, session: SaveSession, part: RankPart, comp: ComponentPart, scope: str
    ) -> Optional[ScopeFiles]:
        """Runs in a worker thread: both files of one component scope, fsynced (None once aborted)."""
        if session.outcome is not None:
            return None
        tensor_rel, state_rel = layout.shard_paths(comp.key, scope)
        self._store.make_component_dir(session.tmp_dir, comp.key)
        body_bytes = sum(t.nbytes for t in comp.tensors)
        metadata = shard_metadata(comp.key, scope)
        region = part.regions[comp.region] if body_bytes else None  # type: ignore[index]
        body = region.view(body_bytes, comp.header_room) if region is not None else memoryview(b"")
        path = os.path.join(session.tmp_dir, tensor_rel)

        def done_with(offset: int, length: int) -> None:
            session.add_written(length)
            self.metrics.bytes_written.inc(length)

        sharded = comp.pattern is SharingPattern.SHARDED
        # the tensors tile the body in order (checked by check_tensor_layout), as SpanChecksums needs
        blocks = [checksum_blocks(t.nbytes) for t in comp.tensors] if sharded else []
        spans = [(t.offset + start, length) for t, own in zip(comp.tensors, blocks) for start, length in own]
        try:
            kept_header = (
                self._keep_region(region, comp, body_bytes, metadata, path, part.headers)
                if region is not None
                else None
            )
            if kept_header is not None:
                written = describe_kept_shard(kept_header, body, done_with, spans)
            else:
                header = part.headers.header(comp.tensors, metadata)
                written = write_shard(path, header, body, self._throttle, done_with, spans)
        finally:
            body.release()
        state = write_file(os.path.join(session.tmp_dir, state_rel), [comp.state or b""], self._throttle)
        session.add_fsync(written.fsync_s + state.fsync_s)
        if sharded:
            sums = iter(written.span_checksums)
            index = {
                t.name: chunk_index_entry(t.dtype, comp.chunks[t.name], t.shape, [next(sums) for _ in own])
                for t, own in zip(comp.tensors, blocks)
            }
        else:
            index = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in comp.tensors}
        return ScopeFiles(
            FileRecord(tensor_rel, written.size, written.checksum, index),
            FileRecord(state_rel, state.size, state.checksum),
        )

    def _keep_region(
        self,
        region: MappedRegion,
        comp: ComponentPart,
        body_bytes: int,
        metadata: Dict[str, str],
        path: str,
        headers: ShardHeaders,
    ) -> Optional[bytes]:
        """In a root on the staging regions' filesystem, keep the region as the shard file at `path`
        (no copy); returns the header written into it, or None where it was not kept."""
        if not self._root_beside_regions or not comp.header_room or region.size != comp.header_room + body_bytes:
            return None
        try:
            header = headers.header(comp.tensors, metadata, room=comp.header_room)
        except ValueError:  # the client reserved too little room: copy
            return None
        return header if region.become_file(header, path) else None

    @staticmethod
    def _ready_to_report(session: SaveSession) -> bool:
        return (
            session.outcome is None
            and not session.reported
            and set(session.ranks) == session.expected
            and all(p.durable for p in session.ranks.values())
        )

    def _report(self, session: SaveSession) -> NodeReport:
        request = session.ranks[min(session.ranks)].request  # the lowest local rank's (rank 0's on node 0)
        return NodeReport(
            step=session.step,
            node=self._node,
            topology=request.topology,
            parts={rank: p.request.parts for rank, p in session.ranks.items()},
            files=session.files,
            versions=request.versions,
            metrics=request.metrics,
            started_at=session.started_at,
            retention=request.retention,
            timings={
                "handoff_s": round(session.last_part_at - session.started_at, 6),
                "write_s": round(session.write_seconds, 6),
                "fsync_s": round(session.fsync_seconds, 6),
            },
            job=request.job,
        )

    def _expire(self, step: int) -> None:
        session = self._sessions.get(step)
        if session is None or session.outcome is not None:
            return
        missing = sorted(session.expected - set(session.ranks))
        if missing:
            reason = f"rank(s) {missing} did not hand over their part of step {step} within {self._save_timeout:g} s"
        else:
            reason = f"step {step} did not finish writing and committing within {self._save_timeout:g} s"
        asyncio.get_running_loop().create_task(self.leader.abort(session.request.job, step, reason))

    async def abort(self, job: str, step: int, reason: str) -> None:
        """Abort `step` of run `job` (for example after a rank sent an invalid part)."""
        await self.leader.abort(job, step, reason)

    async def _on_outcome(self, outcome: Outcome) -> None:
        """The leader decided `outcome.step`: tell every local rank, clean up."""
        session = self._sessions.get(outcome.step)
        if session is not None and (session.request.job != outcome.job or session.outcome is not None):
            session = None
        if not outcome.committed:
            self._aborted[(outcome.job, outcome.step)] = outcome.reason or "aborted"
            if len(self._aborted) > 1024:
                self._aborted.pop(next(iter(self._aborted)))
            log.warning("event=aborted step=%d reason=%r", outcome.step, outcome.reason)
        else:
            self.last_committed = max(self.last_committed or -1, outcome.step)
            self.metrics.last_committed_step.set(self.last_committed)
        if session is None:
            return
        self._count_outcome(session, outcome)
        session.outcome = outcome
        if session.timer is not None:
            session.timer.cancel()
        msg_type, body = outcome.to_wire()
        for part in session.ranks.values():
            await part.link.notify(msg_type, body)
        if session.writes_in_flight == 0:
            self._close_session(session)

    def _count_outcome(self, session: SaveSession, outcome: Outcome) -> None:
        if not outcome.committed:
            self.metrics.saves_aborted.inc()
            return
        self.metrics.saves_committed.inc()
        self.metrics.observe_phase("handoff", session.last_part_at - session.started_at)
        self.metrics.observe_phase("write", session.write_seconds)
        self.metrics.observe_phase("fsync", session.fsync_seconds)
        log.info(
            "event=committed step=%d bytes=%d seconds=%.3f path=%s",
            session.step,
            session.bytes_written,
            time.time() - session.started_at,
            outcome.path,
        )

    def _close_session(self, session: SaveSession) -> None:
        if self._sessions.get(session.step) is session:
            del self._sessions[session.step]
        self.metrics.saves_in_flight.set(len(self._sessions))
        if session.outcome is not None and not session.outcome.committed:
            self._store.discard(session.tmp_dir)


def _check_chunks(part: ComponentPart, where: str) -> None:
    """A SHARDED part names, for every tensor it hands over, a chunk that fits its global tensor."""
    names = {t.name for t in part.tensors}
    if set(part.chunks) != names:
        odd = sorted(names.symmetric_difference(part.chunks))[:5]
        raise SaveRejected(ErrorCode.INVALID_REQUEST, f"{where}: tensors and chunks do not match ({odd})")
    for entry in part.tensors:
        spec = part.chunks[entry.name]
        if not Box(spec.offsets, entry.shape).within(spec.global_shape):
            raise SaveRejected(
                ErrorCode.INVALID_REQUEST,
                f"{where}: tensor {entry.name!r}: a chunk of shape {list(entry.shape)} at {list(spec.offsets)} "
                f"does not fit the global shape {list(spec.global_shape)}",
            )
