"""Mappings of staging files in /dev/shm: at 2 MiB-aligned addresses, advised without holding the
GIL, and put on 2 MiB pages where the kernel can, whatever the mount's `huge=` says.

Python's `mmap` cannot choose an address, and its `madvise` holds the GIL for the whole call (a
1 GiB MADV_POPULATE_WRITE in a background thread stalled the training thread's Python for 1.45 s,
measured), so both go through libc here. On 2 MiB pages an O_DIRECT write of 1 GiB from the
mapping took 0.004 s of CPU and 0.24 s, against 0.04 s and 0.51 s on 4 KiB pages (README,
"Staging memory on 2 MiB pages").
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from typing import Optional

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
"""The PMD page size of x86-64 and arm64 (4 KiB base pages)."""
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
"""Linux 5.14."""
MADV_COLLAPSE = 25
"""Linux 6.1: move a range onto 2 MiB pages now, independent of the THP settings (except `deny`)."""
COLLAPSE_CHUNK = 32 << 20
"""Bytes collapsed per call: a failure (no free 2 MiB block) costs one chunk, not the region."""
MAP_FIXED = 0x10
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.13 names it; 0x4000 on x86-64 and arm64

_PROT_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE


def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _address(mapped: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export, so close() stays possible


class SharedMapping:
    """The first `size` bytes of a file mapped shared, at a 2 MiB-aligned address where libc allows
    (else wherever mmap puts them).

    `map` is a Python mmap that owns the whole address range: its buffer exports (`view()`, tensors
    made from it) keep the range mapped, and close() unmaps it all. The file starts `offset` bytes
    into it. Aligned, a 2 MiB page of the file can be mapped by one page-table entry in every
    process that maps it so.
    """

    def __init__(self, fd: int, size: int, writable: bool) -> None:
        self.size = size
        self.writable = writable
        prot = _PROT_READ_WRITE if writable else mmap.PROT_READ
        self.offset = 0
        self.address: Optional[int] = None
        """Where the file's first byte is mapped (None where libc cannot say: advise() holds the GIL)."""
        span = self._map_aligned(fd, size, prot)
        if span is None:
            span = mmap.mmap(fd, size, prot=prot)
            if writable and _LIBC is not None:
                self.address = _address(span)
        self.map = span

    def _map_aligned(self, fd: int, size: int, prot: int) -> Optional[mmap.mmap]:
        """Reserve size + 2 MiB of anonymous address space (writable, so that ctypes can name its
        address; never touched and not reserved, so it takes no memory), then map the file over it
        from its first 2 MiB-aligned byte; None where that cannot be done."""
        if _LIBC is None:
            return None
        try:
            span = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        except OSError:
            return None
        start = _address(span)
        offset = -start % HUGE_PAGE
        placed = _LIBC.mmap(start + offset, size, prot, mmap.MAP_SHARED | MAP_FIXED, fd, 0)
        if placed != start + offset:
            log.debug("could not map a staging file at an aligned address: %s", os.strerror(ctypes.get_errno()))
            span.close()
            return None
        self.offset, self.address = offset, start + offset
        return span

    def view(self) -> memoryview:
        """The file's bytes (read-only unless mapped writable)."""
        whole = memoryview(self.map)[self.offset : self.offset + self.size]
        return whole if self.writable else whole.toreadonly()

    def advise(self, advice: int, start: int = 0, length: Optional[int] = None) -> None:
        """madvise(2) on [start, start + length) of the file's bytes, without holding the GIL;
        raises OSError (EINVAL where this kernel does not know `advice`)."""
        length = self.size - start if length is None else length
        if _LIBC is None or self.address is None:
            self.map.madvise(advice, self.offset + start, length)
            return
        if _LIBC.madvise(self.address + start, length, advice) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def close(self) -> None:
        """Unmap the range; BufferError while a view or a tensor still uses it (as mmap.close)."""
        self.map.close()


def collapse_onto_huge_pages(fd: int, mapping: SharedMapping) -> int:
    """Put every whole 2 MiB block of a freshly sized, still empty file on a 2 MiB page; returns the
    bytes that got one (0 where the kernel cannot: before Linux 6.1, `shmem_enabled=deny`, or no
    aligned mapping). One byte is written at the start of each block first, so that MADV_COLLAPSE
    finds a page to collapse and fills the rest of the block itself: measured here at 0.06 s per GiB
    where the kernel has free 2 MiB blocks, against 0.6 s to populate 4 KiB pages (compaction, where
    memory is fragmented, took up to 2.5 s per GiB). A full /dev/shm raises OSError(ENOSPC)."""
    blocks = mapping.size // HUGE_PAGE * HUGE_PAGE
    if blocks == 0 or mapping.address is None or mapping.address % HUGE_PAGE:
        return 0
    for block in range(0, blocks, HUGE_PAGE):
        os.pwrite(fd, b"\0", block)
    collapsed = 0
    for start in range(0, blocks, COLLAPSE_CHUNK):
        length = min(COLLAPSE_CHUNK, blocks - start)
        try:
            mapping.advise(MADV_COLLAPSE, start, length)
        except OSError as exc:
            if exc.errno == errno.EINVAL and collapsed == 0:
                return 0  # not supported here: no use trying the other chunks
            log.debug("could not put %d MiB of a staging region on 2 MiB pages: %s", length >> 20, exc)
            continue
        collapsed += length
    return collapsed


def collapse_works_in(directory: str) -> bool:
    """True where collapse_onto_huge_pages() puts a file in `directory` on 2 MiB pages: probed with
    one 2 MiB file, removed at once (False too where the probe cannot be made: no room, no O_TMPFILE)."""
    try:
        fd = os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o600)
    except OSError:
        return False
    try:
        os.ftruncate(fd, HUGE_PAGE)
        mapping = SharedMapping(fd, HUGE_PAGE, writable=True)
        try:
            return collapse_onto_huge_pages(fd, mapping) == HUGE_PAGE
        finally:
            mapping.close()
    except OSError:
        return False
    finally:
        os.close(fd)
