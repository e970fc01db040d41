"""The per-node writer daemon and the `ckptd` command line."""

from ckptd.service.errors import DaemonError
from ckptd.service.server import DaemonConfig, DaemonServer

__all__ = ["DaemonConfig", "DaemonError", "DaemonServer"]
