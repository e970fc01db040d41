"""The `checkpoint_manifest.json` schema: what a committed checkpoint holds and how to verify it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ckptd.proto.formats import FORMAT_VERSION
from ckptd.proto.layout import check_safe_name
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.topology import Topology


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or of a format this version cannot read."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a component scope, relative to the checkpoint directory."""

    path: str
    size: int
    checksum: str
    tensors: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Tensor index of a `.safetensors` file: name -> {dtype, shape}; empty for state files."""


@dataclass(frozen=True)
class ScopeRecord:
    """The files holding one copy of a component (one per job, rank, group or node)."""

    scope: str
    writer_rank: int
    readers: List[int]
    tensor_file: FileRecord
    state_file: FileRecord


@dataclass(frozen=True)
class ComponentRecord:
    """A component as saved."""

    pattern: SharingPattern
    required: bool
    validate_replication: bool
    metadata: Dict[str, Any]
    scopes: Dict[str, ScopeRecord]
    group_name: Optional[str] = None
    spread: bool = False
    """REPLICATED split across nodes: every scope holds a share of the tensors; each rank loads all."""


@dataclass(frozen=True)
class Manifest:
    """Everything a loader needs to find, verify and restore a checkpoint."""

    step: int
    topology: Topology
    groups: Dict[str, List[List[int]]]
    components: Dict[str, ComponentRecord]
    versions: Dict[str, str]
    created_at: str
    committed_at: str
    timings: Dict[str, float]
    metrics: Dict[str, float] = field(default_factory=dict)
    job: str = ""
    """The id of the job run that saved it (empty in manifests written before it was recorded)."""
    format_version: int = FORMAT_VERSION

    def files(self) -> List[FileRecord]:
        """Every file the checkpoint lists."""
        return [f for c in self.components.values() for s in c.scopes.values() for f in (s.tensor_file, s.state_file)]

    def to_json(self) -> str:
        """Serialized form: compact JSON (the C encoder; indented output takes 15x longer for a
        10,000-tensor index). `ckptd inspect` or `python -m json.tool` shows it readably."""
        data = {
            "format_version": self.format_version,
            "step": self.step,
            "topology": self.topology.to_wire(),
            "groups": self.groups,
            "versions": self.versions,
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "timings": self.timings,
            "metrics": self.metrics,
            "job": self.job,
            "components": {key: _component_to_dict(c) for key, c in self.components.items()},
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse and check a manifest; raises ManifestError naming the problem."""
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise ManifestError(f"manifest format version {version!r} is not supported (expected {FORMAT_VERSION})")
            components = {
                check_safe_name(key, "component key"): _component_from_dict(raw)
                for key, raw in data["components"].items()
            }
            return cls(
                step=int(data["step"]),
                topology=Topology.from_wire(data["topology"]),
                groups={k: [list(map(int, g)) for g in v] for k, v in data.get("groups", {}).items()},
                components=components,
                versions=dict(data.get("versions", {})),
                created_at=str(data["created_at"]),
                committed_at=str(data["committed_at"]),
                timings=dict(data.get("timings", {})),
                metrics=dict(data.get("metrics", {})),
                job=str(data.get("job", "")),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"manifest is malformed: {exc!r}") from None


def _file_to_dict(record: FileRecord) -> Dict[str, Any]:
    return {"path": record.path, "size": record.size, "checksum": record.checksum, "tensors": record.tensors}


def _component_to_dict(record: ComponentRecord) -> Dict[str, Any]:
    return {
        "pattern": record.pattern.value,
        "required": record.required,
        "validate_replication": record.validate_replication,
        "metadata": record.metadata,
        "group_name": record.group_name,
        "spread": record.spread,
        "scopes": {
            name: {
                "scope": s.scope,
                "writer_rank": s.writer_rank,
                "readers": s.readers,
                "tensor_file": _file_to_dict(s.tensor_file),
                "state_file": _file_to_dict(s.state_file),
            }
            for name, s in record.scopes.items()
        },
    }


def _file_from_dict(raw: Dict[str, Any]) -> FileRecord:
    path = str(raw["path"])
    parts = path.split("/")
    if len(parts) != 2:
        raise ManifestError(f"manifest file entry {path!r} must be '<component>/<file>'")
    for part in parts:
        check_safe_name(part, "manifest file path component")
    return FileRecord(
        path=path, size=int(raw["size"]), checksum=str(raw["checksum"]), tensors=dict(raw.get("tensors", {}))
    )


def _component_from_dict(raw: Dict[str, Any]) -> ComponentRecord:
    scopes = {
        name: ScopeRecord(
            scope=name,
            writer_rank=int(s["writer_rank"]),
            readers=[int(r) for r in s["readers"]],
            tensor_file=_file_from_dict(s["tensor_file"]),
            state_file=_file_from_dict(s["state_file"]),
        )
        for name, s in raw["scopes"].items()
    }
    return ComponentRecord(
        pattern=SharingPattern(raw["pattern"]),
        required=bool(raw["required"]),
        validate_replication=bool(raw["validate_replication"]),
        metadata=dict(raw.get("metadata", {})),
        scopes=scopes,
        group_name=raw.get("group_name"),
        spread=raw.get("spread") is True,
    )
