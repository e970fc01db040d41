"""What a checkpoint root holds, read from disk alone (no daemon): for `ckptd ls`, `inspect` and `gc`."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ckptd.disk.manifests import read_manifest
from ckptd.disk.objectstore import ObjectStoreError, ObjectStoreRoot
from ckptd.disk.retention import read_retention
from ckptd.disk.root import checkpoint_path, checkpoint_steps, leftover_kind, leftovers, read_latest
from ckptd.proto import layout
from ckptd.proto.manifest import ManifestError


@dataclass
class CheckpointEntry:
    """One directory with a final checkpoint name."""

    step: int
    path: str
    committed_at: Optional[str] = None
    size_bytes: int = 0
    components: List[str] = field(default_factory=list)
    latest: bool = False
    kept_because: List[str] = field(default_factory=list)
    """The retention reasons recorded at the last retention pass (empty without a policy)."""
    problem: Optional[str] = None
    """Why the manifest cannot be read (the directory is then not a usable checkpoint)."""


@dataclass
class Leftover:
    """Something an interrupted save or delete left in the root."""

    path: str
    kind: str
    age_s: float
    size_bytes: int


@dataclass
class Catalog:
    """Everything `ckptd ls` shows about a root."""

    root: str
    checkpoints: List[CheckpointEntry]
    leftovers: List[Leftover]
    latest_step: Optional[int]
    policy: Optional[Dict[str, Any]]

    def to_json(self) -> Dict[str, Any]:
        """Plain form for --json."""
        return asdict(self)


def catalog(root: str) -> Catalog:
    """Every checkpoint (oldest first) and leftover under `root`."""
    root = os.path.realpath(root)
    latest = read_latest(root)
    retention = read_retention(root)
    kept = retention.get("kept", {}) if isinstance(retention.get("kept"), dict) else {}
    checkpoints = [
        _entry(step, checkpoint_path(root, step), latest, kept.get(str(step), [])) for step in checkpoint_steps(root)
    ]
    now = time.time()
    found = [
        Leftover(path, leftover_kind(path), now - os.lstat(path).st_mtime, tree_size(path)) for path in leftovers(root)
    ]
    return Catalog(root, checkpoints, found, latest, retention.get("policy"))


def object_store_catalog(root: ObjectStoreRoot) -> Catalog:
    """Every checkpoint of an object-store tier (its leftovers are multipart uploads, aborted by `gc`)."""
    latest = root.latest_step()
    checkpoints = []
    for step in root.committed_steps():
        entry = CheckpointEntry(step, f"{root.url}/{layout.checkpoint_dir_name(step)}", latest=step == latest)
        try:
            manifest = root.read_manifest(step)
        except (ObjectStoreError, ManifestError) as exc:
            entry.problem = str(exc)
        else:
            entry.committed_at = manifest.committed_at
            entry.components = sorted(manifest.components)
            entry.size_bytes = sum(record.size for record in manifest.files())
        checkpoints.append(entry)
    return Catalog(root.url, checkpoints, [], latest, None)


def _entry(step: int, path: str, latest: Optional[int], kept_because: List[str]) -> CheckpointEntry:
    entry = CheckpointEntry(
        step, path, latest=step == latest, kept_because=list(kept_because), size_bytes=tree_size(path)
    )
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        entry.problem = str(exc)
        return entry
    entry.committed_at = manifest.committed_at
    entry.components = sorted(manifest.components)
    return entry


def tree_size(path: str) -> int:
    """Bytes of the regular files under `path` (or of `path` itself), without following symlinks."""
    if not os.path.isdir(path) or os.path.islink(path):
        try:
            return os.lstat(path).st_size
        except OSError:
            return 0
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total
