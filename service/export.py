"""`ckptd export`: one component's tensors as plain safetensors files with a Hugging Face style index
(and its `config.json`, when the component carries a Hugging Face model's config).

Pure byte copying (no torch): each tensor's bytes are copied from its verified shard into new
safetensors files of at most `max_shard_bytes`, named like Hugging Face checkpoints
(`model.safetensors`, or `model-00001-of-00003.safetensors` plus `model.safetensors.index.json`).
A SHARDED component's tensors are consolidated: each saved chunk's rows are copied to their place in
the full tensor, piece by piece, so no tensor is ever whole in memory.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, replace
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

from ckptd.disk.files import FileProblem, check_listed_file
from ckptd.disk.manifests import read_manifest
from ckptd.disk.safetensors import EXPORT_ALIGNMENT, TensorSpan, encode_header, read_header, tensor_spans
from ckptd.proto.formats import HF_CONFIG_METADATA, SAFETENSORS_DTYPES, TensorEntry
from ckptd.proto.manifest import ComponentRecord, FileRecord, ScopeRecord
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.sharding import Box, chunks_in_scopes, coverage_problem, distinct_chunks
from ckptd.service.errors import ExportError

COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """A run of bytes of an exported tensor: `nbytes` from `path` at `start`, to `offset` in the tensor."""

    path: str
    start: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SourceTensor:
    """An exported tensor and where its bytes sit in the checkpoint's shards."""

    name: str
    dtype: str
    shape: List[int]
    nbytes: int
    pieces: Tuple[Piece, ...]


@dataclass(frozen=True)
class ExportResult:
    """What `export_component` wrote."""

    files: List[str]
    index: Optional[str]
    tensors: int
    total_bytes: int
    config: Optional[str] = None
    """The `config.json` written from the component's Hugging Face config, if it has one."""


def export_component(
    checkpoint_dir: str,
    component: str,
    out_dir: str,
    *,
    scope: Optional[str] = None,
    prefix: str = "model",
    max_shard_bytes: int = 5 * 10**9,
    select: Optional[str] = None,
) -> ExportResult:
    """Write `component`'s tensors from `checkpoint_dir` into `out_dir` (created; must be empty).
    With `select` (a key path such as "model"), only the tensors under it, named relative to it."""
    manifest = read_manifest(checkpoint_dir)
    record = manifest.components.get(component)
    if record is None:
        raise ExportError(f"{checkpoint_dir} has no component {component!r}; it has {sorted(manifest.components)}")
    if record.pattern is SharingPattern.SHARDED:
        tensors = _consolidated_tensors(checkpoint_dir, component, record)
    else:
        tensors = _source_tensors(checkpoint_dir, _scopes(component, record, scope))
    if select is not None:
        tensors = _selected(tensors, select)
    if not tensors:
        raise ExportError(f"component {component!r} holds no tensors to export{f' under {select!r}' if select else ''}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} is not empty; export into a new or empty directory")
    os.makedirs(out_dir, exist_ok=True)
    shards = _plan_shards(tensors, max_shard_bytes)
    names = (
        [f"{prefix}.safetensors"]
        if len(shards) == 1
        else [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        _write_safetensors(os.path.join(out_dir, name), shard)
    index = None
    total = sum(t.nbytes for t in tensors)
    if len(shards) > 1:
        index = os.path.join(out_dir, f"{prefix}.safetensors.index.json")
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        with open(index, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = None
    hf_config = record.metadata.get(HF_CONFIG_METADATA)
    if isinstance(hf_config, str):
        config = os.path.join(out_dir, "config.json")
        with open(config, "w", encoding="utf-8") as f:
            f.write(hf_config)
    return ExportResult([os.path.join(out_dir, n) for n in names], index, len(tensors), total, config)


def _scopes(component: str, record: ComponentRecord, scope: Optional[str]) -> List[ScopeRecord]:
    """The copies to export: all shares of a spread component, the only copy, or the chosen one."""
    if scope is not None:
        if scope not in record.scopes:
            raise ExportError(f"component {component!r} has no scope {scope!r}; it has {sorted(record.scopes)}")
        return [record.scopes[scope]]
    if record.spread:
        return [record.scopes[name] for name in sorted(record.scopes)]
    if len(record.scopes) == 1:
        return list(record.scopes.values())
    raise ExportError(
        f"component {component!r} is {record.pattern.value} with {len(record.scopes)} different copies "
        f"({', '.join(sorted(record.scopes)[:4])}{', ...' if len(record.scopes) > 4 else ''}); choose one with --scope"
    )


def _checked_spans(checkpoint_dir: str, record: FileRecord) -> Tuple[str, Dict[str, TensorSpan]]:
    """A verified shard's path and its tensors' spans."""
    path = os.path.join(checkpoint_dir, record.path)
    try:
        check_listed_file(path, record)
        return path, tensor_spans(*read_header(path), file_size=record.size)
    except FileProblem as exc:
        raise ExportError(f"{exc}; the checkpoint is damaged (see `ckptd verify`)") from None
    except ValueError as exc:
        raise ExportError(
            f"{path} is not a valid shard ({exc}); the checkpoint is damaged (see `ckptd verify`)"
        ) from None


def _source_tensors(checkpoint_dir: str, scopes: Sequence[ScopeRecord]) -> List[SourceTensor]:
    tensors: Dict[str, SourceTensor] = {}
    for scope in scopes:
        path, spans = _checked_spans(checkpoint_dir, scope.tensor_file)
        for name, span in spans.items():
            if name in tensors:
                raise ExportError(f"tensor {name!r} appears in more than one copy being exported")
            piece = Piece(path, span.start, 0, span.nbytes)
            tensors[name] = SourceTensor(name, span.dtype, span.shape, span.nbytes, (piece,))
    return sorted(tensors.values(), key=lambda t: t.name)


def _consolidated_tensors(checkpoint_dir: str, component: str, record: ComponentRecord) -> List[SourceTensor]:
    """A SHARDED component's tensors, whole: every chunk's runs of bytes placed in the full tensor."""
    try:
        chunks = chunks_in_scopes(record.scopes.values())
    except ValueError as exc:
        raise ExportError(f"component {component!r}: {exc}") from None
    spans = dict(_checked_spans(checkpoint_dir, s.tensor_file) for s in record.scopes.values())
    by_file = {s.tensor_file.path: os.path.join(checkpoint_dir, s.tensor_file.path) for s in record.scopes.values()}
    tensors = []
    for name in sorted(chunks):
        problem = coverage_problem(name, chunks[name])
        if problem is not None:
            raise ExportError(f"component {component!r}: {problem}; the checkpoint is damaged")
        first = chunks[name][0]
        itemsize = SAFETENSORS_DTYPES[first.dtype]
        pieces: List[Piece] = []
        for chunk in distinct_chunks(chunks[name]):
            path = by_file[chunk.file]
            start = spans[path][name].start
            pieces += [
                Piece(path, start + src * itemsize, dst * itemsize, run * itemsize)
                for src, dst, run in chunk_runs(first.global_shape, chunk.box)
            ]
        nbytes = math.prod(first.global_shape) * itemsize
        tensors.append(
            SourceTensor(
                name, first.dtype, list(first.global_shape), nbytes, tuple(sorted(pieces, key=lambda p: p.offset))
            )
        )
    return tensors


def _selected(tensors: Sequence[SourceTensor], select: str) -> List[SourceTensor]:
    """The tensors under key path `select`, named relative to it."""
    prefix = select.rstrip("/") + "/"
    return [replace(t, name=t.name[len(prefix) :]) for t in tensors if t.name.startswith(prefix)]


def _plan_shards(tensors: Sequence[SourceTensor], max_shard_bytes: int) -> List[List[SourceTensor]]:
    shards: List[List[SourceTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_safetensors(path: str, tensors: Sequence[SourceTensor]) -> None:
    """A safetensors file of `tensors`, written to a temporary name and renamed when complete."""
    entries, offset = [], 0
    for tensor in tensors:
        entries.append(TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), offset, tensor.nbytes))
        offset += tensor.nbytes
    header = encode_header(entries, {"format": "pt", "exported_by": "ckptd"}, alignment=EXPORT_ALIGNMENT)
    tmp = f"{path}.partial"
    sources: Dict[str, BinaryIO] = {}
    try:
        with open(tmp, "wb") as out:
            out.write(header)
            out.truncate(len(header) + offset)
            for entry, tensor in zip(entries, tensors):
                for piece in tensor.pieces:
                    src = sources.get(piece.path) or sources.setdefault(piece.path, open(piece.path, "rb"))
                    _copy_piece(src, out.fileno(), piece, len(header) + entry.offset, tensor.name)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for src in sources.values():
            src.close()
    os.rename(tmp, path)


def _copy_piece(src: BinaryIO, out_fd: int, piece: Piece, tensor_start: int, name: str) -> None:
    """Copy one piece of a tensor from its shard to its place in the output file."""
    src.seek(piece.start)
    position, remaining = tensor_start + piece.offset, piece.nbytes
    while remaining:
        data = src.read(min(COPY_CHUNK, remaining))
        if not data:
            raise ExportError(f"{src.name} ended early while copying {name!r}")
        os.pwrite(out_fd, data, position)
        position += len(data)
        remaining -= len(data)


def chunk_runs(global_shape: Sequence[int], box: Box) -> List[Tuple[int, int, int]]:
    """The contiguous runs of a chunk's row-major bytes inside its full tensor, in elements: (offset in
    the chunk, offset in the full tensor, length). A chunk that spans whole trailing dimensions is one
    run per index of its leading ones (one run for a row block, as FSDP saves)."""
    if box.volume == 0:
        return []
    dims = len(global_shape)
    split = max(dims - 1, 0)  # dimensions after `split` are covered whole: a run spans them
    while split > 0 and box.sizes[split] == global_shape[split]:
        split -= 1
    outer = box.sizes[:split]
    run = math.prod(box.sizes[split:])
    strides = [math.prod(global_shape[d + 1 :]) for d in range(dims)]
    runs = []
    for position, index in enumerate(itertools.product(*(range(n) for n in outer))):
        target = sum((box.offsets[d] + (index[d] if d < split else 0)) * strides[d] for d in range(dims))
        runs.append((position * run, target, run))
    return runs
