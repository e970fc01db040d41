"""Hugging Face `Trainer`: `CkptdTrainer` saves its checkpoints through ckptd, without blocking.

A callback cannot replace the Trainer's save and resume (the resume reads files of a checkpoint
directory inside `train()`), so this is a subclass; use it where you construct `Trainer`:

    trainer = CkptdTrainer(model=model, args=args, train_dataset=data, ckptd_root="/ckpt/run1")
    trainer.train(resume_from_checkpoint=True)   # the newest committed ckptd checkpoint

At every `save_steps` (or epoch, per `save_strategy`) each rank stages its state and training goes
on while the node's daemon writes. `save_total_limit` becomes the daemon's retention (`keep_last`),
and with `metric_for_best_model` the best checkpoint by it is kept too. Resuming restores the
model, optimizer, scheduler, each rank's RNG streams and the trainer state (which places the data
loader: the Trainer skips the batches already trained, as on its own resume), all verified by
checksum, from the nearest tier whose copy verifies on every rank. `ckptd export <checkpoint>
--component model --out DIR` writes a directory `from_pretrained` loads, `config.json` included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import transformers
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ckptd.client.components import StateComponent
from ckptd.client.errors import CheckpointError
from ckptd.client.integrations.support import SupportedRange, ValueHolder, raise_failed_saves
from ckptd.client.loading import read_manifest
from ckptd.client.manager import CheckpointManager, CheckpointManagerOptions
from ckptd.client.rng import RNGState
from ckptd.client.saving import SaveHandle
from ckptd.disk.root import checkpoint_path
from ckptd.proto.formats import HF_CONFIG_METADATA
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.retention import RetentionPolicy

__all__ = ["CkptdTrainer", "SUPPORTED"]

log = logging.getLogger(__name__)

SUPPORTED = SupportedRange("transformers", "5.0", "6")
TRAINER_STATE_NAME = "trainer_state.json"  # the file the Trainer reads its state from at a resume


class _TrainerComponents:
    """The provider: what a CkptdTrainer saves, and (at a resume) where it is loaded to first."""

    def __init__(self, trainer: "CkptdTrainer", loading: bool = False) -> None:
        self.trainer = trainer
        self.loading = loading
        self.optimizer, self.lr_scheduler, self.rng = ValueHolder(), ValueHolder(), ValueHolder()
        self.trainer_state, self.scaler = ValueHolder(), ValueHolder()
        config_json = getattr(getattr(trainer.model, "config", None), "to_json_string", None)
        self.model_metadata = {HF_CONFIG_METADATA: config_json()} if callable(config_json) else None
        """The model's config.json text, taken once rather than at every save."""

    def get_state_components(self) -> List[StateComponent]:
        t = self.trainer
        optimizer: Any
        scheduler: Any
        rng: Any
        scaler: Any
        if self.loading:  # optimizer and scheduler do not exist yet; their states wait in holders
            optimizer, scheduler, rng, scaler = self.optimizer, self.lr_scheduler, self.rng, self.scaler
        else:
            optimizer, scheduler, rng = t.optimizer, t.lr_scheduler, RNGState()
            scaler = getattr(t.accelerator, "scaler", None)
            self.trainer_state.value = json.dumps(dataclasses.asdict(t.state), sort_keys=True)  # as save_to_json
        components = [
            StateComponent("model", t.model, SharingPattern.REPLICATED, metadata=self.model_metadata),
            StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
            StateComponent("lr_scheduler", scheduler, SharingPattern.REPLICATED),
            StateComponent("rng", rng, SharingPattern.PER_RANK),
            StateComponent("trainer_state", self.trainer_state, SharingPattern.GLOBAL),
        ]
        if scaler is not None:
            components.append(StateComponent("scaler", scaler, SharingPattern.REPLICATED, required=False))
        return components


class _ModelOnly:
    """The provider of the model alone, to load the best model at the end of training."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", self.model, SharingPattern.REPLICATED)]


class CkptdTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints go through the node's ckptd daemon.

    `ckptd_root`: the checkpoint root (default `<output_dir>/ckptd`). `ckptd_options`: the
    CheckpointManager settings (`daemon_args`, `tiers`, `when_busy`, ...); `retention` defaults to
    what `save_total_limit` and `metric_for_best_model` ask for. Every other argument is Trainer's.
    Raises UnsupportedFrameworkError for a transformers outside SUPPORTED. A save the daemon could
    not commit raises CheckpointError at the next save or at the end of `train()`, naming the step.
    """

    def __init__(
        self,
        *args: Any,
        ckptd_root: Optional[str] = None,
        ckptd_options: Optional[CheckpointManagerOptions] = None,
        **kwargs: Any,
    ) -> None:
        SUPPORTED.check(transformers.__version__)
        super().__init__(*args, **kwargs)
        self.ckptd_root = os.path.realpath(ckptd_root or os.path.join(self.args.output_dir, "ckptd"))
        self.ckptd_options = ckptd_options or CheckpointManagerOptions(retention=self._retention())
        self._ckptd: Optional[CheckpointManager] = None
        self._ckptd_handles: Dict[int, SaveHandle] = {}
        self._ckptd_resumed: Optional[_TrainerComponents] = None

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest committed ckptd
        checkpoint (CheckpointError if none verifies), a ckptd checkpoint directory from that one.
        Any other path is a checkpoint the Trainer wrote itself."""
        resume_dir = None
        if resume_from_checkpoint is True or _is_ckptd_checkpoint(resume_from_checkpoint):
            path = None if resume_from_checkpoint is True else str(resume_from_checkpoint)
            resume_dir = self._load_ckptd(path)
            resume_from_checkpoint = resume_dir
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
            raise_failed_saves(self._ckptd_handles, wait=True)
            return result
        finally:
            self._ckptd_resumed = None
            if resume_dir is not None:
                shutil.rmtree(resume_dir, ignore_errors=True)
            if self._ckptd is not None:
                self._ckptd.close()
                self._ckptd = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Stage this rank's state as ckptd step `global_step`; the daemon writes it in the background."""
        if trial is not None:
            raise CheckpointError("CkptdTrainer does not save hyper-parameter search trials; use Trainer for those")
        self.store_flos()
        self._update_stateful_callbacks()
        raise_failed_saves(self._ckptd_handles)
        if self._ckptd is None:
            self._ckptd = CheckpointManager(_TrainerComponents(self), self.ckptd_root, self.ckptd_options)
        step = self.state.global_step
        self.state.best_model_checkpoint = self._best_checkpoint()
        self._ckptd_handles[step] = self._ckptd.save_checkpoint(step, self._metrics_at(step))

    def _best_checkpoint(self) -> Optional[str]:
        """The ckptd checkpoint of the best step so far, which `load_best_model_at_end` loads at the end
        (retention keeps it: see `_retention`); None without one (the Trainer then loads nothing)."""
        if not self.args.load_best_model_at_end or not self.state.best_global_step:
            return None
        return checkpoint_path(self.ckptd_root, self.state.best_global_step)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the model of the best step, from its ckptd checkpoint (verified),
        once every save in flight has committed."""
        best = self.state.best_model_checkpoint
        if best is None or os.path.dirname(os.path.realpath(best)) != self.ckptd_root:  # the Trainer's own
            super()._load_best_model()
            return
        raise_failed_saves(self._ckptd_handles, wait=True)
        log.info(
            "loading the best model (%s %s) from %s", self.args.metric_for_best_model, self.state.best_metric, best
        )
        CheckpointManager(_ModelOnly(self.model), self.ckptd_root, connect=False).load_checkpoint(best)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._ckptd_resumed is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # else: the model was restored in place by the ckptd load, before the Trainer wrapped it

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        resumed = self._ckptd_resumed
        if resumed is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        self.optimizer.load_state_dict(resumed.optimizer.value)
        self.lr_scheduler.load_state_dict(resumed.lr_scheduler.value)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and resumed.scaler.value is not None:
            scaler.load_state_dict(resumed.scaler.value)

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        if self._ckptd_resumed is None:
            super()._load_rng_state(checkpoint)
            return
        if checkpoint is not None:
            RNGState().load_state_dict(self._ckptd_resumed.rng.value)

    def _load_ckptd(self, path: Optional[str]) -> str:
        """Load every component (the model in place, the rest into holders, applied when the Trainer
        asks); returns a directory holding only the trainer state, for the Trainer's resume to read."""
        resumed = _TrainerComponents(self, loading=True)
        manager = CheckpointManager(resumed, self.ckptd_root, self.ckptd_options, connect=False)
        loaded = manager.load_checkpoint(path)
        log.info("resuming from ckptd step %d (%s, tier %s)", loaded.step, loaded, loaded.tier)
        resume_dir = tempfile.mkdtemp(prefix=f"ckptd-resume-{PREFIX_CHECKPOINT_DIR}-{loaded.step}-")
        with open(os.path.join(resume_dir, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(resumed.trainer_state.value)
        self._ckptd_resumed = resumed
        return resume_dir

    def _retention(self) -> Optional[RetentionPolicy]:
        limit = self.args.save_total_limit
        metric = self._best_metric_name()
        if limit is None and metric is None:
            return None
        if metric is None:
            return RetentionPolicy(keep_last=limit)
        mode = "max" if self.args.greater_is_better else "min"
        return RetentionPolicy(keep_last=limit, keep_best=1, best_metric=metric, best_mode=mode)

    def _best_metric_name(self) -> Optional[str]:
        metric = self.args.metric_for_best_model
        if metric is None or not self.args.load_best_model_at_end:
            return None
        return metric if metric.startswith("eval_") else f"eval_{metric}"

    def _metrics_at(self, step: int) -> Dict[str, float]:
        """The evaluation metrics logged at `step` (for keep_best retention). The log grows in step order,
        so only its tail is read: a save never walks the whole run's history."""
        metrics: Dict[str, float] = {}
        for entry in reversed(self.state.log_history):
            if entry.get("step", step) < step:
                break
            if entry.get("step") == step:
                metrics.update({k: float(v) for k, v in entry.items() if k.startswith("eval_") and _is_number(v)})
        return metrics

    def _update_stateful_callbacks(self) -> None:
        """What `Trainer._save_checkpoint` records of its stateful callbacks before it writes the state."""
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()


def _is_ckptd_checkpoint(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        read_manifest(os.fspath(path))
    except CheckpointError:  # not a ckptd checkpoint: the Trainer's own, or nothing
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
