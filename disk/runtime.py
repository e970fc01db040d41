"""Per-user runtime files of a node: the daemon's socket, its lock and its log, named per root."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from ckptd.proto.layout import REGION_DIR


def runtime_dir() -> str:
    """Per-user directory for sockets, locks and daemon logs (created 0700 by whoever needs it)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "ckptd")
    return f"/tmp/ckptd-{os.getuid()}"


def root_token(root: str) -> str:
    """Short stable token of a checkpoint root, for per-root endpoints and locks."""
    return hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]


def default_endpoint(root: str) -> str:
    """The ipc:// endpoint a daemon serving `root` listens on unless told otherwise."""
    return f"ipc://{runtime_dir()}/{root_token(root)}.sock"


def daemon_lock_path(root: str, node: int = 0) -> str:
    """Node-local lock file that makes a daemon the only one serving `root` as node `node` of a job on
    this machine (one machine may play several nodes in a test or a single-host multi-node job)."""
    suffix = f"-node{node}" if node else ""
    return os.path.join(runtime_dir(), f"{root_token(root)}{suffix}.lock")


def daemon_log_path(endpoint: str) -> str:
    """Where a daemon auto-started on `endpoint` logs (one file per endpoint: a machine playing
    several nodes of a job runs several daemons for one root)."""
    token = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"daemon-{token}.log")


@dataclass(frozen=True)
class Mount:
    """One line of the mount table: where, what filesystem, with which options."""

    point: str
    fstype: str
    options: Tuple[str, ...]


def mount_of(path: str, mounts: str = "/proc/mounts") -> Optional[Mount]:
    """The mount that holds `path` (the nearest mount point above it; the last mounted wins a tie),
    or None where the table cannot be read."""
    path = os.path.realpath(path)
    found: Optional[Mount] = None
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                point = parts[1]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and (found is None or len(point) >= len(found.point)):
                    found = Mount(point, parts[2], tuple(parts[3].split(",")))
    except OSError:
        return None
    return found


HUGE_PAGE_MODES = ("always", "within_size", "advise")
"""tmpfs `huge=` modes that back staging regions with 2 MiB pages (with `advise`, because each
region asks for them: client.staging)."""


def staging_huge_pages(mounts: str = "/proc/mounts") -> Optional[str]:
    """The `huge=` mode of the tmpfs holding the staging regions (REGION_DIR) when it backs them with
    2 MiB pages, else None (the default, `huge=never`: 4 KiB pages). With 2 MiB pages the daemon's
    O_DIRECT writes pin 512x fewer pages and copies take fewer TLB misses (README, "Staging memory on
    2 MiB pages")."""
    mount = mount_of(REGION_DIR, mounts)
    if mount is None or mount.fstype != "tmpfs":
        return None
    modes = [o.split("=", 1)[1] for o in mount.options if o.startswith("huge=")]
    return modes[0] if modes and modes[0] in HUGE_PAGE_MODES else None
