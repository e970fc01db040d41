"""What a checkpoint root holds: its checkpoints by step, the `latest` pointer, and the leftovers of
interrupted saves and deletes."""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

from ckptd.disk.durable import TMP_SUFFIX, write_atomic
from ckptd.disk.manifests import has_manifest
from ckptd.proto import layout

log = logging.getLogger(__name__)

DELETED_MARK = "-deleted-"
"""In the tmp name a checkpoint is moved to while it is deleted."""
FENCED_MARK = "-fenced-"
"""In the tmp name a save's directory is moved to when its client gave up on it."""


def checkpoint_steps(root: str, *, with_manifest: bool = False) -> List[int]:
    """Steps of the directories with a final checkpoint name under `root` (only those holding a
    manifest, with `with_manifest`), oldest first; [] if the root does not exist."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = sorted(s for n in names if (s := layout.parse_checkpoint_dir_name(n)) is not None)
    if with_manifest:
        steps = [s for s in steps if has_manifest(checkpoint_path(root, s))]
    return steps


def checkpoint_path(root: str, step: int) -> str:
    """Where the checkpoint of `step` lives under `root`."""
    return os.path.join(root, layout.checkpoint_dir_name(step))


def partner_root(root: str) -> str:
    """Where a node-local root keeps the previous node's files (a checkpoint root of its own)."""
    return os.path.join(root, layout.PARTNER_DIR)


def write_node_copy_record(root: str, node: Optional[int]) -> None:
    """Record that `root` holds node `node`'s copy of each checkpoint (None: the whole checkpoints;
    removes the record)."""
    path = os.path.join(root, layout.NODE_COPY_FILE)
    if node is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    write_atomic(path, json.dumps({"node": node}).encode())


def node_copy_of(root: str) -> Optional[int]:
    """The node whose copy `root` holds, if its daemon recorded one (`write_node_copy_record`)."""
    try:
        with open(os.path.join(root, layout.NODE_COPY_FILE), encoding="utf-8") as f:
            node = json.load(f).get("node")
    except (OSError, ValueError, AttributeError):
        return None
    return node if type(node) is int else None


def committed_checkpoints(root: str) -> List[str]:
    """Final checkpoint directories under `root`, newest step first."""
    return [checkpoint_path(root, s) for s in reversed(checkpoint_steps(root))]


def read_latest(root: str) -> Optional[int]:
    """The step the root's `latest` pointer names, or None (absent or not a checkpoint name)."""
    try:
        with open(os.path.join(root, layout.LATEST_NAME), encoding="utf-8") as f:
            return layout.parse_checkpoint_dir_name(f.read().strip())
    except (OSError, UnicodeDecodeError):
        return None


def write_latest(root: str, step: int) -> None:
    """Point `latest` at `step` (atomically and durably)."""
    write_atomic(os.path.join(root, layout.LATEST_NAME), (layout.checkpoint_dir_name(step) + "\n").encode())


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory `latest` points at, else the newest final directory with a manifest, else None."""
    step = read_latest(root)
    if step is not None:
        candidate = checkpoint_path(root, step)
        if has_manifest(candidate):
            return candidate
        log.warning(
            "%s/latest names %s, which has no manifest; looking for the newest committed one",
            root,
            layout.checkpoint_dir_name(step),
        )
    for candidate in committed_checkpoints(root):
        if has_manifest(candidate):
            return candidate
    return None


def checkpoint_dirs(path: str) -> List[str]:
    """`path` itself if it is a checkpoint directory, else the final checkpoint directories under it,
    oldest first."""
    if has_manifest(path) or layout.parse_checkpoint_dir_name(os.path.basename(os.path.normpath(path))) is not None:
        return [path]
    return [checkpoint_path(path, s) for s in checkpoint_steps(path)]


def is_leftover_name(name: str) -> bool:
    """True for the names interrupted saves, deletes and atomic writes leave in a root."""
    return name.startswith(layout.TMP_PREFIX) or name.endswith(TMP_SUFFIX)


def leftover_kind(path: str) -> str:
    """What left `path` behind: a deleted checkpoint, an interrupted save, or a temporary file."""
    if DELETED_MARK in os.path.basename(path):
        return "deleted checkpoint"
    return "interrupted save" if os.path.isdir(path) else "temporary file"


def leftovers(root: str) -> List[str]:
    """Tmp directories and files left by interrupted saves and deletes, sorted."""
    return sorted(entry.path for entry in os.scandir(root) if is_leftover_name(entry.name))
