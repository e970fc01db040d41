"""Checking a file a manifest lists: a regular file (no symlink) of the recorded size and checksum."""

from __future__ import annotations

import mmap
import os
import stat
from typing import Callable, Optional

from ckptd.proto.formats import Checksum
from ckptd.proto.layout import REGION_DIR
from ckptd.proto.manifest import FileRecord

CHECK_CHUNK = 8 * 1024 * 1024

Progress = Callable[[int], None]
"""Called with the number of bytes just checked."""


class FileProblem(Exception):
    """A listed file does not match its record; `reason` completes the sentence "<path> ..."."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def map_listed_file(
    path: str, record: FileRecord, *, verify: bool = True, progress: Optional[Progress] = None, held: bool = False
) -> mmap.mmap:
    """Map a listed file privately (copy-on-write, so views over it are writable without copying)
    after checking it is a regular file of the recorded size and, with `verify`, checksum; raises
    FileProblem saying what does not match. A file that is also a staging region is read into a copy
    instead, unless the caller `held` the checkpoint against deletion for as long as it maps it."""
    try:
        # O_NONBLOCK: opening a FIFO planted under a listed name must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileProblem(path, "is listed in the manifest but missing") from None
    except OSError as exc:
        raise FileProblem(path, f"cannot be opened ({exc.strerror}); symlinks are refused") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(path, "is not a regular file")
        if info.st_size != record.size:
            raise FileProblem(
                path, f"holds {info.st_size} bytes, the manifest says {record.size} (truncated or altered)"
            )
        if info.st_size == 0:
            raise FileProblem(path, "is empty")
        if not held and info.st_nlink > 1 and _beside_regions(info):
            # Possibly a client's staging region kept as this shard: the client writes it again once the
            # checkpoint is deleted, and a private mapping's untouched pages would follow. Read a copy.
            mapped = _read_copy(fd, info.st_size)
        else:
            mapped = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if verify:
        digest = _checksum(mapped, progress)
        if digest != record.checksum:
            mapped.close()
            raise FileProblem(path, f"checksum {digest} does not match the manifest's {record.checksum}")
    return mapped


def beside_regions(path: str) -> bool:
    """True if `path` (or, before it exists, its nearest existing parent) is on the staging regions'
    filesystem: a daemon with its root there keeps regions as shard files."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return _beside_regions(os.stat(path))
    except OSError:
        return False


def _beside_regions(info: os.stat_result) -> bool:
    try:
        return info.st_dev == os.stat(REGION_DIR).st_dev
    except OSError:
        return False


def _read_copy(fd: int, size: int) -> mmap.mmap:
    copy = mmap.mmap(-1, size)
    with memoryview(copy) as view:
        done = 0
        while done < size:
            read = os.preadv(fd, [view[done : done + CHECK_CHUNK]], done)
            if read == 0:
                raise OSError(f"the file ended after {done} of {size} bytes")
            done += read
    return copy


def check_listed_file(path: str, record: FileRecord, progress: Optional[Progress] = None) -> None:
    """Check a listed file in full (type, size, checksum); raises FileProblem."""
    map_listed_file(path, record, verify=True, progress=progress, held=True).close()


def _checksum(mapped: mmap.mmap, progress: Optional[Progress]) -> str:
    mapped.madvise(mmap.MADV_SEQUENTIAL)
    checksum = Checksum()
    with memoryview(mapped) as view:
        for start in range(0, len(view), CHECK_CHUNK):
            with view[start : start + CHECK_CHUNK] as chunk:
                checksum.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return checksum.hexdigest()
