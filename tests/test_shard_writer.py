"""Shard writes: O_DIRECT from page-aligned memory where the filesystem allows it, buffered on tmpfs;
identical bytes and checksums either way, any size of tail, and a working bandwidth cap."""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

import pytest

from ckptd.proto.formats import Checksum
from ckptd.service.shard_writer import Throttle, write_shard


def page_aligned(data: bytes) -> mmap.mmap:
    region = mmap.mmap(-1, max(len(data), 1))
    region[: len(data)] = data
    return region


@pytest.mark.parametrize("body_size", [0, 1, 4095, 4096, 4097, 3 * 1024 * 1024 + 123])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_shard_bytes_and_checksum_match_for_any_tail(tmp_path: Path, body_size: int, where: str) -> None:
    directory = tmp_path if where == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    header = b"H" * 4096
    body = os.urandom(body_size)
    region = page_aligned(body)
    try:
        view = memoryview(region)[:body_size]
        written = write_shard(str(directory / "x.safetensors"), header, view, Throttle(None))
        view.release()
        data = (directory / "x.safetensors").read_bytes()
        expected = Checksum()
        expected.update(header + body)
        assert data == header + body
        assert written.size == len(data) and written.checksum == expected.hexdigest()
    finally:
        region.close()
        if where == "tmpfs":
            for p in directory.iterdir():
                p.unlink()
            directory.rmdir()


def test_throttle_caps_bandwidth(tmp_path: Path) -> None:
    region = page_aligned(os.urandom(2 * 1024 * 1024))
    started = time.monotonic()
    view = memoryview(region)
    write_shard(str(tmp_path / "slow"), b" " * 4096, view, Throttle(4e6))  # 2 MB at 4 MB/s
    view.release()
    region.close()
    assert time.monotonic() - started >= 0.4
