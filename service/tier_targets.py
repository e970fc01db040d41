"""Where a tier's copies go: a directory (`DirectoryTarget`) or an object store (`ObjectStoreTarget`).
Each copies one committed checkpoint of the root with the commit protocol of its kind (manifest
last), keeps its own `latest`, and applies the tier's retention."""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Protocol, Sequence

from ckptd.disk.files import FileProblem, check_listed_file, map_listed_file
from ckptd.disk.objectstore import ObjectStoreRoot
from ckptd.proto import layout
from ckptd.proto.manifest import FileRecord
from ckptd.proto.retention import RetentionPolicy, kept_steps
from ckptd.proto.tiers import TierSpec, is_object_store
from ckptd.service.shard_writer import PageRelease, Throttle, write_shard
from ckptd.service.store import CheckpointStore

log = logging.getLogger(__name__)

COPY_TOKEN = "copy"
"""In the tmp directory name of a copy into a directory tier (`.tmp-step_N-copy<hex>`)."""


class TierTarget(Protocol):
    """A tier's storage, as the copier uses it (every method may raise OSError or ObjectStoreError)."""

    def open(self, clean: bool = True) -> List[str]:
        """Make it ready (create the directory, reach the bucket) and, with `clean` (the node that
        commits the copies), remove what an interrupted copy left; returns what was removed."""

    def is_committed(self, step: int) -> bool:
        """True if checkpoint `step` is committed here."""

    def latest_step(self) -> Optional[int]:
        """The step this tier's `latest` names."""

    def copy_files(
        self,
        source_dir: str,
        step: int,
        token: str,
        records: Sequence[FileRecord],
        throttle: Throttle,
        progress: PageRelease,
    ) -> None:
        """Copy `records` of checkpoint `step` from `source_dir` into the copy named `token` (the
        nodes of a job with node-local roots each copy their own files into one copy)."""

    def commit_copy(self, step: int, token: str, manifest_json: str) -> None:
        """Commit the copy named `token` (manifest last) and move `latest`."""

    def discard_copy(self, step: int, token: str) -> None:
        """Remove what an abandoned copy left (where its kind allows it: an object store's files stay,
        and a later copy of the step reuses them)."""

    def apply_retention(self, policy: RetentionPolicy) -> List[int]:
        """Delete what `policy` does not keep (never the newest); returns the steps deleted."""


def open_target(spec: TierSpec) -> TierTarget:
    """The target of a tier (nothing is touched yet: `open()` does that)."""
    if is_object_store(spec.path):
        return ObjectStoreTarget(spec.path)
    return DirectoryTarget(spec.path)


class DirectoryTarget:
    """A tier in a directory: a checkpoint root of its own, written the way the root is."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._store: Optional[CheckpointStore] = None

    def open(self, clean: bool = True) -> List[str]:
        """Create the directory (and its parents) and remove interrupted copies."""
        if self._store is None:
            self._store = CheckpointStore(self.path)
        return self._store.remove_leftovers() if clean else []

    @property
    def store(self) -> CheckpointStore:
        """The tier as a checkpoint root (after `open`)."""
        assert self._store is not None, "open() the target first"
        return self._store

    def is_committed(self, step: int) -> bool:
        """True if `step` has its final directory here."""
        return self.store.is_committed(step)

    def latest_step(self) -> Optional[int]:
        """The step the tier's `latest` names (None before `open`)."""
        return None if self._store is None else self._store.latest_step()

    def copy_files(
        self,
        source_dir: str,
        step: int,
        token: str,
        records: Sequence[FileRecord],
        throttle: Throttle,
        progress: PageRelease,
    ) -> None:
        """Files into the copy's tmp directory (made by the first node to get there)."""
        tmp_dir = self._tmp_dir(step, token)
        os.makedirs(tmp_dir, exist_ok=True)
        for record in records:
            destination = os.path.join(tmp_dir, record.path)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            copy_listed_file(os.path.join(source_dir, record.path), destination, record, throttle, progress)

    def commit_copy(self, step: int, token: str, manifest_json: str) -> None:
        """The commit and `latest` of a save, for the copy's tmp directory."""
        self.store.commit(self._tmp_dir(step, token), step, manifest_json)
        self.store.publish([step])

    def discard_copy(self, step: int, token: str) -> None:
        """Remove the copy's tmp directory."""
        self.store.discard(self._tmp_dir(step, token))

    def _tmp_dir(self, step: int, token: str) -> str:
        return os.path.join(
            self.store.root, layout.tmp_dir_name(step, f"{COPY_TOKEN}{layout.check_safe_name(token, 'copy token')}")
        )

    def apply_retention(self, policy: RetentionPolicy) -> List[int]:
        """The root's crash-safe retention pass, in the tier."""
        return self.store.apply_retention(policy)


class ObjectStoreTarget:
    """A tier in an object store (S3 API): each file uploaded and checked, the manifest last. An
    interrupted copy resumes: files whose objects are complete and carry the same checksum are
    not uploaded again."""

    def __init__(self, url: str, root: Optional[ObjectStoreRoot] = None) -> None:
        self.url = url
        self._root = root
        """Set by `open`, or given already reachable (a dry run that must not abort uploads)."""

    def open(self, clean: bool = True) -> List[str]:
        """Reach the bucket with the configured credentials; abort interrupted multipart uploads."""
        if self._root is None:
            root = ObjectStoreRoot(self.url)
            root.check()
            self._root = root
        return self._root.abort_interrupted_uploads() if clean else []

    @property
    def root(self) -> ObjectStoreRoot:
        """The object-store root (after `open`)."""
        assert self._root is not None, "open() the target first"
        return self._root

    def is_committed(self, step: int) -> bool:
        """True if `step`'s manifest is uploaded."""
        return self.root.is_committed(step)

    def latest_step(self) -> Optional[int]:
        """The step `latest` names (None before `open`)."""
        return None if self._root is None else self._root.latest_step()

    def copy_files(
        self,
        source_dir: str,
        step: int,
        token: str,
        records: Sequence[FileRecord],
        throttle: Throttle,
        progress: PageRelease,
    ) -> None:
        """Each file checked against its record, then uploaded unless already there."""
        reused = 0
        for record in records:
            source = os.path.join(source_dir, record.path)
            if self.root.has_file(step, record):
                reused += 1
                progress(0, record.size)
                continue
            check_listed_file(source, record)  # the upload must carry the bytes the manifest describes
            self.root.upload_file(step, source, record, _UploadProgress(throttle, progress))
        if reused:
            log.info("%s: step %d resumed: %d file(s) were already uploaded", self.url, step, reused)

    def commit_copy(self, step: int, token: str, manifest_json: str) -> None:
        """The manifest last."""
        self.root.commit(step, manifest_json)

    def discard_copy(self, step: int, token: str) -> None:
        """Nothing: the files uploaded stay for a later copy of the step to reuse (the tier's retention
        and `ckptd gc` remove a step's objects)."""

    def plan_retention(self, policy: RetentionPolicy) -> List[int]:
        """The steps `policy` does not keep (never the newest nor `latest`)."""
        steps = self.root.committed_steps()
        kept = kept_steps([(step, {}) for step in steps], policy)
        latest = self.root.latest_step()
        return [step for step in steps if step not in kept and step != latest]

    def apply_retention(self, policy: RetentionPolicy) -> List[int]:
        """Delete the steps `policy` does not keep (manifest first); returns them."""
        doomed = self.plan_retention(policy)
        for step in doomed:
            self.root.delete(step)
        return doomed


class _UploadProgress:
    """boto3's upload callback (called from its transfer threads with the bytes just sent): the
    tier's throttle, then the copier's progress."""

    def __init__(self, throttle: Throttle, progress: PageRelease) -> None:
        self._throttle = throttle
        self._progress = progress
        self._sent = 0

    def __call__(self, nbytes: int) -> None:
        self._throttle.consume(nbytes)
        self._progress(self._sent, nbytes)
        self._sent += nbytes


def copy_listed_file(
    source: str, destination: str, record: FileRecord, throttle: Throttle, progress: PageRelease
) -> None:
    """Copy `source`, a file a manifest lists as `record`, to `destination` (created, never replaced),
    fsynced, its bytes checked against the record's size and checksum as they go by. The source is
    mapped and written the way a save's shard is, with O_DIRECT where the destination allows it: the
    copy then costs the checksum and no memory copy. Raises FileProblem naming the source when it
    does not match (nothing is left at `destination`), OSError when the destination cannot be written."""
    mapped = map_listed_file(source, record, verify=False, held=True)  # the copier holds the step
    try:
        with memoryview(mapped) as body:
            written = write_shard(destination, b"", body, throttle, progress)
    finally:
        mapped.close()
    if written.checksum != record.checksum:
        os.unlink(destination)
        raise FileProblem(source, f"checksum {written.checksum} does not match the manifest's {record.checksum}")
