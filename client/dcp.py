"""Reading a ckptd SHARDED component with `torch.distributed.checkpoint.load` (DCP).

`CkptdStorageReader` shows DCP one SHARDED component of a committed checkpoint as a DCP checkpoint:
each saved tensor under the key DCP's `flatten_state_dict` gives its place in the state (the ckptd
tensor name with "/" replaced by "."; e.g. "model.embed.weight", "optim.state.up.weight.exp_avg"),
with the saved chunks as its chunks, so DCP reshards them into whatever the loading ranks hold. Every
other leaf of the state (an optimizer's param_groups, ...) is a bytes item, which DCP's default planner
would decode with `torch.load` (pickle): ckptd never unpickles, so those items are msgpack documents
that only `CkptdLoadPlanner` decodes. A load of tensors only works with any planner.

    reader = CkptdStorageReader("/ckpt/step_00000100", "train")
    dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=reader, planner=CkptdLoadPlanner())
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from typing import Any, Dict, List, Mapping, Sequence, Union

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptd.client.codec import flatten_state, skeleton_refs, torch_dtype, unflatten_state
from ckptd.client.errors import CheckpointError, VerificationError
from ckptd.client.loading import read_manifest
from ckptd.client.sharded import ShardReader, read_skeleton, saved_chunks
from ckptd.disk.manifests import hold_for_loading
from ckptd.proto.layout import MANIFEST_NAME
from ckptd.proto.manifest import ComponentRecord, FileRecord
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.sharding import Box, ChunkRecord, coverage_problem, distinct_chunks

log = logging.getLogger(__name__)

__all__ = ["CkptdLoadPlanner", "CkptdStorageReader"]

StorageData = Dict[MetadataIndex, Union[ChunkRecord, bytes]]
"""What `Metadata.storage_data` holds: a tensor chunk's record, or a non-tensor leaf's msgpack document."""


class CkptdLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner, except that non-tensor values are decoded from the msgpack documents
    `CkptdStorageReader` hands over, never unpickled."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Decode one non-tensor value and put it at its place in the state being loaded."""
        fqn = read_item.dest_index.fqn
        try:
            decoded = unflatten_state(value.read(), {})
        except ValueError as exc:
            raise CheckpointError(
                f"value {fqn!r} is not a ckptd-encoded value ({exc}); CkptdLoadPlanner reads only what "
                "CkptdStorageReader hands over"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


class CkptdStorageReader(StorageReader):
    """A DCP StorageReader over one SHARDED component of a committed ckptd checkpoint.

    `checkpoint_dir` is a checkpoint directory (`<root>/step_XXXXXXXX`), `component` the component's
    key. The manifest and the component's non-tensor state are read (and, with `verify`, checked) here,
    so a missing or unsuitable component raises CheckpointError at once; with `verify`, each chunk's
    checksum blocks are checked the first time a load reads them.
    """

    def __init__(self, checkpoint_dir: Union[str, os.PathLike[str]], component: str, verify: bool = True) -> None:
        super().__init__()
        self.component = component
        self.verify = verify
        self.path = os.fspath(checkpoint_dir)
        self._metadata = Metadata(state_dict_metadata={})
        self._storage_data: StorageData = {}
        self._shards: Dict[str, FileRecord] = {}
        self._open()

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory being read."""
        return self.path

    def reset(self, checkpoint_id: Union[str, os.PathLike[str], None] = None) -> None:
        """Start a new load; given a `checkpoint_id` (a checkpoint directory), read that checkpoint."""
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
            self._open()
        elif self._metadata.storage_meta is not None:
            self._metadata.storage_meta.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The component as DCP metadata (built when the reader was made or reset)."""
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Take the chunk locations of `metadata` (as read_metadata gave it)."""
        if not isinstance(metadata.storage_data, dict):
            raise CheckpointError("CkptdStorageReader needs the metadata its own read_metadata() returns")
        self._storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """No storage-specific planning."""
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        """No storage-specific planning."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Copy every requested part of a saved chunk into the tensor the planner resolves (from a view
        of the mapped shard, no intermediate copy), and hand each non-tensor value to the planner."""
        self._check_planner(plan, planner)
        reader = ShardReader(self.path, self._shards, self.verify)
        try:
            with hold_for_loading(self.path):  # retention leaves the checkpoint alone meanwhile
                for item in plan.items:
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(item, io.BytesIO(self._stored(item, bytes)))
                    else:
                        self._read_tensor(item, planner, reader)
        finally:
            reader.close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike[str]]) -> bool:
        """Whether `checkpoint_id` is a ckptd checkpoint directory (it holds a manifest)."""
        try:
            return os.path.isfile(os.path.join(os.fspath(checkpoint_id), MANIFEST_NAME))
        except TypeError:
            return False

    def _open(self) -> None:
        record = _sharded_record(self.path, self.component)
        self._shards = {s.tensor_file.path: s.tensor_file for s in record.scopes.values()}
        with hold_for_loading(self.path):
            skeleton = read_skeleton(self.path, self.component, record, self.verify)
        self._metadata = _build_metadata(self.component, skeleton, saved_chunks(self.component, record))
        self._metadata.storage_meta = StorageMeta(checkpoint_id=self.path, load_id=uuid.uuid4().hex)
        self._storage_data = self._metadata.storage_data
        log.debug(
            "%s: component %r gives DCP %d entries", self.path, self.component, len(self._metadata.state_dict_metadata)
        )

    def _check_planner(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Refuse, before reading anything, a plan with non-tensor values and a planner that unpickles them."""
        if isinstance(planner, CkptdLoadPlanner):
            return
        values = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if values:
            raise CheckpointError(
                f"component {self.component!r}: the state to load holds non-tensor values ({', '.join(values[:3])}"
                f"{', ...' if len(values) > 3 else ''}), which {type(planner).__name__} would decode with "
                "torch.load (pickle); ckptd never unpickles: pass planner=CkptdLoadPlanner() "
                "(from ckptd.client.dcp) to torch.distributed.checkpoint.load"
            )

    def _stored(self, item: ReadItem, kind: type) -> Any:
        stored = self._storage_data.get(item.storage_index)
        if not isinstance(stored, kind):
            raise CheckpointError(
                f"component {self.component!r}: {item.storage_index.fqn} at {list(item.storage_index.offset or ())} "
                "is not in this checkpoint's metadata"
            )
        return stored

    def _read_tensor(self, item: ReadItem, planner: LoadPlanner, reader: ShardReader) -> None:
        chunk: ChunkRecord = self._stored(item, ChunkRecord)
        part = Box(
            tuple(o + int(d) for o, d in zip(chunk.box.offsets, item.storage_offsets)),
            tuple(int(n) for n in item.lengths),
        )
        needed = part.byte_range_in(chunk.box, torch_dtype(chunk.dtype).itemsize) if part.volume else (0, 0)
        source, _, _ = reader.chunk(chunk, needed)
        source = _narrow(source, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise CheckpointError(
                f"component {self.component!r}: {item.dest_index.fqn} needs a part of size {list(target.size())}, "
                f"the plan reads {list(source.size())} from chunk {chunk.name!r} of {chunk.file}"
            )
        with torch.no_grad():
            target.copy_(source)
        planner.commit_tensor(item, target)


def _sharded_record(checkpoint_dir: str, component: str) -> ComponentRecord:
    """Component `component` of the checkpoint, which must be SHARDED."""
    manifest = read_manifest(checkpoint_dir)
    record = manifest.components.get(component)
    if record is None:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} has no component {component!r}; it holds {sorted(manifest.components)}"
        )
    if record.pattern is not SharingPattern.SHARDED:
        raise CheckpointError(
            f"component {component!r} of {checkpoint_dir} is {record.pattern.value}, not sharded: "
            "torch.distributed.checkpoint reads only SHARDED components; load it with "
            "CheckpointManager.load_checkpoint"
        )
    return record


def _build_metadata(component: str, skeleton: bytes, chunks: Mapping[str, List[ChunkRecord]]) -> Metadata:
    """DCP metadata of a SHARDED component: its state flattened as DCP flattens a state dict, each
    tensor with its saved chunks, each other leaf a bytes item."""
    try:
        placeholders = {name: torch.empty(0, device="meta") for name in set(skeleton_refs(skeleton).values())}
        state = unflatten_state(skeleton, placeholders)
    except ValueError as exc:
        raise VerificationError(f"component {component!r}: its state cannot be decoded: {exc}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"component {component!r} holds a {type(state).__name__}; torch.distributed.checkpoint loads only dicts"
        )
    try:
        flat, paths = flatten_state_dict(dict(state))
    except ValueError as exc:
        raise CheckpointError(f"component {component!r}: DCP cannot flatten its state: {exc}") from None
    names = {id(tensor): name for name, tensor in placeholders.items()}
    entries: Dict[str, STORAGE_TYPES] = {}
    storage: StorageData = {}
    for fqn, value in flat.items():
        if isinstance(value, torch.Tensor):
            entries[fqn] = _tensor_entry(component, fqn, chunks.get(names[id(value)], []), storage)
        elif _holds_tensor(value):
            log.warning(
                "component %r: %s holds tensors inside a %s, which DCP would load as one pickled object; left out",
                component,
                fqn,
                type(value).__name__,
            )
        else:
            entries[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = flatten_state(value, component).skeleton
    return Metadata(
        state_dict_metadata=entries,
        planner_data={fqn: paths[fqn] for fqn in entries},
        storage_data=storage,
    )


def _tensor_entry(component: str, fqn: str, chunks: Sequence[ChunkRecord], storage: StorageData) -> STORAGE_TYPES:
    """A tensor's DCP entry, one chunk per distinct saved box (replicas may both have written one);
    records where each chunk lies in `storage`."""
    if not chunks:
        raise VerificationError(f"component {component!r}: no chunk of tensor {fqn} is listed")
    problem = coverage_problem(chunks[0].name, chunks)
    if problem is not None:
        raise VerificationError(f"component {component!r}: {problem}")
    distinct = distinct_chunks(chunks)
    for chunk in distinct:
        storage[MetadataIndex(fqn, chunk.box.offsets)] = chunk
    first = chunks[0]
    try:
        dtype = torch_dtype(first.dtype)
    except ValueError as exc:
        raise VerificationError(f"component {component!r}: tensor {first.name!r}: {exc}") from None
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype),
        size=torch.Size(first.global_shape),
        chunks=[ChunkStorageMetadata(torch.Size(c.box.offsets), torch.Size(c.box.sizes)) for c in distinct],
    )


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(item) for item in value)
    return False


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The part of `tensor` starting at `offsets`, `lengths` long along each dimension (a view)."""
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor
