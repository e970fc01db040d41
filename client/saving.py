"""Staging a rank's state and handing it to the node daemon; handles that resolve on commit."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckptd.client.daemon import bye, connect, ensure_serving, hello, resolve_endpoint
from ckptd.client.errors import CheckpointError, CheckpointSkipped, DaemonRequestError, PoolBusyError
from ckptd.client.save_plan import ComponentPlan
from ckptd.client.snapshot import (
    PreparedComponent,
    StagedComponent,
    copy_entries,
    snapshot,
    stage_in_full,
    step_only_tensor_addresses,
)
from ckptd.client.staging import Lease, StagingPool, StagingRegion, leases_of
from ckptd.client.topology import RankInfo
from ckptd.disk.files import beside_regions
from ckptd.disk.removal import fence_save
from ckptd.proto import messages
from ckptd.proto.config import DaemonArgs, DaemonOptions, serve_argv, with_fallbacks
from ckptd.proto.errors import ErrorCode
from ckptd.proto.formats import CKPTD_VERSION
from ckptd.proto.layout import REGIONS_PER_COMPONENT
from ckptd.proto.messages import PlannedSave, SaveRequest
from ckptd.proto.ownership import RunIdentity
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.tiers import parse_tiers

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
NOT_NOW_CODES = (ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN)
"""The daemon's refusals of a part it cannot take now (too many saves in flight; draining before it
exits): the "wait" policy asks again, the "skip" policy skips the save."""
DAEMON_TIMEOUT_S = 10.0
"""Default seconds a daemon holding saves may go without answering before the client settles them."""
BYE_TIMEOUT_S = 5.0
"""How long `close` waits for the daemon to acknowledge the goodbye (which frees the root for another run)."""


WHEN_BUSY_POLICIES = ("wait", "skip")
"""What a save may do while the previous one still holds the staging memory."""


@dataclass(frozen=True)
class ClientOptions:
    """How a rank's CheckpointClient talks to its node daemon; checked at construction (ValueError).

    `endpoint`: the daemon's (default $CKPTD_ENDPOINT, else the per-user default for the root).
    `auto_start`: local rank 0 starts a daemon when none answers, with `daemon_args`: DaemonOptions,
    or `ckptd serve` arguments as strings (passed through as given, after the client's own).
    `when_busy`: "wait" or "skip" (see CheckpointClient). `timeout`: bound on each hand-over and each
    wait for staging memory. `connect_timeout`: how long to wait for a daemon to answer.
    `retention`: what the committing daemon keeps (None: everything). `daemon_timeout`: how long the
    daemon holding this rank's saves may go without answering before they are settled.
    `tiers`: slower tiers, nearest first, as `NAME=PATH[:every=N][:keep_last=K][:keep_every=M]`
    (`ckptd.proto.tiers`): an auto-started daemon fills them from the root, and loading falls back
    to them. `huge_pages`: put this rank's staging memory on 2 MiB pages wherever the kernel allows,
    even where /dev/shm gives 4 KiB ones (ckptd.client.staging.StagingRegion); False keeps 4 KiB
    pages unless the mount gives 2 MiB ones, sparing the allocation the kernel's compaction.
    """

    endpoint: Optional[str] = None
    auto_start: bool = True
    when_busy: str = "wait"
    timeout: float = 600.0
    connect_timeout: float = 60.0
    daemon_args: DaemonArgs = DaemonOptions()
    retention: Optional[RetentionPolicy] = None
    daemon_timeout: float = DAEMON_TIMEOUT_S
    tiers: Tuple[str, ...] = ()
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tiers, str):
            raise ValueError(f"tiers must be a sequence of tier descriptions, not the string {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(self.tiers))
        parse_tiers(self.tiers)  # TierSpecError (a ValueError) names what is wrong
        if self.when_busy not in WHEN_BUSY_POLICIES:
            raise ValueError(f"when_busy must be {' or '.join(map(repr, WHEN_BUSY_POLICIES))}, not {self.when_busy!r}")
        if self.daemon_timeout <= 0:
            raise ValueError(f"daemon_timeout must be positive, not {self.daemon_timeout!r}")
        if not isinstance(self.daemon_args, DaemonOptions):
            object.__setattr__(self, "daemon_args", tuple(serve_argv(self.daemon_args)))


class SaveHandle:
    """The future of one checkpoint: `wait()` returns its committed directory or raises."""

    def __init__(self, step: int, on_resolved: Optional[Callable[["SaveHandle"], None]] = None) -> None:
        self.step = step
        self.blocked_s = 0.0
        """Seconds `save_checkpoint` blocked the caller."""
        self.planned = False
        """True when the save reused the daemon's plan of an earlier save of the same structure."""
        self._event = threading.Event()
        self._staged = threading.Event()
        self._path: Optional[str] = None
        self._error: Optional[CheckpointError] = None
        self._daemon_instance: Optional[str] = None  # the daemon that accepted it
        self._leases: List[Lease] = []
        self._on_resolved = on_resolved

    def done(self) -> bool:
        """True once the checkpoint committed or failed; never blocks."""
        return self._event.is_set()

    def staged(self) -> bool:
        """True once this rank's state is copied out and handed to the daemon (or staging failed)."""
        return self._staged.is_set()

    def wait_staged(self, timeout: Optional[float] = None) -> None:
        """Block until this rank's state is copied out (overlap mode); raises if staging failed."""
        if not self._staged.wait(timeout):
            raise CheckpointError(f"staging of step {self.step} not finished within {timeout:g} s")
        if self._error is not None and self._event.is_set():
            raise self._error

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the checkpoint commits; return its directory or raise CheckpointError."""
        if not self._event.wait(timeout):
            raise CheckpointError(f"checkpoint of step {self.step} not committed within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._path is not None
        return self._path

    def _resolve(self, path: Optional[str] = None, error: Optional[CheckpointError] = None) -> None:
        """Record the final outcome (the first one given wins)."""
        if not self._event.is_set():
            self._path, self._error = path, error
            self._event.set()
            if self._on_resolved is not None:
                self._on_resolved(self)
        if error is not None:
            self._staged.set()


class CheckpointClient:
    """One rank's connection to its node daemon: stages components and tracks their commits.

    `when_busy` is the back-pressure policy when the previous save still holds the staging
    regions: "wait" blocks until the daemon releases them, "skip" skips this save (every rank's
    handle then fails with the reason, since a checkpoint needs all ranks).

    Staging regions are lent to the daemon as leases and come back only by a release naming the
    same lease, or once the save is settled: when the daemon that holds a save restarts, goes
    `daemon_timeout` seconds without answering, or does not answer its hand-over within `timeout`,
    the save is settled on disk (committed, or fenced so that it never commits) before its regions
    are reused.

    Its settings are `options` (ClientOptions), each of which a keyword of the same name overrides.
    """

    def __init__(
        self, root: str, rank_info: RankInfo, options: Optional[ClientOptions] = None, **overrides: Any
    ) -> None:
        options = replace(options or ClientOptions(), **overrides)
        self.options = options
        self.root = os.path.realpath(root)
        self.rank_info = rank_info
        self.when_busy = options.when_busy
        self.timeout = options.timeout
        self.daemon_timeout = options.daemon_timeout
        self.retention = options.retention
        self.endpoint = resolve_endpoint(self.root, options.endpoint)
        self._pool = StagingPool(options.huge_pages)
        self._plans: Dict[str, ComponentPlan] = {}
        """Each component's save plan, by key (reused while its state keeps its structure)."""
        self._wire_plan: Optional[WirePlan] = None
        """The plan the daemon holds for this client's requests (None: send the next one in full)."""
        self._handles: Dict[int, SaveHandle] = {}
        """Saves not yet settled, by step (a settled one is forgotten: memory stays flat)."""
        self._lent: Dict[Lease, Optional[str]] = {}
        """Leases handed to a daemon and not yet back, with the instance that took them (None until it answers)."""
        self._lock = threading.Lock()
        self._stager: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._plan_checker: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._staging: Set[SaveHandle] = set()
        self._step_hook: Optional[Any] = None
        self._may_start = options.auto_start and rank_info.local_rank == 0
        self._connect_timeout = options.connect_timeout
        self._daemon_args = _place_in_job(
            with_fallbacks(options.daemon_args, tier=options.tiers) if options.tiers else options.daemon_args, rank_info
        )
        self._run = RunIdentity(
            rank_info.job_id, socket.gethostname(), os.getpid(), rank_info.rank, rank_info.started_at
        )
        self._connection, self._daemon_instance = connect(
            self.root,
            self.endpoint,
            self._on_notification,
            may_start=self._may_start,
            wait_s=self._connect_timeout,
            daemon_args=self._daemon_args,
            run=self._run,
        )
        self._daemon_lost = False
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_daemon, name="ckptd-watchdog", daemon=True)
        self._watchdog.start()

    def save(
        self,
        step: int,
        components: Sequence[PreparedComponent],
        metrics: Optional[Mapping[str, float]] = None,
        overlap: bool = False,
    ) -> SaveHandle:
        """Stage this rank's part of checkpoint `step` and hand it to the daemon.

        Returns once the state is copied out. With `overlap`, returns once the tensors that forward
        and backward may change are copied; parameters and optimizer state are copied in the
        background, and every `optimizer.step()` waits until that copy is done, so a checkpoint
        never mixes two steps. This assumes parameters and optimizer state change only inside
        `optimizer.step()`; call `handle.wait_staged()` before changing them any other way.
        """
        started = time.perf_counter()
        if self._daemon_lost:
            self._reconnect()
        handle = self._register(step)
        try:
            staged = self._stage(components, step_only_tensor_addresses(components) if overlap else set())
        except PoolBusyError as exc:
            self.skip(step, str(exc))
            handle._resolve(error=CheckpointSkipped(f"save of step {step} skipped: {exc}"))
            log.warning("save of step %d skipped: %s", step, exc)
            return handle
        except BaseException:
            self._forget(handle)
            raise
        if overlap:
            self._hand_over_in_background(handle, staged, metrics)
        else:
            self._hand_over(handle, staged, metrics)
        handle.blocked_s = time.perf_counter() - started
        return handle

    def allocate_ahead(self, components: Sequence[PreparedComponent]) -> None:
        """Size the staging regions from the components' current state and allocate and prefault
        them in the background, and plan the components (their save plans), so that the first save
        costs a warm copy."""
        staged = [s for s in snapshot(components, self.rank_info, self._plans) if s.region_bytes]
        if not staged:
            return

        def make_views(regions: Dict[str, StagingRegion]) -> None:
            """Build each plan's views of its first region (a few ms for 400 tensors), off the first save."""
            for component in staged:
                if component.plan is not None:
                    component.plan.copies(regions[component.key])
                    component.plan.region_views(regions[component.key])  # overlap mode's copies

        self._pool.allocate_ahead({s.key: s.region_bytes for s in staged}, self._regions_per_component(), make_views)

    def _regions_per_component(self) -> int:
        """Regions a component will stage into: one, or, where the daemon keeps regions as the shard
        files of a root on /dev/shm, one per checkpoint retention keeps, one for a checkpoint a tier
        copy holds a while longer, and one for the next save (the most where retention keeps all)."""
        if not beside_regions(self.root):
            return 1
        keep_last = self.retention.keep_last if self.retention is not None else None
        return min(REGIONS_PER_COMPONENT, keep_last + 2) if keep_last is not None else REGIONS_PER_COMPONENT

    def wait_staging_allocated(self, timeout: Optional[float] = None) -> bool:
        """Wait until the memory allocate_ahead() started is allocated and prefaulted; False on timeout."""
        return self._pool.wait_allocated(timeout)

    @property
    def staging_allocated_at(self) -> Optional[float]:
        """time.perf_counter() when the memory allocate_ahead() started was ready (None before)."""
        return self._pool.allocated_at

    def _register(self, step: int) -> SaveHandle:
        handle = SaveHandle(step, on_resolved=self._forget)
        with self._lock:
            if step in self._handles:
                raise CheckpointError(f"a save of step {step} is already in flight on this rank")
            self._handles[step] = handle
        return handle

    def _forget(self, handle: SaveHandle) -> None:
        with self._lock:
            if self._handles.get(handle.step) is handle:
                del self._handles[handle.step]

    def _reserve(self, staged: List[StagedComponent]) -> None:
        sizes = {s.key: s.region_bytes for s in staged if s.region_bytes}
        if not sizes:
            return
        regions = self._pool.reserve(sizes, wait=self.when_busy == "wait", timeout=self.timeout)
        for component in staged:
            component.region = regions.get(component.key)

    def _lend(self, handle: SaveHandle, staged: List[StagedComponent]) -> None:
        handle._leases = leases_of(s.region for s in staged if s.region is not None)
        with self._lock:
            self._lent.update((lease, None) for lease in handle._leases)

    def _take_back(self, leases: Iterable[Lease]) -> None:
        """The daemon no longer reads these leases' regions (or never will): free them for reuse."""
        leases = list(leases)
        with self._lock:
            for lease in leases:
                self._lent.pop(lease, None)
        self._pool.release(leases)

    def _stage(self, components: Sequence[PreparedComponent], deferrable: Set[int]) -> List[StagedComponent]:
        """Snapshot the components, reserve their regions and copy what must be copied now (see
        _copy_now). A component whose plan no longer holds is staged again in full, from the same
        state dict. On an error no region stays reserved."""
        staged = snapshot(components, self.rank_info, self._plans, check_plans=False)
        self._reserve(staged)
        try:
            missed = self._copy_checking_plans(staged, deferrable)
            if missed:
                self._stage_again(staged, missed, deferrable)
        except BaseException:
            self._release(staged)
            raise
        return staged

    def _copy_checking_plans(self, staged: List[StagedComponent], deferrable: Set[int]) -> List[int]:
        """Copy what must be copied now of the components whose plans hold, and check the plans the
        snapshots were made from; return the indices of those whose plan no longer holds.

        Where every copy reads the plans' own tensors, the plans are checked in a thread while the
        copy runs (the copy releases the GIL): for 10,000 small tensors the check takes about as long
        as the copy, and the copy of a component that misses is wasted. Otherwise they are checked
        first."""
        unchecked = [i for i, s in enumerate(staged) if s.unchecked is not None]
        if not unchecked or deferrable or not all(staged[i].copies_from_plan() for i in unchecked):
            missed = [i for i in unchecked if not staged[i].plan_holds()]
            self._copy_now([s for i, s in enumerate(staged) if i not in missed], deferrable)
            return missed
        if self._plan_checker is None:
            self._plan_checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptd-plan-check")
        checking = self._plan_checker.submit(lambda: [i for i in unchecked if not staged[i].plan_holds()])
        try:
            self._copy_now(staged, deferrable)
        finally:
            missed = checking.result()
        return missed

    def _stage_again(self, staged: List[StagedComponent], missed: List[int], deferrable: Set[int]) -> None:
        """Stage the components at `missed` again in full, in `staged`, and copy them (the others stay
        as they are: an RNG state's tensors, new at every save, miss every time)."""
        log.debug("save plans of %s no longer hold: staged in full", ", ".join(staged[i].key for i in missed))
        self._release([staged[i] for i in missed])
        for i in missed:
            staged[i] = stage_in_full(staged[i].prepared, self.rank_info, staged[i].state_dict, self._plans)
        again = [staged[i] for i in missed]
        self._reserve(again)
        self._copy_now(again, deferrable)

    def _release(self, staged: List[StagedComponent]) -> None:
        """Give back the regions reserved for `staged`, which will not be handed over as they are."""
        self._pool.release(leases_of(s.region for s in staged if s.region is not None))
        for component in staged:
            component.region = None

    @staticmethod
    def _copy_now(staged: List[StagedComponent], deferrable: Set[int]) -> None:
        """Copy what must be copied before returning; leave tensors at `deferrable` addresses for later."""
        for component in staged:
            if component.region is None:
                continue
            now: Optional[List[int]] = None
            component.deferred = []
            if deferrable:
                now = []
                for index, source in enumerate(component.sources):
                    (component.deferred if source.data_ptr() in deferrable else now).append(index)
            event = copy_entries(component, now)
            if event is not None:
                if deferrable:
                    torch.cuda.current_stream().wait_event(event)  # forward must not overwrite them first
                else:
                    event.synchronize()

    def _hand_over(
        self, handle: SaveHandle, staged: List[StagedComponent], metrics: Optional[Mapping[str, float]]
    ) -> None:
        """Finish the copies, then send the save request; raises CheckpointError if the daemon refuses
        it or does not answer in time (a save that nonetheless committed is returned, resolved)."""
        sent = False
        try:
            for component in staged:
                if component.deferred:
                    event = copy_entries(component, component.deferred)
                    if event is not None:
                        event.synchronize()
            self._lend(handle, staged)
            sent = True
            reply, handle.planned = self._send_part(
                handle.step, staged, {k: float(v) for k, v in (metrics or {}).items()}
            )
            instance = str(reply.body.get("instance", ""))
            with self._lock:
                handle._daemon_instance = instance
                self._lent.update((lease, instance) for lease in handle._leases if lease in self._lent)
        except DaemonRequestError as exc:  # refused: the daemon holds none of it
            self._take_back(handle._leases)
            if exc.code == ErrorCode.ABORTED:  # another rank's failure aborted the step: that is its outcome
                handle._resolve(error=CheckpointError(f"checkpoint of step {handle.step} aborted: {exc}"))
                return
            if exc.code in NOT_NOW_CODES and self.when_busy == "skip":
                self.skip(handle.step, str(exc))
                handle._resolve(error=CheckpointSkipped(f"save of step {handle.step} skipped: {exc}"))
                log.warning("save of step %d skipped: %s", handle.step, exc)
                return
            self._forget(handle)
            raise CheckpointError(
                f"the daemon refused rank {self.rank_info.rank}'s part of step {handle.step}: {exc}"
            ) from None
        except BaseException as exc:
            if not sent:
                self._pool.release(leases_of(s.region for s in staged if s.region is not None))
                self._forget(handle)
                raise
            # The daemon may still take the part: settle it on disk before the regions are reused.
            self._daemon_lost = True
            self._settle(handle, f"the ckptd daemon at {self.endpoint} did not take the hand-over: {exc}")
            self._take_back(handle._leases)
            if not isinstance(exc, CheckpointError):
                raise
            if handle._error is not None:
                raise handle._error from None
        finally:
            handle._staged.set()

    def _send_part(
        self, step: int, staged: List[StagedComponent], metrics: Dict[str, float]
    ) -> Tuple[messages.Envelope, bool]:
        """Hand this rank's part of `step` to the daemon: a planned save when the daemon holds a plan
        of this structure, else the full request (registered as the plan for the next saves).
        Returns the reply and whether the plan was used."""
        expires_at = time.monotonic() + self.timeout
        signature = _plan_signature(staged)
        wire = self._wire_plan
        if wire is not None and signature is not None and wire.signature == signature:
            planned = PlannedSave(wire.plan_id, step, tuple(s.to_update() for s in staged), metrics, expires_at)
            try:
                return self._send_save(messages.SAVE_PLANNED, planned.to_wire(), expires_at), True
            except DaemonRequestError as exc:
                if exc.code != ErrorCode.UNKNOWN_PLAN:
                    raise
                log.info("the daemon holds no save plan of this rank (restarted?): sending step %d in full", step)
        plan_id = secrets.randbits(62) if signature is not None else None
        request = self._request(
            step,
            parts=tuple(s.to_part() for s in staged),
            versions={"ckptd": CKPTD_VERSION, "torch": torch.__version__},
            metrics=metrics,
            retention=self.retention,
            expires_at=expires_at,
            plan_id=plan_id,
            daemon=self._daemon_instance,
        )
        self._wire_plan = None
        reply = self._send_save(messages.SAVE, request.to_wire(), expires_at)
        if plan_id is not None and signature is not None:
            self._wire_plan = WirePlan(plan_id, signature)
        return reply, False

    def _request(self, step: int, **fields: Any) -> SaveRequest:
        """A request of this rank's for checkpoint `step`, with `fields` (parts, deadline, ...)."""
        return SaveRequest(
            root=self.root,
            step=step,
            rank=self.rank_info.rank,
            pid=os.getpid(),
            topology=self.rank_info.topology,
            job=self.rank_info.job_id,
            **fields,
        )

    def _send_save(self, msg_type: str, body: Dict[str, Any], expires_at: float) -> messages.Envelope:
        """Send a save request until the daemon takes it or `expires_at`; with the "wait" policy,
        a daemon that cannot take it now (too many saves in flight, or draining before a restart) is
        asked again after a pause (after a restart, the new daemon answers)."""
        pause = 0.005
        while True:
            remaining = expires_at - time.monotonic()
            try:
                return self._connection.request(msg_type, body, timeout=max(remaining, 0.001))
            except DaemonRequestError as exc:
                if exc.code == ErrorCode.WRONG_DAEMON and remaining > pause:  # restarted: address the new one
                    self._daemon_instance = body["daemon"] = hello(
                        self._connection, self.root, max(remaining, 0.001), self._run
                    )
                    continue
                if exc.code not in NOT_NOW_CODES or self.when_busy != "wait" or remaining <= pause:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.25)

    def _hand_over_in_background(
        self, handle: SaveHandle, staged: List[StagedComponent], metrics: Optional[Mapping[str, float]]
    ) -> None:
        if self._stager is None:
            self._stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptd-stage")
        if self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(self._wait_for_staging)
        with self._lock:
            self._staging.add(handle)

        def run() -> None:
            try:
                self._hand_over(handle, staged, metrics)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, CheckpointError)
                    else CheckpointError(f"staging step {handle.step} failed: {exc!r}")
                )
                handle._resolve(error=error)
                log.error("%s", error)
            finally:
                with self._lock:
                    self._staging.discard(handle)

        self._stager.submit(run)

    def _wait_for_staging(self, *_: Any) -> None:
        """Optimizer step pre-hook: parameters may not change while a background copy reads them."""
        with self._lock:
            pending = list(self._staging)
        for handle in pending:
            handle._staged.wait()

    def skip(self, step: int, reason: str) -> None:
        """Tell the daemon this rank skips checkpoint `step`: it aborts the step, and every rank's
        handle of it fails with `reason` (a checkpoint needs every rank)."""
        body = self._request(
            step, parts=(), expires_at=time.monotonic() + self.timeout, skip_reason=reason[:1024]
        ).to_wire()
        try:
            self._connection.request(messages.SAVE, body, timeout=self.timeout)
        except CheckpointError as exc:
            log.warning("could not tell the daemon that step %d was skipped: %s", step, exc)

    def _on_notification(self, envelope: messages.Envelope) -> None:
        """Runs on the I/O thread."""
        if envelope.type == messages.RELEASED:
            released = messages.Released.from_wire(envelope.body)
            if released is not None:
                self._take_back(released.leases)
            return
        outcome = messages.Outcome.from_wire(envelope.type, envelope.body)
        if outcome is None or outcome.job != self.rank_info.job_id:
            return
        with self._lock:
            handle = self._handles.get(outcome.step)
        if handle is None:
            return
        if outcome.committed:
            handle._resolve(path=outcome.path)
        else:
            handle._resolve(error=CheckpointError(f"checkpoint of step {outcome.step} aborted: {outcome.reason}"))

    def _watch_daemon(self) -> None:
        """While saves or leases are out, ask the daemon that took them every second whether it still
        runs: a daemon that was restarted, or that has not answered for `daemon_timeout` seconds,
        took those saves with it; settle them and take their staging memory back."""
        interval = min(WATCH_INTERVAL_S, self.daemon_timeout / 4)
        last_answer = time.monotonic()
        while not self._closing.wait(interval):
            with self._lock:
                idle = not self._handles and not self._lent
            if idle:
                last_answer = time.monotonic()
                continue
            asked_at = time.monotonic()
            try:
                instance = hello(
                    self._connection, self.root, min(2 * WATCH_INTERVAL_S, self.daemon_timeout / 2), self._run
                )
            except CheckpointError:
                silent = time.monotonic() - last_answer
                if silent >= self.daemon_timeout:
                    try:
                        self._lose_daemon(None, f"stopped answering for {silent:.0f} s")
                    except Exception:  # as above
                        log.exception("settling the saves of an unanswering daemon failed")
                    last_answer = time.monotonic()
                continue
            last_answer = time.monotonic()
            if instance != self._daemon_instance:
                # What the old daemon never answered, it never will, and the new one refuses unread (a
                # request is addressed to its daemon): give it up now rather than at its deadline.
                self._connection.fail_sent_before(
                    asked_at, f"the ckptd daemon at {self.endpoint} was restarted before it answered"
                )
            try:
                self._lose_daemon(instance, "was restarted")
            except Exception:  # the watchdog must outlive any one failure (the disk may be failing)
                log.exception("settling the saves of a restarted daemon failed; trying again in %.1f s", interval)

    def _lose_daemon(self, answering: Optional[str], what: str) -> None:
        """Settle every save held by a daemon other than `answering` (None: no daemon answers) and take
        back exactly the leases that daemon held."""
        with self._lock:
            lost = [h for h in self._handles.values() if h._daemon_instance not in (None, answering)]
            leases = [lease for lease, instance in self._lent.items() if instance not in (None, answering)]
        if answering is not None:
            self._daemon_instance = answering
        if not lost and not leases:
            return
        log.error("the ckptd daemon at %s %s; settling the saves it held", self.endpoint, what)
        self._daemon_lost = answering is None
        for handle in lost:
            self._settle(handle, f"the ckptd daemon at {self.endpoint} {what} while it held this save (see its log)")
        self._take_back(leases)

    def _settle(self, handle: SaveHandle, what: str) -> None:
        """Decide a save the daemon can no longer be asked about, for good: committed if its directory
        has its final name, otherwise fenced so that it never commits. Call before reusing its regions."""
        path = fence_save(self.root, handle.step, self.rank_info.job_id)
        if path is not None:
            handle._resolve(path=path)
        else:
            handle._resolve(
                error=CheckpointError(
                    f"checkpoint of step {handle.step} was not committed: {what}; the previous checkpoint is intact"
                )
            )

    def _reconnect(self) -> None:
        """After losing the daemon: wait for one to answer again (local rank 0 restarts it if allowed)."""
        self._daemon_instance = ensure_serving(
            self._connection,
            self.root,
            may_start=self._may_start,
            wait_s=self._connect_timeout,
            daemon_args=self._daemon_args,
            run=self._run,
        )
        self._daemon_lost = False

    @property
    def staging(self) -> StagingPool:
        """This rank's staging memory: its regions by name and the bytes staged in them."""
        return self._pool

    def in_flight(self) -> List[SaveHandle]:
        """Handles of saves not yet committed or failed."""
        with self._lock:
            return [h for h in self._handles.values() if not h.done()]

    def close(self, timeout: Optional[float] = None) -> None:
        """Wait for saves in flight (up to `timeout` each), then free the staging memory."""
        for handle in self.in_flight():
            try:
                handle.wait(timeout if timeout is not None else self.timeout)
            except CheckpointError as exc:
                log.warning("save of step %d did not commit before close: %s", handle.step, exc)
        self._closing.set()
        self._watchdog.join(timeout=10)
        for executor in (self._stager, self._plan_checker):
            if executor is not None:
                executor.shutdown(wait=True)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        deadline = time.monotonic() + 5.0
        while self._pool.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._daemon_lost:
            bye(self._connection, timeout=min(BYE_TIMEOUT_S, self.daemon_timeout))
        self._connection.close()
        self._pool.close()


@dataclass(frozen=True)
class WirePlan:
    """A save plan the daemon holds for this client: its id and the structure it was made for."""

    plan_id: int
    signature: Tuple[Any, ...]


def _plan_signature(staged: List[StagedComponent]) -> Optional[Tuple[Any, ...]]:
    """What a planned save must share with the request that registered its plan: each component's
    plan (the object itself, compared by identity: replanning makes a new one) and staging region;
    None if a component has no plan, so that every save of this structure goes in full."""
    if any(s.plan is None for s in staged):
        return None
    return tuple((s.key, s.plan, s.region.name if s.region is not None else None) for s in staged)


def _place_in_job(daemon_args: DaemonArgs, rank_info: RankInfo) -> DaemonArgs:
    """`daemon_args` with this rank's node and the job's node count, which a daemon auto-started in
    a multi-node job must know (unless `daemon_args` sets them itself)."""
    if rank_info.topology.num_nodes == 1:
        return daemon_args
    return with_fallbacks(daemon_args, node=rank_info.node, num_nodes=rank_info.topology.num_nodes)
