"""SHARDED components: chunks of global tensors, who writes each, and the box arithmetic of resharding.

A SHARDED component holds DTensors (and plain tensors, treated as one chunk covering the whole
tensor, held by every rank). Each rank holds one chunk of each tensor: a box of the global tensor,
given by its offsets and sizes. Ranks that hold the same box (replicas) write it once: the owner
rule below is a pure function every replica evaluates alike, so no rank has to ask another.

In the manifest, each chunk is an entry of the tensor index of the file that holds it: besides the
usual dtype and shape (the chunk's sizes), it records the global shape, the chunk's offsets and the
checksums of its bytes, one per block of CHECKSUM_BLOCK_BYTES, so that a rank that reads part of a
chunk verifies the blocks it reads: neither the whole file nor the whole chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ckptd.proto.formats import SAFETENSORS_DTYPES
from ckptd.proto.manifest import ScopeRecord

GLOBAL_SHAPE = "global_shape"
OFFSETS = "offsets"
BLOCK_CHECKSUMS = "block_checksums"
"""Keys a SHARDED component's tensor index entries carry besides dtype and shape."""

CHECKSUM_BLOCK_BYTES = 4 * 2**20
"""A chunk's bytes are checksummed in blocks of this size. Measured on a 1 GB FSDP2 state saved on 2
ranks and loaded cold on 4 (bench/bench_sharded.py): verifying whole chunks made the load 1.4x
slower than dcp.load, since each new rank read about twice the bytes it needed; with 16 MiB blocks
still 1.4x (a chunk there is 21 MB); with 4 MiB, 0.9x. A 1 TB state lists about 6 MB of checksums."""


Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A box of a global tensor: `sizes` elements along each dimension, starting at `offsets`."""

    offsets: Shape
    sizes: Shape

    @property
    def volume(self) -> int:
        """Number of elements in the box."""
        return math.prod(self.sizes)

    def within(self, shape: Sequence[int]) -> bool:
        """Whether the box lies inside a tensor of `shape` (of the same number of dimensions)."""
        return len(self.offsets) == len(self.sizes) == len(shape) and all(
            o >= 0 and s >= 0 and o + s <= g for o, s, g in zip(self.offsets, self.sizes, shape)
        )

    def intersect(self, other: "Box") -> Optional["Box"]:
        """The box both cover, or None when they share no element."""
        lows = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        highs = tuple(min(a + n, b + m) for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(high <= low for low, high in zip(lows, highs)):
            return None
        return Box(lows, tuple(high - low for low, high in zip(lows, highs)))

    def byte_range_in(self, outer: "Box", itemsize: int) -> Tuple[int, int]:
        """[start, end) of the bytes of `outer`'s row-major tensor that hold this box's elements
        (and those between them); the box must lie inside `outer` and hold an element."""
        strides = [math.prod(outer.sizes[d + 1 :]) for d in range(len(outer.sizes))]
        first = sum((o - b) * st for o, b, st in zip(self.offsets, outer.offsets, strides))
        last = sum((o + n - 1 - b) * st for o, n, b, st in zip(self.offsets, self.sizes, outer.offsets, strides))
        return first * itemsize, (last + 1) * itemsize

    def relative_to(self, outer: "Box") -> Tuple[slice, ...]:
        """Index of this box inside `outer`'s own tensor (this box must lie inside `outer`)."""
        return tuple(slice(o - b, o - b + s) for o, s, b in zip(self.offsets, self.sizes, outer.offsets))


@dataclass(frozen=True)
class ChunkSpec:
    """What a rank says of one chunk it hands over: the tensor's global shape and the chunk's offsets
    (its sizes are the staged tensor's shape)."""

    global_shape: Shape
    offsets: Shape

    def to_wire(self) -> List[List[int]]:
        """Plain form for a frame."""
        return [list(self.global_shape), list(self.offsets)]

    @classmethod
    def from_wire(cls, raw: Any) -> "ChunkSpec":
        """Inverse of `to_wire`; ValueError on anything malformed."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 2:
            raise ValueError("a chunk must be [global_shape, offsets]")
        shape, offsets = raw
        if not all(isinstance(x, (list, tuple)) and all(type(d) is int and d >= 0 for d in x) for x in raw):
            raise ValueError("a chunk's global shape and offsets must be lists of non-negative integers")
        return cls(tuple(shape), tuple(offsets))


@dataclass(frozen=True)
class ChunkRecord:
    """One saved chunk, as the manifest lists it."""

    name: str
    file: str
    """The checkpoint-relative path of the shard that holds it."""
    dtype: str
    global_shape: Shape
    box: Box
    block_checksums: Tuple[str, ...]
    """One per CHECKSUM_BLOCK_BYTES of the chunk's bytes (`checksum_blocks`)."""


def chunk_owners(chunks: Iterable[Tuple[str, int]], replicas: Sequence[int]) -> Dict[str, int]:
    """Which of `replicas` (ranks that hold the same chunks) writes each chunk (name, bytes): largest
    first, each to the replica with the fewest bytes so far (ties: the lowest rank). Every replica
    calls this with the same arguments and gets the same answer."""
    ranks = sorted(replicas)
    load = {rank: 0 for rank in ranks}
    owners: Dict[str, int] = {}
    for name, nbytes in sorted(chunks, key=lambda item: (-item[1], item[0])):
        owner = min(ranks, key=lambda rank: (load[rank], rank))
        owners[name] = owner
        load[owner] += nbytes
    return owners


def checksum_blocks(nbytes: int) -> List[Tuple[int, int]]:
    """The blocks (start, length) of a chunk of `nbytes` bytes that get a checksum each (one, empty,
    for an empty chunk)."""
    if nbytes == 0:
        return [(0, 0)]
    return [(start, min(CHECKSUM_BLOCK_BYTES, nbytes - start)) for start in range(0, nbytes, CHECKSUM_BLOCK_BYTES)]


def chunk_index_entry(dtype: str, spec: ChunkSpec, sizes: Sequence[int], checksums: Sequence[str]) -> Dict[str, Any]:
    """The tensor index entry of a chunk in a SHARDED component's shard."""
    return {
        "dtype": dtype,
        "shape": list(sizes),
        GLOBAL_SHAPE: list(spec.global_shape),
        OFFSETS: list(spec.offsets),
        BLOCK_CHECKSUMS: list(checksums),
    }


def chunks_in_scopes(scopes: Iterable[ScopeRecord]) -> Dict[str, List[ChunkRecord]]:
    """Every chunk of a SHARDED component by tensor name, from its scopes' tensor indexes;
    ValueError naming the entry when one lacks the chunk keys."""
    chunks: Dict[str, List[ChunkRecord]] = {}
    for scope in scopes:
        path = scope.tensor_file.path
        for name, entry in scope.tensor_file.tensors.items():
            try:
                record = ChunkRecord(
                    name=name,
                    file=path,
                    dtype=str(entry["dtype"]),
                    global_shape=tuple(int(d) for d in entry[GLOBAL_SHAPE]),
                    box=Box(tuple(int(d) for d in entry[OFFSETS]), tuple(int(d) for d in entry["shape"])),
                    block_checksums=tuple(str(c) for c in entry[BLOCK_CHECKSUMS]),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: tensor {name!r} is not a chunk entry ({exc!r})") from None
            nbytes = record.box.volume * SAFETENSORS_DTYPES.get(record.dtype, 0)
            if record.dtype not in SAFETENSORS_DTYPES or len(record.block_checksums) != len(checksum_blocks(nbytes)):
                raise ValueError(
                    f"{path}: tensor {name!r} lists {len(record.block_checksums)} block checksums for {nbytes} bytes"
                )
            chunks.setdefault(name, []).append(record)
    return chunks


def distinct_chunks(chunks: Iterable[ChunkRecord]) -> List[ChunkRecord]:
    """One chunk per box: ranks that the mesh does not know to be replicas may each write a box."""
    return list({chunk.box: chunk for chunk in chunks}.values())


def coverage_problem(name: str, chunks: Sequence[ChunkRecord]) -> Optional[str]:
    """Why the chunks of tensor `name` do not tile it exactly once (identical boxes count once: ranks
    that the mesh does not know to be replicas may both write one), or None."""
    first = chunks[0]
    for chunk in chunks:
        if chunk.dtype != first.dtype or chunk.global_shape != first.global_shape:
            return (
                f"tensor {name!r}: {chunk.file} holds a {chunk.dtype} chunk of shape {list(chunk.global_shape)}, "
                f"{first.file} a {first.dtype} chunk of shape {list(first.global_shape)}"
            )
        if not chunk.box.within(first.global_shape):
            return f"tensor {name!r}: the chunk in {chunk.file} at {list(chunk.box.offsets)} lies outside {list(first.global_shape)}"
    boxes = sorted({c.box for c in chunks}, key=lambda b: (b.offsets, b.sizes))
    for i, box in enumerate(boxes):
        for other in boxes[i + 1 :]:
            if box.sizes and other.offsets[0] >= box.offsets[0] + box.sizes[0]:
                break  # sorted by offsets: no later box starts inside this one along dimension 0
            if box.volume and other.volume and box.intersect(other) is not None:
                return f"tensor {name!r}: chunks at {list(box.offsets)} and {list(other.offsets)} overlap"
    covered, total = sum(b.volume for b in boxes), math.prod(first.global_shape)
    if covered != total:
        return f"tensor {name!r}: its chunks cover {covered} of its {total} elements"
    return None
