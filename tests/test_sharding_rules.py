"""The pure rules of SHARDED components (ckptd.proto.sharding): who writes a replicated chunk, and
whether the saved chunks tile each tensor exactly once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ckptd.proto.sharding import CHECKSUM_BLOCK_BYTES, Box, ChunkRecord, checksum_blocks, chunk_owners, coverage_problem


def chunk(offsets: tuple, sizes: tuple, shape: tuple = (10, 4), file: str = "c/rank-00000.safetensors") -> ChunkRecord:
    return ChunkRecord("w", file, "F32", shape, Box(offsets, sizes), ("xxh3_64:0",))


@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=8), st.integers(0, 10**6)), unique_by=lambda c: c[0]),
    st.lists(st.integers(0, 64), min_size=1, max_size=8, unique=True),
)
def test_every_replica_picks_the_same_owners_whatever_order_it_lists_them(chunks: list, replicas: list) -> None:
    owners = chunk_owners(chunks, replicas)
    assert owners == chunk_owners(list(reversed(chunks)), list(reversed(replicas)))
    assert set(owners) == {name for name, _ in chunks} and set(owners.values()) <= set(replicas)


def test_owners_are_balanced_by_bytes() -> None:
    chunks = [(f"t{i}", size) for i, size in enumerate([100, 90, 60, 40, 10, 10])]
    owners = chunk_owners(chunks, [3, 7])
    load = {3: 0, 7: 0}
    for name, size in chunks:
        load[owners[name]] += size
    assert load == {3: 150, 7: 160} or load == {3: 160, 7: 150}


def test_coverage_accepts_a_tiling_and_identical_duplicates() -> None:
    tiles = [chunk((0, 0), (5, 4)), chunk((5, 0), (5, 4)), chunk((5, 0), (5, 4), file="c/rank-00001.safetensors")]
    assert coverage_problem("w", tiles) is None
    uneven = [
        chunk((0, 0), (4, 4), shape=(7, 4)),
        chunk((4, 0), (3, 4), shape=(7, 4)),
        chunk((7, 0), (0, 4), shape=(7, 4)),
    ]
    assert coverage_problem("w", uneven) is None
    assert coverage_problem("s", [ChunkRecord("s", "f", "F32", (), Box((), ()), ("x",))]) is None


def test_coverage_names_a_gap_an_overlap_and_a_stray_chunk() -> None:
    assert "cover 20 of its 40" in (coverage_problem("w", [chunk((0, 0), (5, 4))]) or "")
    overlap = coverage_problem("w", [chunk((0, 0), (6, 4)), chunk((5, 0), (5, 4))])
    assert overlap is not None and "overlap" in overlap
    outside = coverage_problem("w", [chunk((0, 0), (5, 4)), chunk((8, 0), (5, 4))])
    assert outside is not None and "outside" in outside
    mixed = coverage_problem("w", [chunk((0, 0), (5, 4)), chunk((5, 0), (5, 4), shape=(11, 4))])
    assert mixed is not None and "shape" in mixed


def test_box_intersection_and_its_index_in_each_chunk() -> None:
    saved, held = Box((4, 0), (4, 6)), Box((6, 2), (5, 2))
    overlap = saved.intersect(held)
    assert overlap == Box((6, 2), (2, 2))
    assert overlap.relative_to(saved) == (slice(2, 4), slice(2, 4))
    assert overlap.relative_to(held) == (slice(0, 2), slice(0, 2))
    assert Box((0,), (4,)).intersect(Box((4,), (4,))) is None


def test_checksum_blocks_tile_a_chunk() -> None:
    block = CHECKSUM_BLOCK_BYTES
    assert checksum_blocks(0) == [(0, 0)]
    assert checksum_blocks(10) == [(0, 10)]
    assert checksum_blocks(2 * block + 1) == [(0, block), (block, block), (2 * block, 1)]


def test_the_bytes_a_part_of_a_chunk_needs() -> None:
    chunk = Box((4, 0), (4, 6))  # rows 4-7 of a tensor 6 wide, float32
    assert Box((5, 0), (2, 6)).byte_range_in(chunk, 4) == (24 * 1, 24 * 3)  # rows 5 and 6: contiguous
    assert Box((4, 2), (4, 2)).byte_range_in(chunk, 4) == (8, 4 * (3 * 6 + 4))  # columns 2-3 of every row
    assert Box((), ()).byte_range_in(Box((), ()), 8) == (0, 8)
