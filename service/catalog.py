"""What a checkpoint root holds, read from disk alone (no daemon): for `ckptd ls`, `inspect` and `gc`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ckptd.proto import layout
from ckptd.proto.manifest import Manifest, ManifestError
from ckptd.proto.retention import RETENTION_FILE, RetentionPolicy


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


def read_manifest_file(checkpoint_dir: str) -> Manifest:
    """The manifest of a checkpoint directory; raises ManifestError (also for a missing one)."""
    path = os.path.join(checkpoint_dir, layout.MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return Manifest.from_json(f.read())
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path}: {exc}") from None


def latest_step(root: str) -> Optional[int]:
    """The step the root's `latest` pointer names, or None."""
    try:
        with open(os.path.join(root, layout.LATEST_NAME), encoding="utf-8") as f:
            return layout.parse_checkpoint_dir_name(f.read().strip())
    except OSError:
        return None


def read_retention(root: str) -> Dict[str, Any]:
    """The root's retention record ({"policy": ..., "kept": {step: reasons}}), or {}."""
    try:
        with open(os.path.join(root, RETENTION_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def saved_policy(root: str) -> Optional[RetentionPolicy]:
    """The retention policy the daemon last applied to `root`, if any."""
    raw = read_retention(root).get("policy")
    try:
        return None if raw is None else RetentionPolicy.from_wire(raw)
    except ValueError:
        return None


def catalog(root: str) -> Catalog:
    """Every checkpoint (oldest first) and leftover under `root`."""
    root = os.path.realpath(root)
    latest = latest_step(root)
    retention = read_retention(root)
    kept = retention.get("kept", {}) if isinstance(retention.get("kept"), dict) else {}
    checkpoints, leftovers = [], []
    now = time.time()
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        step = layout.parse_checkpoint_dir_name(name)
        if step is not None:
            checkpoints.append(_entry(step, path, latest, kept.get(str(step), [])))
        elif name.startswith(layout.TMP_PREFIX) or name.endswith(".tmp"):
            kind = "deleted checkpoint" if "-deleted-" in name else (
                "interrupted save" if os.path.isdir(path) else "temporary file")
            leftovers.append(Leftover(path, kind, now - os.lstat(path).st_mtime, tree_size(path)))
    checkpoints.sort(key=lambda c: c.step)
    return Catalog(root, checkpoints, leftovers, latest, retention.get("policy"))


def _entry(step: int, path: str, latest: Optional[int], kept_because: List[str]) -> CheckpointEntry:
    entry = CheckpointEntry(step, path, latest=step == latest, kept_because=list(kept_because),
                            size_bytes=tree_size(path))
    try:
        manifest = read_manifest_file(path)
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
