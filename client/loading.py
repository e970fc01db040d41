"""Finding, verifying and reading committed checkpoints (no daemon needed)."""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any, Dict, List, Sequence

import torch

from ckptd.client.codec import torch_dtype, unflatten_state
from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.topology import RankInfo
from ckptd.disk import manifests
from ckptd.disk.files import FileProblem, map_listed_file
from ckptd.disk.manifests import hold_for_loading
from ckptd.disk.root import committed_checkpoints, latest_checkpoint
from ckptd.disk.safetensors import decode_header, tensor_spans
from ckptd.proto.manifest import ComponentRecord, FileRecord, Manifest, ManifestError, ScopeRecord
from ckptd.proto.patterns import SharingPattern, place

log = logging.getLogger(__name__)

__all__ = [
    "committed_checkpoints",
    "hold_for_loading",
    "latest_checkpoint",
    "read_manifest",
    "read_scope",
    "rank_scopes",
    "read_scopes",
    "select_scope",
    "select_scopes",
    "verify_file",
]


def read_manifest(checkpoint_dir: str) -> Manifest:
    """Parse a checkpoint's manifest; raises VerificationError if it is missing or malformed."""
    try:
        return manifests.read_manifest(checkpoint_dir)
    except ManifestError as exc:
        raise VerificationError(str(exc)) from None


def verify_file(checkpoint_dir: str, record: FileRecord) -> str:
    """Check that a listed file is a regular file inside the checkpoint with the recorded size and
    checksum; return its path or raise VerificationError naming it."""
    path = os.path.join(checkpoint_dir, record.path)
    _map_checked(path, record, verify=True).close()
    return path


def _map_checked(path: str, record: FileRecord, verify: bool) -> mmap.mmap:
    try:
        return map_listed_file(path, record, verify=verify)
    except FileProblem as exc:
        raise VerificationError(str(exc)) from None


def select_scopes(
    manifest: Manifest, key: str, record: ComponentRecord, rank_info: RankInfo, group_ranks: Sequence[int] = ()
) -> List[ScopeRecord]:
    """The files this rank loads component `key` from: every share of a spread component (at any
    topology), else the one copy `select_scope` picks."""
    if record.spread:
        return [record.scopes[name] for name in sorted(record.scopes)]
    return [select_scope(manifest, key, record, rank_info, group_ranks)]


def rank_scopes(manifest: Manifest, key: str) -> List[ScopeRecord]:
    """Every saved rank's copy of PER_RANK component `key`, in rank order (for its reshard function)."""
    record = manifest.components[key]
    try:
        return [
            record.scopes[place(record.pattern, rank, manifest.topology).scope]
            for rank in range(manifest.topology.world_size)
        ]
    except KeyError as exc:
        raise VerificationError(f"component {key!r} has no copy for scope {exc}") from None


def select_scope(
    manifest: Manifest, key: str, record: ComponentRecord, rank_info: RankInfo, group_ranks: Sequence[int] = ()
) -> ScopeRecord:
    """The copy of component `key` that this rank loads (the table in DESIGN.md), or a clear error."""
    pattern = record.pattern
    saved, current = manifest.topology, rank_info.topology
    if pattern in (SharingPattern.PER_RANK, SharingPattern.PER_NODE, SharingPattern.PER_GROUP) and saved != current:
        how = "load it with the same topology"
        if pattern is SharingPattern.PER_RANK:
            how += ", or give its StateComponent a reshard function"
        raise CheckpointError(
            f"component {key!r} is {pattern.value} and was saved with {saved.describe()}, but this job has "
            f"{current.describe()}; {how}"
        )
    try:
        placement = place(pattern, rank_info.rank, current, record.group_name, group_ranks or None)
    except ValueError as exc:
        raise CheckpointError(f"component {key!r}: {exc}") from None
    scope = record.scopes.get(placement.scope)
    if scope is None:
        raise CheckpointError(
            f"component {key!r} has no copy for rank {rank_info.rank} ({placement.scope}); saved copies: {sorted(record.scopes)}"
        )
    return scope


def read_scope(checkpoint_dir: str, scope: ScopeRecord, verify: bool = True) -> Any:
    """Verify (optionally) and read one copy of a component back into its state-dict form.

    Tensors are views of a private mapping of the shard: loading costs no second copy of the
    state in memory (the pages are the page cache's until something writes to them).
    """
    return read_scopes(checkpoint_dir, [scope], verify)


def read_scopes(checkpoint_dir: str, scopes: Sequence[ScopeRecord], verify: bool = True) -> Any:
    """`read_scope` over the shares of a component: the tensors of every share, the non-tensor state
    of the first (every share holds the same)."""
    tensors: Dict[str, torch.Tensor] = {}
    for scope in scopes:
        tensor_path = os.path.join(checkpoint_dir, scope.tensor_file.path)
        tensors.update(
            _shard_tensors(tensor_path, scope.tensor_file, _map_checked(tensor_path, scope.tensor_file, verify))
        )
    for scope in scopes[1:]:  # verified like every listed file, though only the first is decoded
        _map_checked(os.path.join(checkpoint_dir, scope.state_file.path), scope.state_file, verify).close()
    state_path = os.path.join(checkpoint_dir, scopes[0].state_file.path)
    state_map = _map_checked(state_path, scopes[0].state_file, verify)
    try:
        return unflatten_state(state_map[:], tensors)
    except (ValueError, KeyError) as exc:
        raise VerificationError(f"{state_path} cannot be decoded: {exc}") from None
    finally:
        state_map.close()


def _shard_tensors(path: str, record: FileRecord, mapped: mmap.mmap) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors shard as views of its mapping, checked against the manifest index."""
    try:
        spans = tensor_spans(*decode_header(mapped), file_size=len(mapped))
        tensors = {}
        for name, expected in record.tensors.items():
            span = spans[name]
            if span.dtype != expected["dtype"] or span.shape != list(expected["shape"]):
                raise ValueError(f"tensor {name!r} does not match the manifest's index")
            dtype = torch_dtype(span.dtype)
            if span.nbytes == 0:
                tensors[name] = torch.empty(span.shape, dtype=dtype)
            else:  # its own storage over the mapping: some torch calls (set_rng_state) ignore storage offsets
                count = span.nbytes // dtype.itemsize
                tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=span.start).view(span.shape)
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VerificationError(f"{path} cannot be read as a safetensors shard: {exc}") from None
