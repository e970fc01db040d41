"""ckptd.disk.memory_maps on real /dev/shm files: mappings at 2 MiB-aligned addresses that read and
write the file, read-only ones that refuse writes, an unmap refused while a view lives, and staging
files collapsed onto 2 MiB pages whole blocks at a time (this kernel can: Linux 6.1+)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ckptd.disk.memory_maps import (
    HUGE_PAGE,
    MADV_POPULATE_WRITE,
    SharedMapping,
    collapse_onto_huge_pages,
    collapse_works_in,
)

MIB = 2**20


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/ckptd-test-memory-maps-{os.getpid()}")
    yield path
    path.unlink(missing_ok=True)


def _pmd_mapped_bytes(address: int) -> int:
    """ShmemPmdMapped of this process's mapping that starts at `address`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{address:x}-"))
    return next(int(line.split()[1]) * 1024 for line in lines[start + 1 :] if line.startswith("ShmemPmdMapped:"))


def test_a_writable_mapping_is_aligned_and_is_the_file(shm_file: Path) -> None:
    fd = os.open(shm_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 3 * MIB)
        mapping = SharedMapping(fd, 3 * MIB, writable=True)
        assert mapping.address is not None and mapping.address % HUGE_PAGE == 0
        view = mapping.view()
        assert len(view) == 3 * MIB
        view[5 : 5 + 4] = b"ckpt"
        view[-1:] = b"!"
        assert os.pread(fd, 4, 5) == b"ckpt" and os.pread(fd, 1, 3 * MIB - 1) == b"!"
        with pytest.raises(BufferError):
            mapping.close()  # a view still uses the range
        view.release()
        mapping.close()
    finally:
        os.close(fd)


def test_a_read_only_mapping_reads_the_file_and_refuses_writes(shm_file: Path) -> None:
    shm_file.write_bytes(b"x" * MIB + b"tail")
    fd = os.open(shm_file, os.O_RDONLY)
    try:
        mapping = SharedMapping(fd, MIB + 4, writable=False)
    finally:
        os.close(fd)
    view = mapping.view()
    assert view.readonly and bytes(view[MIB:]) == b"tail"
    with pytest.raises(TypeError):
        view[0:1] = b"y"
    view.release()
    mapping.close()


def test_advise_names_the_error_of_an_unknown_advice(shm_file: Path) -> None:
    fd = os.open(shm_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, MIB)
        mapping = SharedMapping(fd, MIB, writable=True)
        mapping.advise(MADV_POPULATE_WRITE)
        with pytest.raises(OSError) as refused:
            mapping.advise(12345)
        assert refused.value.errno == 22
        mapping.close()
    finally:
        os.close(fd)


def test_a_fresh_file_is_collapsed_onto_2mib_pages_whole_blocks_at_a_time(shm_file: Path) -> None:
    assert collapse_works_in("/dev/shm"), "this kernel cannot collapse /dev/shm files (MADV_COLLAPSE: Linux 6.1+)"
    size = 2 * HUGE_PAGE + 4096  # two whole blocks and a page
    fd = os.open(shm_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        mapping = SharedMapping(fd, size, writable=True)
        assert collapse_onto_huge_pages(fd, mapping) == 2 * HUGE_PAGE
        os.posix_fallocate(fd, 0, size)
        mapping.advise(MADV_POPULATE_WRITE)
        assert mapping.address is not None
        assert _pmd_mapped_bytes(mapping.address) == 2 * HUGE_PAGE
        assert os.pread(fd, size, 0) == bytes(size)  # still the empty file it was
        mapping.close()
    finally:
        os.close(fd)


def _saw_other_threads_run_during(call: Callable[[], None]) -> bool:
    """Whether this thread got to run Python while `call` ran in another thread. The switch interval
    is raised so far that a thread gives the GIL up only where it blocks or releases it itself."""
    running = [False]
    seen = False

    def target() -> None:
        running[0] = True
        call()
        running[0] = False

    thread = threading.Thread(target=target)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        thread.start()
        while thread.is_alive():
            seen = seen or running[0]
            time.sleep(0.001)
    finally:
        sys.setswitchinterval(interval)
        thread.join()
    return seen


def test_advise_lets_the_training_thread_run_while_the_kernel_populates(shm_file: Path) -> None:
    """A region is populated in a background thread; mmap.madvise held the GIL for the whole call
    (the trainer's Python stalled for as long: 1.45 s for 1 GiB). This test fails with it."""
    size = 256 * MIB
    fd = os.open(shm_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        mapping = SharedMapping(fd, size, writable=True)
        assert _saw_other_threads_run_during(lambda: mapping.advise(MADV_POPULATE_WRITE))
        mapping.close()
    finally:
        os.close(fd)
