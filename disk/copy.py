"""Copying a committed checkpoint's files into another tier's directory, each one checked against
its manifest record as it is copied (a corrupt source is never passed on)."""

from __future__ import annotations

import os
import stat
from typing import Callable

from ckptd.disk.files import FileProblem
from ckptd.proto.formats import Checksum
from ckptd.proto.manifest import FileRecord

COPY_CHUNK = 8 * 1024 * 1024

Pace = Callable[[int], None]
"""Called after each chunk is written, with its size: the caller's progress and throttle (it may
sleep, or raise to stop the copy)."""


def copy_listed_file(
    source: str, destination: str, record: FileRecord, pace: Pace, chunk_bytes: int = COPY_CHUNK
) -> None:
    """Copy `source` (a file a manifest lists as `record`) to `destination` (created, never replaced),
    fsynced, checking the bytes against the record's size and checksum as they go by. Raises
    FileProblem naming the source when it does not match (the partial copy is removed), OSError when
    the destination cannot be written."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileProblem(source, "is listed in the manifest but missing") from None
    except OSError as exc:
        raise FileProblem(source, f"cannot be opened ({exc.strerror}); symlinks are refused") from None
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(source, "is not a regular file")
        if info.st_size != record.size:
            raise FileProblem(source, f"holds {info.st_size} bytes, the manifest says {record.size}")
        dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            digest = _copy(source, src, dst, record.size, pace, chunk_bytes)
            if digest != record.checksum:
                raise FileProblem(source, f"checksum {digest} does not match the manifest's {record.checksum}")
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            os.unlink(destination)
            raise
        os.close(dst)
    finally:
        os.close(src)


def _copy(source: str, src: int, dst: int, size: int, pace: Pace, chunk_bytes: int) -> str:
    checksum = Checksum()
    buffer = bytearray(min(chunk_bytes, max(size, 1)))
    view = memoryview(buffer)
    copied = 0
    while copied < size:
        n = os.readv(src, [view[: min(len(buffer), size - copied)]])
        if n == 0:
            raise FileProblem(source, f"ended after {copied} of {size} bytes (truncated while copied)")
        chunk = view[:n]
        checksum.update(chunk)
        written = 0
        while written < n:
            written += os.write(dst, chunk[written:])
        copied += n
        pace(n)
    return checksum.hexdigest()
