"""`ckptd export`: one component's tensors as plain safetensors files with a Hugging Face style index.

Pure byte copying (no torch): each tensor's bytes are copied from its verified shard into new
safetensors files of at most `max_shard_bytes`, named like Hugging Face checkpoints
(`model.safetensors`, or `model-00001-of-00003.safetensors` plus `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ckptd.disk.files import FileProblem, check_listed_file
from ckptd.disk.manifests import read_manifest
from ckptd.disk.safetensors import EXPORT_ALIGNMENT, encode_header, read_header, tensor_spans
from ckptd.proto.formats import TensorEntry
from ckptd.proto.manifest import ComponentRecord, ScopeRecord
from ckptd.service.errors import ExportError

COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes sit in a checkpoint shard."""

    name: str
    dtype: str
    shape: List[int]
    path: str
    start: int
    nbytes: int


@dataclass(frozen=True)
class ExportResult:
    """What `export_component` wrote."""

    files: List[str]
    index: Optional[str]
    tensors: int
    total_bytes: int


def export_component(
    checkpoint_dir: str,
    component: str,
    out_dir: str,
    *,
    scope: Optional[str] = None,
    prefix: str = "model",
    max_shard_bytes: int = 5 * 10**9,
) -> ExportResult:
    """Write `component`'s tensors from `checkpoint_dir` into `out_dir` (created; must be empty)."""
    manifest = read_manifest(checkpoint_dir)
    record = manifest.components.get(component)
    if record is None:
        raise ExportError(f"{checkpoint_dir} has no component {component!r}; it has {sorted(manifest.components)}")
    scopes = _scopes(component, record, scope)
    tensors = _source_tensors(checkpoint_dir, scopes)
    if not tensors:
        raise ExportError(f"component {component!r} holds no tensors to export")
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
    return ExportResult([os.path.join(out_dir, n) for n in names], index, len(tensors), total)


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


def _source_tensors(checkpoint_dir: str, scopes: Sequence[ScopeRecord]) -> List[SourceTensor]:
    tensors: Dict[str, SourceTensor] = {}
    for scope in scopes:
        path = os.path.join(checkpoint_dir, scope.tensor_file.path)
        try:
            check_listed_file(path, scope.tensor_file)
            spans = tensor_spans(*read_header(path), file_size=scope.tensor_file.size)
        except FileProblem as exc:
            raise ExportError(f"{exc}; the checkpoint is damaged (see `ckptd verify`)") from None
        except ValueError as exc:
            raise ExportError(
                f"{path} is not a valid shard ({exc}); the checkpoint is damaged (see `ckptd verify`)"
            ) from None
        for name, span in spans.items():
            if name in tensors:
                raise ExportError(f"tensor {name!r} appears in more than one copy being exported")
            tensors[name] = SourceTensor(name, span.dtype, span.shape, path, span.start, span.nbytes)
    return sorted(tensors.values(), key=lambda t: t.name)


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
    with open(tmp, "wb") as out:
        out.write(header)
        for tensor in tensors:
            with open(tensor.path, "rb") as src:
                src.seek(tensor.start)
                remaining = tensor.nbytes
                while remaining:
                    chunk = src.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise ExportError(f"{tensor.path} ended early while copying {tensor.name!r}")
                    out.write(chunk)
                    remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, path)
