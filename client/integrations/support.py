"""What the framework integrations share: the version check, a holder component, plain-data conversion."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
from packaging.version import InvalidVersion, Version

from ckptd.client.errors import CheckpointError, UnsupportedFrameworkError
from ckptd.client.saving import SaveHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupportedRange:
    """The versions of one framework an integration is built and tested for: `minimum` <= v < `below`."""

    package: str
    minimum: str
    below: str

    def check(self, installed: str) -> None:
        """Raise UnsupportedFrameworkError unless `installed` lies in the range."""
        try:
            version = Version(installed)
        except InvalidVersion:
            raise UnsupportedFrameworkError(f"{self.package} reports an unreadable version {installed!r}") from None
        if not Version(self.minimum) <= Version(version.base_version) < Version(self.below):
            raise UnsupportedFrameworkError(
                f"{self.package} {installed} is installed, but ckptd's integration supports "
                f"{self.package}>={self.minimum},<{self.below}: install a version in that range "
                f"(pip install '{self.package}>={self.minimum},<{self.below}') or save with CheckpointManager directly"
            )


class ValueHolder:
    """A component's stateful that holds one value: `state_dict()` gives it, `load_state_dict()` replaces it.

    The integrations hand a framework's already-collected state to ckptd through it, and take the
    loaded state back from it."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> Any:
        """The held value (saved as it is)."""
        return self.value

    def load_state_dict(self, state: Any) -> None:
        """Hold the loaded value."""
        self.value = state


_LEAVES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.Size, torch.device)


def plain(value: Any, path: str, lossy: List[str]) -> Any:
    """`value` with dict subclasses made dicts (OrderedDicts stay) and, for values ckptd's codec cannot
    hold, their `repr` in their place; the key path of each replaced value is added to `lossy`.

    For state a framework keeps only to show (hyper-parameters): a resume never reads it back as objects."""
    if isinstance(value, torch.Tensor) or type(value) in _LEAVES:
        return value
    if isinstance(value, OrderedDict):
        return OrderedDict((k, plain(v, f"{path}.{k}", lossy)) for k, v in value.items())
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else repr(k): plain(v, f"{path}.{k}", lossy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{path}.{i}", lossy) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    lossy.append(path)
    return repr(value)


def warn_lossy(what: str, lossy: List[str]) -> None:
    """Log once per save which values were kept only as their repr."""
    if lossy:
        log.warning(
            "%s: %d value(s) of types ckptd does not store were saved as their repr (%s); a resume does not use them",
            what,
            len(lossy),
            ", ".join(lossy[:5]) + (", ..." if len(lossy) > 5 else ""),
        )


def raise_failed_saves(handles: Dict[int, SaveHandle], wait: bool = False) -> None:
    """Forget the resolved saves in `handles` (step -> handle; all of them, waiting, with `wait`);
    raise CheckpointError naming the step of one that failed."""
    for step, handle in sorted(handles.items()):
        if not (wait or handle.done()):
            continue
        del handles[step]
        try:
            handle.wait()
        except CheckpointError as exc:
            raise CheckpointError(f"ckptd could not commit the checkpoint of step {step}: {exc}") from exc
