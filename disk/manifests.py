"""Reading a checkpoint's manifest, and the locks on it that keep a checkpoint from being deleted
while it is loaded."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator, Optional

from ckptd.disk.durable import write_atomic
from ckptd.proto import layout
from ckptd.proto.manifest import Manifest, ManifestError


class ManifestProblem(ManifestError):
    """A checkpoint's manifest cannot be read; `reason` says why, without the path."""

    def __init__(self, path: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


def manifest_path(checkpoint_dir: str) -> str:
    """Where a checkpoint's manifest lives."""
    return os.path.join(checkpoint_dir, layout.MANIFEST_NAME)


def read_manifest(checkpoint_dir: str) -> Manifest:
    """Parse a checkpoint's manifest; raises ManifestProblem naming the file and what is wrong
    with it (missing: the directory is not a committed checkpoint)."""
    path = manifest_path(checkpoint_dir)
    try:
        with open(path, encoding="utf-8") as f:
            return Manifest.from_json(f.read())
    except FileNotFoundError:
        reason = f"is missing: {checkpoint_dir} is not a committed checkpoint"
        raise ManifestProblem(path, reason, f"{path} {reason}") from None
    except (ManifestError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestProblem(path, str(exc), f"{path}: {exc}") from None


def write_manifest(checkpoint_dir: str, manifest_json: str) -> None:
    """Write a checkpoint's manifest (atomically and durably): the commit marker, written last."""
    write_atomic(manifest_path(checkpoint_dir), manifest_json.encode())


def has_manifest(checkpoint_dir: str) -> bool:
    """True if the directory holds a manifest file (without reading it)."""
    return os.path.isfile(manifest_path(checkpoint_dir))


@contextlib.contextmanager
def hold_for_loading(checkpoint_dir: str) -> Iterator[None]:
    """Hold a shared lock on the checkpoint's manifest: retention does not delete a checkpoint while a
    loader holds it (the files a loader has mapped stay readable after that)."""
    try:
        fd = os.open(manifest_path(checkpoint_dir), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield  # reading the manifest will report what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_for_deleting(checkpoint_dir: str) -> Iterator[Optional[int]]:
    """Try to take the exclusive lock on the checkpoint's manifest: yields the locked descriptor, or
    None while a loader holds it or the manifest is gone."""
    try:
        fd = os.open(manifest_path(checkpoint_dir), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)
