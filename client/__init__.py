"""The rank-side API of ckptd: declare state components, save asynchronously, load."""

from ckptd.client.components import StateComponent, Stateful
from ckptd.client.errors import (
    CheckpointError,
    CheckpointSkipped,
    DaemonUnavailableError,
    RootInUseError,
    UnsupportedStateError,
    VerificationError,
)
from ckptd.client.manager import CheckpointManager, CheckpointManagerOptions, LoadedCheckpoint
from ckptd.client.rng import RNGState
from ckptd.client.saving import CheckpointClient, ClientOptions, SaveHandle
from ckptd.client.snapshot import PreparedComponent
from ckptd.client.topology import RankInfo
from ckptd.proto.config import DaemonOptions
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.topology import Topology

__all__ = [
    "CheckpointClient",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointSkipped",
    "ClientOptions",
    "DaemonOptions",
    "DaemonUnavailableError",
    "LoadedCheckpoint",
    "PreparedComponent",
    "RNGState",
    "RankInfo",
    "RetentionPolicy",
    "RootInUseError",
    "SaveHandle",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "Topology",
    "UnsupportedStateError",
    "VerificationError",
]
