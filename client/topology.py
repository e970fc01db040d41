"""Where this rank sits in the job, from torch.distributed and the torchrun environment."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch.distributed as dist

from ckptd.client.errors import CheckpointError
from ckptd.proto.topology import Topology


@dataclass(frozen=True)
class RankInfo:
    """This process's rank, the job's topology, and the id of this run of the job (equal on every rank;
    a restarted job gets a new one, so its saves supersede the dead run's unfinished ones)."""

    rank: int
    topology: Topology
    job_id: str = "default"
    started_at: float = field(default_factory=time.time)
    """Wall-clock time the run started (rank 0's clock)."""

    @property
    def local_rank(self) -> int:
        """Index on this node."""
        return self.topology.local_rank(self.rank)

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.topology.node_of(self.rank)


def detect_rank_info() -> RankInfo:
    """Rank and topology, gathered from every rank when torch.distributed is initialized; a single
    process otherwise. The job id is fresh for every run (rank 0's, shared with the others by that
    gather), so two runs never share one, whatever the launcher's rendezvous id."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = (_node_key(), int(os.environ.get("LOCAL_RANK", "0")), uuid.uuid4().hex, time.time())
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        topology = _topology_from_node_keys([(key, local) for key, local, _, _ in gathered])
        return RankInfo(rank, topology, job_id=gathered[0][2], started_at=gathered[0][3])
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size != "1":
        raise CheckpointError(
            f"WORLD_SIZE is {world_size}, but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) before creating the CheckpointManager, so that the "
            "ranks agree on the job's topology (a single process needs neither)"
        )
    return RankInfo(0, Topology.single_node(1), job_id=uuid.uuid4().hex)


def _node_key() -> str:
    """Identifies this node: torchrun's node rank when set, else the host name."""
    group_rank = os.environ.get("GROUP_RANK")
    return f"node-{group_rank}" if group_rank is not None else socket.gethostname()


def _topology_from_node_keys(entries: List[Tuple[str, int]]) -> Topology:
    nodes: dict[str, List[Tuple[int, int]]] = {}
    for rank, (key, local_rank) in enumerate(entries):
        nodes.setdefault(key, []).append((local_rank, rank))
    ordered = sorted(nodes.values(), key=lambda members: min(r for _, r in members))
    return Topology(tuple(tuple(r for _, r in sorted(members)) for members in ordered))


def process_group_ranks(group: Any) -> Tuple[int, ...]:
    """Global ranks of a torch.distributed process group."""
    return tuple(int(r) for r in dist.get_process_group_ranks(group))
