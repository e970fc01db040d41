"""Random number generator state as a checkpointable component."""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List

import torch

__all__ = ["RNGState"]

_log = logging.getLogger(__name__)
_VERSION = 1
_KNOWN_KEYS = frozenset({"version", "python", "numpy", "torch", "cuda"})


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


class RNGState:
    """The state of every random stream a training step usually draws from.

    `state_dict()` captures Python's `random`, NumPy's global generator (when NumPy is importable),
    torch's CPU generator and each visible CUDA device's generator (when CUDA is available), using
    only values `ckptd.client.codec` can store (tuples, ints, floats, uint8/int64 tensors).
    `load_state_dict()` restores them so each stream continues exactly where it was captured.
    Streams the state does not mention are left untouched; parts that cannot be restored here
    (no NumPy, no CUDA, fewer devices) are skipped with a logged warning.

    Use it as a component, usually PER_RANK: ``StateComponent("rng", RNGState(), SharingPattern.PER_RANK)``.
    """

    def state_dict(self) -> Dict[str, Any]:
        """Capture the current state of all generators."""
        state: Dict[str, Any] = {"version": _VERSION, "python": random.getstate()}
        np = _numpy()
        if np is not None:
            name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
            state["numpy"] = {
                "bit_generator": str(name),
                "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            }
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the generators captured by `state_dict()`."""
        version = state_dict.get("version", _VERSION)
        if version != _VERSION:
            _log.warning("RNG state has version %r, expected %r; restoring what is recognizable", version, _VERSION)
        unknown = set(state_dict) - _KNOWN_KEYS
        if unknown:
            _log.warning("ignoring unknown RNG state parts: %s", ", ".join(sorted(map(str, unknown))))

        if "python" in state_dict:
            random.setstate(_as_tuple(state_dict["python"]))

        if "numpy" in state_dict:
            np = _numpy()
            if np is None:
                _log.warning("RNG state holds a NumPy generator state but NumPy is not importable; skipping it")
            else:
                part = state_dict["numpy"]
                key = torch.as_tensor(part["key"]).cpu().numpy().astype(np.uint32)
                np.random.set_state(
                    (
                        part["bit_generator"],
                        key,
                        int(part["pos"]),
                        int(part["has_gauss"]),
                        float(part["cached_gaussian"]),
                    )
                )

        if "torch" in state_dict:
            torch.set_rng_state(_byte_tensor(state_dict["torch"]))

        if "cuda" in state_dict:
            states: List[Any] = list(state_dict["cuda"])
            if not torch.cuda.is_available():
                _log.warning(
                    "RNG state holds %d CUDA generator states but CUDA is not available; skipping them", len(states)
                )
            else:
                count = torch.cuda.device_count()
                if count != len(states):
                    _log.warning(
                        "RNG state holds %d CUDA generator states but %d devices are visible; restoring the first %d",
                        len(states),
                        count,
                        min(count, len(states)),
                    )
                for index, cuda_state in enumerate(states[:count]):
                    torch.cuda.set_rng_state(_byte_tensor(cuda_state), index)


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (`random.setstate` wants tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def _byte_tensor(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(device="cpu", dtype=torch.uint8).contiguous()
