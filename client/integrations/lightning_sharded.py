"""Lightning with sharded model state: `Trainer(strategy=CkptdModelParallelStrategy(root, ...))`.

Lightning's ModelParallelStrategy (FSDP2's `fully_shard` and tensor parallelism, applied in the
LightningModule's `configure_model`) writes its own DCP checkpoint and calls no CheckpointIO, so
ckptd takes its place as a strategy. Every rank stages its part of each checkpoint and returns:

- `model` and `optimizers` are SHARDED: each rank stages the chunks of the DTensors it holds, and a
  resumed job may shard them differently (another data-parallel size);
- the rest of Lightning's checkpoint dict (schedulers, loops, callbacks, hyper-parameters, trainer
  state) is GLOBAL, rank 0's, as with CkptdCheckpointIO.

ModelCheckpoint's files are pointers to the ckptd step (written by rank 0), so `monitor`,
`save_top_k` (with `retention_for`), `every_n_train_steps`, `save_last` and
`trainer.fit(ckpt_path="last")` keep their meaning.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, List, Literal, Optional, Union

import lightning
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.integrations.lightning import (
    COMPONENT_OF_KEY,
    SUPPORTED,
    HeldComponents,
    Pointer,
    StepSaver,
    join_checkpoint,
    load_pointed,
    remove_pointer,
)
from ckptd.client.integrations.support import ValueHolder
from ckptd.client.loading import read_manifest
from ckptd.client.manager import CheckpointManager, CheckpointManagerOptions
from ckptd.proto.patterns import SharingPattern

__all__ = ["CkptdModelParallelStrategy"]

MODEL = COMPONENT_OF_KEY["state_dict"]
OPTIMIZERS = COMPONENT_OF_KEY["optimizer_states"]
SHARDED = {MODEL: SharingPattern.SHARDED, OPTIMIZERS: SharingPattern.SHARDED}
"""The components each rank saves its own chunks of; every other component is GLOBAL."""


class _ShardedModel:
    """The model component at a load: its DTensors, which ckptd fills with the chunks this rank holds."""

    def __init__(self, module: nn.Module, strict: bool) -> None:
        self.module = module
        self.strict = strict

    def state_dict(self) -> Dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_model_state_dict(self.module, state, options=StateDictOptions(strict=self.strict))


class _ShardedOptimizers:
    """The optimizers component at a load: each optimizer's state keyed by parameter name."""

    def __init__(self, module: nn.Module, optimizers: List[Optimizer]) -> None:
        self.module = module
        self.optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in optimizers]

    def state_dict(self) -> List[Dict[str, Any]]:
        # get_optimizer_state_dict also creates the state of an optimizer that has not stepped yet
        return [get_optimizer_state_dict(self.module, optimizer) for optimizer in self.optimizers]

    def load_state_dict(self, state: List[Dict[str, Any]]) -> None:
        if len(state) != len(self.optimizers):
            raise CheckpointError(
                f"the checkpoint holds {len(state)} optimizer states and the LightningModule configures "
                f"{len(self.optimizers)} optimizers; load it with the configure_optimizers it was saved with"
            )
        for optimizer, optimizer_state in zip(self.optimizers, state):
            set_optimizer_state_dict(self.module, optimizer, optimizer_state)


class CkptdModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy, with every checkpoint saved through the node's ckptd daemon
    without blocking: model and optimizers SHARDED, the rest GLOBAL (see the module docstring).

    `root` is the ckptd checkpoint root (shared by the job's ranks); `options` and the keyword
    arguments after the strategy's own are CheckpointManager settings (`retention`, `daemon_args`,
    ...). Raises UnsupportedFrameworkError for a Lightning outside SUPPORTED. A save that fails in
    the daemon raises CheckpointError at the next save or at the end of `fit`, naming the step.
    """

    def __init__(
        self,
        root: str,
        options: Optional[CheckpointManagerOptions] = None,
        *,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = "auto",
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        **overrides: Any,
    ) -> None:
        SUPPORTED.check(lightning.__version__)
        strategy_args: Dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            **strategy_args,
        )
        self.root = os.path.realpath(root)
        self._saver = StepSaver(self.root, options, overrides, SHARDED)

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """The model's sharded state as it lies, on its device: ckptd copies it into staging memory
        itself, so Lightning's copy to the CPU first (`cpu_offload`) would be a second, blocking copy."""
        assert self.model is not None
        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: Optimizer) -> Dict[str, Any]:
        """The optimizer's sharded state keyed by parameter name, as it lies (see above)."""
        assert self.model is not None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.model, optimizer)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """On every rank: stage `checkpoint` as ckptd step `global_step` (once per step); rank 0
        points `filepath` at it."""
        if storage_options is not None:
            raise TypeError("CkptdModelParallelStrategy takes no storage_options; configure the daemon instead")
        path = os.fspath(self.broadcast(filepath))
        step = self._saver.save(checkpoint, path, say_lossy=self.is_global_zero)
        if self.is_global_zero:  # Trainer.save_checkpoint's barrier follows
            Pointer(self.root, step).write(path)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Restore the model and optimizers in place from the step `checkpoint_path` points at (every
        rank reads the chunks it holds, verified by checksum); returns the rest of the checkpoint dict
        for Lightning to restore. A `last*` pointer falls back as CkptdCheckpointIO's does."""
        return load_pointed(os.fspath(self.broadcast(checkpoint_path)), self._load_step)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the pointer (the daemon's retention removes checkpoints)."""
        if self.is_global_zero:
            remove_pointer(filepath)

    def teardown(self) -> None:
        """Wait for the saves in flight to commit, release the staging memory, then tear down."""
        try:
            self._saver.finish()
        finally:
            super().teardown()

    def _load_step(self, checkpoint_dir: str) -> Dict[str, Any]:
        """Every rank loads `checkpoint_dir`; VerificationError on every rank if one rank's files fail."""
        assert self.model is not None and self.lightning_module is not None
        saved = read_manifest(checkpoint_dir).components
        holders = {key: ValueHolder() for key in saved if key not in SHARDED}
        live: Dict[str, Any] = {MODEL: _ShardedModel(self.model, self.lightning_module.strict_loading)}
        if self.optimizers:  # none outside fit (validate, test, predict): the saved ones are not read
            live[OPTIMIZERS] = _ShardedOptimizers(self.model, self.optimizers)
        provider = HeldComponents({**holders, **{key: c for key, c in live.items() if key in saved}}, SHARDED)
        problem: Optional[VerificationError] = None
        try:
            CheckpointManager(provider, self.root, connect=False).load_checkpoint(checkpoint_dir)
        except VerificationError as exc:
            problem = exc
        if not self.reduce_boolean_decision(problem is None, all=True):
            raise problem or VerificationError(f"{checkpoint_dir}: another rank could not verify its files")
        return join_checkpoint({key: holder.value for key, holder in holders.items()})
