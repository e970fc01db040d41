"""Reusable shared-memory staging regions, laid out as safetensors bodies, with back-pressure."""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import threading
import time
import uuid
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch

from ckptd.client.errors import CheckpointError, PoolBusyError
from ckptd.disk.memory_maps import (
    HUGE_PAGE,
    MADV_HUGEPAGE,
    MADV_POPULATE_WRITE,
    SharedMapping,
    collapse_onto_huge_pages,
)
from ckptd.disk.runtime import staging_huge_pages
from ckptd.proto.formats import TensorEntry
from ckptd.proto.layout import REGION_DIR, REGION_PREFIX, REGIONS_PER_COMPONENT

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE

Lease = Tuple[str, int]
"""(staging region name, generation): one save's hold on one region."""


class StagingRegion:
    """One /dev/shm file mapped read-write, allocated once and reused across saves.

    The space is reserved now (posix_fallocate), so a full /dev/shm is a clear error now rather than
    a SIGBUS in the middle of a copy, and every page is mapped in now, so that no copy into the
    region ever takes a page fault: a save's copy costs a warm copy, wherever the region was made
    (ahead of the first save in the background, or by a save whose state outgrew its region).

    With `huge_pages` (the default) the region lies on 2 MiB pages wherever the kernel allows: by
    itself where /dev/shm is mounted `huge=within_size` or `always`; asked for under `huge=advise`
    (its pages then come from mapping it in: the fault reports a full /dev/shm, and fallocate would
    take small pages first); collapsed onto them under the default `huge=never` (Linux 6.1). The
    daemon's O_DIRECT writes then pin 512x fewer pages (ckptd.disk.memory_maps).
    """

    def __init__(self, size: int, huge_pages: bool = True) -> None:
        self.size = max(PAGE, -(-size // PAGE) * PAGE)
        self.name = f"{REGION_PREFIX}{os.getuid()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lease: Optional[int] = None
        """The generation of the save that holds this region (None while it is free)."""
        self._check_room()
        self._map: Optional[SharedMapping] = None
        self.huge_page_bytes = 0
        """Bytes of the region on 2 MiB pages."""
        path = self.path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._map = SharedMapping(fd, self.size, writable=True)
            self.huge_page_bytes = self._reserve(fd, huge_pages)
        except OSError as exc:
            self._close_map()
            os.unlink(path)
            raise self._no_room("no space left" if exc.errno == errno.EFAULT else exc.strerror or str(exc)) from None
        except BaseException:
            self._close_map()
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._unlink_at_exit = weakref.finalize(self, _unlink, path)
        self._bytes = torch.frombuffer(self._map.map, dtype=torch.uint8, count=self.size, offset=self._map.offset)
        self._pinned = False
        self._prefault()

    def _close_map(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _no_room(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot allocate a {self.size / 2**20:.0f} MiB staging region in {REGION_DIR}: {reason}; "
            f"{REGION_DIR} needs room for this rank's state (containers: raise --shm-size)"
        )

    def _check_room(self) -> None:
        """Refuse at once a region larger than what /dev/shm has free, rather than fill it first
        (its pages are memory) and fail at the end."""
        try:
            fs = os.statvfs(REGION_DIR)
        except OSError:
            return
        free = fs.f_bavail * fs.f_frsize
        if self.size > free:
            raise self._no_room(f"{free / 2**20:.0f} MiB free")

    def _reserve(self, fd: int, huge_pages: bool) -> int:
        """Take the region's memory now; returns the bytes on 2 MiB pages. Where the mount gives 2 MiB
        pages they come by themselves (`huge=advise`: asked for); else, with `huge_pages`, the region
        is collapsed onto them before the rest is reserved."""
        mode = staging_huge_pages()
        whole_blocks = self.size // HUGE_PAGE * HUGE_PAGE
        if huge_pages and mode == "advise" and self._populate_huge():
            return whole_blocks
        assert self._map is not None
        collapsed = collapse_onto_huge_pages(fd, self._map) if huge_pages and mode is None else 0
        os.posix_fallocate(fd, 0, self.size)
        return whole_blocks if mode in ("always", "within_size") else collapsed

    def _populate_huge(self) -> bool:
        """Ask for 2 MiB pages, then map every page in; False where the kernel cannot do either
        (no THP; before Linux 5.14). A full /dev/shm raises EFAULT here, where touching would SIGBUS."""
        assert self._map is not None
        try:
            self._map.advise(MADV_HUGEPAGE)
        except OSError:
            return False
        try:
            self._map.advise(MADV_POPULATE_WRITE)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        return True

    def _prefault(self) -> None:
        """Map every page writable now. MADV_POPULATE_WRITE (Linux 5.14) does it in one call, measured
        here at about half the cost of touching each page; older kernels fall back to touching."""
        assert self._map is not None
        try:
            self._map.advise(MADV_POPULATE_WRITE)
        except OSError:
            self._bytes.fill_(0)

    @property
    def path(self) -> str:
        """The region's file."""
        return os.path.join(REGION_DIR, self.name)

    def held_by_checkpoint(self) -> bool:
        """True while a checkpoint's shard file is this region (the daemon kept it: a root on /dev/shm)."""
        try:
            return os.stat(self.path).st_nlink > 1
        except FileNotFoundError:
            return False

    def reclaim(self) -> bool:
        """True if the region may be written: no checkpoint holds it. Gives the file back its full size
        where the daemon trimmed it to a shard's (within its last page: no mapped page is lost)."""
        info = os.stat(self.path)
        if info.st_nlink > 1:
            return False
        if info.st_size < self.size:
            os.truncate(self.path, self.size)
        return True

    def tensor(self, entry: TensorEntry, dtype: torch.dtype, base: int = 0) -> torch.Tensor:
        """A tensor view of the region where `entry` is staged, in a body that starts at `base`."""
        flat = self._bytes[base + entry.offset : base + entry.offset + entry.nbytes]
        return flat.view(dtype).view(entry.shape)

    def block(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor view of `nbytes` of the region starting at `offset`."""
        return self._bytes[offset : offset + nbytes].view(dtype)

    def bytes_view(self, offset: int, nbytes: int) -> memoryview:
        """Raw bytes of the region (for digests)."""
        assert self._map is not None
        return self._map.view()[offset : offset + nbytes]

    def pin_for_cuda(self) -> None:
        """Page-lock the region once so device-to-host copies run asynchronously at full speed."""
        if self._pinned or not torch.cuda.is_available():
            return
        self._pinned = int(torch.cuda.cudart().cudaHostRegister(self._bytes.data_ptr(), self.size, 0)) == 0
        if not self._pinned:
            log.warning("cudaHostRegister failed for staging region %s; copies will be synchronous", self.name)

    def close(self) -> None:
        """Unmap and unlink; the daemon's own mapping (if any) keeps its bytes alive."""
        if self._map is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr())
        del self._bytes
        try:
            self._map.close()
        except BufferError:
            log.debug("region %s still viewed; leaving the unmap to garbage collection", self.name)
        self._map = None
        self._unlink_at_exit()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StagingPool:
    """Staging regions per component key, reused while large enough; a held region blocks or skips a save.

    A reservation is a lease: every region it hands out gets a new generation, and a release frees a
    region only when it names the generation the region holds now, so a late or repeated release of
    an older save never frees a region that already holds the next save's bytes.

    A key normally has one region. Where the daemon keeps a region as a shard file (a root on
    /dev/shm), the region belongs to that checkpoint until retention deletes it, so the key gets
    another: allocated in the background when a release finds its region kept, at most
    REGIONS_PER_COMPONENT per key (beyond that the oldest kept one is let go: its checkpoint holds
    the pages). A region is only written while neither a save nor a checkpoint holds it.
    """

    def __init__(self, huge_pages: bool = True) -> None:
        self._huge_pages = huge_pages
        """Whether new regions go on 2 MiB pages where the kernel allows (StagingRegion)."""
        self._rings: Dict[str, List[StagingRegion]] = {}
        self._key_of: Dict[str, str] = {}
        """Region name -> component key."""
        self._generations = itertools.count(1)
        self._cond = threading.Condition()
        self._allocating: Optional[threading.Thread] = None
        self._spares: Set[str] = set()
        """Keys whose next region is being allocated in the background."""
        self._spares_up_to = REGIONS_PER_COMPONENT
        """Regions per key up to which a spare is allocated in the background (beyond: by the save)."""
        self.allocated_at: Optional[float] = None
        """time.perf_counter() when the last allocate_ahead() finished."""

    def reserve(self, sizes: Dict[str, int], wait: bool, timeout: Optional[float]) -> Dict[str, StagingRegion]:
        """Regions for every key in `sizes`, each leased under a new generation (`region.lease`);
        waits for held ones or raises PoolBusyError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                picked = {key: self._pick(key, size) for key, size in sizes.items()}
                if all(region is not None for region in picked.values()):
                    break
                if not wait:
                    raise PoolBusyError("the previous save still holds this rank's staging regions")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CheckpointError(
                        f"staging regions still busy after {timeout:g} s: the daemon has not finished writing "
                        "the previous save (is it alive? see its log next to its socket)"
                    )
                self._cond.wait(remaining)
            reserved = {}
            for key, region in picked.items():
                assert region is not None
                region.lease = next(self._generations)
                reserved[key] = region
            return reserved

    def _pick(self, key: str, size: int) -> Optional[StagingRegion]:
        """A region of `key` that may be written now (allocated if need be), or None to wait."""
        ring = self._rings.setdefault(key, [])
        free = [r for r in ring if r.lease is None]
        for region in free:
            if region.size >= size and region.reclaim():
                return region
        if key in self._spares or any(r.lease is not None for r in ring):  # one is on its way back
            return None
        kept = [r for r in free if r.held_by_checkpoint()]
        for region in free:
            if region not in kept:  # too small: replaced
                self._discard(key, region)
        if len(ring) >= REGIONS_PER_COMPONENT:
            if not kept:
                return None
            self._discard(key, kept[0])
        return self._add(key, StagingRegion(size, self._huge_pages))

    def _add(self, key: str, region: StagingRegion) -> StagingRegion:
        self._rings.setdefault(key, []).append(region)
        self._key_of[region.name] = key
        return region

    def _discard(self, key: str, region: StagingRegion) -> None:
        self._rings[key].remove(region)
        self._key_of.pop(region.name, None)
        region.close()

    def allocate_ahead(
        self,
        sizes: Dict[str, int],
        regions_per_key: int = 1,
        prepare: Optional[Callable[[Dict[str, StagingRegion]], None]] = None,
    ) -> threading.Thread:
        """Allocate and prefault regions for `sizes` in a background thread (a save that comes first
        waits for the first of each key), so the first save costs a warm copy; returns the thread.
        `regions_per_key` > 1 where regions will be kept as shard files: the ones later saves need
        (spares are allocated in the background up to that many). `prepare`, if given, is called in
        that thread with the first region of each key, for what a save into them needs made first."""
        self._spares_up_to = min(regions_per_key, REGIONS_PER_COMPONENT)

        def allocate() -> None:
            try:
                reserved = self.reserve(sizes, wait=True, timeout=None)
                self.release(leases_of(reserved.values()))
                if prepare is not None:
                    prepare(reserved)
                for key, size in sizes.items():
                    with self._cond:
                        missing = self._spares_up_to - len(self._rings[key])
                    for _ in range(missing):
                        region = StagingRegion(size, self._huge_pages)
                        with self._cond:
                            self._add(key, region)
                            self._cond.notify_all()
            except CheckpointError as exc:
                log.warning("could not allocate staging memory ahead of the first save: %s", exc)
                return
            self.allocated_at = time.perf_counter()
            log.info(
                "staging memory ready: %.0f MiB, %.0f MiB of it on 2 MiB pages (%s is huge=%s)",
                self.staged_bytes() / 2**20,
                self.huge_page_bytes() / 2**20,
                REGION_DIR,
                staging_huge_pages() or "never",
            )

        thread = threading.Thread(target=allocate, name="ckptd-allocate", daemon=True)
        thread.start()
        self._allocating = thread
        return thread

    def wait_allocated(self, timeout: Optional[float] = None) -> bool:
        """Wait for the last allocate_ahead() to finish; True once it has (or none was started)."""
        thread = self._allocating
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def release(self, leases: Iterable[Lease]) -> None:
        """Free the regions whose current lease is one of `leases` ((name, generation) pairs: the
        daemon wrote them, or the save was refused); any other pair is stale and ignored. A region the
        daemon kept as a shard file gets its key a spare, allocated in the background."""
        with self._cond:
            for name, generation in leases:
                key = self._key_of.get(name)
                region = next((r for r in self._rings[key] if r.name == name), None) if key is not None else None
                if region is not None and region.lease == generation:
                    region.lease = None
                    if region.held_by_checkpoint():
                        self._allocate_spare(key, region.size)  # type: ignore[arg-type]
                elif region is not None:
                    log.debug(
                        "ignored a stale release of %s (generation %s, held by %s)", name, generation, region.lease
                    )
            self._cond.notify_all()

    def _allocate_spare(self, key: str, size: int) -> None:
        """Start allocating another region for `key` unless one is free or the key has its most."""
        ring = self._rings[key]
        if key in self._spares or len(ring) >= self._spares_up_to:
            return
        if any(r.lease is None and r.size >= size and not r.held_by_checkpoint() for r in ring):
            return
        self._spares.add(key)

        def allocate() -> None:
            region: Optional[StagingRegion] = None
            try:
                region = StagingRegion(size, self._huge_pages)
            except CheckpointError as exc:
                log.warning("could not allocate a spare staging region for %r: %s", key, exc)
            with self._cond:
                self._spares.discard(key)
                if region is not None:
                    self._add(key, region)
                self._cond.notify_all()

        threading.Thread(target=allocate, name="ckptd-allocate-spare", daemon=True).start()

    def busy(self) -> bool:
        """True while the daemon still holds any region."""
        with self._cond:
            return any(r.lease is not None for ring in self._rings.values() for r in ring)

    def staged_bytes(self) -> int:
        """Total bytes of shared memory this pool holds."""
        with self._cond:
            return sum(r.size for ring in self._rings.values() for r in ring)

    def huge_page_bytes(self) -> int:
        """Bytes of the pool's shared memory on 2 MiB pages."""
        with self._cond:
            return sum(r.huge_page_bytes for ring in self._rings.values() for r in ring)

    def close(self) -> None:
        """Unlink every region (waits for nothing: call after the saves in flight are done)."""
        with self._cond:
            for key, ring in self._rings.items():
                for region in list(ring):
                    self._discard(key, region)

    def names(self) -> List[str]:
        """Names of the regions this pool owns."""
        with self._cond:
            return list(self._key_of)


def leases_of(regions: Iterable[StagingRegion]) -> List[Lease]:
    """(name, generation) of each leased region."""
    return [(r.name, r.lease) for r in regions if r.lease is not None]
