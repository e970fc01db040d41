"""What node daemons tell the commit leader (DESIGN.md commit steps 3 and 5), and how it travels.

Between daemons the frames use the same envelope as client <-> daemon (`messages.encode`), over
an authenticated TCP connection. A follower sends `NODE_HELLO` when it connects and a `HEARTBEAT`
every second (the leader answers each with `OK`, so both sides notice a dead peer), `NODE_REPORT`
once every local rank's shards are durable, and `NODE_ABORT` when a local rank fails. The leader
announces each decision with the client-facing `COMMITTED` / `ABORTED` bodies (`Outcome`).

With node-local roots the leader also fills the slower tiers with every node's files: it sends
`TIER_COPY` (`TierCopyOrder`), each follower copies its own files of that step into the tier and
answers `TIER_COPIED` (`TierCopyDone`), and the leader commits the tier's copy once every node has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ckptd.proto import layout
from ckptd.proto.errors import ErrorCode, ProtocolError
from ckptd.proto.manifest import FileRecord
from ckptd.proto.messages import ComponentPart, _field
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.topology import Topology

NODE_HELLO = "node_hello"
HEARTBEAT = "heartbeat"
NODE_REPORT = "node_report"
NODE_ABORT = "node_abort"
TIER_COPY = "tier_copy"
TIER_COPIED = "tier_copied"

DEFAULT_LEADER_PORT = 29600


@dataclass(frozen=True)
class ScopeFiles:
    """The two files written for one component scope."""

    tensor_file: FileRecord
    state_file: FileRecord


@dataclass
class NodeReport:
    """A node's statement that every local rank's part of `step` is durable in the save's tmp directory."""

    job: str
    step: int
    node: int
    topology: Topology
    parts: Dict[int, Tuple[ComponentPart, ...]]
    """Each local rank's component parts (for the consistency and replication checks)."""
    files: Dict[str, Dict[str, ScopeFiles]]
    """Component key -> scope -> files written on this node."""
    versions: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    retention: Optional[RetentionPolicy] = None
    node_local: bool = False
    """The node writes into a root of its own (`--node-local-root`) and commits its copy itself."""

    def to_wire(self, with_topology: bool = True) -> Dict[str, Any]:
        """Plain form for a NODE_REPORT frame; without the topology's ranks, only its digest, when the
        leader already has it (a report then costs O(local ranks), not O(world size))."""
        return {
            "job": self.job,
            "step": self.step,
            "node": self.node,
            "topology": self.topology.to_wire() if with_topology else None,
            "topology_id": self.topology.digest,
            "parts": [[rank, [p.to_wire() for p in parts]] for rank, parts in self.parts.items()],
            "files": [
                [key, scope, _file_to_wire(f.tensor_file), _file_to_wire(f.state_file)]
                for key, scopes in self.files.items()
                for scope, f in scopes.items()
            ],
            "versions": self.versions,
            "metrics": self.metrics,
            "started_at": self.started_at,
            "timings": self.timings,
            "retention": self.retention.to_wire() if self.retention else None,
            "node_local": self.node_local,
        }

    @classmethod
    def from_wire(cls, body: Dict[str, Any], topologies: Optional[Dict[str, Topology]] = None) -> "NodeReport":
        """Checked inverse of `to_wire`; `topologies` (by digest) are those the receiver already has.
        File paths are rebuilt from the component key and scope, so a report cannot point the manifest
        outside the checkpoint directory."""
        where = "node report"
        topology = _report_topology(body, topologies or {}, where)
        node = _field(body, "node", int, where)
        step = _field(body, "step", int, where)
        if not 0 <= node < topology.num_nodes or step < 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: node {node} or step {step} out of range")
        parts: Dict[int, Tuple[ComponentPart, ...]] = {}
        for item in _field(body, "parts", list, where):
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], list)):
                raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: parts must be [rank, [part, ...]] pairs")
            if _node_of(topology, item[0]) != node:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: rank {item[0]} is not on node {node}")
            parts[item[0]] = tuple(ComponentPart.from_wire(p) for p in item[1])
        files: Dict[str, Dict[str, ScopeFiles]] = {}
        for item in _field(body, "files", list, where):
            if not (isinstance(item, list) and len(item) == 4):
                raise ProtocolError(
                    ErrorCode.INVALID_REQUEST, f"{where}: files must be [key, scope, tensor file, state file]"
                )
            key, scope, tensor_file, state_file = item
            try:
                tensor_path, state_path = layout.shard_paths(
                    layout.check_safe_name(key, "component key"), layout.check_safe_name(scope, "scope")
                )
            except ValueError as exc:
                raise ProtocolError(ErrorCode.INVALID_NAME, f"{where}: {exc}") from None
            files.setdefault(key, {})[scope] = ScopeFiles(
                _file_from_wire(tensor_file, tensor_path, where), _file_from_wire(state_file, state_path, where)
            )
        versions = _field(body, "versions", dict, where)
        metrics = _field(body, "metrics", dict, where)
        timings = _field(body, "timings", dict, where)
        started_at = _field(body, "started_at", (int, float), where)
        job = _field(body, "job", str, where)
        try:
            retention = None if body.get("retention") is None else RetentionPolicy.from_wire(body["retention"])
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: retention: {exc}") from None
        return cls(
            node_local=body.get("node_local") is True,
            retention=retention,
            job=job,
            step=step,
            node=node,
            topology=topology,
            parts=parts,
            files=files,
            versions={str(k): str(v) for k, v in versions.items()},
            metrics={str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            started_at=float(started_at),
            timings={str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        )


@dataclass(frozen=True)
class TierCopyOrder:
    """Leader -> followers: copy this node's files of checkpoint `step` into tier `tier`, as copy `token`."""

    tier: str
    step: int
    token: str

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a TIER_COPY frame."""
        return {"tier": self.tier, "step": self.step, "token": self.token}

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> "TierCopyOrder":
        """Checked inverse of `to_wire`."""
        where = "tier copy order"
        step = _field(body, "step", int, where)
        try:
            token = layout.check_safe_name(_field(body, "token", str, where), "copy token")
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_NAME, f"{where}: {exc}") from None
        if step < 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: step {step} out of range")
        return cls(_field(body, "tier", str, where), step, token)


@dataclass(frozen=True)
class TierCopyDone:
    """Follower -> leader: node `node` copied `files` (paths in the checkpoint) for `order`, or failed."""

    order: TierCopyOrder
    node: int
    files: Tuple[str, ...] = ()
    error: Optional[str] = None

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a TIER_COPIED frame."""
        return {**self.order.to_wire(), "node": self.node, "files": list(self.files), "error": self.error}

    @classmethod
    def from_wire(cls, body: Dict[str, Any]) -> "TierCopyDone":
        """Checked inverse of `to_wire`."""
        where = "tier copy report"
        files = _field(body, "files", list, where)
        error = body.get("error")
        if not all(isinstance(f, str) for f in files) or not (error is None or isinstance(error, str)):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: files must be strings and error a string or null")
        return cls(TierCopyOrder.from_wire(body), _field(body, "node", int, where), tuple(files), error)


def _report_topology(body: Dict[str, Any], known: Dict[str, Topology], where: str) -> Topology:
    digest = body.get("topology_id")
    if body.get("topology") is None:
        topology = known.get(digest) if isinstance(digest, str) else None
        if topology is None:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"{where}: topology {digest!r} is unknown here; send it in full"
            )
        return topology
    try:
        topology = Topology.from_wire(body.get("topology"))
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: {exc}") from None
    if digest is not None and digest != topology.digest:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: the topology does not match its digest {digest!r}")
    return topology


def _node_of(topology: Topology, rank: int) -> int:
    try:
        return topology.node_of(rank)
    except ValueError:
        return -1


def _file_to_wire(record: FileRecord) -> Dict[str, Any]:
    return {"size": record.size, "checksum": record.checksum, "tensors": record.tensors}


def _file_from_wire(raw: Any, path: str, where: str) -> FileRecord:
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: a file record must be a map")
    size = _field(raw, "size", int, where)
    checksum = _field(raw, "checksum", str, where)
    tensors = _field(raw, "tensors", dict, where)
    if size < 0 or len(checksum) > 128:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: file {path}: bad size or checksum")
    return FileRecord(path, size, checksum, tensors)


def parse_address(text: str) -> Tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) -> (host, port); raises ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"leader address {text!r} must be HOST:PORT with a port in 1-65535")
    return host, int(port)
