"""Finding, verifying and reading committed checkpoints (no daemon needed)."""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Optional, Sequence

from safetensors import safe_open

from ckptd.client.codec import unflatten_state
from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.topology import RankInfo
from ckptd.proto import layout
from ckptd.proto.formats import Checksum
from ckptd.proto.manifest import ComponentRecord, FileRecord, Manifest, ManifestError, ScopeRecord
from ckptd.proto.patterns import SharingPattern, place

log = logging.getLogger(__name__)

READ_CHUNK = 8 * 1024 * 1024


def read_manifest(checkpoint_dir: str) -> Manifest:
    """Parse a checkpoint's manifest; raises VerificationError if it is missing or malformed."""
    path = os.path.join(checkpoint_dir, layout.MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return Manifest.from_json(f.read())
    except FileNotFoundError:
        raise VerificationError(f"{path} is missing: {checkpoint_dir} is not a committed checkpoint") from None
    except (ManifestError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path}: {exc}") from None


def committed_checkpoints(root: str) -> list[str]:
    """Final checkpoint directories under `root`, newest step first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = sorted((s, n) for n in names if (s := layout.parse_checkpoint_dir_name(n)) is not None)
    return [os.path.join(root, n) for _, n in reversed(steps)]


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory `latest` points at, else the newest final directory with a manifest, else None."""
    try:
        with open(os.path.join(root, layout.LATEST_NAME), encoding="utf-8") as f:
            name = f.read().strip()
        if layout.parse_checkpoint_dir_name(name) is not None:
            candidate = os.path.join(root, name)
            if os.path.isfile(os.path.join(candidate, layout.MANIFEST_NAME)):
                return candidate
            log.warning("%s/latest names %s, which has no manifest; looking for the newest committed one", root, name)
    except FileNotFoundError:
        pass
    for candidate in committed_checkpoints(root):
        if os.path.isfile(os.path.join(candidate, layout.MANIFEST_NAME)):
            return candidate
    return None


def verify_file(checkpoint_dir: str, record: FileRecord) -> str:
    """Check that a listed file is a regular file inside the checkpoint with the recorded size and
    checksum; return its path or raise VerificationError naming it."""
    path = os.path.join(checkpoint_dir, record.path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise VerificationError(f"{path} is listed in the manifest but missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise VerificationError(f"{path} is not a regular file (symlinks are refused)")
    if info.st_size != record.size:
        raise VerificationError(f"{path} holds {info.st_size} bytes, the manifest says {record.size} (truncated or altered)")
    checksum = Checksum()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            checksum.update(chunk)
    if checksum.hexdigest() != record.checksum:
        raise VerificationError(f"{path} checksum {checksum.hexdigest()} does not match the manifest's {record.checksum}")
    return path


def select_scope(
    manifest: Manifest, key: str, record: ComponentRecord, rank_info: RankInfo, group_ranks: Sequence[int] = ()
) -> ScopeRecord:
    """The copy of component `key` that this rank loads (the table in DESIGN.md), or a clear error."""
    pattern = record.pattern
    saved, current = manifest.topology, rank_info.topology
    if pattern in (SharingPattern.PER_RANK, SharingPattern.PER_NODE, SharingPattern.PER_GROUP) and saved != current:
        raise CheckpointError(
            f"component {key!r} is {pattern.value} and was saved with {saved.describe()}, but this job has "
            f"{current.describe()}; load it with the same topology"
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
    """Verify (optionally) and read one copy of a component back into its state-dict form."""
    if verify:
        tensor_path = verify_file(checkpoint_dir, scope.tensor_file)
        state_path = verify_file(checkpoint_dir, scope.state_file)
    else:
        tensor_path = os.path.join(checkpoint_dir, scope.tensor_file.path)
        state_path = os.path.join(checkpoint_dir, scope.state_file.path)
    tensors = {}
    if scope.tensor_file.tensors:
        try:
            with safe_open(tensor_path, framework="pt") as shard:
                for name in scope.tensor_file.tensors:
                    tensors[name] = shard.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise VerificationError(f"{tensor_path} cannot be read as safetensors: {exc}") from None
    with open(state_path, "rb") as f:
        skeleton = f.read()
    try:
        return unflatten_state(skeleton, tensors)
    except (ValueError, KeyError) as exc:
        raise VerificationError(f"{state_path} cannot be decoded: {exc}") from None
