"""Sharing patterns and the writer-selection rule (one pure function, used by both sides)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence

from ckptd.proto.topology import Topology


class SharingPattern(str, enum.Enum):
    """How a component's state relates across ranks; decides who writes it and who loads what."""

    GLOBAL = "GLOBAL"
    """One logical copy (rank 0's); written by rank 0, loaded by every rank."""
    REPLICATED = "REPLICATED"
    """Identical on every rank; written once, loaded by every rank."""
    PER_RANK = "PER_RANK"
    """Different on every rank; each rank writes and loads its own file."""
    PER_GROUP = "PER_GROUP"
    """Identical inside a named process group, different across groups; lowest rank writes."""
    PER_NODE = "PER_NODE"
    """Node-local; local rank 0 of each node writes, every rank of that node loads."""


@dataclass(frozen=True)
class Placement:
    """Where one rank's copy of a component lives: the file scope and the rank that writes it."""

    scope: str
    writer_rank: int


def place(
    pattern: SharingPattern,
    rank: int,
    topology: Topology,
    group_name: Optional[str] = None,
    group_ranks: Optional[Sequence[int]] = None,
) -> Placement:
    """Apply the dedup table of DESIGN.md: which file holds `rank`'s copy, and which rank writes it."""
    pattern = SharingPattern(pattern)
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return Placement("global", 0)
    if pattern is SharingPattern.PER_RANK:
        return Placement(f"rank-{rank:05d}", rank)
    if pattern is SharingPattern.PER_NODE:
        node = topology.node_of(rank)
        return Placement(f"node-{node:05d}", topology.node_ranks(node)[0])
    if not group_name or not group_ranks:
        raise ValueError("PER_GROUP placement needs a group name and its ranks")
    if rank not in group_ranks:
        raise ValueError(f"rank {rank} is not a member of process group {group_name!r} (ranks {list(group_ranks)})")
    writer = min(group_ranks)
    return Placement(f"group-{group_name}-{writer:05d}", writer)


def is_writer(
    pattern: SharingPattern,
    rank: int,
    topology: Topology,
    group_name: Optional[str] = None,
    group_ranks: Optional[Sequence[int]] = None,
) -> bool:
    """True when `rank` writes its copy of the component (the dedup rule)."""
    return place(pattern, rank, topology, group_name, group_ranks).writer_rank == rank
