"""What a trainer declares: its state components and how each is shared across ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, runtime_checkable

from ckptd.proto.layout import check_safe_name
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.topology import Topology

Reshard = Callable[[List[Any], Topology, Topology, int], Any]
"""(every saved rank's state in rank order, the saved topology, the current one, this rank) -> the
state this rank loads."""


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict()` (modules, optimizers, schedulers, ...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class StateComponent:
    """One piece of training state, its sharing pattern, and how strictly it must be present.

    Raises ValueError for PER_GROUP without a process group name, for validate_replication on
    anything but REPLICATED, and for keys or group names that are not safe file names.
    """

    key: str
    stateful: Stateful
    sharing_pattern: SharingPattern
    required: bool = True
    validate_replication: bool = False
    process_group_name: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = field(default=None)
    spread: bool = False
    """REPLICATED only: split the tensors by bytes across the job's nodes, so that every node's
    daemon writes a share in parallel instead of node 0 writing them all. Loads at any topology."""
    reshard: Optional[Reshard] = None
    """PER_RANK only: how to load the per-rank states at another topology (a dataloader position split
    again across the new world size, say). Without it such a load fails, naming both topologies."""

    def __post_init__(self) -> None:
        check_safe_name(self.key, "component key")
        self.sharing_pattern = SharingPattern(self.sharing_pattern)
        if not isinstance(self.stateful, Stateful):
            raise TypeError(f"component {self.key!r}: stateful must have state_dict() and load_state_dict()")
        if self.sharing_pattern is SharingPattern.PER_GROUP:
            if not self.process_group_name:
                raise ValueError(f"component {self.key!r}: PER_GROUP needs process_group_name")
            check_safe_name(self.process_group_name, "process group name")
        elif self.process_group_name is not None:
            raise ValueError(f"component {self.key!r}: process_group_name applies only to PER_GROUP")
        if self.spread and self.sharing_pattern is not SharingPattern.REPLICATED:
            raise ValueError(
                f"component {self.key!r}: spread applies only to REPLICATED, not {self.sharing_pattern.value}"
            )
        if self.reshard is not None and self.sharing_pattern is not SharingPattern.PER_RANK:
            raise ValueError(
                f"component {self.key!r}: reshard applies only to PER_RANK, not {self.sharing_pattern.value}"
            )
        if self.validate_replication and self.sharing_pattern is not SharingPattern.REPLICATED:
            raise ValueError(
                f"component {self.key!r}: validate_replication applies only to REPLICATED, not {self.sharing_pattern.value}"
            )
        for name, value in (self.metadata or {}).items():
            if not isinstance(name, str) or not (value is None or isinstance(value, (str, int, float, bool))):
                raise ValueError(f"component {self.key!r}: metadata must map strings to str/int/float/bool/None")
