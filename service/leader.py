"""The commit leader: once every node reports, validate, write the manifest, commit, announce.

On one node the leader lives in the same daemon as the node coordinator (`LocalCommitLeader`);
a multi-node leader receives the same `NodeReport`s over authenticated TCP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Set, Tuple

from ckptd.proto.cluster import NodeReport, ScopeFiles
from ckptd.proto.formats import STATE_DIGEST_KEY
from ckptd.proto.manifest import ComponentRecord, Manifest, ScopeRecord
from ckptd.proto.messages import ComponentPart, Outcome
from ckptd.proto.patterns import SharingPattern, place
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.sharding import chunks_in_scopes, coverage_problem
from ckptd.service.errors import CommitRejected
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.store import CheckpointStore, RetentionFacts

log = logging.getLogger(__name__)


Announce = Callable[[Outcome], Awaitable[None]]
Published = Callable[[List[int]], None]
"""Told the steps of each batch once committed and durable, before retention runs (in a worker thread)."""
SaveKey = Tuple[str, int]
"""(job run, step): one save."""
TIMELINE_KEPT = 256


class CommitChannel(Protocol):
    """Where a node coordinator sends its reports and aborts: the leader itself, or a link to it."""

    async def start(self) -> None:
        """Begin serving (bind or connect)."""

    async def close(self) -> None:
        """Stop serving."""

    async def report(self, report: NodeReport) -> None:
        """Every local rank's part of a save is durable."""

    async def abort(self, job: str, step: int, reason: str) -> None:
        """Abort a save on every node."""

    def deliver_outcomes_to(self, announce: Announce) -> None:
        """Where the channel sends each decided outcome (the node coordinator)."""


async def nobody_listens(outcome: Outcome) -> None:
    """The announce of a channel no coordinator listens to yet (an outcome then is a wiring bug)."""
    log.error("the outcome of step %d was decided before anything listened for it", outcome.step)


class LocalCommitLeader:
    """Commits a save once every node of the job has reported into this process (on one node, the
    node's own coordinator; on several, through `ClusterLeader`).

    Commits on the root are serialized: one committer task takes the ready saves lowest step first,
    so two commits never race on the root's directory entries, `latest` or the retention pass."""

    def __init__(
        self,
        store: CheckpointStore,
        executor: concurrent.futures.Executor,
        metrics: Optional[DaemonMetrics] = None,
        on_published: Optional[Published] = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._on_published = on_published
        self._executor = executor
        self._announce: Announce = nobody_listens
        self._reports: Dict[SaveKey, Dict[int, NodeReport]] = {}
        self._ready: Dict[SaveKey, List[NodeReport]] = {}
        self._committing: Set[SaveKey] = set()
        self._committer: Optional[asyncio.Task] = None
        self._timeline: Dict[SaveKey, Dict[str, float]] = {}
        """The last saves' moments (time.monotonic(), comparable across the processes of one host):
        the last node's report, the commit's rename, the outcome sent."""

    async def start(self) -> None:
        """Nothing to set up on one node."""

    def deliver_outcomes_to(self, announce: Announce) -> None:
        """Where each decided outcome goes."""
        self._announce = announce

    async def close(self) -> None:
        """Let the commit in progress finish (its outcome is final once it renames the directory)."""
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)

    def reported_for(self, key: SaveKey) -> Set[int]:
        """The nodes that have reported save `key` so far."""
        return set(self._reports.get(key, ()))

    def reported_nodes(self) -> Dict[SaveKey, Set[int]]:
        """Saves waiting for reports, with the nodes that have reported so far."""
        return {key: set(reports) for key, reports in self._reports.items()}

    async def report(self, report: NodeReport) -> None:
        """Record a node's report; queue the save for commit when the last node has reported."""
        key = (report.job, report.step)
        if key in self._committing or key in self._ready:
            return
        reports = self._reports.setdefault(key, {})
        reports[report.node] = report
        if len(reports) < report.topology.num_nodes:
            return
        del self._reports[key]
        self._ready[key] = list(reports.values())
        self._mark(key, "last_report")
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_ready())

    async def _commit_ready(self) -> None:
        """Commit the ready saves in batches, lowest step first: each one's manifest and rename, then
        one fsync of the root, `latest` and one retention pass for the batch; announce the outcomes
        after that fsync (see `CheckpointStore.publish` for when it fails)."""
        while self._ready:
            batch = sorted(self._ready.items(), key=lambda item: (item[0][1], item[0][0]))
            self._ready.clear()
            self._committing.update(key for key, _ in batch)
            try:
                outcomes = [await self._commit(key, reports) for key, reports in batch]
                for key, _ in batch:
                    self._mark(key, "committed")
                committed = [reports for outcome, (_, reports) in zip(outcomes, batch) if outcome.committed]
                if committed:
                    await self._publish([o.step for o in outcomes if o.committed], committed[-1])
                for key, _ in batch:
                    self._mark(key, "published")
            finally:
                self._committing.difference_update(key for key, _ in batch)
            for outcome in outcomes:
                await self._announce(outcome)
                self._mark((outcome.job, outcome.step), "announced")

    def _mark(self, key: SaveKey, moment: str) -> None:
        self._timeline.setdefault(key, {})[moment] = time.monotonic()
        while len(self._timeline) > TIMELINE_KEPT:
            del self._timeline[next(iter(self._timeline))]

    def timeline(self) -> List[Dict[str, Any]]:
        """The last saves' moments, oldest first: job, step, last_report, committed, announced."""
        return [{"job": job, "step": step, **moments} for (job, step), moments in self._timeline.items()]

    async def _publish(self, steps: List[int], newest: List[NodeReport]) -> None:
        """Make a batch's renames durable and move `latest`, then apply the newest save's retention
        policy. Never raises: the batch is committed whatever happens here."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._store.publish, steps)
            if self._on_published is not None:
                await loop.run_in_executor(self._executor, self._on_published, steps)
            policy = next((r.retention for r in sorted(newest, key=lambda r: r.node) if r.retention), None)
            if policy is not None:
                await loop.run_in_executor(self._executor, self._apply_retention, policy)
        except Exception:
            log.exception("publishing step(s) %s failed; they are committed, `latest` is repaired later", steps)

    async def _commit(self, key: SaveKey, reports: List[NodeReport]) -> Outcome:
        """Write one save's manifest and rename its directory into place (not yet durable: `publish`)."""
        job, step = key
        try:
            committing = time.monotonic()
            path, manifest_json = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._write_manifest, key, reports
            )
        except CommitRejected as exc:
            return Outcome(job, step, committed=False, reason=str(exc))
        except Exception as exc:  # OSError, or a bug: either way not committed, and the committer goes on
            reason = f"committing step {step} failed: {exc}"
            log.error(reason, exc_info=not isinstance(exc, OSError))
            return Outcome(job, step, committed=False, reason=reason)
        if self._metrics is not None:
            self._metrics.observe_phase("commit", time.monotonic() - committing)
        log.info("committed step %d at %s", step, path)
        return Outcome(job, step, committed=True, path=path, manifest=manifest_json)

    def _write_manifest(self, key: SaveKey, reports: List[NodeReport]) -> Tuple[str, str]:
        """Build, encode and commit one save's manifest (in a thread: for many tensors, building and
        encoding it takes tens of ms, which the event loop must not wait for); returns its path and JSON."""
        job, step = key
        manifest = build_manifest(reports)
        manifest_json = manifest.to_json()
        facts = RetentionFacts(manifest.metrics, manifest.job)
        return self._store.commit(self._store.tmp_path(step, job), step, manifest_json, facts), manifest_json

    def _apply_retention(self, policy: RetentionPolicy) -> None:
        apply_retention(self._store, policy)

    async def abort(self, job: str, step: int, reason: str) -> None:
        """Abort `step` of run `job` on every node (a rank failed, timed out or sent an invalid part).
        Ignored while that save is already committing: its outcome is announced by the commit."""
        key = (job, step)
        if key in self._committing:
            return
        self._reports.pop(key, None)
        self._ready.pop(key, None)
        await self._announce(Outcome(job, step, committed=False, reason=reason))


def apply_retention(store: CheckpointStore, policy: RetentionPolicy) -> None:
    """After a commit: delete what the policy does not keep. A failure here never fails the commit."""
    try:
        deleted = store.apply_retention(policy)
    except OSError as exc:
        log.error("retention pass failed (nothing is lost; it runs again after the next commit): %s", exc)
        return
    except Exception:  # the checkpoint is committed whatever the retention pass does
        log.exception("retention pass failed (nothing is lost; it runs again after the next commit)")
        return
    if deleted:
        log.info("retention deleted step(s) %s", deleted)


class NodeCopyCommitter:
    """Commits a follower's own copy of each checkpoint in its node-local root (`--node-local-root`):
    the files this node wrote, under the manifest the leader committed (which also lists the files
    that live on other nodes). Runs the same steps as the leader's commit, on this node's root."""

    def __init__(
        self, store: CheckpointStore, executor: concurrent.futures.Executor, on_published: Optional[Published] = None
    ) -> None:
        self._store = store
        self._executor = executor
        self._on_published = on_published

    async def commit(self, outcome: Outcome, retention: Optional[RetentionPolicy]) -> Outcome:
        """`outcome` (COMMITTED, with its manifest) with the path of this node's copy; the outcome is
        the job's whatever happens here (a copy that cannot be committed is logged: loads on this node
        then take its files from the other nodes or the next tier)."""
        if outcome.manifest is None:
            log.error(
                "the leader committed step %d without sending its manifest; this node keeps no copy", outcome.step
            )
            return outcome
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._executor, self._commit, outcome)
        except OSError as exc:
            log.error("step %d is committed, but this node's copy could not be: %s", outcome.step, exc)
            return outcome
        if self._on_published is not None:
            await loop.run_in_executor(self._executor, self._on_published, [outcome.step])
        if retention is not None:
            await loop.run_in_executor(self._executor, apply_retention, self._store, retention)
        return replace(outcome, path=path)

    def _commit(self, outcome: Outcome) -> str:
        assert outcome.manifest is not None
        path = self._store.commit(self._store.tmp_path(outcome.step, outcome.job), outcome.step, outcome.manifest)
        self._store.publish([outcome.step])
        log.info("committed this node's copy of step %d at %s", outcome.step, path)
        return path


def build_manifest(reports: List[NodeReport]) -> Manifest:
    """Check every rank's parts against each other and describe the checkpoint; raises CommitRejected.
    The metrics and versions recorded are rank 0's (node 0 reports its lowest rank's)."""
    first = min(reports, key=lambda report: report.node)
    parts_by_rank: Dict[int, Dict[str, ComponentPart]] = {}
    for report in reports:
        for rank, parts in report.parts.items():
            parts_by_rank[rank] = {p.key: p for p in parts}
    reference_rank = min(parts_by_rank)
    reference = parts_by_rank[reference_rank]
    _check_same_components(parts_by_rank, reference_rank)
    groups = _check_groups(parts_by_rank)
    _check_replication(parts_by_rank)
    files: Dict[str, Dict[str, ScopeFiles]] = {}
    for report in reports:
        for key, scope_files in report.files.items():
            files.setdefault(key, {}).update(scope_files)

    components: Dict[str, ComponentRecord] = {}
    for key, spec in reference.items():
        scopes: Dict[str, ScopeRecord] = {}
        for rank in sorted(parts_by_rank):
            part = parts_by_rank[rank][key]
            placement = place(part.pattern, rank, first.topology, part.group_name, part.group_ranks, spread=part.spread)
            written = files.get(key, {}).get(placement.scope)
            if written is None:
                raise CommitRejected(f"component {key!r}: no file was written for scope {placement.scope}")
            record = scopes.get(placement.scope)
            any_rank_reads = spec.spread or spec.pattern is SharingPattern.SHARDED
            readers = sorted(parts_by_rank) if any_rank_reads else (record.readers if record else []) + [rank]
            scopes[placement.scope] = ScopeRecord(
                placement.scope, placement.writer_rank, readers, written.tensor_file, written.state_file
            )
        if spec.spread:
            _check_shares(key, scopes, parts_by_rank[reference_rank][key])
        if spec.pattern is SharingPattern.SHARDED:
            _check_chunks(key, scopes)
        components[key] = ComponentRecord(
            spread=spec.spread,
            pattern=spec.pattern,
            required=spec.required,
            validate_replication=spec.validate_replication,
            metadata=dict(spec.metadata),
            scopes=scopes,
            group_name=spec.group_name,
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    started = min(r.started_at for r in reports)
    timings: Dict[str, float] = {}
    for report in reports:
        for name, value in report.timings.items():
            timings[name] = max(timings.get(name, 0.0), value)
    timings["total_s"] = round(time.time() - started, 6)
    return Manifest(
        step=first.step,
        topology=first.topology,
        groups=groups,
        components=components,
        versions=first.versions,
        metrics=first.metrics,
        created_at=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        committed_at=now.isoformat(),
        timings=timings,
        job=first.job,
    )


def _check_same_components(parts_by_rank: Dict[int, Dict[str, ComponentPart]], reference_rank: int) -> None:
    reference = parts_by_rank[reference_rank]
    for rank, parts in parts_by_rank.items():
        if set(parts) != set(reference):
            raise CommitRejected(
                f"ranks disagree on the components of this checkpoint: rank {reference_rank} has "
                f"{sorted(reference)}, rank {rank} has {sorted(parts)}"
            )
        for key, part in parts.items():
            ref = reference[key]
            if (part.pattern, part.group_name, part.validate_replication, part.spread) != (
                ref.pattern,
                ref.group_name,
                ref.validate_replication,
                ref.spread,
            ):
                raise CommitRejected(
                    f"component {key!r}: rank {rank} declares {part.pattern.value} (group {part.group_name!r}, "
                    f"validate_replication={part.validate_replication}) but rank {reference_rank} declares "
                    f"{ref.pattern.value} (group {ref.group_name!r}, validate_replication={ref.validate_replication})"
                )


def _check_groups(parts_by_rank: Dict[int, Dict[str, ComponentPart]]) -> Dict[str, List[List[int]]]:
    """Every member of a PER_GROUP group must report the same members; returns name -> groups."""
    groups: Dict[str, Dict[Tuple[int, ...], None]] = {}
    for rank, parts in parts_by_rank.items():
        for part in parts.values():
            if part.pattern is not SharingPattern.PER_GROUP:
                continue
            members = tuple(sorted(part.group_ranks))
            for member in members:
                other = parts_by_rank.get(member, {}).get(part.key)
                if other is None or tuple(sorted(other.group_ranks)) != members:
                    seen = None if other is None else sorted(other.group_ranks)
                    raise CommitRejected(
                        f"component {part.key!r}: rank {rank} says group {part.group_name!r} is {list(members)}, "
                        f"but rank {member} reports {seen}"
                    )
            groups.setdefault(part.group_name or "", {})[members] = None
    return {name: [list(m) for m in sorted(found)] for name, found in groups.items()}


def _check_shares(key: str, scopes: Dict[str, ScopeRecord], reference: ComponentPart) -> None:
    """A spread component's shares must not overlap; with digests (validate_replication) they must
    also cover every tensor the ranks hold."""
    seen: Dict[str, str] = {}
    for scope in scopes.values():
        for name in scope.tensor_file.tensors:
            if name in seen:
                raise CommitRejected(f"component {key!r}: tensor {name!r} is in both {seen[name]} and {scope.scope}")
            seen[name] = scope.scope
    if reference.digests is not None:
        missing = sorted(set(reference.digests) - {STATE_DIGEST_KEY} - set(seen))
        if missing:
            raise CommitRejected(f"component {key!r}: no share holds tensor(s) {missing[:5]}")


def _check_chunks(key: str, scopes: Dict[str, ScopeRecord]) -> None:
    """A SHARDED component's chunks, over all ranks' files, tile each of its tensors exactly once."""
    try:
        chunks = chunks_in_scopes(scopes.values())
    except ValueError as exc:
        raise CommitRejected(f"component {key!r}: {exc}") from None
    for name in sorted(chunks):
        problem = coverage_problem(name, chunks[name])
        if problem is not None:
            raise CommitRejected(f"component {key!r}: {problem}")


def _check_replication(parts_by_rank: Dict[int, Dict[str, ComponentPart]]) -> None:
    """For validate_replication components: every rank's digests equal the writer's, name by name."""
    ranks = sorted(parts_by_rank)
    for key, ref_part in parts_by_rank[ranks[0]].items():
        if not ref_part.validate_replication:
            continue
        reference = ref_part.digests or {}
        problems: List[str] = []
        for name in sorted(set().union(*((parts_by_rank[r][key].digests or {}).keys() for r in ranks))):
            differing = [r for r in ranks[1:] if (parts_by_rank[r][key].digests or {}).get(name) != reference.get(name)]
            if differing:
                what = "non-tensor state" if name == STATE_DIGEST_KEY else f"tensor {name!r}"
                problems.append(f"{what} differs on rank(s) {differing} from rank {ranks[0]}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CommitRejected(f"replication check failed for component {key!r}: {shown}")
