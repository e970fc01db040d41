"""The shape of a job: which global ranks live on which node."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple


@dataclass(frozen=True)
class Topology:
    """Global ranks grouped by node: `nodes[n]` lists the global ranks on node n, local rank order."""

    nodes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def single_node(cls, world_size: int) -> "Topology":
        """Every rank on node 0."""
        return cls((tuple(range(world_size)),))

    @classmethod
    def uniform(cls, world_size: int, local_world_size: int) -> "Topology":
        """Consecutive blocks of `local_world_size` ranks per node, as torchrun assigns them."""
        if local_world_size <= 0 or world_size % local_world_size:
            raise ValueError(f"world size {world_size} is not a multiple of local world size {local_world_size}")
        return cls(tuple(tuple(range(n, n + local_world_size)) for n in range(0, world_size, local_world_size)))

    def __post_init__(self) -> None:
        ranks = sorted(r for node in self.nodes for r in node)
        if not self.nodes or any(not node for node in self.nodes) or ranks != list(range(len(ranks))):
            raise ValueError(f"topology must cover ranks 0..N-1 exactly once on non-empty nodes, got {self.nodes}")

    @property
    def world_size(self) -> int:
        """Number of ranks in the job."""
        return sum(len(node) for node in self.nodes)

    @property
    def num_nodes(self) -> int:
        """Number of nodes in the job."""
        return len(self.nodes)

    def node_of(self, rank: int) -> int:
        """The node that holds `rank`."""
        try:
            return self._node_by_rank[rank]
        except (KeyError, TypeError):
            raise ValueError(f"rank {rank} is not in a job of world size {self.world_size}") from None

    @functools.cached_property
    def _node_by_rank(self) -> Dict[int, int]:
        return {rank: index for index, node in enumerate(self.nodes) for rank in node}

    @functools.cached_property
    def digest(self) -> str:
        """A short fingerprint of the topology: a message may name a topology its receiver already has
        by it instead of listing every rank again."""
        return hashlib.sha256(repr(self.nodes).encode()).hexdigest()[:32]

    def node_ranks(self, node: int) -> Tuple[int, ...]:
        """Global ranks on `node`, local rank 0 first."""
        return self.nodes[node]

    def local_rank(self, rank: int) -> int:
        """The rank's index on its node."""
        return self.nodes[self.node_of(rank)].index(rank)

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for messages and the manifest."""
        return {"nodes": [list(node) for node in self.nodes]}

    @classmethod
    def from_wire(cls, data: Any) -> "Topology":
        """Inverse of `to_wire`; raises ValueError on anything malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise ValueError("topology must be a map with a list 'nodes'")
        nodes: List[Sequence[int]] = data["nodes"]
        if not all(isinstance(n, list) and all(type(r) is int for r in n) for n in nodes):
            raise ValueError("topology 'nodes' must be lists of integer ranks")
        return cls(tuple(tuple(n) for n in nodes))

    def describe(self) -> str:
        """Short human form, for error messages."""
        sizes = ",".join(str(len(n)) for n in self.nodes)
        return f"world size {self.world_size} on {self.num_nodes} node(s) (ranks per node: {sizes})"
