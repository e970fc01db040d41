"""One live run per root: the daemon admits the clients of one run at a time and keeps that run's
claim in the root (rules and record in `ckptd.proto.ownership`).

The daemon admits a client's run when no other run owns the root, or when the owner is dead: none of
its client processes on this host is alive (a restarted run supersedes its dead predecessor), and the
claim file names no other live run. The node-0 daemon writes the claim, renews it while the run has a
live client, and removes it when the run has none left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

from ckptd.disk.claims import read_claim, remove_claim, write_claim
from ckptd.proto.errors import ErrorCode
from ckptd.proto.ownership import (
    CLAIM_RENEW_S,
    CLAIM_TTL_S,
    RootClaim,
    RunIdentity,
    root_in_use_message,
)
from ckptd.service.errors import OwnershipRefused
from ckptd.service.regions import pid_alive

log = logging.getLogger(__name__)


@dataclass
class _OwningRun:
    run: RunIdentity
    members: Dict[bytes, int] = field(default_factory=dict)
    """Connection identity -> pid of each client of the run that has not said goodbye."""

    def alive(self) -> bool:
        return any(pid_alive(pid) for pid in self.members.values())


@dataclass
class _Watch:
    """A recent claim from another host, watched to learn whether its run still renews it."""

    job: str
    renewals: int
    since: float


def boot_id() -> str:
    """This host's boot id ('' where the platform has none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class RootOwnership:
    """Which run owns the root, as seen by one daemon."""

    def __init__(self, root: str, *, keeps_claim: bool, claim_ttl: float = CLAIM_TTL_S) -> None:
        self.root = root
        self.keeps_claim = keeps_claim
        self.claim_ttl = claim_ttl
        self.host = socket.gethostname()
        self.boot_id = boot_id()
        self._owner: Optional[_OwningRun] = None
        self._watch: Optional[_Watch] = None
        self._renewals = 0
        self._renewed_at = 0.0

    @property
    def owner(self) -> Optional[RunIdentity]:
        """The run that owns the root now, if any."""
        return self._owner.run if self._owner else None

    async def admit(self, identity: bytes, run: RunIdentity) -> None:
        """Admit a client of `run`, taking the root for the run if no live run owns it; raises
        OwnershipRefused when another live run does (or may: ROOT_CLAIM_PENDING)."""
        owner = self._owner
        if owner is not None and owner.run.job != run.job:
            if owner.alive():
                raise OwnershipRefused(ErrorCode.ROOT_IN_USE, root_in_use_message(self.root, owner.run))
            log.info("run %s gave up the root (no live client); %s takes it", owner.run.job, run.job)
            await self._release()
            owner = None
        if owner is None:
            claim = await asyncio.to_thread(read_claim, self.root)
            if claim is not None and claim.run.job != run.job:
                self._check_dead(claim)
            owner = self._owner = _OwningRun(run)
            self._watch = None
            log.info("event=root_owned job=%s pid=%d host=%s", run.job, run.pid, run.host)
        owner.members[identity] = run.pid
        if self.keeps_claim and self._renewed_at == 0.0:
            await self._renew()

    async def leave(self, identity: bytes) -> None:
        """A client closed its connection on purpose; the run gives the root up with its last client."""
        owner = self._owner
        if owner is not None and owner.members.pop(identity, None) is not None and not owner.members:
            log.info("event=root_released job=%s (its last client said goodbye)", owner.run.job)
            await self._release()

    def live_claim_at_start(self) -> Optional[RunIdentity]:
        """The run of another host's live claim on the root, whose daemon may be writing into it now.
        A claim from this host is never another daemon's: one daemon serves a root per host and node."""
        claim = read_claim(self.root)
        if claim is None or claim.run.host == self.host:
            return None
        try:
            self._check_dead(claim)
        except OwnershipRefused:
            return claim.run
        return None

    async def tick(self) -> None:
        """Called every second or so: renew the claim while the owner has a live client, give the
        root up once it has none."""
        owner = self._owner
        if owner is None:
            return
        for ident in [i for i, pid in owner.members.items() if not pid_alive(pid)]:
            del owner.members[ident]
        if not owner.members:
            log.info("event=root_released job=%s (no live client left)", owner.run.job)
            await self._release()
        elif self.keeps_claim and time.time() - self._renewed_at >= CLAIM_RENEW_S:
            await self._renew()

    def _check_dead(self, claim: RootClaim) -> None:
        """Return if `claim`'s run is dead; raise OwnershipRefused if it is (or may be) alive."""
        if claim.run.host == self.host and claim.boot_id == self.boot_id:
            if any(pid_alive(pid) for pid in claim.pids):
                raise OwnershipRefused(ErrorCode.ROOT_IN_USE, root_in_use_message(self.root, claim.run))
            return
        if claim.run.host == self.host or time.time() - claim.renewed_at > self.claim_ttl:
            return  # this host rebooted since, or the claiming host stopped renewing long ago
        watch = self._watch
        now = time.monotonic()
        if watch is None or watch.job != claim.run.job:
            self._watch = watch = _Watch(claim.run.job, claim.renewals, now)
        if claim.renewals != watch.renewals:  # renewed since we last looked: alive
            self._watch = _Watch(claim.run.job, claim.renewals, now)
            raise OwnershipRefused(ErrorCode.ROOT_IN_USE, root_in_use_message(self.root, claim.run))
        if now - watch.since > self.claim_ttl:
            return  # not renewed for a whole TTL of our own clock, whatever the claimed time says
        raise OwnershipRefused(
            ErrorCode.ROOT_CLAIM_PENDING,
            f"the checkpoint root {self.root} was claimed {max(0.0, time.time() - claim.renewed_at):.0f} s ago by "
            f"{claim.run.describe()}; waiting up to {self.claim_ttl:g} s to see whether that run is still alive",
        )

    async def _renew(self) -> None:
        owner = self._owner
        assert owner is not None
        self._renewals += 1
        self._renewed_at = time.time()
        claim = RootClaim(
            owner.run,
            tuple(sorted(set(owner.members.values()))),
            self.boot_id,
            os.getpid(),
            self._renewed_at,
            self._renewals,
        )
        try:
            await asyncio.to_thread(write_claim, self.root, claim)
        except OSError as exc:
            log.warning("cannot write the root claim in %s: %s", self.root, exc)

    async def _release(self) -> None:
        owner, self._owner = self._owner, None
        self._renewed_at = 0.0
        if owner is None or not self.keeps_claim:
            return
        try:
            await asyncio.to_thread(remove_claim, self.root, owner.run.job)
        except OSError as exc:
            log.warning("cannot remove the root claim in %s: %s", self.root, exc)
