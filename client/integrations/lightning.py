"""PyTorch Lightning: `Trainer(plugins=[CkptdCheckpointIO(root)])` saves every checkpoint through ckptd.

Lightning collects its checkpoint dict on every rank and hands it to the CheckpointIO plugin on
global rank 0 only (DDP state is the same on every rank), so the plugin saves rank 0's dict as a
one-rank ckptd job: its tensors are copied into staging memory and `save_checkpoint` returns; the
node's daemon writes and commits in the background.

The file Lightning asks for (`epoch=0-step=12.ckpt`, `last.ckpt`) becomes a small pointer naming
the ckptd step, so `ModelCheckpoint` keeps its meaning: `monitor`, `save_top_k` (its deletions
remove pointers; `retention_for` maps it onto the daemon's retention), `every_n_train_steps`,
`save_last`, and `trainer.fit(ckpt_path="last")`. A pointer whose step never committed (the job
died first) loads, for `last*` pointers, the newest older committed step instead, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import lightning
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from ckptd.client.components import StateComponent
from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.integrations.support import SupportedRange, ValueHolder, plain, raise_failed_saves, warn_lossy
from ckptd.client.loading import read_manifest
from ckptd.client.manager import CheckpointManager, CheckpointManagerOptions
from ckptd.client.saving import SaveHandle
from ckptd.client.topology import RankInfo
from ckptd.disk.root import checkpoint_path, checkpoint_steps
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.topology import Topology

__all__ = ["CkptdCheckpointIO", "SUPPORTED", "retention_for"]

log = logging.getLogger(__name__)

SUPPORTED = SupportedRange("lightning", "2.2", "2.7")
POINTER_FORMAT = "ckptd-lightning-pointer/1"

COMPONENT_OF_KEY = {
    "state_dict": "model",
    "optimizer_states": "optimizers",
    "lr_schedulers": "lr_schedulers",
    "loops": "loops",
    "callbacks": "callbacks",
}
"""Lightning checkpoint keys saved as a component of their own, by component key."""
HPARAMS_COMPONENT = "hyper_parameters"
HPARAMS_KEYS = ("hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_name")
TRAINER_COMPONENT = "trainer"
"""Every other key: epoch, global_step, the Lightning version, the precision plugin's and the datamodule's state."""


@dataclass(frozen=True)
class Pointer:
    """What a `.ckpt` file Lightning asked for holds: the ckptd root and step it stands for."""

    root: str
    step: int

    def write(self, path: str) -> None:
        """Write atomically (a reader sees the old pointer or the new one)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": POINTER_FORMAT, "root": self.root, "step": self.step}, f)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> "Pointer":
        """The pointer in `path`; CheckpointError when it is not one."""
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read(4096))
            if raw.get("format") != POINTER_FORMAT:
                raise ValueError(raw.get("format"))
            return cls(str(raw["root"]), int(raw["step"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path} is not a ckptd checkpoint pointer ({type(exc).__name__}: {exc}); a checkpoint "
                "Lightning wrote itself loads without CkptdCheckpointIO"
            ) from None


def split_checkpoint(checkpoint: Mapping[str, Any], lossy: List[str]) -> Dict[str, Any]:
    """Lightning's checkpoint dict as ckptd component states (see COMPONENT_OF_KEY); hyper-parameters
    ckptd cannot store are kept as their repr, and their key paths added to `lossy`."""
    states: Dict[str, Any] = {
        component: checkpoint[key] for key, component in COMPONENT_OF_KEY.items() if key in checkpoint
    }
    states[HPARAMS_COMPONENT] = {k: plain(checkpoint[k], k, lossy) for k in HPARAMS_KEYS if k in checkpoint}
    taken = set(COMPONENT_OF_KEY) | set(HPARAMS_KEYS)
    states[TRAINER_COMPONENT] = {k: v for k, v in checkpoint.items() if k not in taken}
    return states


def join_checkpoint(states: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of `split_checkpoint`."""
    checkpoint = dict(states.get(TRAINER_COMPONENT) or {})
    checkpoint.update(states.get(HPARAMS_COMPONENT) or {})
    for key, component in COMPONENT_OF_KEY.items():
        if component in states:
            checkpoint[key] = states[component]
    return checkpoint


def monitored_metrics(checkpoint: Mapping[str, Any], path: str) -> Dict[str, float]:
    """The score of the ModelCheckpoint whose top-k file `path` is (for keep_best retention). A save
    that enters no top k (only `last.ckpt`) has none, and the daemon does not rank it."""
    metrics: Dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict) or not state.get("monitor"):
            continue
        score = (state.get("best_k_models") or {}).get(path)
        if score is not None:
            metrics[str(state["monitor"])] = float(score)
    return metrics


def retention_for(callback: ModelCheckpoint) -> Optional[RetentionPolicy]:
    """The daemon retention that keeps what `callback` keeps: its `save_top_k` best by `monitor`, or its
    `save_top_k` newest without one; None (keep everything) for `save_top_k=-1`. The newest
    checkpoint, the one `last.ckpt` names, is always kept too."""
    k = callback.save_top_k
    if k < 0:
        return None
    if k == 0:
        return RetentionPolicy(keep_last=1)
    if callback.monitor is None:
        return RetentionPolicy(keep_last=k)
    return RetentionPolicy(keep_best=k, best_metric=callback.monitor, best_mode=callback.mode)


class HeldComponents:
    """The provider CheckpointManager asks for components: the held states, GLOBAL (rank 0's) unless
    `patterns` names another pattern."""

    def __init__(self, holders: Mapping[str, Any], patterns: Optional[Mapping[str, SharingPattern]] = None) -> None:
        self.holders = holders
        self.patterns = patterns or {}

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent(key, holder, self.patterns.get(key, SharingPattern.GLOBAL))
            for key, holder in self.holders.items()
        ]


def _one_rank() -> RankInfo:
    """Rank 0 of a one-rank ckptd job: Lightning saves rank 0's dict alone, and any rank may load it."""
    return RankInfo(0, Topology.single_node(1), job_id=uuid.uuid4().hex)


class StepSaver:
    """Stages Lightning checkpoint dicts as ckptd steps (once per step: ModelCheckpoint saves a step
    twice, its own file and last.ckpt) and keeps their handles, so a failed save is raised later.

    Components not in `patterns` are GLOBAL; `rank_info` None: the job's ranks, from torch.distributed."""

    def __init__(
        self,
        root: str,
        options: Optional[CheckpointManagerOptions],
        overrides: Dict[str, Any],
        patterns: Optional[Mapping[str, SharingPattern]] = None,
        rank_info: Optional[RankInfo] = None,
    ) -> None:
        self.root = root
        self.options = options
        self.overrides = overrides
        self.rank_info = rank_info
        self.holders: Dict[str, ValueHolder] = {}
        self.provider = HeldComponents(self.holders, patterns)
        self.manager: Optional[CheckpointManager] = None
        self.handles: Dict[int, SaveHandle] = {}
        self.last_step: Optional[int] = None

    def save(self, checkpoint: Mapping[str, Any], path: str, say_lossy: bool = True) -> int:
        """Stage Lightning's `checkpoint` as ckptd step `global_step` unless that step is staged
        already, with the score `path` has in a ModelCheckpoint's top k; returns the step. The first
        save warns (with `say_lossy`) of hyper-parameters kept as their repr."""
        raise_failed_saves(self.handles)
        step = int(checkpoint["global_step"])
        if step == self.last_step:
            return step
        lossy: List[str] = []
        for key, state in split_checkpoint(checkpoint, lossy).items():
            self.holders.setdefault(key, ValueHolder()).value = state
        if self.manager is None:
            if say_lossy:
                warn_lossy("Lightning hyper-parameters", lossy)
            self.manager = CheckpointManager(
                self.provider, self.root, self.options, rank_info=self.rank_info, **self.overrides
            )
        self.handles[step] = self.manager.save_checkpoint(step, monitored_metrics(checkpoint, path))
        self.last_step = step
        return step

    def finish(self) -> None:
        """Wait for the saves in flight to commit (CheckpointError names a failed one), then release
        the staging memory."""
        try:
            raise_failed_saves(self.handles, wait=True)
        finally:
            if self.manager is not None:
                self.manager.close()
                self.manager = None
            self.handles.clear()


def load_pointed(path: str, load_step: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """The checkpoint dict of the step the pointer at `path` names, read by `load_step(checkpoint_dir)`
    (which raises VerificationError for a copy that does not verify).

    A `last*.ckpt` pointer whose step is not committed, or does not verify, loads the newest older
    committed step that does, with a warning; any other such pointer raises CheckpointError."""
    pointer = Pointer.read(path)
    committed = checkpoint_steps(pointer.root, with_manifest=True)
    is_last = os.path.basename(path).startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)
    candidates = [s for s in reversed(committed) if s <= pointer.step] if is_last else [pointer.step]
    problems: List[str] = []
    if pointer.step not in committed:
        problems.append(f"step {pointer.step} was never committed under {pointer.root} (did the job die first?)")
        if not is_last:
            candidates = []
    for step in candidates:
        try:
            checkpoint = load_step(checkpoint_path(pointer.root, step))
        except VerificationError as exc:
            problems.append(f"step {step}: {exc}")
            continue
        if problems:
            log.warning("%s: loaded step %d instead of %d: %s", path, step, pointer.step, "; ".join(problems))
        return checkpoint
    raise CheckpointError(f"{path} cannot be loaded: {'; '.join(problems) or 'nothing is committed'}")


class CkptdCheckpointIO(CheckpointIO):
    """A Lightning CheckpointIO that saves through the node's ckptd daemon without blocking.

    `root` is the ckptd checkpoint root (any directory; Lightning's `dirpath` only holds pointers).
    The other arguments are CheckpointManager settings (`retention`, `daemon_args`, `when_busy`,
    ...; see CheckpointManagerOptions). Raises UnsupportedFrameworkError for a Lightning outside
    SUPPORTED. A save that fails in the daemon raises CheckpointError at the next save or at the end
    of `fit`, naming the step. For sharded model state (FSDP2 through ModelParallelStrategy) use
    CkptdModelParallelStrategy instead: Lightning's sharded strategies do not call a CheckpointIO.
    """

    def __init__(self, root: str, options: Optional[CheckpointManagerOptions] = None, **overrides: Any) -> None:
        SUPPORTED.check(lightning.__version__)
        self.root = os.path.realpath(root)
        self._saver = StepSaver(self.root, options, overrides, rank_info=_one_rank())

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Stage `checkpoint` as ckptd step `global_step` (once per step) and point `path` at it."""
        if storage_options is not None:
            raise TypeError("CkptdCheckpointIO takes no storage_options; configure the daemon instead")
        step = self._saver.save(checkpoint, os.fspath(path))
        Pointer(self.root, step).write(os.fspath(path))

    def load_checkpoint(
        self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> Dict[str, Any]:
        """The checkpoint dict of the step `path` points at, every file verified by checksum (see
        `load_pointed` for a pointer whose step did not commit)."""
        return load_pointed(os.fspath(path), self._load_step)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer (the daemon's retention removes checkpoints; see `retention_for`)."""
        remove_pointer(path)

    def teardown(self) -> None:
        """Wait for the saves in flight to commit, then release the staging memory."""
        self._saver.finish()

    def _load_step(self, checkpoint_dir: str) -> Dict[str, Any]:
        holders = {key: ValueHolder() for key in read_manifest(checkpoint_dir).components}
        manager = CheckpointManager(HeldComponents(holders), self.root, connect=False, rank_info=_one_rank())
        manager.load_checkpoint(checkpoint_dir)
        return join_checkpoint({key: holder.value for key, holder in holders.items()})


def remove_pointer(path: Any) -> None:
    """Remove a pointer file; one already gone is no error."""
    try:
        os.remove(os.fspath(path))
    except FileNotFoundError:
        pass
