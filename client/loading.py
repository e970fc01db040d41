"""Finding, verifying and reading committed checkpoints (no daemon needed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import stat
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ckptd.client.codec import torch_dtype, unflatten_state
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


@contextlib.contextmanager
def hold_for_loading(checkpoint_dir: str) -> Iterator[None]:
    """Hold a shared lock on the checkpoint's manifest: the daemon's retention does not delete a
    checkpoint while a loader holds it (the files a loader has mapped stay readable after that)."""
    try:
        fd = os.open(os.path.join(checkpoint_dir, layout.MANIFEST_NAME), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield  # reading the manifest will report what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


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
    _map_checked(path, record, verify=True).close()
    return path


def _map_checked(path: str, record: FileRecord, verify: bool) -> mmap.mmap:
    """Map a listed file privately (copy-on-write, so tensors over it are writable without copying),
    after checking it is a regular file of the recorded size and, if `verify`, checksum."""
    try:
        # O_NONBLOCK: opening a FIFO planted under a listed name must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise VerificationError(f"{path} is listed in the manifest but missing") from None
    except OSError as exc:
        raise VerificationError(f"{path} cannot be opened ({exc.strerror}); symlinks are refused") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise VerificationError(f"{path} is not a regular file")
        if info.st_size != record.size:
            raise VerificationError(
                f"{path} holds {info.st_size} bytes, the manifest says {record.size} (truncated or altered)"
            )
        if info.st_size == 0:
            raise VerificationError(f"{path} is empty")
        mapped = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if verify:
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        checksum = Checksum()
        view = memoryview(mapped)
        for start in range(0, len(view), READ_CHUNK):
            checksum.update(view[start:start + READ_CHUNK])
        view.release()
        if checksum.hexdigest() != record.checksum:
            mapped.close()
            raise VerificationError(
                f"{path} checksum {checksum.hexdigest()} does not match the manifest's {record.checksum}"
            )
    return mapped


def select_scopes(
    manifest: Manifest, key: str, record: ComponentRecord, rank_info: RankInfo, group_ranks: Sequence[int] = ()
) -> List[ScopeRecord]:
    """The files this rank loads component `key` from: every share of a spread component (at any
    topology), else the one copy `select_scope` picks."""
    if record.spread:
        return [record.scopes[name] for name in sorted(record.scopes)]
    return [select_scope(manifest, key, record, rank_info, group_ranks)]


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
        tensors.update(_shard_tensors(tensor_path, scope.tensor_file, _map_checked(tensor_path, scope.tensor_file, verify)))
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
        header_len = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8:8 + header_len])
        start = 8 + header_len
        tensors = {}
        for name, expected in record.tensors.items():
            info = header[name]
            begin, end = info["data_offsets"]
            dtype, shape = torch_dtype(info["dtype"]), info["shape"]
            if info["dtype"] != expected["dtype"] or list(shape) != list(expected["shape"]) or not (
                0 <= begin <= end <= len(mapped) - start
            ):
                raise ValueError(f"tensor {name!r} does not match the manifest's index")
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:  # its own storage over the mapping: some torch calls (set_rng_state) ignore storage offsets
                count = (end - begin) // dtype.itemsize
                tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).view(shape)
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VerificationError(f"{path} cannot be read as a safetensors shard: {exc}") from None
