"""Read-only mappings of the clients' shared-memory staging regions."""

from __future__ import annotations

import mmap
import os
import stat
from typing import Optional

from ckptd.proto.layout import REGION_PREFIX
from ckptd.service.errors import RegionError

SHM_DIR = "/dev/shm"


class MappedRegion:
    """A client's staging region mapped by name; the mapping keeps the bytes alive even if the
    client dies and the name is unlinked, so the daemon owns the data once it has mapped it."""

    def __init__(self, name: str, size: int, owner_pid: Optional[int] = None) -> None:
        if not name.startswith(REGION_PREFIX) or "/" in name or "\0" in name:
            raise RegionError(f"region name {name!r} is not a ckptd shared-memory region")
        self.name = name
        self.owner_pid = owner_pid
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise RegionError(f"cannot open shared-memory region {name!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise RegionError(f"region {name!r} is not a regular file owned by this user")
            if info.st_size < size:
                raise RegionError(f"region {name!r} holds {info.st_size} bytes, fewer than the {size} announced")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        finally:
            os.close(fd)
        self.size = size

    def view(self, nbytes: int) -> memoryview:
        """The first `nbytes` of the region."""
        if nbytes > self.size:
            raise RegionError(f"{nbytes} bytes requested from region {self.name!r} of {self.size}")
        if self._map is None:
            return memoryview(b"")
        return memoryview(self._map)[:nbytes]

    def drop_pages(self, offset: int, length: int) -> None:
        """Unmap pages that are written (the bytes stay in the client's region): the daemon's resident
        memory then stays at one write chunk, whatever the checkpoint size."""
        start = offset - offset % mmap.PAGESIZE
        if self._map is not None and length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, min(self.size, offset + length) - start)

    def close(self) -> None:
        """Unmap; if the owning client is gone, also unlink the name it can no longer clean up."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.owner_pid is not None and not pid_alive(self.owner_pid):
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


def pid_alive(pid: int) -> bool:
    """True if a process with `pid` runs on this node (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: a process that exists counts as alive


def sweep_orphaned_regions() -> list[str]:
    """Unlink this user's staging regions whose owning process is gone (killed trainers).

    Region names are `ckptd-<uid>-<pid>-<token>`, so the owner is known without any state.
    """
    prefix = f"{REGION_PREFIX}{os.getuid()}-"
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
