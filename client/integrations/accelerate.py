"""Hugging Face Accelerate: what `accelerator.save_state()` saves, as ckptd components.

Accelerate's save hooks can add to what `save_state` writes but cannot take its place, so the
recipe is a provider for CheckpointManager, used in place of `save_state` / `load_state`:

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    manager = CheckpointManager(AcceleratorComponents(accelerator), "/ckpt/run1")
    manager.load_checkpoint()               # on a resume (instead of accelerator.load_state(dir))
    ...
    manager.save_checkpoint(step)           # returns once staged (instead of accelerator.save_state(dir))

Saved, as `save_state` saves them: every prepared model (unwrapped) and optimizer, and every scheduler,
REPLICATED (DDP keeps them equal on every rank); the gradient scaler, if any; each prepared data loader
that keeps a position (`use_stateful_dataloader=True`) PER_RANK; each rank's RNG streams PER_RANK; the
objects given to `accelerator.register_for_checkpointing` and Accelerate's step counter GLOBAL.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import accelerate

from ckptd.client.components import StateComponent
from ckptd.client.integrations.support import SupportedRange
from ckptd.client.rng import RNGState
from ckptd.proto.patterns import SharingPattern

__all__ = ["AcceleratorComponents", "SUPPORTED"]

log = logging.getLogger(__name__)

SUPPORTED = SupportedRange("accelerate", "1.0", "2")


class _StepCounter:
    """Accelerate's own step counter (gradient accumulation), which `save_state` saves too."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> Dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


def _numbered(name: str, index: int) -> str:
    """Accelerate's naming: the first of a kind plain, the next ones numbered (`model`, `model_1`, ...)."""
    return name if index == 0 else f"{name}_{index}"


class AcceleratorComponents:
    """A CheckpointManager provider of everything `accelerator` has prepared or registered, asked
    afresh at every save and load (so objects prepared later are included).

    Raises UnsupportedFrameworkError for an Accelerate outside SUPPORTED."""

    def __init__(self, accelerator: Any) -> None:
        SUPPORTED.check(accelerate.__version__)
        self.accelerator = accelerator
        self._warned_loaders = False

    def get_state_components(self) -> List[StateComponent]:
        """The components, in a fixed order."""
        acc = self.accelerator
        replicated = SharingPattern.REPLICATED
        components = [
            StateComponent(_numbered("model", i), acc.unwrap_model(model), replicated)
            for i, model in enumerate(acc._models)
        ]
        components += [StateComponent(_numbered("optimizer", i), o, replicated) for i, o in enumerate(acc._optimizers)]
        components += [StateComponent(_numbered("scheduler", i), s, replicated) for i, s in enumerate(acc._schedulers)]
        if acc.scaler is not None:
            components.append(StateComponent("scaler", acc.scaler, replicated))
        components += self._loaders()
        components += [
            StateComponent(_numbered("custom", i), obj, SharingPattern.GLOBAL)
            for i, obj in enumerate(acc._custom_objects)
        ]
        components.append(StateComponent("rng", RNGState(), SharingPattern.PER_RANK))
        components.append(StateComponent("accelerator", _StepCounter(acc), SharingPattern.GLOBAL))
        return components

    def _loaders(self) -> List[StateComponent]:
        stateful = [dl for dl in self.accelerator._dataloaders if getattr(dl, "use_stateful_dataloader", False)]
        if len(stateful) < len(self.accelerator._dataloaders) and not self._warned_loaders:
            self._warned_loaders = True
            log.warning(
                "data loaders prepared without use_stateful_dataloader=True keep no position in the checkpoint; "
                "pass DataLoaderConfiguration(use_stateful_dataloader=True) to Accelerator, or skip batches "
                "yourself on a resume (accelerator.skip_first_batches)"
            )
        return [
            StateComponent(_numbered("dataloader", i), dl, SharingPattern.PER_RANK) for i, dl in enumerate(stateful)
        ]
