"""Where this rank sits in the job, from torch.distributed and the torchrun environment."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
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

    @property
    def local_rank(self) -> int:
        """Index on this node."""
        return self.topology.local_rank(self.rank)

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.topology.node_of(self.rank)


def detect_rank_info() -> RankInfo:
    """Rank and topology: gathered from every rank when torch.distributed is initialized, else read
    from the torchrun environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), else a single process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = (_node_key(), int(os.environ.get("LOCAL_RANK", "0")), uuid.uuid4().hex)
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        topology = _topology_from_node_keys([(key, local) for key, local, _ in gathered])
        return RankInfo(rank, topology, job_id=gathered[0][2])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    job_id = f"{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}" if run_id else uuid.uuid4().hex
    if world > 1 and not run_id:
        job_id = "default"  # ranks cannot agree on a fresh id without communication
    try:
        return RankInfo(rank, Topology.uniform(world, local_world), job_id=job_id)
    except ValueError as exc:
        raise CheckpointError(f"cannot derive the job topology from the environment: {exc}") from None


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
