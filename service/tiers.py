"""Filling the slower tiers: committed checkpoints of the root copied, in the background, into each
tier that wants their step, with the commit protocol of a save (files fsynced, manifest last,
directory renamed into place, `latest`, the tier's own retention).

One thread copies, nearest tier first, so copies never take a save's writer threads. A tier that
falls behind skips to the newest step it wants (a skipped step is logged); the root's retention
never deletes a step that waits for a copy or is being copied (the copier holds it the way a loader
does). A copy cut short by a stop or a crash leaves a tmp directory that the next start removes, and
that start copies the newest wanted step again if the tier lacks it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Set

from ckptd.disk.files import FileProblem
from ckptd.disk.manifests import ManifestProblem, hold_for_loading, manifest_path, read_manifest
from ckptd.disk.objectstore import ObjectStoreError
from ckptd.proto.cluster import TierCopyDone, TierCopyOrder
from ckptd.proto.manifest import FileRecord, Manifest
from ckptd.proto.tiers import TierSpec
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.shard_writer import PageRelease, Throttle
from ckptd.service.store import CheckpointStore
from ckptd.service.tier_targets import TierTarget, open_target

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 2.0
LOCAL_COMMIT_WAIT_S = 30.0
"""How long a follower waits for its own commit of a step the leader orders copied."""
DRAIN_STALL_S = 5.0
"""A stopping daemon gives up on the copies once this long passed without a byte copied."""
"""How long a stopping daemon waits for the copier (a tier's network call may not end sooner)."""


class CopyStopped(Exception):
    """The daemon is stopping: the copy in progress is abandoned (its tmp directory is a leftover)."""


class OtherNodesFailed(Exception):
    """Another node could not copy its files of a step into a tier (the copy is abandoned)."""


class OtherNodes(Protocol):
    """The other nodes' share of a tier copy, when every node's root holds only its own files."""

    def order_copies(self, order: TierCopyOrder) -> None:
        """Ask every other node to copy its files of `order.step` into the tier (from any thread)."""

    def wait_for_copies(self, order: TierCopyOrder, stopping: Callable[[], bool]) -> List[str]:
        """The files the other nodes copied for `order`, once all have; raises OtherNodesFailed, or
        CopyStopped when `stopping()` turns true."""


@dataclass
class Tier:
    """One slower tier as the copier sees it."""

    spec: TierSpec
    target: TierTarget
    opened: bool = False
    """False until the target could be opened (a shared filesystem or the object store may be down)."""
    latest: Optional[int] = None
    """The step the tier's `latest` named when the copier last looked (status never waits on the tier)."""
    pending: Optional[int] = None
    """The newest step waiting to be copied here."""
    pin: Optional[contextlib.ExitStack] = None
    """Holds the pending step in the root against retention."""
    copying: Optional[int] = None
    bytes_waiting: int = 0
    bytes_copied: int = 0
    copies: int = 0
    last_copy_mbps: Optional[float] = None
    last_error: Optional[str] = None

    def status(self) -> Dict[str, Any]:
        """What `ckptd status` shows for this tier."""
        return {
            "name": self.spec.name,
            "path": self.spec.path,
            "every": self.spec.every,
            "latest": self.latest,
            "pending": self.pending,
            "copying": self.copying,
            "bytes_waiting": self.bytes_waiting,
            "bytes_copied": self.bytes_copied,
            "copies": self.copies,
            "last_copy_mbps": self.last_copy_mbps,
            "last_error": self.last_error,
        }


class TierCopier:
    """Copies the root's committed checkpoints into the slower tiers, in one background thread."""

    def __init__(
        self,
        source: CheckpointStore,
        specs: Sequence[TierSpec],
        max_mbps: Optional[float] = None,
        metrics: Optional[DaemonMetrics] = None,
    ) -> None:
        self._source = source
        self._tiers = [Tier(spec, open_target(spec)) for spec in specs]
        self._throttle = Throttle(max_mbps * 1e6 if max_mbps else None)
        self._metrics = metrics
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._others: Optional[OtherNodes] = None

    def share_with(self, others: OtherNodes) -> None:
        """Every node's root holds only its own files: each copy also takes the other nodes' files,
        which they copy themselves when asked (before `start`)."""
        self._others = others

    def start(self) -> None:
        """Queue the newest step each tier wants, and start the copier thread, which first opens
        each tier (removing what an interrupted copy left): a slow or unreachable tier never holds
        up the daemon. A step a tier already holds is not copied again."""
        steps = self._source.committed_steps()
        if steps:
            self.committed(steps)
        self._thread = threading.Thread(target=self._run, name="ckptd-tiers", daemon=True)
        self._thread.start()

    def committed(self, steps: Sequence[int]) -> None:
        """Steps just committed in the root (call before the root's retention runs): queue, for each
        tier, the newest one it wants. Touches only the root (never a tier): the commit waits for it."""
        for tier in self._tiers:
            wanted = [step for step in steps if tier.spec.wants(step)]
            if wanted:
                self._enqueue(tier, max(wanted))

    @property
    def busy(self) -> bool:
        """True while a copy waits or runs."""
        with self._cond:
            return any(t.pending is not None or t.copying is not None for t in self._tiers)

    def drain(self, timeout: float, stall_s: float = DRAIN_STALL_S) -> bool:
        """Wait until every queued copy is done, for at most `timeout` seconds, and not past `stall_s`
        seconds without a byte copied (a stalled tier: the next start resumes its copy); True when
        all are done."""
        deadline = time.monotonic() + timeout
        copied, progressed = -1, time.monotonic()
        while self.busy:
            now = time.monotonic()
            total = sum(t.bytes_copied for t in self._tiers)
            if total != copied:
                copied, progressed = total, now
            if now > deadline or now - progressed > stall_s:
                log.warning("stopping with copies not done (%s); the next start resumes them", self.status())
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Stop copying; a copy in progress is abandoned between two chunks."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)
            if self._thread.is_alive():
                log.warning("the tier copier is still waiting on a tier after %.0f s; leaving it", CLOSE_WAIT_S)
        for tier in self._tiers:
            if tier.pin is not None:
                tier.pin.close()
                tier.pin = None

    def status(self) -> List[Dict[str, Any]]:
        """Each tier's state, nearest first."""
        with self._cond:
            return [tier.status() for tier in self._tiers]

    def _open(self, tier: Tier) -> bool:
        if tier.opened:
            return True
        try:
            removed = tier.target.open()
        except (OSError, ObjectStoreError) as exc:
            tier.last_error = f"cannot open tier {tier.spec.name!r} at {tier.spec.path}: {exc}"
            log.error("%s; its copies wait until it can be opened", tier.last_error)
            return False
        tier.opened = True
        self._look_at_latest(tier)
        for path in removed:
            log.info("tier %s: removed %s, left by an interrupted copy", tier.spec.name, path)
        return True

    def _enqueue(self, tier: Tier, step: int) -> None:
        with self._cond:
            if tier.pending is not None and tier.pending >= step or tier.copying == step:
                return
            pin = contextlib.ExitStack()
            pin.enter_context(hold_for_loading(self._source.final_path(step)))  # retention leaves it alone
            if tier.pending is not None:
                log.warning(
                    "tier %s is behind: step %d is skipped for the newer step %d", tier.spec.name, tier.pending, step
                )
                assert tier.pin is not None
                tier.pin.close()
            tier.pending, tier.pin = step, pin
            tier.bytes_waiting = _checkpoint_bytes(self._source.final_path(step))
            self._report(tier)
            self._cond.notify_all()

    def _run(self) -> None:
        for tier in self._tiers:
            if not self._stopping:
                self._open(tier)
        while True:
            with self._cond:
                while not self._stopping and all(t.pending is None for t in self._tiers):
                    self._cond.wait()
                if self._stopping:
                    return
                tier = next(t for t in self._tiers if t.pending is not None)
                step, pin = tier.pending, tier.pin
                tier.pending, tier.pin, tier.copying = None, None, step
            assert step is not None and pin is not None
            try:
                self._copy(tier, step)
            except CopyStopped:
                log.info("tier %s: the copy of step %d stops with the daemon", tier.spec.name, step)
            except Exception as exc:
                if self._stopping:  # the stop surfaced through the object store's transfer threads
                    log.info("tier %s: the copy of step %d stops with the daemon", tier.spec.name, step)
                elif isinstance(exc, (OSError, ObjectStoreError, FileProblem, ManifestProblem, OtherNodesFailed)):
                    tier.last_error = f"copying step {step} into tier {tier.spec.name!r} failed: {exc}"
                    log.error("%s; the next step it wants is copied as usual", tier.last_error)
                else:  # a bug: the copier must outlive any one copy
                    tier.last_error = f"copying step {step} into tier {tier.spec.name!r} failed (see the log)"
                    log.exception(tier.last_error)
            finally:
                pin.close()
                with self._cond:
                    tier.copying = None
                    if tier.pending is None:
                        tier.bytes_waiting = 0
                    self._report(tier)

    def _copy(self, tier: Tier, step: int) -> None:
        if not self._open(tier):
            raise OSError(tier.last_error)
        if tier.target.is_committed(step):
            return
        started = time.monotonic()
        source_dir = self._source.final_path(step)
        manifest = read_manifest(source_dir)
        with open(manifest_path(source_dir), encoding="utf-8") as f:
            manifest_json = f.read()
        self._copy_files_and_commit(tier, source_dir, manifest, manifest_json)
        self._look_at_latest(tier)
        copied = sum(record.size for record in manifest.files())
        seconds = time.monotonic() - started
        tier.copies += 1
        tier.last_error = None
        tier.last_copy_mbps = round(copied / 1e6 / max(seconds, 1e-6), 1)
        log.info("tier %s: copied step %d (%.0f MB in %.2f s)", tier.spec.name, step, copied / 1e6, seconds)
        deleted = tier.target.apply_retention(tier.spec.retention)
        if deleted:
            log.info("tier %s: retention deleted step(s) %s", tier.spec.name, deleted)

    def _copy_files_and_commit(self, tier: Tier, source_dir: str, manifest: Manifest, manifest_json: str) -> None:
        """The checkpoint's files into one copy, committed once all are in: every file from this root,
        or, when each node's root holds its own files, this node's and every other node's."""
        order = TierCopyOrder(tier.spec.name, manifest.step, uuid.uuid4().hex[:12])
        others = self._others
        if others is not None:
            others.order_copies(order)
        try:
            own = manifest.files() if others is None else files_held(source_dir, manifest)
            tier.target.copy_files(source_dir, order.step, order.token, own, self._throttle, self._progress(tier))
            if others is not None:
                copied = {record.path for record in own}
                copied.update(others.wait_for_copies(order, lambda: self._stopping))
                missing = sorted(record.path for record in manifest.files() if record.path not in copied)
                if missing:
                    raise OtherNodesFailed(f"no node holds {len(missing)} file(s) of step {order.step}: {missing[:3]}")
            tier.target.commit_copy(order.step, order.token, manifest_json)
        except BaseException:
            tier.target.discard_copy(order.step, order.token)
            raise

    def _progress(self, tier: Tier) -> PageRelease:
        def progress(offset: int, nbytes: int) -> None:
            tier.bytes_copied += nbytes
            tier.bytes_waiting = max(0, tier.bytes_waiting - nbytes)
            if self._metrics is not None:
                self._metrics.tier_bytes_copied.labels(tier.spec.name).inc(nbytes)
            if self._stopping:
                raise CopyStopped()

        return progress

    def _look_at_latest(self, tier: Tier) -> None:
        """Read the tier's `latest` (in the copier thread only: it may wait on the network)."""
        try:
            tier.latest = tier.target.latest_step()
        except (OSError, ObjectStoreError) as exc:
            log.warning("tier %s: cannot read its latest step: %s", tier.spec.name, exc)
        with self._cond:
            self._report(tier)

    def _report(self, tier: Tier) -> None:
        if self._metrics is None:
            return
        self._metrics.tier_bytes_waiting.labels(tier.spec.name).set(tier.bytes_waiting)
        if tier.latest is not None:
            self._metrics.tier_last_step.labels(tier.spec.name).set(tier.latest)


class NodeTierCopies:
    """On a follower whose root is node-local: copies this node's files of a step into a tier when the
    leader orders it (`TierCopyOrder`), in one background thread, and answers with `TierCopyDone`.
    The leader commits the tier's copy; this node never cleans a tier (another node's copy may be in
    flight there)."""

    def __init__(
        self,
        source: CheckpointStore,
        node: int,
        specs: Sequence[TierSpec],
        answer: Callable[[TierCopyDone], None],
        max_mbps: Optional[float] = None,
    ) -> None:
        self._source = source
        self._node = node
        self._targets = {spec.name: open_target(spec) for spec in specs}
        self._opened: Set[str] = set()
        self._answer = answer
        self._throttle = Throttle(max_mbps * 1e6 if max_mbps else None)
        self._orders: Dict[str, TierCopyOrder] = {}
        """The newest order per tier not yet started (an older one is answered as skipped)."""
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the copying thread."""
        self._thread = threading.Thread(target=self._run, name="ckptd-node-tiers", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop; a copy in progress is abandoned between two chunks (the leader gives up on it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)

    def ordered(self, order: TierCopyOrder) -> None:
        """The leader asks for this node's files of a step (called from the event loop)."""
        if order.tier not in self._targets:
            self._answer(TierCopyDone(order, self._node, error=f"node {self._node} has no tier {order.tier!r}"))
            return
        with self._cond:
            older = self._orders.get(order.tier)
            self._orders[order.tier] = order
            self._cond.notify_all()
        if older is not None:
            self._answer(TierCopyDone(older, self._node, error=f"node {self._node} skipped it for step {order.step}"))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._orders:
                    self._cond.wait()
                if self._stopping:
                    return
                order = self._orders.pop(next(iter(self._orders)))
            self._answer(self._copy(order))

    def _copy(self, order: TierCopyOrder) -> TierCopyDone:
        target = self._targets[order.tier]
        source_dir = self._source.final_path(order.step)
        committed_by = time.monotonic() + LOCAL_COMMIT_WAIT_S  # the order may overtake the commit's announcement
        while not self._source.is_committed(order.step) and time.monotonic() < committed_by and not self._stopping:
            time.sleep(0.05)
        try:
            with hold_for_loading(source_dir):
                if order.tier not in self._opened:
                    target.open(clean=False)
                    self._opened.add(order.tier)
                own = files_held(source_dir, read_manifest(source_dir))
                target.copy_files(source_dir, order.step, order.token, own, self._throttle, self._progress)
        except (OSError, ObjectStoreError, FileProblem, ManifestProblem, CopyStopped) as exc:
            error = f"node {self._node} could not copy its files of step {order.step} into tier {order.tier!r}: {exc}"
            log.error(error)
            return TierCopyDone(order, self._node, error=error)
        log.info("tier %s: copied this node's %d file(s) of step %d", order.tier, len(own), order.step)
        return TierCopyDone(order, self._node, tuple(record.path for record in own))

    def _progress(self, offset: int, nbytes: int) -> None:
        if self._stopping:
            raise CopyStopped()


def files_held(checkpoint_dir: str, manifest: Manifest) -> List[FileRecord]:
    """The files of `manifest` present in `checkpoint_dir` (a node-local copy holds its node's)."""
    return [record for record in manifest.files() if os.path.exists(os.path.join(checkpoint_dir, record.path))]


def _checkpoint_bytes(checkpoint_dir: str) -> int:
    try:
        return sum(record.size for record in read_manifest(checkpoint_dir).files())
    except ManifestProblem:
        return 0
