"""The limits the other rows are read against: copying the state (memcpy limit; device-to-host on
CUDA) and writing its bytes once (buffered write+fsync limit, and the O_DIRECT write for
reference), plus the disk probe each writing row takes before and after its saves.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple

from bench_saver import Pending, RowNotApplicable, Saver, finished
from bench_state import RowContext

from ckptd.disk.memory_maps import MADV_COLLAPSE, MADV_POPULATE_WRITE, collapse_works_in
from ckptd.disk.runtime import staging_huge_pages
from ckptd.proto.layout import REGION_DIR

TENSOR_ALIGNMENT = 64
"""Bytes each of the memcpy limit's host buffers is aligned to (as torch's CPU allocator does)."""


def staging_huge_pages_from() -> Optional[str]:
    """What gives ckptd's staging regions 2 MiB pages on this machine (by default): /dev/shm's mount,
    or ckptd collapsing its regions onto them; None where they get 4 KiB pages."""
    mode = staging_huge_pages()
    if mode:
        return f"/dev/shm huge={mode}"
    return "collapsed by ckptd; /dev/shm is huge=never" if collapse_works_in(REGION_DIR) else None


def staging_pages() -> str:
    """The pages ckptd's staging gets here, and so the limits' buffers, for the bench's header."""
    source = staging_huge_pages_from()
    return f"2 MiB pages ({source})" if source else "4 KiB pages"


def host_buffer(size: int) -> mmap.mmap:
    """A private anonymous buffer of `size` bytes, every page mapped in, on the pages ckptd's staging
    gets here: the limits copy into and write from the same kind of memory as ckptd does (on 2 MiB
    pages a copy takes fewer TLB misses and an O_DIRECT write pins 512x fewer pages)."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    huge = staging_huge_pages_from() is not None
    buffer.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    buffer.madvise(MADV_POPULATE_WRITE)
    if huge:
        try:  # where THP is `never` for anonymous memory, as ckptd collapses its regions
            buffer.madvise(MADV_COLLAPSE)
        except OSError:
            pass
    return buffer


class MemcpySaver(Saver):
    """Copy every tensor into preallocated, prefaulted buffers of the same shape. On CPU: views of one
    host_buffer. On CUDA: the device-to-host limit, pinned host buffers filled with non-blocking
    copies, then a synchronize."""

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        self.buffers = [ctx.host_empty(t) for t in ctx.tensors] if ctx.cuda else self._host_views(ctx)
        self.save(-1)  # prefault

    def _host_views(self, ctx: RowContext) -> List[Any]:
        torch = self.torch
        sizes = [t.numel() * t.element_size() for t in ctx.tensors]
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + -(-size // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT)
        memory = torch.frombuffer(host_buffer(max(starts[-1], mmap.PAGESIZE)), dtype=torch.uint8)
        return [
            memory[start : start + size].view(t.dtype).view(t.shape)
            for start, size, t in zip(starts, sizes, ctx.tensors)
        ]

    def save(self, i: int) -> Pending:
        with self.torch.no_grad():
            for buffer, tensor in zip(self.buffers, self.ctx.tensors):
                buffer.copy_(tensor, non_blocking=self.ctx.cuda)
        self.ctx.sync()
        return finished()


def fill_with_state(torch: Any, target: Any, tensors: Sequence[Any]) -> None:
    """Copy the state's bytes, tensor after tensor, into the uint8 host tensor `target` (which also
    prefaults it): the write limits write the same bytes as the savers, zero pages included. Device
    tensors are copied to the host here, once, at setup: the write limits measure the disk alone."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            target[offset : offset + flat.numel()].copy_(flat)
            offset += flat.numel()
    target[offset:].fill_(0)


class WriteSaver(Saver):
    """One sequential write of the state's bytes from a prefaulted buffer, then fsync."""

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        length = self.write_length(ctx.nbytes)
        self.buffer = host_buffer(max(length, mmap.PAGESIZE))  # anonymous mappings are page-aligned
        staged = self.torch.frombuffer(self.buffer, dtype=self.torch.uint8)
        fill_with_state(self.torch, staged, ctx.tensors)
        del staged
        self.view = memoryview(self.buffer)[:length]

    @staticmethod
    def write_length(nbytes: int) -> int:
        """Bytes each save writes for a state of `nbytes`."""
        return nbytes

    def close(self) -> None:
        self.view.release()
        self.buffer.close()

    prefix, flags = "write", 0
    background = True

    def save(self, i: int) -> Pending:
        self.write(i)
        return finished()

    def write(self, i: int) -> None:
        """Write the buffer into a new file for save `i` and fsync it."""
        path = os.path.join(self.workdir, f"{self.prefix}-{i:03d}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self.flags, 0o644)
        try:
            self._write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.last_output = path

    def _write(self, fd: int) -> None:
        """Write the state's bytes into `fd` (in one call)."""
        view = self.view
        while view:
            view = view[os.write(fd, view) :]

    def background_save(self, i: int) -> Optional[Pending]:
        """The bare write in a thread (os.write and fsync release the GIL): what the I/O alone costs
        the training loop, the reference for the background writers' throughput."""
        return self.write_in_thread(i)

    def write_in_thread(self, i: int) -> Pending:
        """Start `write(i)` in a thread of this process."""
        thread = threading.Thread(target=self.write, args=(i,), name="bench-write", daemon=True)
        thread.start()
        return Pending(lambda: not thread.is_alive(), thread.join)


def _check_o_direct(workdir: str) -> None:
    """Raise RowNotApplicable unless files in `workdir` can be opened with O_DIRECT."""
    probe = os.path.join(workdir, "direct-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as exc:
        raise RowNotApplicable(f"O_DIRECT is not supported in {workdir}: {exc.strerror}") from None
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


class DirectWriteSaver(WriteSaver):
    """The same write with O_DIRECT (page cache bypassed, as ckptd's daemon writes where it can),
    from a page-aligned prefaulted buffer, the length rounded up to a page; then fsync."""

    prefix = "direct"

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        if not hasattr(os, "O_DIRECT"):
            raise RowNotApplicable("this platform has no O_DIRECT")
        super().__init__(ctx, workdir)
        self.flags = os.O_DIRECT
        _check_o_direct(workdir)

    @staticmethod
    def write_length(nbytes: int) -> int:
        return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


class FloorSaver(DirectWriteSaver):
    """The training-lost floor as one saver, for samples interleaved with ckptd's in the ckptd rows'
    own process: `save` copies every tensor into the O_DIRECT row's page-aligned prefaulted buffer
    (the memcpy limit; `copy` alone times that) and returns with the O_DIRECT write + fsync of the
    buffer running in a thread; with `checksummed` set, the write checksums as it goes, as the
    checksummed row does. Host state only: on CUDA the memcpy limit copies into pinned buffers."""

    prefix = "floor"
    blocking = False
    checksummed = False

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        if ctx.cuda:
            raise RowNotApplicable("the interleaved floor copies host tensors; on CUDA the memcpy row is the limit")
        os.makedirs(workdir, exist_ok=True)
        super().__init__(ctx, workdir)
        staged = self.torch.frombuffer(self.buffer, dtype=self.torch.uint8)
        self._copies: List[Tuple[Any, Any]] = []  # (destination, source) byte views, made once
        offset = 0
        for tensor in ctx.tensors:
            source = tensor.detach().view(-1).view(self.torch.uint8)  # a view, never a copy
            self._copies.append((staged[offset : offset + source.numel()], source))
            offset += source.numel()

    def copy(self) -> None:
        """Copy the live state into the buffer, tensor after tensor (what the memcpy limit times)."""
        with self.torch.no_grad():
            for destination, source in self._copies:
                destination.copy_(source)

    def save(self, i: int) -> Pending:
        self.copy()
        return self.write_in_thread(i)

    def _write(self, fd: int) -> None:
        if self.checksummed:
            write_checksummed(fd, self.view)
        else:
            super()._write(fd)

    def close(self) -> None:
        self._copies.clear()
        super().close()
        for name in os.listdir(self.workdir):
            if name.startswith(f"{self.prefix}-"):
                os.unlink(os.path.join(self.workdir, name))


def write_checksummed(fd: int, view: memoryview) -> None:
    """Write `view` into `fd` in the chunks ckptd's daemon writes, each fed to ckptd's checksum first."""
    from ckptd.proto.formats import Checksum
    from ckptd.service.shard_writer import DIRECT_CHUNK_BYTES

    checksum = Checksum()
    for start in range(0, len(view), DIRECT_CHUNK_BYTES):
        chunk = view[start : start + DIRECT_CHUNK_BYTES]
        checksum.update(chunk)
        while chunk:
            chunk = chunk[os.write(fd, chunk) :]


class ChecksummedDirectWriteSaver(DirectWriteSaver):
    """The O_DIRECT write, in the chunks ckptd's daemon writes, each checksummed with ckptd's checksum
    before it is written: the least a saver whose files can be verified writes for (ckptd's daemon
    also checksums every byte it writes)."""

    prefix = "direct-checksummed"

    def _write(self, fd: int) -> None:
        write_checksummed(fd, self.view)


def disk_probe(torch: Any, ctx: RowContext, path: str) -> float:
    """Seconds to write the state's bytes straight from the live tensors into a new file (buffered,
    like the write+fsync limit) and fsync it: the disk's speed at this moment, for this row. Device
    tensors are copied to the host one at a time first; those copies are not counted."""
    started = time.perf_counter()
    copying = 0.0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for tensor in ctx.tensors:
            t = time.perf_counter()
            host = tensor.detach().cpu()  # the tensor itself when it is on the host already
            copying += time.perf_counter() - t
            view = memoryview(host.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started - copying
