"""The per-node writer daemon and the `ckptd` command line."""

from ckptd.service.server import DaemonConfig, DaemonError, DaemonServer

__all__ = ["DaemonConfig", "DaemonError", "DaemonServer"]
