"""State values that must survive a save/load unchanged, and an exact recursive comparison.

`FIDELITY_CASES` maps a case id to a function building a fresh state value (deterministic).
`assert_state_equal(expected, actual)` asserts exact equality: same types, bitwise-equal tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch
from torch import nn

__all__ = ["FIDELITY_CASES", "assert_state_equal"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _nested_dict_int_keys() -> Any:
    return {0: {1: {2: "deep"}, -5: [1, 2]}, 10**6: {"x": 0}, "s": {3: None}}


def _mixed_keys() -> Any:
    return {
        1: "int",
        "1": "str",
        2: "two",
        None: "none",
        1.5: "float",
        (1, "a"): "tuple",
        (): "empty tuple",
        False: "bool",
        b"k": "bytes",
    }


def _tuples() -> Any:
    return {"empty": (), "one": (1,), "nested": ((1, (2, ())), [3, (4,)]), "top": ((), ((),))}


def _lists() -> Any:
    return [[], [1, [2, [3, []]]], ["a", None, 1.0, True]]


def _none() -> Any:
    return None


def _bools() -> Any:
    return {"t": True, "f": False, "list": [True, 0, 1, False], "tuple": (False, 1)}


def _floats_special() -> Any:
    return [float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e-310, 1.7976931348623157e308, 0.1]


def _bytes() -> Any:
    return {"empty": b"", "data": bytes(range(256)), "nul": b"\x00\x00"}


def _strings_unicode() -> Any:
    return {"": "", "ascii": "hello", "uni": "Grüße, 世界 🎉", "nul": "a\x00b", "ключ": "значение"}


def _big_ints() -> Any:
    return [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 3**100, -(7**80)]


def _torch_values() -> Any:
    return {
        "dtypes": [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64],
        "size": torch.Size([2, 3]),
        "empty_size": torch.Size([]),
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda"), torch.device("meta")],
        "size_key": {torch.Size([1]): "v"},
    }


def _tensor_dtypes() -> Any:
    base = _randn(4, 5)
    out: Dict[str, torch.Tensor] = {
        "float32": base.clone(),
        "float32_special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "float64": base.double(),
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "int8": torch.randint(-128, 127, (7,), dtype=torch.int8, generator=_gen(1)),
        "int16": torch.randint(-(2**15), 2**15 - 1, (7,), dtype=torch.int16, generator=_gen(2)),
        "int32": torch.randint(-(2**31), 2**31 - 1, (7,), dtype=torch.int32, generator=_gen(3)),
        "int64": torch.tensor([-(2**63), 2**63 - 1, 0, -1]),
        "uint8": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=_gen(4)),
        "bool": torch.tensor([True, False, True]),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out[name] = (base * 4).to(dtype)
    return out


def _tensor_0d() -> Any:
    return {"scalar": torch.tensor(3.5), "int_scalar": torch.tensor(7), "bool_scalar": torch.tensor(True)}


def _tensor_empty() -> Any:
    return {"empty": torch.empty(0, 3), "empty1d": torch.zeros(0, dtype=torch.int64), "other": torch.zeros(0, 3)}


def _tensor_noncontiguous() -> Any:
    x = _randn(4, 6)
    return {"t": x.t(), "strided": x[:, ::2]}


def _tensor_sliced() -> Any:
    big = _randn(8, 6)
    return {"slice": big[2:5, 1:], "row": big[7]}


def _tensors_tied() -> Any:
    w = _randn(3, 4)
    return {"a": w, "b": {"again": w}, "c": [w, w.view(3, 4)]}


def _tied_module() -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    return model.state_dict(keep_vars=False)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _module_state() -> Any:
    model = _small_model()
    model(torch.randn(5, 4, generator=_gen(5)))  # update BatchNorm running stats
    return model.state_dict()


def _adamw_state() -> Any:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    model(torch.randn(4, 3, generator=_gen(6))).sum().backward()
    optim.step()
    return optim.state_dict()


def _lr_scheduler_state() -> Any:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    for _ in range(3):
        optim.step()
        sched.step()
    return {"scheduler": sched.state_dict(), "optimizer": optim.state_dict()}


def _training_state() -> Any:
    return {"model": _module_state(), "optim": _adamw_state(), "step": 1000, "epoch_done": False}


FIDELITY_CASES: Dict[str, Callable[[], Any]] = {
    "nested_dict_int_keys": _nested_dict_int_keys,
    "mixed_dict_keys": _mixed_keys,
    "tuples": _tuples,
    "lists": _lists,
    "none": _none,
    "bools": _bools,
    "floats_special": _floats_special,
    "bytes": _bytes,
    "strings_unicode": _strings_unicode,
    "big_ints": _big_ints,
    "torch_values": _torch_values,
    "tensor_dtypes": _tensor_dtypes,
    "tensor_0d": _tensor_0d,
    "tensor_empty": _tensor_empty,
    "tensor_noncontiguous": _tensor_noncontiguous,
    "tensor_sliced": _tensor_sliced,
    "tensors_tied": _tensors_tied,
    "tied_module": _tied_module,
    "module_batchnorm": _module_state,
    "adamw": _adamw_state,
    "lr_scheduler": _lr_scheduler_state,
    "training_state": _training_state,
}


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_state_equal(expected: Any, actual: Any, path: str = "") -> None:
    """Assert `actual` equals `expected` exactly; the failure message names the key path."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(_tensor_bytes(actual), _tensor_bytes(expected)), f"{where}: tensor data differs"
        return
    assert type(actual) is type(expected), f"{where}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), (
            f"{where}: keys {list(actual.keys())!r} != {list(expected.keys())!r}"
        )
        for key in expected:
            assert_state_equal(expected[key], actual[key], f"{path}/{key!r}")
        has_meta = hasattr(expected, "_metadata")
        assert hasattr(actual, "_metadata") == has_meta, f"{where}: _metadata presence differs"
        if has_meta:
            assert_state_equal(expected._metadata, actual._metadata, f"{path}/._metadata")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (e, a) in enumerate(zip(expected, actual)):
            assert_state_equal(e, a, f"{path}/{index}")
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} != nan"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), (
                f"{where}: {actual!r} != {expected!r}"
            )
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
