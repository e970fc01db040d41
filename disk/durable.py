"""Writes that survive a crash: fsync of directories, durable directory creation, atomic replace."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid

TMP_SUFFIX = ".tmp"
"""Suffix of an atomic write's temporary file (a leftover is removed by the root's leftover sweep)."""


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """Create `path` and its missing parents, fsyncing the parent of each directory created, so that
    the new entries survive a power cut (fsync of a directory covers what is in it, not its own entry)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current) and os.path.dirname(current) != current:
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", directory) from None
        fsync_dir(os.path.dirname(directory))


def temp_name(path: str) -> str:
    """A temporary name beside `path`, unique to this call, so that writers of one path never collide."""
    return f"{path}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def write_atomic(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync the directory. With
    `durable=False`, no fsync: for records whose loss in a crash is harmless (a lease the crash ends)."""
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")
