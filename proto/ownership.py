"""Who owns a checkpoint root: the run a client says it belongs to, and the claim a live run keeps in
the root so that a second live job on the same root is refused (a pure record: the daemon does the I/O).

A root is owned by one live run at a time. On one host the daemon knows its clients' processes, so a
run is live while any of them is. A root shared across hosts also holds a claim file, renewed by the
owning run's node-0 daemon every `CLAIM_RENEW_S` seconds: a claim from another host is live while it
keeps being renewed, and dead once it has not been for `CLAIM_TTL_S` seconds.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional, Tuple

CLAIM_FILE = ".ckptd-owner.json"
"""In the root: the owning run's claim (absent when no live run owns the root)."""
CLAIM_RENEW_S = 2.0
CLAIM_TTL_S = 15.0
"""A claim from another host not renewed for this long is a dead run's."""


@dataclass(frozen=True)
class RunIdentity:
    """The run a client belongs to, as it introduces itself to its daemon."""

    job: str
    """The run's id (fresh for every run of a job)."""
    host: str
    pid: int
    rank: int
    started_at: float
    """Wall-clock time the run started (rank 0's, shared by every rank)."""

    def describe(self) -> str:
        """Who the run is, for an error message."""
        return f"run {self.job} (rank {self.rank}, pid {self.pid} on host {self.host}, started {_utc(self.started_at)})"


@dataclass(frozen=True)
class RootClaim:
    """The owning run's claim on a root, written into the root by the daemon that serves its node 0."""

    run: RunIdentity
    pids: Tuple[int, ...]
    """The run's client processes on the claiming host."""
    boot_id: str
    """The claiming host's boot id: its pids mean nothing after a reboot."""
    daemon_pid: int
    renewed_at: float
    renewals: int

    def to_json(self) -> str:
        """The claim file's content."""
        return json.dumps({**asdict(self), "pids": list(self.pids)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Optional["RootClaim"]:
        """The claim in `text`, or None if it is not a well-formed claim (a torn or foreign file)."""
        try:
            data: Any = json.loads(text)
            run = RunIdentity(**data["run"])
            claim = cls(
                run=run,
                pids=tuple(data["pids"]),
                boot_id=data["boot_id"],
                daemon_pid=data["daemon_pid"],
                renewed_at=float(data["renewed_at"]),
                renewals=data["renewals"],
            )
        except (ValueError, TypeError, KeyError):
            return None
        typed = (
            isinstance(run.job, str)
            and isinstance(run.host, str)
            and type(run.pid) is int
            and all(type(p) is int for p in claim.pids)
            and isinstance(claim.boot_id, str)
            and type(claim.renewals) is int
        )
        return claim if typed else None


def root_in_use_message(root: str, owner: RunIdentity) -> str:
    """The refusal a second live run gets."""
    return (
        f"the checkpoint root {root} is in use by another live run: {owner.describe()}. Two runs saving into one "
        "root would mix their checkpoints and move each other's 'latest'. Give this run its own root, or stop "
        "that run first: a run gives the root up when it closes its CheckpointManager or its processes exit "
        "(see 'Another live run owns the root' in docs/troubleshooting.md)"
    )


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
