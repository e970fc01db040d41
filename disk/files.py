"""Checking a file a manifest lists: a regular file (no symlink) of the recorded size and checksum."""

from __future__ import annotations

import mmap
import os
import stat
from typing import Callable, Optional

from ckptd.proto.formats import Checksum
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
    path: str, record: FileRecord, *, verify: bool = True, progress: Optional[Progress] = None
) -> mmap.mmap:
    """Map a listed file privately (copy-on-write, so views over it are writable without copying)
    after checking it is a regular file of the recorded size and, with `verify`, checksum; raises
    FileProblem saying what does not match."""
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
        mapped = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if verify:
        digest = _checksum(mapped, progress)
        if digest != record.checksum:
            mapped.close()
            raise FileProblem(path, f"checksum {digest} does not match the manifest's {record.checksum}")
    return mapped


def check_listed_file(path: str, record: FileRecord, progress: Optional[Progress] = None) -> None:
    """Check a listed file in full (type, size, checksum); raises FileProblem."""
    map_listed_file(path, record, verify=True, progress=progress).close()


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
