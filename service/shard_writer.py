"""Durable file writes for shards: header plus staged body, checksummed, throttled, fsynced."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from ckptd.proto.formats import Checksum

CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class WrittenFile:
    """Size and checksum of a file that is on disk and fsynced."""

    size: int
    checksum: str


class Throttle:
    """Caps the write bandwidth of every thread that shares it (a token bucket, thread-safe)."""

    def __init__(self, max_bytes_per_second: Optional[float]) -> None:
        self._rate = max_bytes_per_second
        self._lock = threading.Lock()
        self._next_free = time.monotonic()

    @property
    def chunk_bytes(self) -> int:
        """Write granularity: small when throttled so the cap is smooth."""
        if not self._rate:
            return CHUNK_BYTES
        return max(4096, min(CHUNK_BYTES, int(self._rate / 20)))

    def consume(self, nbytes: int) -> None:
        """Block until `nbytes` more may be written."""
        if not self._rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + nbytes / self._rate
            delay = self._next_free - now
        if delay > 0:
            time.sleep(delay)


def write_file(path: str, pieces: Iterable[memoryview | bytes], throttle: Throttle) -> WrittenFile:
    """Create `path` (must not exist), write `pieces` in order, fsync, return size and checksum."""
    checksum = Checksum()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        step = throttle.chunk_bytes
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), step):
                chunk = view[start:start + step]
                throttle.consume(len(chunk))
                checksum.update(chunk)
                _write_all(fd, chunk)
            size += len(view)
        os.fsync(fd)
    finally:
        os.close(fd)
    return WrittenFile(size, checksum.hexdigest())


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    write_file(tmp, [data], Throttle(None))
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
