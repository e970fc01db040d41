"""The checkpoint root on disk: tmp directories, the atomic commit, the `latest` pointer, leftovers."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from ckptd.proto import layout
from ckptd.proto.retention import (
    DELETED_KEY,
    DELETED_REMEMBERED,
    RETENTION_FILE,
    RetentionPolicy,
    deleted_checkpoints,
    kept_steps,
)
from ckptd.service.shard_writer import fsync_dir, makedirs_durable, write_atomic

log = logging.getLogger(__name__)


class CheckpointStore:
    """Owns every directory operation under one checkpoint root (DESIGN.md commit step 4)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        makedirs_durable(self.root)

    def check_writable(self) -> None:
        """Raise OSError unless this process can create files in the root (creates and removes one)."""
        probe = os.path.join(self.root, f"{layout.TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
        os.unlink(probe)

    def final_path(self, step: int) -> str:
        """Where the committed checkpoint of `step` lives."""
        return os.path.join(self.root, layout.checkpoint_dir_name(step))

    def is_committed(self, step: int) -> bool:
        """True if `step` already has a final directory."""
        return os.path.lexists(self.final_path(step))

    def tmp_path(self, step: int, job: str) -> str:
        """Where run `job` writes checkpoint `step` before it commits: the same path on every node
        of a job (the root is on a shared filesystem), so the leader renames one directory."""
        return os.path.join(self.root, layout.tmp_dir_name(step, layout.job_token(job)))

    def create_tmp_dir(self, step: int, job: str) -> str:
        """The directory to write checkpoint `step` of run `job` into (other nodes may create it too)."""
        path = self.tmp_path(step, job)
        makedirs_durable(self.root)  # the root may have been removed while we serve it
        os.makedirs(path, 0o755, exist_ok=True)
        return path

    @staticmethod
    def make_component_dir(tmp_dir: str, key: str) -> None:
        """Create a component's directory inside a save's tmp directory. Never re-creates `tmp_dir`
        itself: a client that gave up on the save may have moved it aside, and then the save must fail."""
        try:
            os.mkdir(os.path.join(tmp_dir, key))
        except FileExistsError:
            pass

    def commit(self, tmp_dir: str, step: int, manifest_json: str) -> str:
        """Manifest last (tmp, fsync, rename), then rename the directory into place; returns its path.

        Every shard is already fsynced; this makes their directory entries durable first, so the
        final name never points at a directory whose files could vanish in a crash. Raises OSError
        only while the checkpoint is not committed: once the directory has its final name it is.
        Call `publish` next: the rename is durable, and `latest` moves, only then.
        """
        for entry in os.scandir(tmp_dir):
            if entry.is_dir(follow_symlinks=False):
                fsync_dir(entry.path)
        write_atomic(os.path.join(tmp_dir, layout.MANIFEST_NAME), manifest_json.encode())
        final = self.final_path(step)
        os.rename(tmp_dir, final)
        return final

    def publish(self, steps: List[int]) -> None:
        """After `commit` of `steps` (one or a batch): make their renames durable with one fsync of the
        root and move `latest` to the newest. They have their final names, so they are committed
        whatever happens here: a failure (an fsync that reports EIO leaves their durability unknown)
        is logged, and `latest` is repaired at the next commit or daemon start."""
        try:
            fsync_dir(self.root)
            self.advance_latest(max(steps))
        except OSError as exc:
            log.error("step(s) %s are committed, but updating the root failed (%s); `latest` is repaired at "
                      "the next commit or daemon start", steps, exc)

    def advance_latest(self, step: int) -> None:
        """Point `latest` at `step` unless it already names a newer checkpoint (it never moves back)."""
        latest = self.latest_step()
        if latest is None or step > latest:
            write_atomic(os.path.join(self.root, layout.LATEST_NAME), (layout.checkpoint_dir_name(step) + "\n").encode())

    def repair_latest(self) -> Optional[int]:
        """Point `latest` at the newest directory with a final name and a manifest (a crash between the
        rename and the pointer update leaves it one behind); returns that step."""
        steps = self.committed_steps()[::-1]
        if steps and self.latest_step() != steps[0]:
            log.warning("latest pointed at %s; the newest committed checkpoint is step %d: repairing",
                        self.latest_step(), steps[0])
            write_atomic(os.path.join(self.root, layout.LATEST_NAME), (layout.checkpoint_dir_name(steps[0]) + "\n").encode())
        return steps[0] if steps else None

    def latest_step(self) -> Optional[int]:
        """The step `latest` points at, or None."""
        try:
            with open(os.path.join(self.root, layout.LATEST_NAME)) as f:
                return layout.parse_checkpoint_dir_name(f.read().strip())
        except FileNotFoundError:
            return None

    def committed_steps(self) -> List[int]:
        """Steps with a final directory that holds a manifest, oldest first."""
        return sorted(
            step for name in os.listdir(self.root) if (step := layout.parse_checkpoint_dir_name(name)) is not None
            and os.path.isfile(os.path.join(self.root, name, layout.MANIFEST_NAME))
        )

    def plan_retention(self, policy: RetentionPolicy) -> Tuple[Dict[int, List[str]], List[int]]:
        """(kept step -> reasons, steps to delete) for `policy` as the root is now; `latest` is kept."""
        checkpoints = [(step, self._metrics(step)) for step in self.committed_steps()]
        kept = kept_steps(checkpoints, policy)
        latest = self.latest_step()
        if latest is not None:
            kept.setdefault(latest, []).append("latest")
        return kept, [step for step, _ in checkpoints if step not in kept]

    def apply_retention(self, policy: RetentionPolicy) -> List[int]:
        """Delete the committed checkpoints `policy` does not keep (never `latest`, never one a loader
        holds); record what is kept and why in the root's retention file, and what is deleted (with
        its job run) before deleting it. Returns the deleted steps."""
        kept, doomed = self.plan_retention(policy)
        deleted = self._deleted_record()
        if doomed:
            deleted = (deleted + [[step, self._manifest_field(step, "job", "")] for step in doomed])[-DELETED_REMEMBERED:]
            self._write_retention_record(policy, kept, deleted)
        taken = {}
        for step in doomed:
            moved = self._take_away(step)
            if moved is None:
                kept[step] = ["being loaded (deleted at a later pass)"]
            else:
                taken[step] = moved
        if taken:
            fsync_dir(self.root)
            for step, moved in taken.items():
                shutil.rmtree(moved, ignore_errors=True)
                log.info("retention: deleted step %d", step)
        self._write_retention_record(policy, kept, deleted)
        return sorted(taken)

    def _write_retention_record(self, policy: RetentionPolicy, kept: Dict[int, List[str]], deleted: List[list]) -> None:
        record = {"policy": policy.to_wire(), "kept": {str(step): reasons for step, reasons in sorted(kept.items())},
                  DELETED_KEY: deleted}
        write_atomic(os.path.join(self.root, RETENTION_FILE), json.dumps(record, indent=1).encode())

    def _deleted_record(self) -> List[list]:
        try:
            with open(os.path.join(self.root, RETENTION_FILE), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return []
        return [list(entry) for entry in deleted_checkpoints(record)]

    def _metrics(self, step: int) -> Dict[str, float]:
        metrics = self._manifest_field(step, "metrics", {})
        return metrics if isinstance(metrics, dict) else {}

    def _manifest_field(self, step: int, name: str, default: Any) -> Any:
        try:
            with open(os.path.join(self.final_path(step), layout.MANIFEST_NAME), encoding="utf-8") as f:
                return json.load(f).get(name, default)
        except (OSError, ValueError, AttributeError):
            return default

    def _take_away(self, step: int) -> Optional[str]:
        """First half of a crash-safe delete: take the checkpoint's final name away (one rename, so a
        half-deleted directory is never mistaken for a checkpoint; a restart removes the rest), and
        return where it went. None, and nothing touched, while a loader holds the manifest's shared lock."""
        final = self.final_path(step)
        try:
            fd = os.open(os.path.join(final, layout.MANIFEST_NAME), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("retention: step %d is being loaded; keeping it for now", step)
                return None
            doomed = os.path.join(self.root, layout.tmp_dir_name(step, "deleted-" + uuid.uuid4().hex[:8]))
            try:
                os.rename(final, doomed)
            except FileNotFoundError:  # another retention pass (ckptd gc, another node) took it first
                return None
        finally:
            os.close(fd)
        return doomed

    def discard(self, tmp_dir: str) -> None:
        """Remove a tmp directory of an aborted save."""
        shutil.rmtree(tmp_dir, ignore_errors=True)

    def leftovers(self) -> List[str]:
        """Tmp directories and files left by interrupted saves."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(layout.TMP_PREFIX) or entry.name.endswith(".tmp"):
                found.append(entry.path)
        return sorted(found)

    def remove_leftovers(self, min_age_s: float = 0.0) -> List[str]:
        """Delete what interrupted saves left behind (only what is at least `min_age_s` old, when a
        daemon may be writing); returns what was removed."""
        now = time.time()
        removed = [p for p in self.leftovers() if now - _mtime(p) >= min_age_s]
        for path in removed:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            log.info("removed leftover of an interrupted save: %s", path)
        return removed


def _mtime(path: str) -> float:
    """Newest modification time of `path` and what is directly inside it (a save in flight touches
    its component directories), or now if it vanished."""
    try:
        times = [os.lstat(path).st_mtime]
        if os.path.isdir(path) and not os.path.islink(path):
            times += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)]
        return max(times)
    except OSError:
        return time.time()
