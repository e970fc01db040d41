"""Sharing patterns and the writer-selection rule (one pure function, used by both sides)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

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
    SHARDED = "SHARDED"
    """DTensors: every rank writes the chunks it owns (`ckptd.proto.sharding`); loads at any topology."""


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
    spread: bool = False,
) -> Placement:
    """Apply the dedup table of DESIGN.md: which file holds `rank`'s copy, and which rank writes it.

    A REPLICATED component with `spread` is split across the nodes: local rank 0 of each node
    writes that node's share (`share_of_tensors`); this returns the share `rank`'s node writes
    (every rank loads every share)."""
    pattern = SharingPattern(pattern)
    if spread and pattern is not SharingPattern.REPLICATED:
        raise ValueError(f"spread applies only to REPLICATED, not {pattern.value}")
    if spread:
        node = topology.node_of(rank)
        return Placement(share_scope(node), topology.node_ranks(node)[0])
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return Placement("global", 0)
    if pattern in (SharingPattern.PER_RANK, SharingPattern.SHARDED):
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


def share_scope(node: int) -> str:
    """Scope of the share of a spread REPLICATED component that `node` writes."""
    return f"share-{node:05d}"


def share_of_tensors(tensors: Iterable[Tuple[str, int]], num_nodes: int) -> Dict[str, int]:
    """Split a spread REPLICATED component's tensors (name, bytes) across `num_nodes` by bytes: largest
    first, each to the node with the fewest bytes so far (ties: the lowest node). Every rank holds the
    same tensors, so every rank computes the same split without talking to the others."""
    load = [0] * num_nodes
    share: Dict[str, int] = {}
    for name, nbytes in sorted(tensors, key=lambda item: (-item[1], item[0])):
        node = min(range(num_nodes), key=lambda n: (load[n], n))
        share[name] = node
        load[node] += nbytes
    return share


def is_writer(
    pattern: SharingPattern,
    rank: int,
    topology: Topology,
    group_name: Optional[str] = None,
    group_ranks: Optional[Sequence[int]] = None,
) -> bool:
    """True when `rank` writes its copy of the component (the dedup rule)."""
    return place(pattern, rank, topology, group_name, group_ranks).writer_rank == rank
