"""`CheckpointManager`: the trainer-facing API over a state provider."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch.distributed as dist

from ckptd.client.assembly import Assembly, assemble_from_nodes
from ckptd.client.components import StateComponent
from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.loading import (
    hold_for_loading,
    latest_checkpoint,
    rank_scopes,
    read_manifest,
    read_scopes,
    select_scopes,
)
from ckptd.client.saving import CheckpointClient, ClientOptions, SaveHandle
from ckptd.client.sharded import read_sharded
from ckptd.client.snapshot import PreparedComponent
from ckptd.client.topology import RankInfo, detect_rank_info, process_group_ranks
from ckptd.disk.files import FileProblem
from ckptd.disk.objectstore import ObjectStoreError, ObjectStoreRoot, fetch_checkpoint
from ckptd.disk.root import checkpoint_path, checkpoint_steps
from ckptd.disk.tiers import read_tiers_record
from ckptd.proto import layout
from ckptd.proto.manifest import Manifest, ManifestError
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.tiers import ROOT_TIER, is_object_store, parse_tiers
from ckptd.proto.topology import Topology

log = logging.getLogger(__name__)


class LoadedCheckpoint(str):
    """The directory a load restored from (a str, as `load_checkpoint` always returned), with the
    `step` it holds and the `tier` it came from (`"root"`, a tier's name, or None for a path given)."""

    step: int
    tier: Optional[str]

    def __new__(cls, path: str, step: int, tier: Optional[str]) -> "LoadedCheckpoint":
        loaded = super().__new__(cls, path)
        loaded.step, loaded.tier = step, tier
        return loaded

    def __reduce__(self) -> Tuple[Any, Tuple[str, int, Optional[str]]]:
        return LoadedCheckpoint, (str(self), self.step, self.tier)


@dataclass(frozen=True)
class CheckpointManagerOptions(ClientOptions):
    """Every setting of a CheckpointManager: the ClientOptions of its connection to the node daemon
    (`endpoint`, `auto_start`, `when_busy`, `timeout`, `connect_timeout`, `daemon_args`, `retention`,
    `daemon_timeout`, `tiers`, `huge_pages`; checked as there), and:

    `verify`: check every file's checksum before loading it.
    `connect`: connect to the daemon (starting one if allowed) at construction; otherwise at the first save.
    """

    verify: bool = True
    connect: bool = True


class CheckpointManager:
    """Saves and loads a trainer's state through the node's ckptd daemon.

    `provider` has `get_state_components()` (called at every save and load, so patterns may be
    decided at run time) and, when it uses PER_GROUP, `get_process_groups()`. A provider with only
    the older `get_statefuls_for_save()` / `get_statefuls_for_load()` still works: each stateful
    is treated as GLOBAL.

    The connection to the node daemon (auto-started by local rank 0 when `auto_start` and nothing
    answers) is made at construction unless `connect=False`, in which case the first save makes it;
    loading never needs a daemon. `when_busy` ("wait" or "skip") is the policy when the previous
    save still holds this rank's staging memory: "wait" blocks the save until the daemon has written
    the previous one; "skip" returns at once with a handle that raises CheckpointSkipped (and a
    warning), so `save_checkpoint` may be called every step. `retention` (a RetentionPolicy) tells
    the committing daemon what to keep after each commit; None keeps every checkpoint.

    `timeout` bounds each hand-over and each wait for staging memory; `daemon_timeout` is how long
    the daemon holding this rank's saves may go without answering before they are settled: each is
    then either committed already or fenced so that it never commits, and its handle says which.
    `daemon_args` (DaemonOptions, or `ckptd serve` arguments as strings) configures an auto-started daemon.

    The settings are `options` (CheckpointManagerOptions); each of its fields may also be given as a
    keyword, which overrides `options`: `CheckpointManager(p, root, when_busy="skip")` and
    `CheckpointManager(p, root, CheckpointManagerOptions(when_busy="skip"))` are the same manager.
    `rank_info` (default: detected from torch.distributed and the environment) says where this rank sits.
    """

    def __init__(
        self,
        provider: Any,
        root: str,
        options: Optional[CheckpointManagerOptions] = None,
        *,
        rank_info: Optional[RankInfo] = None,
        **overrides: Any,
    ) -> None:
        self.options = replace(options or CheckpointManagerOptions(), **overrides)
        self.provider = provider
        self.root = os.path.realpath(root)
        self.verify = self.options.verify
        self.rank_info = rank_info or detect_rank_info()
        self._client: Optional[CheckpointClient] = None
        self._gloo: Any = None
        """The process group that carries files between nodes at a load (made on first need)."""
        if not hasattr(provider, "get_state_components"):
            if not hasattr(provider, "get_statefuls_for_save"):
                raise TypeError("the provider needs get_state_components() (or the older get_statefuls_for_save())")
            warnings.warn(
                "get_statefuls_for_save()/get_statefuls_for_load() are deprecated; implement "
                "get_state_components() to choose a sharing pattern per component",
                DeprecationWarning,
                stacklevel=2,
            )
        if self.options.connect:
            components = self._prepare(self._components(for_save=True))  # a misdeclared provider fails here,
            self.connect()  # before a daemon is started
            self._allocate(components)

    @property
    def client(self) -> CheckpointClient:
        """The connection to the node daemon (made on first use)."""
        return self.connect()

    def connect(self) -> CheckpointClient:
        """Connect to the node daemon now, starting one if allowed (done at construction unless
        `connect=False`); returns the connection. Raises DaemonUnavailableError or RootInUseError."""
        if self._client is None:
            self._client = CheckpointClient(self.root, self.rank_info, self.options)
        return self._client

    def allocate_staging(self) -> None:
        """Allocate this rank's staging memory in the background, sized from the state as it is now.

        Called at construction; call it again once the state has its full size (for example after
        the first optimizer step, when AdamW creates its state) so that the first save does not
        pay for allocating and faulting in the memory.
        """
        self._allocate(self._prepare(self._components(for_save=True)))

    def _allocate(self, components: List[PreparedComponent]) -> None:
        try:
            self.client.allocate_ahead(components)
        except Exception as exc:  # the state may not be ready this early; the first save reports real errors
            log.warning("staging memory is not allocated ahead (%s); the first save allocates it", exc)

    def wait_staging_allocated(self, timeout: Optional[float] = None) -> bool:
        """Wait until the staging memory allocate_staging() started is ready; False on timeout.

        Never needed for correctness (a save waits for it); useful to keep the allocation out of a
        timed region, or to know when the first save will cost no more than a warm one."""
        return self.client.wait_staging_allocated(timeout)

    def save_checkpoint(
        self, step: int, metrics: Optional[Mapping[str, float]] = None, *, overlap: bool = False
    ) -> SaveHandle:
        """Stage this rank's state for checkpoint `step`; returns once staged, with a handle.

        The caller may change its tensors as soon as this returns. `handle.wait()` gives the
        committed directory or raises CheckpointError with the reason.

        `overlap=True` returns sooner: only the tensors that forward and backward may change
        (buffers, non-module state) are copied before returning; parameters and optimizer state are
        copied while the next forward and backward run, and the next `optimizer.step()` (of any
        optimizer) waits until that copy is done, so the checkpoint never mixes two steps. Change
        parameters outside `optimizer.step()` only after `handle.wait_staged()`.
        """
        return self.client.save(step, self._prepare(self._components(for_save=True)), metrics, overlap=overlap)

    def load_checkpoint(self, path: Optional[str] = None) -> LoadedCheckpoint:
        """Restore every component on this rank from `path` into the existing objects; returns the
        directory loaded (a str, with the `step` and the `tier` it came from).

        Every file this rank needs is verified before anything is restored. With `path=None` the
        newest committed checkpoint in any tier (the root, then the `tiers`, nearest first) is used,
        read from the nearest tier that holds it and verifies; if no tier's copy verifies on some
        rank, the next older step is tried, with a warning naming what was skipped, so all ranks load
        the same step.
        """
        components = self._prepare(self._components(for_save=False))
        if path is not None:
            self._restore(self._read(path, components))
            return LoadedCheckpoint(path, read_manifest(path).step, None)
        copies = self._copies_by_step()
        for step in self._steps_on_any_rank(copies):  # newest first
            states: Optional[List[tuple]] = None
            problems = []
            candidates = copies.get(step, [])
            gathered = self._gather_from_nodes(step, components)
            if gathered is not None and gathered.directory is not None:  # this node's root copy is partial
                candidates = [(ROOT_TIER, gathered.directory)] + [c for c in candidates if c[0] != ROOT_TIER]
            for tier, candidate in candidates:  # nearest tier first
                try:
                    states = self._read_copy(candidate, step, components)
                except VerificationError as exc:
                    why = str(exc)
                    if tier == ROOT_TIER and gathered is not None and gathered.problems:
                        why = "; ".join(gathered.problems)
                    problems.append(f"{candidate} (tier {tier}): {why}")
                    log.warning("skipping checkpoint %s (tier %s): %s", candidate, tier, why)
                    continue
                break
            agreed = self._all_ranks_agree(states is not None)
            if gathered is not None:  # every rank of the node has read it by now
                gathered.remove()
            if agreed:
                assert states is not None
                self._restore(states)
                if tier != ROOT_TIER:
                    log.info("loaded step %d from tier %s (%s)", step, tier, candidate)
                return LoadedCheckpoint(candidate, step, tier)
            reason = "; ".join(problems) or ("no tier this rank reaches holds it" if step not in copies else "")
            log.warning("skipping step %d: %s", step, reason or "another rank could not verify it")
        others = ", ".join(f"{name} ({path})" for name, path in self._tiers()[1:])
        raise CheckpointError(
            f"no committed checkpoint under {self.root}{f' or in tiers {others}' if others else ''} verifies"
        )

    def _tiers(self) -> List[Tuple[str, str]]:
        """(name, path) of the root and the slower tiers, nearest first: the manager's `tiers`, or
        else those the root's daemon recorded."""
        specs = parse_tiers(self.options.tiers) or read_tiers_record(self.root)
        return [(ROOT_TIER, self.root)] + [(spec.name, spec.path) for spec in specs]

    def _copies_by_step(self) -> Dict[int, List[Tuple[str, str]]]:
        """Step -> (tier, directory or object-store URL) of each committed copy this rank can reach,
        nearest tier first."""
        copies: Dict[int, List[Tuple[str, str]]] = {}
        for tier, root in self._tiers():
            if is_object_store(root):
                try:
                    steps = ObjectStoreRoot(root).committed_steps()
                except ObjectStoreError as exc:
                    log.warning("tier %s is skipped: %s", tier, exc)
                    continue
                for step in steps:
                    copies.setdefault(step, []).append((tier, f"{root}/{layout.checkpoint_dir_name(step)}"))
                continue
            for step in checkpoint_steps(root):  # a final name without its manifest is damage: warned about
                copies.setdefault(step, []).append((tier, checkpoint_path(root, step)))
        return copies

    def _read_copy(self, copy: str, step: int, components: List[PreparedComponent]) -> List[tuple]:
        """`_read` of a directory; of a copy in an object store, the files this rank reads are first
        fetched into a temporary directory of the root (ranged GETs, every file checked), read from
        there, and removed."""
        if not is_object_store(copy):
            return self._read(copy, components)
        fetched = os.path.join(self.root, layout.tmp_dir_name(step, f"fetch{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        os.makedirs(self.root, exist_ok=True)
        try:
            wanted = functools.partial(self._files_needed, components=components)
            fetch_checkpoint(ObjectStoreRoot(copy.rsplit("/", 1)[0]), step, fetched, wanted)
            return self._read(fetched, components)
        except (ObjectStoreError, FileProblem, ManifestError) as exc:
            raise VerificationError(str(exc)) from None
        finally:
            shutil.rmtree(fetched, ignore_errors=True)  # what was read is in memory (or mapped) by now

    def _gather_from_nodes(self, step: int, components: List[PreparedComponent]) -> Optional[Assembly]:
        """In a job of several ranks: the files this rank's node needs for `step` and its root lacks
        (node-local roots), gathered from the other nodes (collective; None on one rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        if self._gloo is None:  # the files travel between CPU memories, whatever the job's backend
            self._gloo = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        needed = functools.partial(self._files_needed, components=components)
        return assemble_from_nodes(self.root, step, self.rank_info.topology.node_of, needed, self._gloo)

    def _files_needed(self, manifest: Manifest, components: List[PreparedComponent]) -> Set[str]:
        """The files this rank reads from a checkpoint with `manifest` (every file of a SHARDED
        component, or of one resharded by its own function)."""
        paths: Set[str] = set()
        for prepared in components:
            comp = prepared.component
            record = manifest.components.get(comp.key)
            if record is None:
                continue
            scopes = list(record.scopes.values())
            resharded = record.pattern is SharingPattern.PER_RANK and comp.reshard is not None
            if record.pattern is not SharingPattern.SHARDED and not resharded:
                group_ranks = prepared.group_ranks if record.pattern is SharingPattern.PER_GROUP else ()
                try:
                    scopes = select_scopes(manifest, comp.key, record, self.rank_info, group_ranks)
                except CheckpointError:
                    continue  # the read says why
            paths.update(path for scope in scopes for path in (scope.tensor_file.path, scope.state_file.path))
        return paths

    def _steps_on_any_rank(self, copies: Dict[int, List[Tuple[str, str]]]) -> List[int]:
        """Every step some rank holds a copy of, newest first (the same list on every rank: a rank
        whose node-local tier was wiped still tries the steps the other ranks hold)."""
        steps = set(copies)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(steps))
            steps = {step for held in gathered for step in held}
        return sorted(steps, reverse=True)

    def _read(self, checkpoint_dir: str, components: List[PreparedComponent]) -> List[tuple]:
        """Each component's verified state from `checkpoint_dir` (nothing is restored yet)."""
        with hold_for_loading(checkpoint_dir):  # retention leaves it alone while its files are opened
            return self._read_held(checkpoint_dir, components)

    def _read_held(self, checkpoint_dir: str, components: List[PreparedComponent]) -> List[tuple]:
        # every rank asks for its sharded targets first, in one order: a state_dict() may be collective,
        # and a rank that fails to verify a file must not leave the others waiting inside one
        targets = {
            p.component.key: p.component.stateful.state_dict()
            for p in components
            if p.component.sharing_pattern is SharingPattern.SHARDED
        }
        manifest = read_manifest(checkpoint_dir)
        states = []
        for prepared in components:
            comp = prepared.component
            record = manifest.components.get(comp.key)
            if record is None:
                if comp.required:
                    raise CheckpointError(f"required component {comp.key!r} is not in {checkpoint_dir}")
                log.warning("optional component %r is not in %s; leaving it as it is", comp.key, checkpoint_dir)
                continue
            if record.pattern is not comp.sharing_pattern:
                log.warning(
                    "component %r was saved as %s and is declared %s now; loading the saved layout",
                    comp.key,
                    record.pattern.value,
                    comp.sharing_pattern.value,
                )
            states.append((comp, self._read_component(checkpoint_dir, manifest, prepared, targets.get(comp.key))))
        return states

    def _read_component(self, checkpoint_dir: str, manifest: Manifest, prepared: PreparedComponent, target: Any) -> Any:
        """One component's state for this rank, by the pattern it was saved with."""
        comp = prepared.component
        record = manifest.components[comp.key]
        if record.pattern is SharingPattern.SHARDED:
            if target is None:
                raise CheckpointError(
                    f"component {comp.key!r} was saved SHARDED; declare it SHARDED to load it (its "
                    "state_dict() names the tensors, DTensors or plain, to fill)"
                )
            return read_sharded(checkpoint_dir, comp.key, record, target, self.verify)
        if (
            record.pattern is SharingPattern.PER_RANK
            and comp.reshard is not None
            and manifest.topology != self.rank_info.topology
        ):
            saved = [
                read_scopes(checkpoint_dir, [scope], verify=self.verify) for scope in rank_scopes(manifest, comp.key)
            ]
            return comp.reshard(saved, manifest.topology, self.rank_info.topology, self.rank_info.rank)
        group_ranks = prepared.group_ranks if record.pattern is SharingPattern.PER_GROUP else ()
        scopes = select_scopes(manifest, comp.key, record, self.rank_info, group_ranks)
        return read_scopes(checkpoint_dir, scopes, verify=self.verify)

    def _restore(self, states: List[tuple]) -> None:
        for comp, state in states:
            comp.stateful.load_state_dict(state)
        log.info("rank %d restored %d components", self.rank_info.rank, len(states))

    def _all_ranks_agree(self, ok: bool) -> bool:
        """True when this rank and (in a distributed job) every other rank could read the candidate."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return ok
        votes: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(votes, ok)
        return all(votes)

    def saved_topology(self, path: Optional[str] = None) -> Topology:
        """The topology checkpoint `path` (default: the latest) was saved with, to decide before
        loading what to do on another world size (PER_RANK, PER_GROUP and PER_NODE need the same)."""
        checkpoint = path or self.latest_checkpoint()
        if checkpoint is None:
            raise CheckpointError(f"no committed checkpoint under {self.root}")
        return read_manifest(checkpoint).topology

    def latest_checkpoint(self) -> Optional[str]:
        """The newest committed checkpoint directory under root, or None."""
        return latest_checkpoint(self.root)

    def close(self) -> None:
        """Wait for saves in flight, then release the staging memory and the connection."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _components(self, for_save: bool) -> List[StateComponent]:
        if hasattr(self.provider, "get_state_components"):
            components = list(self.provider.get_state_components())
        else:
            getter = (
                self.provider.get_statefuls_for_save
                if for_save
                else getattr(self.provider, "get_statefuls_for_load", self.provider.get_statefuls_for_save)
            )
            components = [StateComponent(k, s, SharingPattern.GLOBAL) for k, s in dict(getter()).items()]
        keys = [c.key for c in components]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"duplicate component keys: {keys}")
        return components

    def _prepare(self, components: List[StateComponent]) -> List[PreparedComponent]:
        groups: Optional[Dict[str, Any]] = None
        prepared = []
        for comp in components:
            if comp.sharing_pattern is not SharingPattern.PER_GROUP:
                prepared.append(PreparedComponent(comp))
                continue
            if groups is None:
                getter = getattr(self.provider, "get_process_groups", None)
                if getter is None:
                    raise CheckpointError(
                        f"component {comp.key!r} is PER_GROUP but the provider has no get_process_groups()"
                    )
                groups = dict(getter())
            group = groups.get(comp.process_group_name or "")
            if group is None:
                raise CheckpointError(
                    f"component {comp.key!r} names process group {comp.process_group_name!r}, which "
                    f"get_process_groups() does not return (it has {sorted(groups)})"
                )
            prepared.append(PreparedComponent(comp, process_group_ranks(group)))
        return prepared
