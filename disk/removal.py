"""Crash-safe removal: a checkpoint loses its final name in one rename before its files go, and a
save's tmp directory is moved aside (fenced) so that it can never commit."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from typing import List, Optional

from ckptd.disk.manifests import hold_for_deleting, read_manifest
from ckptd.disk.retention import deleted_after_commit
from ckptd.disk.root import DELETED_MARK, FENCED_MARK, checkpoint_path, leftovers
from ckptd.proto import layout
from ckptd.proto.manifest import ManifestError

log = logging.getLogger(__name__)


def take_away(root: str, step: int) -> Optional[str]:
    """First half of deleting checkpoint `step`: take its final name away (one rename, so a half-deleted
    directory is never mistaken for a checkpoint; a restart removes the rest) and return where it
    went. None, and nothing touched, while a loader holds it or once it is gone."""
    final = checkpoint_path(root, step)
    with hold_for_deleting(final) as locked:
        if locked is None:
            return None
        doomed = os.path.join(root, layout.tmp_dir_name(step, DELETED_MARK.lstrip("-") + uuid.uuid4().hex[:8]))
        try:
            os.rename(final, doomed)
        except FileNotFoundError:  # another retention pass (ckptd gc, another node) took it first
            return None
    return doomed


def remove_tree(path: str) -> None:
    """Remove a directory tree (or a file) whose name is already a leftover's. What is already gone is
    fine; another failure is logged, and the next leftover sweep tries again."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (%s); a later leftover sweep removes it", path, exc)


def remove_leftovers(root: str, min_age_s: float = 0.0) -> List[str]:
    """Delete what interrupted saves and deletes left in `root` (only what is at least `min_age_s`
    old, when a daemon may be writing); returns what was removed."""
    now = time.time()
    removed = [p for p in leftovers(root) if now - _newest_mtime(p) >= min_age_s]
    for path in removed:
        remove_tree(path)
        log.info("removed leftover of an interrupted save: %s", path)
    return removed


def fence_save(root: str, step: int, job: str) -> Optional[str]:
    """Settle checkpoint `step` of run `job` under `root` for good: its final directory if it
    committed, else None, and then it never will.

    The daemon commits a save by renaming its tmp directory to the final name, and never re-creates
    the tmp directory of a save it has opened. So one rename decides: once the tmp directory is moved
    aside, the save cannot commit; if the daemon renamed it first, it is committed. Retention may
    delete a committed checkpoint before its client hears of the commit; the retention record lists
    such deletions first, so they still count as committed."""
    tmp_dir = os.path.join(root, layout.tmp_dir_name(step, layout.job_token(job)))
    fenced = f"{tmp_dir}{FENCED_MARK}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(tmp_dir, fenced)
        log.info("moved the tmp directory of step %d aside: that save can no longer commit", step)
        remove_tree(fenced)  # a daemon still writing it only has files of its own open
    except FileNotFoundError:
        pass  # never opened, already discarded, or renamed to its final name
    except OSError as exc:
        log.warning("could not move %s aside (%s); deciding from what is on disk", tmp_dir, exc)
    final = checkpoint_path(root, step)
    return final if _committed_by(final, job) or deleted_after_commit(root, step, job) else None


def _committed_by(checkpoint_dir: str, job: str) -> bool:
    try:
        return read_manifest(checkpoint_dir).job == job
    except (ManifestError, OSError):  # unreadable (an I/O error): not known to be committed
        return False


def _newest_mtime(path: str) -> float:
    """Newest modification time of `path` and what is directly inside it (a save in flight touches
    its component directories), or now if it vanished."""
    try:
        times = [os.lstat(path).st_mtime]
        if os.path.isdir(path) and not os.path.islink(path):
            times += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)]
        return max(times)
    except OSError:
        return time.time()
