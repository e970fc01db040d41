"""State dict <-> (msgpack skeleton, named tensors), without pickle.

A state value is walked recursively: containers and scalars become msgpack primitives or
`msgpack.ExtType` values (codes from `ckptd.proto.formats`; every ext payload is itself a msgpack
document using the same convention), and every tensor becomes an `EXT_TENSOR_REF` naming an entry
of the tensor dict. Decoding restores the exact Python types.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import msgpack
import torch

from ckptd.client.dtensors import is_dtensor
from ckptd.client.errors import UnsupportedStateError
from ckptd.proto.formats import (
    EXT_BIGINT,
    EXT_DEVICE,
    EXT_DTYPE,
    EXT_ORDERED_DICT,
    EXT_SIZE,
    EXT_TENSOR_REF,
    EXT_TUPLE,
    SAFETENSORS_DTYPES,
)

__all__ = ["FlatState", "flatten_state", "unflatten_state", "skeleton_refs", "safetensors_dtype", "torch_dtype"]

# torch dtype attribute name -> safetensors dtype name; entries the running torch lacks are skipped.
_DTYPE_NAMES: Tuple[Tuple[str, str], ...] = (
    ("float64", "F64"),
    ("float32", "F32"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("int64", "I64"),
    ("int32", "I32"),
    ("int16", "I16"),
    ("int8", "I8"),
    ("uint64", "U64"),
    ("uint32", "U32"),
    ("uint16", "U16"),
    ("uint8", "U8"),
    ("bool", "BOOL"),
)
_TO_SAFETENSORS: Dict[torch.dtype, str] = {
    getattr(torch, attr): name for attr, name in _DTYPE_NAMES if isinstance(getattr(torch, attr, None), torch.dtype)
}
_FROM_SAFETENSORS: Dict[str, torch.dtype] = {name: dtype for dtype, name in _TO_SAFETENSORS.items()}
assert set(_FROM_SAFETENSORS) <= set(SAFETENSORS_DTYPES)

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_SUPPORTED = (
    "dict, OrderedDict, list, tuple, str, bytes, int, float, bool, None, torch.Tensor, "
    "torch.dtype, torch.Size or torch.device"
)
_RESERVED_NAMES = frozenset({"__metadata__"})  # reserved key of the safetensors header


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype name (a key of `SAFETENSORS_DTYPES`) of a torch dtype.

    Raises UnsupportedStateError for dtypes safetensors cannot hold (complex, quantized, ...).
    """
    try:
        return _TO_SAFETENSORS[dtype]
    except (KeyError, TypeError):
        raise UnsupportedStateError(
            f"tensor dtype {dtype} cannot be stored; convert the tensor to one of: "
            + ", ".join(str(d) for d in _TO_SAFETENSORS)
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; ValueError if unknown or absent from this torch."""
    try:
        return _FROM_SAFETENSORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown or unsupported safetensors dtype {name!r}") from None


@dataclass
class FlatState:
    """A flattened state value: the msgpack skeleton plus the tensors it references."""

    skeleton: bytes
    """msgpack bytes of the structure, with tensors replaced by `EXT_TENSOR_REF(name)`."""
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Unique tensors by name, in first-seen order; the original tensor objects (no copies)."""
    refs: Dict[str, str] = field(default_factory=dict)
    """Every key path that holds a tensor -> the tensor's name (aliases included)."""


_NO_METADATA: Any = object()


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _path_part(key: Any) -> str:
    return key if type(key) is str else str(key)


def _join(path: str, key: Any) -> str:
    part = _path_part(key)
    return f"{path}/{part}" if path else part


path_join = _join
"""The key path of `key` inside the container at `path` (how tensors are named)."""


def tensor_ref(name: str) -> msgpack.ExtType:
    """The skeleton's reference to tensor `name`."""
    return msgpack.ExtType(EXT_TENSOR_REF, _pack(name))


def encode_tuple(items: List[Any]) -> msgpack.ExtType:
    """A tuple of encoded items."""
    return msgpack.ExtType(EXT_TUPLE, _pack(items))


def encode_ordered_dict(items: Dict[Any, Any], metadata: Any = _NO_METADATA) -> msgpack.ExtType:
    """An OrderedDict of encoded items, with its encoded `_metadata` if it has one."""
    return msgpack.ExtType(EXT_ORDERED_DICT, _pack([items] if metadata is _NO_METADATA else [items, metadata]))


def encode_scalar(value: Any) -> Any:
    """A non-container, non-tensor state value encoded as `flatten_state` encodes it; raises
    UnsupportedStateError for anything else."""
    if type(value) in (list, tuple, dict, OrderedDict) or isinstance(value, torch.Tensor):
        raise UnsupportedStateError(f"{_type_name(value)} is not a scalar state value")
    return _Encoder("", sharded=False).encode(value, "")


def pack_skeleton(tree: Any) -> bytes:
    """The skeleton bytes of an encoded tree."""
    return _pack(tree)


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _is_numpy_scalar(value: Any) -> bool:
    cls = type(value)
    return cls.__module__ == "numpy" and any(
        base.__name__ == "generic" and base.__module__ == "numpy" for base in cls.__mro__
    )


class _Encoder:
    """One flatten_state walk: collects tensors, assigns names, detects aliases and cycles."""

    def __init__(self, component: str, sharded: bool) -> None:
        self.component = component
        self.sharded = sharded
        self.tensors: Dict[str, torch.Tensor] = {}
        self.refs: Dict[str, str] = {}
        self._by_id: Dict[int, str] = {}
        self._by_view: Dict[Tuple[Any, ...], str] = {}
        self._used: Set[str] = set(_RESERVED_NAMES)
        self._active: Set[int] = set()  # ids of containers on the current path (cycle detection)

    def fail(self, path: str, what: str) -> UnsupportedStateError:
        return UnsupportedStateError(f"component {self.component!r}: value at {path or '<root>'} {what}")

    def encode(self, value: Any, path: str, in_key: bool = False) -> Any:
        cls = type(value)
        if value is None or cls is bool or cls is str or cls is bytes or cls is float:
            return value
        if cls is int:
            if _INT_MIN <= value <= _INT_MAX:
                return value
            return msgpack.ExtType(EXT_BIGINT, _pack(str(value)))
        if cls is list or cls is tuple or cls is dict or cls is OrderedDict:
            if id(value) in self._active:
                raise self.fail(path, f"is a {cls.__name__} that contains itself; state must not have reference cycles")
            self._active.add(id(value))
            try:
                return self._encode_container(value, path, in_key)
            finally:
                self._active.discard(id(value))
        if isinstance(value, torch.Tensor):
            if in_key:
                raise self.fail(path, "is a dict key holding a tensor; use a str or int key instead")
            name = self._tensor_name(value, path)
            self.refs[path] = name
            return tensor_ref(name)
        if cls is torch.dtype:
            return msgpack.ExtType(EXT_DTYPE, _pack(str(value).rpartition(".")[2]))
        if cls is torch.Size:
            return msgpack.ExtType(EXT_SIZE, _pack([int(d) for d in value]))
        if cls is torch.device:
            return msgpack.ExtType(EXT_DEVICE, _pack(str(value)))
        if _is_numpy_scalar(value) and hasattr(value, "item"):
            item = value.item()
            if not _is_numpy_scalar(item):
                return self.encode(item, path, in_key)
        raise self.fail(
            path, f"has unsupported type {_type_name(value)}; convert it to a supported type ({_SUPPORTED})"
        )

    def _encode_container(self, value: Any, path: str, in_key: bool) -> Any:
        cls = type(value)
        if cls is list:
            return [self.encode(item, _join(path, i), in_key) for i, item in enumerate(value)]
        if cls is tuple:
            return encode_tuple([self.encode(item, _join(path, i), in_key) for i, item in enumerate(value)])
        if in_key:  # unreachable for real keys (dicts are unhashable); kept for safety
            raise self.fail(path, f"is a dict key of type {cls.__name__}")
        items = {
            self.encode(key, _join(path, key), True): self.encode(item, _join(path, key)) for key, item in value.items()
        }
        if cls is dict:
            return items
        if hasattr(value, "_metadata"):
            return encode_ordered_dict(items, self.encode(value._metadata, _join(path, "_metadata")))
        return encode_ordered_dict(items)

    def _tensor_name(self, tensor: torch.Tensor, path: str) -> str:
        known = self._by_id.get(id(tensor))
        if known is not None:
            return known
        self._check_storable(tensor, path)
        view_key = None if is_dtensor(tensor) else _view_key(tensor)
        if view_key is not None:
            known = self._by_view.get(view_key)
            if known is not None:
                self._by_id[id(tensor)] = known
                return known
        name = self._unique_name(path)
        self.tensors[name] = tensor
        self._by_id[id(tensor)] = name
        if view_key is not None:
            self._by_view[view_key] = name
        return name

    def _check_storable(self, tensor: torch.Tensor, path: str) -> None:
        """Raise, naming the key path, for a tensor this component cannot store."""
        if is_dtensor(tensor):
            if not self.sharded:
                raise self.fail(
                    path,
                    "is a DTensor (sharded across ranks); declare its component SharingPattern.SHARDED, "
                    "which saves each rank's chunks and loads them at any topology",
                )
        elif not (type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter)):
            raise self.fail(
                path, f"is a tensor subclass {_type_name(tensor)}; convert it to a plain torch.Tensor first"
            )
        elif tensor.layout != torch.strided:
            raise self.fail(path, f"is a {tensor.layout} tensor; convert it to a dense tensor (.to_dense())")
        elif tensor.is_quantized:
            raise self.fail(path, "is a quantized tensor; dequantize it (.dequantize()) first")
        elif tensor.is_nested:
            raise self.fail(path, "is a nested tensor; unbind it into a list of tensors first")
        elif tensor.is_meta:
            raise self.fail(path, "is a meta tensor and holds no data; materialize it first")
        if tensor.dtype not in _TO_SAFETENSORS:
            raise self.fail(
                path,
                f"is a tensor of dtype {tensor.dtype}, which cannot be stored; convert it to one of: "
                + ", ".join(str(d) for d in _TO_SAFETENSORS),
            )

    def _unique_name(self, path: str) -> str:
        base = path.replace("\x00", "\\0") or "tensor"
        name, n = base, 1
        while name in self._used:
            n += 1
            name = f"{base}#{n}"
        self._used.add(name)
        return name


def _view_key(tensor: torch.Tensor) -> Optional[Tuple[Any, ...]]:
    """What makes two tensor objects the same view of the same memory (None for an empty tensor)."""
    if tensor.numel() == 0:
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def flatten_state(state: Any, component: str, sharded: bool = False) -> FlatState:
    """Split `state` into a msgpack skeleton and its unique tensors.

    Tensor names are the key paths joined with "/" (made unique with a `#N` suffix); a tensor
    reached twice (same object, or the same view of the same storage) is stored once. DTensors are
    taken only for a SHARDED component (`sharded`).
    Raises UnsupportedStateError, naming `component` and the key path, for values it cannot store.
    """
    encoder = _Encoder(component, sharded)
    skeleton = _pack(encoder.encode(state, ""))
    return FlatState(skeleton=skeleton, tensors=encoder.tensors, refs=encoder.refs)


class _Ref(str):
    """A tensor reference met while walking a skeleton (its name)."""


class _AnyName(Mapping[str, Any]):
    """Every tensor name, mapped to a `_Ref` of itself: lets a skeleton be decoded without its tensors."""

    def __getitem__(self, name: str) -> _Ref:
        return _Ref(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def skeleton_refs(skeleton: bytes) -> Dict[str, str]:
    """Every key path of a skeleton that holds a tensor -> the tensor's name (the `refs` that
    `flatten_state` gave when it made the skeleton). Raises ValueError if the skeleton is malformed."""
    names: Dict[str, str] = {}
    state = unflatten_state(skeleton, _AnyName())

    def walk(value: Any, path: str) -> None:
        if type(value) is _Ref:
            names[path] = str(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, _join(path, key))
            if hasattr(value, "_metadata"):
                walk(value._metadata, _join(path, "_metadata"))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, _join(path, index))

    walk(state, "")
    return names


def unflatten_state(skeleton: bytes, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the state value from a skeleton made by `flatten_state` and tensors by name.

    Every reference to one name yields the same tensor object. Raises ValueError if the skeleton is
    malformed or references a tensor missing from `tensors`.
    """

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=ext_hook)

    def ext_hook(code: int, data: bytes) -> Any:
        payload = unpack(data)
        if code == EXT_TUPLE:
            return tuple(payload)
        if code == EXT_TENSOR_REF:
            if type(payload) is not str or payload not in tensors:
                raise ValueError(f"skeleton references tensor {payload!r}, which is not among the loaded tensors")
            return tensors[payload]
        if code == EXT_DTYPE:
            dtype = getattr(torch, payload, None) if type(payload) is str else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"skeleton holds unknown torch dtype {payload!r}")
            return dtype
        if code == EXT_SIZE:
            return torch.Size(payload)
        if code == EXT_ORDERED_DICT:
            result = OrderedDict(payload[0])
            if len(payload) > 1:
                result._metadata = payload[1]  # type: ignore[attr-defined]
            return result
        if code == EXT_BIGINT:
            return int(payload)
        if code == EXT_DEVICE:
            return torch.device(payload)
        raise ValueError(f"skeleton holds unknown msgpack extension code {code}")

    try:
        return unpack(skeleton)
    except ValueError as exc:
        if str(exc):
            raise
        raise ValueError(f"malformed state skeleton: {type(exc).__name__}") from exc  # msgpack's FormatError: no text
    except Exception as exc:  # msgpack's own errors (truncated data, bad types) and TypeErrors
        raise ValueError(f"malformed state skeleton: {exc}") from exc
