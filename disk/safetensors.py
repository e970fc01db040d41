"""The safetensors header: written for the daemon's shards and for exports, read by the loader and
the exporter (https://github.com/huggingface/safetensors: an 8-byte little-endian length, then a JSON
header; tensor data follows, at offsets relative to the header's end)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ckptd.proto.formats import HEADER_ALIGNMENT, TensorEntry

METADATA_KEY = "__metadata__"
EXPORT_ALIGNMENT = 8
"""Exports start their data 8-byte aligned, as the safetensors library itself writes files."""

Header = Dict[str, Any]
"""Tensor name -> {"dtype", "shape", "data_offsets"} (and METADATA_KEY -> str map, if any)."""


SCOPE_NAME_ROOM = 160
"""Characters reserved for a shard's scope name in `header_room` (a scope is a safe name, at most 128,
with a prefix such as "group-"): the client reserves the room before the daemon names the scope."""


def shard_metadata(component: str, scope: str) -> Dict[str, str]:
    """The `__metadata__` of the shard of `component`'s `scope` that the daemon writes."""
    return {"format": "pt", "ckptd_component": component, "ckptd_scope": scope}


def header_room(entries: Sequence[TensorEntry], component: str) -> int:
    """Bytes (a page multiple) that hold the header of any shard of `component` with these tensors:
    a staging region that starts with this room can become the shard file itself (see
    `encode_header`'s `room`)."""
    longest = encode_header(entries, shard_metadata(component, "x" * SCOPE_NAME_ROOM), alignment=1)
    return -(-len(longest) // HEADER_ALIGNMENT) * HEADER_ALIGNMENT


def encode_header(
    entries: Iterable[TensorEntry],
    metadata: Optional[Dict[str, str]] = None,
    alignment: int = HEADER_ALIGNMENT,
    room: Optional[int] = None,
) -> bytes:
    """The length prefix plus JSON header for tensors laid out as `entries` describe, padded with
    spaces so that the data starts at a multiple of `alignment` (a page, by default: the daemon writes
    the body with O_DIRECT straight from page-aligned staging memory), or to exactly `room` bytes
    (ValueError if it needs more)."""
    header: Dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.offset, entry.offset + entry.nbytes],
        }
    body = json.dumps(header, separators=(",", ":")).encode()
    if room is not None:  # exactly `room` bytes with the prefix
        if 8 + len(body) > room:
            raise ValueError(f"the header needs {8 + len(body)} bytes, more than the {room} reserved")
        body += b" " * (room - 8 - len(body))
    else:
        body += b" " * (-(8 + len(body)) % alignment)
    return len(body).to_bytes(8, "little") + body


def decode_header(buffer: Any) -> Tuple[Header, int]:
    """The header of a safetensors file held in `buffer` (bytes, mmap or memoryview), and the offset
    where its data starts; raises ValueError if it is not a safetensors header."""
    if len(buffer) < 8:
        raise ValueError("shorter than a safetensors length prefix")
    length = int.from_bytes(buffer[:8], "little")
    if length > len(buffer) - 8:
        raise ValueError(f"header length {length} exceeds the file")
    header = json.loads(bytes(buffer[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + length


def read_header(path: str) -> Tuple[Header, int]:
    """The header of the safetensors file at `path`, and the offset where its data starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors length prefix")
        length = int.from_bytes(prefix, "little")
        body = f.read(length)
    if len(body) < length:
        raise ValueError(f"header length {length} exceeds the file")
    return decode_header(prefix + body)


def tensor_entries(header: Header) -> Dict[str, Any]:
    """The header's tensors (everything but its metadata)."""
    return {name: info for name, info in header.items() if name != METADATA_KEY}


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes sit in a safetensors file."""

    dtype: str
    shape: List[int]
    start: int
    """Offset of its first byte from the start of the file."""
    nbytes: int


def tensor_spans(header: Header, data_start: int, file_size: Optional[int] = None) -> Dict[str, TensorSpan]:
    """Each tensor's dtype, shape and byte range in the file; raises ValueError for a malformed entry,
    or (given `file_size`) one that reaches past the end of the file."""
    spans = {}
    for name, info in tensor_entries(header).items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry") from None
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end) or not isinstance(dtype, str):
            raise ValueError(f"tensor {name!r} has a malformed header entry")
        if file_size is not None and data_start + end > file_size:
            raise ValueError(f"tensor {name!r} reaches past the end of the file")
        spans[name] = TensorSpan(dtype, shape, data_start + begin, end - begin)
    return spans
