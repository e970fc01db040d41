"""Shard writes: O_DIRECT from page-aligned memory where the filesystem allows it, buffered on tmpfs;
identical bytes and checksums either way, any size of tail, and a working bandwidth cap."""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

import pytest

from ckptd.disk.safetensors import encode_header, shard_metadata
from ckptd.proto.formats import Checksum, TensorEntry
from ckptd.service.shard_headers import ShardHeaders
from ckptd.service.shard_writer import Throttle, describe_kept_shard, write_shard


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


@pytest.mark.parametrize("throttled", [False, True])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_span_checksums_cover_each_chunk_in_the_same_pass(tmp_path: Path, where: str, throttled: bool) -> None:
    """SHARDED chunks get a checksum each (zero-length ones too), equal to one taken over their bytes
    alone, whichever write path (O_DIRECT on disk, buffered on tmpfs; small pieces when throttled)."""
    directory = tmp_path if where == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    sizes = [5000, 0, 4096, 3 * 1024 * 1024 + 7, 1, 0]
    body = os.urandom(sum(sizes))
    spans, offset = [], 0
    for size in sizes:
        spans.append((offset, size))
        offset += size
    region = page_aligned(body)
    try:
        view = memoryview(region)[: len(body)]
        throttle = Throttle(400 * 1024 * 1024 if throttled else None)
        written = write_shard(str(directory / "x.safetensors"), b"H" * 4096, view, throttle, spans=spans)
        view.release()
        expected = []
        for start, size in spans:
            one = Checksum()
            one.update(body[start : start + size])
            expected.append(one.hexdigest())
        assert list(written.span_checksums) == expected
        kept = describe_kept_shard(b"H" * 4096, memoryview(region)[: len(body)], spans=spans)
        assert (kept.size, kept.checksum, kept.span_checksums) == (
            written.size,
            written.checksum,
            written.span_checksums,
        ), "a region kept as the shard file must be described as its written copy would be"
    finally:
        region.close()
        if where == "tmpfs":
            for p in directory.iterdir():
                p.unlink()
            directory.rmdir()


def test_shard_headers_are_encoded_once_per_tensor_tuple_and_match_encode_header() -> None:
    tensors = tuple(TensorEntry(f"t{i}", "F32", (4, i), 16 * i * i, 16 * i) for i in range(1, 50))
    metadata = shard_metadata("model", "global")
    header = encode_header(tensors, metadata)
    headers = ShardHeaders()
    first = headers.header(tensors, metadata)
    assert first == header and headers.header(tensors, metadata) is first  # the second is remembered
    other_scope = shard_metadata("model", "rank-1")
    assert headers.header(tensors, other_scope) == encode_header(tensors, other_scope)
    room = len(header) + 4096
    assert headers.header(tensors, metadata, room=room) == encode_header(tensors, metadata, room=room)
    with pytest.raises(ValueError, match="more than the"):
        headers.header(tensors, metadata, room=64)
    # Equal tensors in another tuple (a new full request) are encoded anew, to the same bytes.
    again = tuple(list(tensors))
    assert headers.header(again, metadata) == header and headers.header(again, metadata) is not first
    changed = tensors[:-1] + (TensorEntry("t49", "BF16", (4, 49), tensors[-1].offset, 8 * 49),)
    assert headers.header(changed, metadata) == encode_header(changed, metadata) != header
