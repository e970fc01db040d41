"""The checkpoint root on disk: tmp directories, the atomic commit, the `latest` pointer, leftovers."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ckptd.disk import removal
from ckptd.disk import root as root_dir
from ckptd.disk.durable import fsync_dir, makedirs_durable
from ckptd.disk.manifests import manifest_path, read_manifest, write_manifest
from ckptd.disk.retention import read_retention, write_retention
from ckptd.proto import layout
from ckptd.proto.manifest import ManifestError
from ckptd.proto.retention import DELETED_REMEMBERED, RetentionPolicy, deleted_checkpoints, kept_steps

log = logging.getLogger(__name__)

FileIdentity = Tuple[int, int, int, int]
"""(device, inode, size, mtime in ns) of a file: a manifest replaced or rewritten gets another."""


@dataclass(frozen=True)
class RetentionFacts:
    """What retention reads of a committed checkpoint's manifest: its metrics and the job run that saved it."""

    metrics: Dict[str, float]
    job: str


def _identity(path: str) -> FileIdentity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CheckpointStore:
    """Owns every directory operation under one checkpoint root (DESIGN.md commit step 4)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        makedirs_durable(self.root)
        self._facts: Dict[int, Tuple[FileIdentity, Optional[RetentionFacts]]] = {}
        """Step -> its manifest's identity and facts (None: unreadable) when retention last read it. A
        manifest of 10,000 tensors takes 9 ms to parse, and each save's retention pass reads every
        committed one; a committed manifest never changes in place, so each is read once."""

    def check_writable(self) -> None:
        """Raise OSError unless this process can create files in the root (creates and removes one)."""
        probe = os.path.join(self.root, f"{layout.TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
        try:
            os.unlink(probe)
        except FileNotFoundError:  # node 0's leftover cleanup got to it first, on a shared root
            pass

    def final_path(self, step: int) -> str:
        """Where the committed checkpoint of `step` lives."""
        return root_dir.checkpoint_path(self.root, step)

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

    def commit(self, tmp_dir: str, step: int, manifest_json: str, facts: Optional[RetentionFacts] = None) -> str:
        """Manifest last (tmp, fsync, rename), then rename the directory into place; returns its path.

        Every shard is already fsynced; this makes their directory entries durable first, so the
        final name never points at a directory whose files could vanish in a crash. Raises OSError
        only while the checkpoint is not committed: once the directory has its final name it is.
        Call `publish` next: the rename is durable, and `latest` moves, only then. `facts`, where the
        caller has them, spare retention reading the manifest back.
        """
        for entry in os.scandir(tmp_dir):
            if entry.is_dir(follow_symlinks=False):
                fsync_dir(entry.path)
        write_manifest(tmp_dir, manifest_json)
        identity = _identity(manifest_path(tmp_dir)) if facts is not None else None
        final = self.final_path(step)
        os.rename(tmp_dir, final)
        if identity is not None:
            self._facts[step] = (identity, facts)
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
            log.error(
                "step(s) %s are committed, but updating the root failed (%s); `latest` is repaired at "
                "the next commit or daemon start",
                steps,
                exc,
            )

    def advance_latest(self, step: int) -> None:
        """Point `latest` at `step` unless it already names a newer checkpoint (it never moves back)."""
        latest = self.latest_step()
        if latest is None or step > latest:
            root_dir.write_latest(self.root, step)

    def repair_latest(self) -> Optional[int]:
        """Point `latest` at the newest directory with a final name and a manifest (a crash between the
        rename and the pointer update leaves it one behind); returns that step."""
        steps = self.committed_steps()[::-1]
        if steps and self.latest_step() != steps[0]:
            log.warning(
                "latest pointed at %s; the newest committed checkpoint is step %d: repairing",
                self.latest_step(),
                steps[0],
            )
            root_dir.write_latest(self.root, steps[0])
        return steps[0] if steps else None

    def latest_step(self) -> Optional[int]:
        """The step `latest` points at, or None."""
        return root_dir.read_latest(self.root)

    def committed_steps(self) -> List[int]:
        """Steps with a final directory that holds a manifest, oldest first."""
        return root_dir.checkpoint_steps(self.root, with_manifest=True)

    def plan_retention(self, policy: RetentionPolicy) -> Tuple[Dict[int, List[str]], List[int]]:
        """(kept step -> reasons, steps to delete) for `policy` as the root is now; `latest` is kept."""
        return self._plan(policy, self._committed_facts())

    def _committed_facts(self) -> Dict[int, Optional[RetentionFacts]]:
        steps = self.committed_steps()
        for gone in set(self._facts) - set(steps):
            self._facts.pop(gone, None)
        return {step: self._read_facts(step) for step in steps}

    def _read_facts(self, step: int) -> Optional[RetentionFacts]:
        """`step`'s retention facts: remembered while its manifest is the same file, else read."""
        try:
            identity: Optional[FileIdentity] = _identity(manifest_path(self.final_path(step)))
        except OSError:
            identity = None
        remembered = self._facts.get(step)
        if identity is not None and remembered is not None and remembered[0] == identity:
            return remembered[1]
        try:
            manifest = read_manifest(self.final_path(step))
            facts: Optional[RetentionFacts] = RetentionFacts(manifest.metrics, manifest.job)
        except (ManifestError, OSError) as exc:
            log.warning(
                "retention: cannot read the manifest of step %d (%s); treating it as having no metrics", step, exc
            )
            facts = None
        if identity is not None:
            self._facts[step] = (identity, facts)
        return facts

    def _plan(
        self, policy: RetentionPolicy, facts: Dict[int, Optional[RetentionFacts]]
    ) -> Tuple[Dict[int, List[str]], List[int]]:
        checkpoints = [(step, known.metrics if known else {}) for step, known in facts.items()]
        kept = kept_steps(checkpoints, policy)
        latest = self.latest_step()
        if latest is not None:
            kept.setdefault(latest, []).append("latest")
        return kept, [step for step, _ in checkpoints if step not in kept]

    def apply_retention(self, policy: RetentionPolicy) -> List[int]:
        """Delete the committed checkpoints `policy` does not keep (never `latest`, never one a loader
        holds); record what is kept and why in the root's retention file, and what is deleted (with
        its job run) before deleting it. Returns the deleted steps."""
        facts = self._committed_facts()
        kept, doomed = self._plan(policy, facts)
        deleted = deleted_checkpoints(read_retention(self.root))
        if doomed:
            jobs = [(step, known.job if (known := facts[step]) else "") for step in doomed]
            deleted = (deleted + jobs)[-DELETED_REMEMBERED:]
            write_retention(self.root, policy, kept, deleted)
        taken = {}
        for step in doomed:
            moved = removal.take_away(self.root, step)
            if moved is None:
                log.info("retention: step %d is being loaded; keeping it for now", step)
                kept[step] = ["being loaded (deleted at a later pass)"]
            else:
                taken[step] = moved
        if taken:
            fsync_dir(self.root)
            for step, moved in taken.items():
                removal.remove_tree(moved)
                log.info("retention: deleted step %d", step)
        write_retention(self.root, policy, kept, deleted)
        return sorted(taken)

    def discard(self, tmp_dir: str) -> None:
        """Remove a tmp directory of an aborted save."""
        removal.remove_tree(tmp_dir)

    def leftovers(self) -> List[str]:
        """Tmp directories and files left by interrupted saves."""
        return root_dir.leftovers(self.root)

    def remove_leftovers(self, min_age_s: float = 0.0) -> List[str]:
        """Delete what interrupted saves left behind (only what is at least `min_age_s` old, when a
        daemon may be writing); returns what was removed."""
        return removal.remove_leftovers(self.root, min_age_s)
