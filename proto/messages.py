"""Wire messages between a rank's client and its node daemon (msgpack control frames).

Every frame is a msgpack map `{"v": PROTOCOL_VERSION, "type": str, "id": int, "body": map}`.
Requests carry a client-chosen `id`; the reply to a request carries the same `id`.
Notifications (released, committed, aborted) carry id 0. Tensor bytes never travel here:
they sit in the client's shared-memory regions, which a save request names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import msgpack

from ckptd.proto.errors import ErrorCode, ProtocolError
from ckptd.proto.formats import HEADER_ALIGNMENT, SAFETENSORS_DTYPES, TensorEntry
from ckptd.proto.layout import REGION_PREFIX, check_safe_name
from ckptd.proto.ownership import RunIdentity
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.sharding import ChunkSpec
from ckptd.proto.topology import Topology

PROTOCOL_VERSION = 3
"""2: staging regions are handed over as leases (region name + generation). 3: a part's body starts
`header_room` bytes into its region (a daemon of 2 would read the body from the region's start)."""
MAX_FRAME_BYTES = 64 * 1024 * 1024

# request types
HELLO = "hello"
BYE = "bye"
SAVE = "save"
SAVE_PLANNED = "save_planned"
STATUS = "status"
# reply types
OK = "ok"
ACCEPTED = "accepted"
ERROR = "error"
# notification types
RELEASED = "released"
COMMITTED = "committed"
ABORTED = "aborted"


@dataclass(frozen=True)
class Envelope:
    """A decoded frame."""

    type: str
    id: int
    body: Dict[str, Any]


def encode(msg_type: str, body: Dict[str, Any], msg_id: int = 0) -> bytes:
    """Pack one frame."""
    frame: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": msg_type, "id": msg_id, "body": body}, use_bin_type=True
    )
    return frame


def decode(frame: bytes) -> Envelope:
    """Unpack and check one frame's envelope; raises ProtocolError naming what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"
        )
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame must be a msgpack map with keys v, type, id, body")
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "run the same ckptd version in the trainer and the daemon",
        )
    msg_type, msg_id, body = data.get("type"), data.get("id", 0), data.get("body", {})
    if not isinstance(msg_type, str) or type(msg_id) is not int or not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame needs a string 'type', an integer 'id' and a map 'body'")
    return Envelope(msg_type, msg_id, body)


def error_body(code: ErrorCode, message: str) -> Dict[str, Any]:
    """Body of an ERROR reply."""
    return {"code": code.value, "message": message}


def _field(body: Dict[str, Any], name: str, kind: Any, where: str) -> Any:
    value = body.get(name)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"{where}: field {name!r} must be {expected}, got {type(value).__name__}"
        )
    return value


PID_LIMIT = 2**22
"""Linux's largest `pid_max`: a pid on the wire above it (or below 1) names no process."""


def _pid(body: Dict[str, Any], name: str, where: str) -> int:
    value: int = _field(body, name, int, where)
    if not 0 < value <= PID_LIMIT:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: field {name!r} is not a process id: {value}")
    return value


def _optional(body: Dict[str, Any], name: str, kind: Any, where: str) -> Any:
    return None if body.get(name) is None else _field(body, name, kind, where)


@dataclass(frozen=True)
class Hello:
    """A client introducing itself (and, repeated, showing it is still there). `run` is None for a tool
    that only asks questions; a trainer's client names its run, which the daemon admits or refuses."""

    pid: int
    root: str
    run: Optional[RunIdentity] = None

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a frame."""
        run = self.run
        return {
            "pid": self.pid,
            "root": self.root,
            "run": None
            if run is None
            else {"job": run.job, "host": run.host, "pid": run.pid, "rank": run.rank, "started_at": run.started_at},
        }

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> "Hello":
        """Checked inverse of `to_wire`."""
        where = "hello"
        pid, root = _pid(body, "pid", where), _field(body, "root", str, where)
        raw = body.get("run")
        if raw is None:
            return cls(pid, root)
        if not isinstance(raw, dict):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"{where}: field 'run' must be map, got {type(raw).__name__}"
            )
        where = "hello: run"
        run = RunIdentity(
            job=_job_id(_field(raw, "job", str, where), where),
            host=_field(raw, "host", str, where)[:256],
            pid=_pid(raw, "pid", where),
            rank=_field(raw, "rank", int, where),
            started_at=float(_field(raw, "started_at", (int, float), where)),
        )
        return cls(pid, root, run)


def _job_id(job: str, where: str) -> str:
    if not 0 < len(job) <= 128 or "\0" in job:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: job id must be 1-128 characters without NUL")
    return job


@dataclass(frozen=True)
class ComponentPart:
    """One rank's part of one component in a save: data (writer) or a presence note (non-writer)."""

    key: str
    pattern: SharingPattern
    required: bool = True
    writer: bool = False
    group_name: Optional[str] = None
    group_ranks: Tuple[int, ...] = ()
    validate_replication: bool = False
    spread: bool = False
    metadata: Dict[str, Any] = field(default_factory=dict)
    region: Optional[str] = None
    lease: int = 0
    """The generation under which the client handed `region` over for this save."""
    region_size: int = 0
    """Bytes of the body staged in `region`, after its `header_room`."""
    header_room: int = 0
    """Bytes before the body in `region` (a multiple of HEADER_ALIGNMENT): room where the daemon may
    write the shard's header and keep the region itself as the shard file."""
    tensors: Tuple[TensorEntry, ...] = ()
    state: Optional[bytes] = None
    digests: Optional[Dict[str, str]] = None
    chunks: Dict[str, ChunkSpec] = field(default_factory=dict)
    """SHARDED only: where each staged tensor lies in its global tensor."""

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a frame."""
        return {
            "key": self.key,
            "pattern": self.pattern.value,
            "required": self.required,
            "writer": self.writer,
            "group_name": self.group_name,
            "group_ranks": list(self.group_ranks),
            "validate_replication": self.validate_replication,
            "spread": self.spread,
            "metadata": self.metadata,
            "region": self.region,
            "lease": self.lease,
            "region_size": self.region_size,
            "header_room": self.header_room,
            "tensors": self.tensors,
            "state": self.state,
            "digests": self.digests,
            "chunks": {name: spec.to_wire() for name, spec in self.chunks.items()},
        }

    @classmethod
    def from_wire(cls, body: Any) -> "ComponentPart":
        """Checked inverse of `to_wire`."""
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "each component part must be a map")
        try:
            key = check_safe_name(body.get("key"), "component key")
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_NAME, str(exc)) from None
        where = f"component {key!r}"
        try:
            pattern = SharingPattern(body.get("pattern"))
        except ValueError:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"{where}: unknown sharing pattern {body.get('pattern')!r}"
            ) from None
        group_name = _optional(body, "group_name", str, where)
        if group_name is not None:
            try:
                check_safe_name(group_name, "process group name")
            except ValueError as exc:
                raise ProtocolError(ErrorCode.INVALID_NAME, f"{where}: {exc}") from None
        group_ranks = tuple(_field(body, "group_ranks", list, where))
        if not all(type(r) is int and r >= 0 for r in group_ranks):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: group_ranks must be non-negative integers")
        if pattern is SharingPattern.PER_GROUP and (group_name is None or not group_ranks):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: PER_GROUP needs group_name and group_ranks")
        region = _optional(body, "region", str, where)
        if region is not None and (not region.startswith(REGION_PREFIX) or "/" in region or "\0" in region):
            raise ProtocolError(
                ErrorCode.INVALID_NAME, f"{where}: region name {region!r} is not a ckptd shared-memory region"
            )
        header_room = body.get("header_room", 0)
        if type(header_room) is not int or header_room < 0 or header_room % HEADER_ALIGNMENT:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"{where}: header_room must be a non-negative multiple of {HEADER_ALIGNMENT}, not {header_room!r}",
            )
        spread = body.get("spread", False)
        if type(spread) is not bool or (spread and pattern is not SharingPattern.REPLICATED):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"{where}: spread must be a bool, and applies only to REPLICATED"
            )
        metadata = _field(body, "metadata", dict, where)
        if not all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in metadata.items()
        ):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"{where}: metadata must map strings to str/int/float/bool/None"
            )
        return cls(
            key=key,
            pattern=pattern,
            required=bool(_field(body, "required", bool, where)),
            writer=bool(_field(body, "writer", bool, where)),
            group_name=group_name,
            group_ranks=group_ranks,
            validate_replication=bool(_field(body, "validate_replication", bool, where)),
            spread=spread,
            metadata=metadata,
            region=region,
            lease=_field(body, "lease", int, where),
            region_size=_field(body, "region_size", int, where),
            header_room=header_room,
            tensors=_tensor_entries(_field(body, "tensors", (list, tuple), where), where),
            state=_optional(body, "state", bytes, where),
            digests=_digests(body.get("digests"), where),
            chunks=_chunks(body.get("chunks", {}), pattern, where),
        )


def _tensor_entries(raw: Any, where: str) -> Tuple[TensorEntry, ...]:
    """Entries as sent: [name, dtype, shape, offset, nbytes] each; types checked here, layout by the daemon."""
    try:
        entries = tuple(
            TensorEntry(name, dtype, tuple(shape), offset, nbytes) for name, dtype, shape, offset, nbytes in raw
        )
    except (TypeError, ValueError):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"{where}: tensor entries must be [name, dtype, shape, offset, nbytes]"
        ) from None
    for entry in entries:
        name, dtype, shape, offset, nbytes = entry
        if not (
            type(name) is str
            and 0 < len(name) <= 1024
            and "\0" not in name
            and dtype in SAFETENSORS_DTYPES
            and type(offset) is int
            and type(nbytes) is int
            and offset >= 0
            and nbytes >= 0
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: malformed tensor entry {list(entry)!r:.200}")
    return entries


def _chunks(raw: Any, pattern: SharingPattern, where: str) -> Dict[str, ChunkSpec]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: chunks must map tensor names to chunks")
    if raw and pattern is not SharingPattern.SHARDED:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: only a SHARDED component has chunks")
    try:
        return {name: ChunkSpec.from_wire(spec) for name, spec in raw.items()}
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: {exc}") from None


def _metrics(body: Dict[str, Any], where: str) -> Dict[str, Any]:
    metrics: Dict[str, Any] = _field(body, "metrics", dict, where)
    if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items()):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: metrics must map strings to numbers")
    return metrics


def _digests(raw: Any, where: str) -> Optional[Dict[str, str]]:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: digests must map tensor names to strings")
    return raw


@dataclass(frozen=True)
class SaveRequest:
    """One rank's whole part of checkpoint `step`."""

    root: str
    step: int
    rank: int
    pid: int
    topology: Topology
    parts: Tuple[ComponentPart, ...]
    job: str = "default"
    """Identifies one run of a job: a restarted job re-saving a step supersedes the old run's save."""
    versions: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    retention: Optional[RetentionPolicy] = None
    """What to keep once this checkpoint commits (None: keep everything)."""
    expires_at: float = 0.0
    """CLOCK_MONOTONIC time (shared by the processes of one node) after which the daemon must refuse
    this part: the client stops waiting for the hand-over then and settles the save itself."""
    skip_reason: Optional[str] = None
    """Set when the rank skips this step instead of handing over a part (no parts): the daemon
    aborts the step for every rank with this reason."""
    plan_id: Optional[int] = None
    """Set to ask the daemon to keep this request as a plan: later saves with the same structure
    send only a `PlannedSave` naming it."""
    daemon: Optional[str] = None
    """The daemon instance the client addressed (the one it last heard from): any other refuses the
    request unread (WRONG_DAEMON), so a request the old daemon took and died with can be given up at
    once, its regions reused. A planned save is addressed by its plan, which only that daemon holds."""

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a frame."""
        return {
            "daemon": self.daemon,
            "plan_id": self.plan_id,
            "root": self.root,
            "step": self.step,
            "rank": self.rank,
            "pid": self.pid,
            "job": self.job,
            "topology": self.topology.to_wire(),
            "parts": [p.to_wire() for p in self.parts],
            "versions": self.versions,
            "metrics": self.metrics,
            "retention": self.retention.to_wire() if self.retention else None,
            "expires_at": self.expires_at,
            "skip_reason": self.skip_reason,
        }

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> "SaveRequest":
        """Checked inverse of `to_wire`."""
        where = "save request"
        step = _field(body, "step", int, where)
        rank = _field(body, "rank", int, where)
        if step < 0 or rank < 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: step and rank must be non-negative")
        try:
            topology = Topology.from_wire(body.get("topology"))
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: {exc}") from None
        if rank >= topology.world_size:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: rank {rank} outside {topology.describe()}")
        parts = tuple(ComponentPart.from_wire(p) for p in _field(body, "parts", list, where))
        keys = [p.key for p in parts]
        if len(set(keys)) != len(keys):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: duplicate component keys in {keys}")
        versions = _field(body, "versions", dict, where)
        metrics = _metrics(body, where)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: versions must map strings to strings")
        job = _job_id(_field(body, "job", str, where), where)
        try:
            retention = None if body.get("retention") is None else RetentionPolicy.from_wire(body["retention"])
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: retention: {exc}") from None
        return cls(
            root=_field(body, "root", str, where),
            step=step,
            rank=rank,
            job=job,
            pid=_pid(body, "pid", where),
            topology=topology,
            parts=parts,
            versions=versions,
            metrics=metrics,
            retention=retention,
            expires_at=float(_field(body, "expires_at", (int, float), where)),
            skip_reason=_optional(body, "skip_reason", str, where),
            plan_id=_optional(body, "plan_id", int, where),
            daemon=_optional(body, "daemon", str, where),
        )

    def planned(self, save: "PlannedSave") -> "SaveRequest":
        """The full request of a planned save of this plan: this request's structure with the save's
        own step, metrics, deadline and per-component fields. Raises ProtocolError unless the save
        names exactly this plan's components."""
        updates = {u.key: u for u in save.parts}
        if sorted(updates) != sorted(p.key for p in self.parts) or len(updates) != len(save.parts):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"planned save of step {save.step}: components {sorted(updates)} are not the plan's "
                f"{sorted(p.key for p in self.parts)}",
            )
        parts = tuple(
            replace(p, lease=u.lease, state=u.state, digests=u.digests)
            for p, u in ((p, updates[p.key]) for p in self.parts)
        )
        return replace(self, step=save.step, metrics=save.metrics, expires_at=save.expires_at, parts=parts)


@dataclass(frozen=True)
class PartUpdate:
    """What changes between saves of one component part under a plan."""

    key: str
    lease: int = 0
    state: Optional[bytes] = None
    digests: Optional[Dict[str, str]] = None

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a frame."""
        return {"key": self.key, "lease": self.lease, "state": self.state, "digests": self.digests}

    @classmethod
    def from_wire(cls, body: Any) -> "PartUpdate":
        """Checked inverse of `to_wire`."""
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "each part of a planned save must be a map")
        where = f"planned part {body.get('key')!r:.100}"
        return cls(
            key=_field(body, "key", str, where),
            lease=_field(body, "lease", int, where),
            state=_optional(body, "state", bytes, where),
            digests=_digests(body.get("digests"), where),
        )


@dataclass(frozen=True)
class PlannedSave:
    """One rank's part of checkpoint `step` under a plan it registered with an earlier SaveRequest:
    only what changes from save to save (the daemon checks it as strictly as a full request)."""

    plan_id: int
    step: int
    parts: Tuple[PartUpdate, ...]
    metrics: Dict[str, float] = field(default_factory=dict)
    expires_at: float = 0.0

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a frame."""
        return {
            "plan_id": self.plan_id,
            "step": self.step,
            "parts": [p.to_wire() for p in self.parts],
            "metrics": self.metrics,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> "PlannedSave":
        """Checked inverse of `to_wire`."""
        where = "planned save"
        step = _field(body, "step", int, where)
        if step < 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: step must be non-negative")
        return cls(
            plan_id=_field(body, "plan_id", int, where),
            step=step,
            parts=tuple(PartUpdate.from_wire(p) for p in _field(body, "parts", list, where)),
            metrics=_metrics(body, where),
            expires_at=float(_field(body, "expires_at", (int, float), where)),
        )


@dataclass(frozen=True)
class Released:
    """Daemon -> client: the daemon is done reading these staging regions for checkpoint `step`;
    each lease is (region name, generation), and frees its region only if it is still current."""

    step: int
    leases: Tuple[Tuple[str, int], ...]

    def to_wire(self) -> Dict[str, Any]:
        """Body of a RELEASED notification."""
        return {"step": self.step, "leases": [list(lease) for lease in self.leases]}

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> Optional["Released"]:
        """Inverse of `to_wire`; None when the body is malformed."""
        step, raw = body.get("step"), body.get("leases")
        if type(step) is not int or not isinstance(raw, list):
            return None
        leases = tuple(
            (lease[0], lease[1])
            for lease in raw
            if isinstance(lease, list) and len(lease) == 2 and isinstance(lease[0], str) and type(lease[1]) is int
        )
        return cls(step, leases)


@dataclass(frozen=True)
class Outcome:
    """Daemon -> client: checkpoint `step` of run `job` committed at `path`, or aborted with `reason`."""

    job: str
    step: int
    committed: bool
    path: Optional[str] = None
    reason: Optional[str] = None
    manifest: Optional[str] = None
    """The committed manifest's JSON, for the daemons of nodes that commit their own copy (never sent to
    a client)."""

    def to_wire(self, with_manifest: bool = False) -> Tuple[str, Dict[str, Any]]:
        """Message type and body (the manifest only when asked for and known)."""
        if self.committed:
            body: Dict[str, Any] = {"job": self.job, "step": self.step, "path": self.path}
            if with_manifest and self.manifest is not None:
                body["manifest"] = self.manifest
            return COMMITTED, body
        return ABORTED, {"job": self.job, "step": self.step, "reason": self.reason}

    @classmethod
    def from_wire(cls, msg_type: str, body: Dict[str, Any]) -> Optional["Outcome"]:
        """Inverse of `to_wire`; None when the body is malformed."""
        job, step = body.get("job"), body.get("step")
        if not isinstance(job, str) or type(step) is not int or msg_type not in (COMMITTED, ABORTED):
            return None
        if msg_type == COMMITTED:
            path, manifest = body.get("path"), body.get("manifest")
            return cls(
                job,
                step,
                committed=True,
                path=path if isinstance(path, str) else None,
                manifest=manifest if isinstance(manifest, str) else None,
            )
        reason = body.get("reason")
        return cls(job, step, committed=False, reason=reason if isinstance(reason, str) else "aborted")
