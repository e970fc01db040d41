"""Unit tests of ckptd.client.codec (state dict <-> msgpack skeleton + tensors) and RNGState."""

from __future__ import annotations

import os
import random
import sys
from collections import OrderedDict, defaultdict

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

from ckptd.client.codec import FlatState, flatten_state, safetensors_dtype, torch_dtype, unflatten_state
from ckptd.client.errors import UnsupportedStateError
from ckptd.client.rng import RNGState
from ckptd.proto.formats import SAFETENSORS_DTYPES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_cases import FIDELITY_CASES, assert_state_equal


def roundtrip(state, component="c"):
    """Flatten, copy the tensors (as a load would), unflatten."""
    flat = flatten_state(state, component)
    loaded = {name: tensor.clone() for name, tensor in flat.tensors.items()}
    return flat, unflatten_state(flat.skeleton, loaded)


@pytest.mark.parametrize("case", sorted(FIDELITY_CASES))
def test_fidelity_roundtrip(case):
    expected = FIDELITY_CASES[case]()
    flat, actual = roundtrip(FIDELITY_CASES[case]())
    assert isinstance(flat, FlatState) and isinstance(flat.skeleton, bytes)
    assert_state_equal(expected, actual)
    for tensor in flat.tensors.values():
        assert safetensors_dtype(tensor.dtype) in SAFETENSORS_DTYPES


def test_flat_tensors_are_originals_in_order():
    a, b = torch.ones(2), torch.zeros(3)
    flat = flatten_state({"x": {"a": a}, "b": b}, "m")
    assert list(flat.tensors) == ["x/a", "b"]
    assert flat.tensors["x/a"] is a and flat.tensors["b"] is b


def test_skeleton_is_plain_msgpack():
    flat = flatten_state(FIDELITY_CASES["training_state"](), "m")
    assert isinstance(msgpack.unpackb(flat.skeleton, raw=False, strict_map_key=False), dict)


def test_tied_same_object_stored_once():
    state = FIDELITY_CASES["tensors_tied"]()
    flat, out = roundtrip(state)
    assert list(flat.tensors) == ["a"]
    assert out["a"] is out["b"]["again"] is out["c"][0] is out["c"][1]


def test_tied_module_weights_stored_once():
    state = FIDELITY_CASES["tied_module"]()
    assert state["0.weight"] is not state["1.weight"]  # distinct objects, same storage view
    flat, out = roundtrip(state)
    assert list(flat.tensors) == ["0.weight"]
    assert out["0.weight"] is out["1.weight"]
    assert_state_equal(state, out)


def test_empty_tensors_and_overlapping_views_not_aliased():
    base = torch.arange(10.0)
    state = {"e1": torch.empty(0), "e2": torch.empty(0), "whole": base, "tail": base[1:], "other": base[1:].view(3, 3)}
    flat, out = roundtrip(state)
    assert list(flat.tensors) == ["e1", "e2", "whole", "tail", "other"]
    assert out["e1"] is not out["e2"]
    assert_state_equal(state, out)


def test_parameter_is_accepted():
    p = nn.Parameter(torch.randn(3))
    flat, out = roundtrip({"p": p})
    assert flat.tensors["p"] is p
    assert torch.equal(out["p"], p.detach())


def test_ordered_dict_metadata_preserved():
    state = FIDELITY_CASES["module_batchnorm"]()
    assert isinstance(state, OrderedDict) and hasattr(state, "_metadata")
    _, out = roundtrip(state)
    assert type(out) is OrderedDict
    assert out._metadata == state._metadata
    plain = OrderedDict(a=1)
    _, out = roundtrip(plain)
    assert type(out) is OrderedDict and not hasattr(out, "_metadata")
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    model.load_state_dict(roundtrip(model.state_dict())[1])


@pytest.mark.parametrize(
    "expected, actual",
    [
        ((1, 2), [1, 2]),
        ({"a": True}, {"a": 1}),
        (OrderedDict(a=1), {"a": 1}),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (0.0, -0.0),
        (float("nan"), 1.0),
        (torch.tensor([float("nan")]), torch.tensor([-float("nan")])),
        (torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)),
        (torch.zeros(2, 1), torch.zeros(1, 2)),
    ],
)
def test_assert_state_equal_is_strict(expected, actual):
    with pytest.raises(AssertionError):
        assert_state_equal({"k": [expected]}, {"k": [actual]})


def test_assert_state_equal_checks_metadata():
    a, b = OrderedDict(x=1), OrderedDict(x=1)
    a._metadata = {"": {"version": 1}}
    with pytest.raises(AssertionError, match="_metadata"):
        assert_state_equal(a, b)
    b._metadata = {"": {"version": 2}}
    with pytest.raises(AssertionError, match="version"):
        assert_state_equal(a, b)


def test_numpy_scalars_become_python_values():
    state = {"f": np.float64(1.5), "i": np.int64(-3), "b": np.bool_(True), "f32": np.float32(0.25)}
    _, out = roundtrip(state)
    assert_state_equal({"f": 1.5, "i": -3, "b": True, "f32": 0.25}, out)


class _Thing:
    pass


@pytest.mark.parametrize(
    "value, type_name",
    [
        (object(), "object"),
        ({1, 2}, "set"),
        (lambda: 0, "function"),
        (_Thing(), "_Thing"),
        (np.zeros(3), "ndarray"),
        (defaultdict(int), "defaultdict"),
        (bytearray(b"x"), "bytearray"),
        (1 + 2j, "complex"),
    ],
)
def test_unsupported_value_names_path_and_type(value, type_name):
    state = {"model": {"layers": [0, 1, 2, {"foo": value}]}}
    with pytest.raises(UnsupportedStateError) as info:
        flatten_state(state, "trainer")
    message = str(info.value)
    assert "model/layers/3/foo" in message
    assert "'trainer'" in message and type_name in message and "convert" in message


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, dtype=torch.complex64),
        lambda: torch.randn(3, 3).to_sparse(),
        lambda: torch.empty(3, device="meta"),
        lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8),
        lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
    ],
    ids=["complex", "sparse", "meta", "quantized", "nested"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unsupported_tensors(make):
    with pytest.raises(UnsupportedStateError) as info:
        flatten_state({"state": {0: {"foo": make()}}}, "optim")
    assert "component 'optim': value at state/0/foo" in str(info.value)


def test_tensor_dict_key_and_cycle_rejected():
    with pytest.raises(UnsupportedStateError, match="a/b"):
        flatten_state({"a": {"b": {torch.ones(1): 1}}}, "c")
    loop = {"x": []}
    loop["x"].append(loop)
    with pytest.raises(UnsupportedStateError, match="x/0"):
        flatten_state(loop, "c")


def test_shared_non_tensor_containers_are_fine():
    shared = [1, 2]
    _, out = roundtrip({"a": shared, "b": shared})
    assert out == {"a": [1, 2], "b": [1, 2]}


def test_tensor_names_readable_and_unique():
    model_sd = FIDELITY_CASES["module_batchnorm"]()
    flat = flatten_state(model_sd, "model")
    assert list(flat.tensors) == list(model_sd)
    flat = flatten_state(FIDELITY_CASES["adamw"](), "optim")
    assert {"state/0/exp_avg", "state/0/exp_avg_sq", "state/0/step", "state/1/exp_avg"} <= set(flat.tensors)

    state = {
        1: torch.ones(1),
        "1": torch.ones(2),
        "1#2": torch.ones(3),
        "__metadata__": torch.ones(4),
        "a\x00b": torch.ones(5),
        "": torch.ones(6),
        ("t", 2): [torch.ones(7)],
    }
    flat, out = roundtrip(state)
    names = list(flat.tensors)
    assert names[:3] == ["1", "1#2", "1#2#2"]
    assert "__metadata__" not in names
    assert all(isinstance(n, str) and n and "\x00" not in n for n in names)
    assert len(set(names)) == len(names) == 7
    assert "('t', 2)/0" in names
    assert_state_equal(state, out)
    assert list(flatten_state(torch.ones(1), "c").tensors) == ["tensor"]


def test_unflatten_errors():
    flat = flatten_state({"w": torch.ones(2)}, "c")
    with pytest.raises(ValueError, match="'w'"):
        unflatten_state(flat.skeleton, {})
    with pytest.raises(ValueError):
        unflatten_state(flat.skeleton[:-3], flat.tensors)
    with pytest.raises(ValueError):
        unflatten_state(msgpack.packb(msgpack.ExtType(99, b"\xc0")), {})


def test_dtype_mapping():
    expected = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for attr, name in [
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("uint16", "U16"),
        ("uint32", "U32"),
        ("uint64", "U64"),
    ]:
        if hasattr(torch, attr):
            expected[getattr(torch, attr)] = name
    for dtype, name in expected.items():
        assert safetensors_dtype(dtype) == name
        assert torch_dtype(name) is dtype
    for bad in (torch.complex64, torch.quint8):
        with pytest.raises(UnsupportedStateError):
            safetensors_dtype(bad)
    with pytest.raises(ValueError):
        torch_dtype("C64")


def _draw():
    return (
        [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        np.random.rand(5).tolist() + [np.random.normal()],
        torch.rand(5).tolist() + torch.randn(1).tolist(),
    )


def _check_rng_restores(state_transform):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's and NumPy's state
    np.random.normal()
    rng = RNGState()
    saved = state_transform(rng.state_dict())
    first = _draw()
    _draw()
    rng.load_state_dict(saved)
    assert _draw() == first


def test_rng_state_restores_streams():
    _check_rng_restores(lambda sd: sd)


def test_rng_state_survives_codec():
    def through_codec(sd):
        flat = flatten_state(sd, "rng")
        assert "torch" in flat.tensors and flat.tensors["torch"].dtype == torch.uint8
        assert flat.tensors["numpy/key"].dtype == torch.int64
        return roundtrip(sd, "rng")[1]

    _check_rng_restores(through_codec)


def test_rng_partial_state_leaves_others_untouched(caplog):
    rng = RNGState()
    sd = rng.state_dict()
    del sd["numpy"]
    sd["cuda"] = [torch.get_rng_state()] if not torch.cuda.is_available() else sd.get("cuda", [])
    np.random.seed(5)
    expected_np = np.random.rand(3).tolist()
    np.random.seed(5)
    rng.load_state_dict(sd)
    assert np.random.rand(3).tolist() == expected_np
    if not torch.cuda.is_available():
        assert "CUDA" in caplog.text
