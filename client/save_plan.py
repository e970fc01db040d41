"""Repeat saves: recognise a state whose structure is unchanged since the last save and reuse its plan.

Flattening a state dict, naming its tensors and laying them out costs microseconds per tensor
(measured: 0.18 s for 10,000 small tensors, 11 ms for a 400-tensor LM with AdamW), paid again on
every save although a training loop's state keeps its structure. A `ComponentPlan` keeps what the
first save worked out, and a repeat save only checks that it still holds:

- the containers: the same types, the same keys (types included) in the same order, the same lengths;
- every tensor: the same type, memory (data_ptr), shape, strides, dtype and device (a DTensor: its
  local tensor's, and its global shape, placements and mesh), so names, aliases, chunks and layout
  are still right;
- the non-tensor values are re-encoded (a scheduler's step changes every save), cheaply: compared
  with the last save's as msgpack bytes, and the skeleton rebuilt only when they differ.

Anything else (a new key, a resized tensor, optimizer state created or replaced, a tensor moved)
misses, and the component is planned again from scratch. DCP caches its save plans the same way.

A repeat save copies through views made once of the plan's own tensors (`plan_copies`: small
tensors that lie back to back are one torch.cat), so the copy needs nothing of the new state dict
but its structure, and the tensors are checked in a thread while it runs. A miss found then is
staged again in full, from the same state dict, before the save returns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import msgpack
import torch

from ckptd.client.codec import (
    FlatState,
    encode_ordered_dict,
    encode_scalar,
    encode_tuple,
    pack_skeleton,
    path_join,
    tensor_ref,
    torch_dtype,
)
from ckptd.client.dtensors import is_dtensor, local_tensor, placement_key
from ckptd.client.errors import UnsupportedStateError

if TYPE_CHECKING:
    from ckptd.client.snapshot import PreparedComponent, StagedComponent

_TENSOR = "tensor"
_SCALAR = "scalar"
_MISSING: Any = object()

Leaf = str  # _TENSOR or _SCALAR
Node = Union[Leaf, "_Sequence", "_Mapping"]


class _Miss(Exception):
    """The state no longer matches the template."""


@dataclass(frozen=True)
class _Sequence:
    """A list or tuple of a fixed length."""

    cls: type
    children: Tuple[Node, ...]


@dataclass(frozen=True)
class _Mapping:
    """A dict or OrderedDict with fixed keys in a fixed order (an OrderedDict's `_metadata` too)."""

    cls: type
    keys: Tuple[Any, ...]
    key_types: Optional[Tuple[type, ...]]
    """None when every key is a str (equal keys then have equal types)."""
    children: Tuple[Node, ...]
    metadata: Optional[Node]
    all_tensors: bool


def build_template(value: Any, path: str, refs: Dict[str, str], names: List[str]) -> Optional[Node]:
    """The structure of `value` as `flatten_state` walked it (`refs`: its tensor paths; the name of
    each tensor met is appended to `names`); None where a part cannot be matched cheaply (dict keys
    other than str and int), so the component is always flattened in full."""
    if path in refs:
        names.append(refs[path])
        return _TENSOR
    cls = type(value)
    if cls is list or cls is tuple:
        children = [build_template(item, path_join(path, i), refs, names) for i, item in enumerate(value)]
        if any(c is None for c in children):
            return None
        return _Sequence(cls, tuple(c for c in children if c is not None))
    if cls is dict or cls is OrderedDict:
        keys = tuple(value)
        if not all(type(k) is str or type(k) is int for k in keys):
            return None
        children = [build_template(item, path_join(path, key), refs, names) for key, item in value.items()]
        metadata = getattr(value, "_metadata", _MISSING) if cls is OrderedDict else _MISSING
        meta_node = (
            None if metadata is _MISSING else build_template(metadata, path_join(path, "_metadata"), refs, names)
        )
        if any(c is None for c in children) or (metadata is not _MISSING and meta_node is None):
            return None
        key_types = None if all(type(k) is str for k in keys) else tuple(type(k) for k in keys)
        return _Mapping(
            cls,
            keys,
            key_types,
            tuple(c for c in children if c is not None),
            meta_node,
            all(c is _TENSOR for c in children),
        )
    return _SCALAR


def _collect(node: Node, value: Any, tensors: List[Any], scalars: List[Any]) -> None:
    """Append `value`'s tensors and non-tensor leaves in walk order; raise _Miss on another structure."""
    if node is _TENSOR:
        tensors.append(value)
        return
    if node is _SCALAR:
        scalars.append(value)
        return
    cls = type(value)  # not narrowing `value`: its type is checked against the template's
    if cls is not node.cls or len(value) != len(node.children):  # type: ignore[union-attr]
        raise _Miss
    if isinstance(node, _Sequence):
        _collect_children(node.children, value, tensors, scalars)
        return
    assert isinstance(node, _Mapping)
    if tuple(value) != node.keys or (node.key_types is not None and tuple(map(type, value)) != node.key_types):
        raise _Miss
    if node.all_tensors:
        tensors.extend(value.values())
    else:
        _collect_children(node.children, value.values(), tensors, scalars)
    metadata = getattr(value, "_metadata", _MISSING) if node.cls is OrderedDict else _MISSING
    if (metadata is _MISSING) != (node.metadata is None):
        raise _Miss
    if node.metadata is not None:
        _collect(node.metadata, metadata, tensors, scalars)


def _collect_children(children: Tuple[Node, ...], values: Any, tensors: List[Any], scalars: List[Any]) -> None:
    for child, item in zip(children, values):
        if child is _TENSOR:
            tensors.append(item)
        elif child is _SCALAR:
            scalars.append(item)
        else:
            _collect(child, item, tensors, scalars)


def _build(node: Node, refs: Iterator[Any], scalars: Iterator[Any]) -> Any:
    """The encoded tree `flatten_state` would make, from the template, the tensor references and the
    encoded non-tensor values (iterators, in walk order)."""
    if node is _TENSOR:
        return next(refs)
    if node is _SCALAR:
        return next(scalars)
    if isinstance(node, _Sequence):
        items = [_build(child, refs, scalars) for child in node.children]
        return items if node.cls is list else encode_tuple(items)
    assert isinstance(node, _Mapping)
    encoded = {key: _build(child, refs, scalars) for key, child in zip(node.keys, node.children)}
    if node.cls is dict:
        return encoded
    if node.metadata is not None:
        return encode_ordered_dict(encoded, _build(node.metadata, refs, scalars))
    return encode_ordered_dict(encoded)


def _pack_scalars(scalars: List[Any]) -> bytes:
    """The non-tensor values as exact msgpack bytes (equal bytes: equal values of equal types)."""
    packed: bytes = msgpack.packb(scalars, use_bin_type=True, strict_types=True, default=encode_scalar)
    return packed


def _fingerprints(tensors: List[Any], dtensors: bool) -> Any:
    """What must stay equal for a plan to hold: per tensor its type, memory, shape, strides, dtype and
    device; a DTensor's local tensor's, and its placement. Plain tensors are read column by column
    (measured: 3 ms for 10,000 tensors against 6 ms tensor by tensor)."""
    if dtensors:
        return [_dtensor_fingerprint(t) for t in tensors]
    tensor = torch.Tensor
    return (
        list(map(type, tensors)),
        list(map(tensor.data_ptr, tensors)),
        [t.shape for t in tensors],
        list(map(tensor.stride, tensors)),
        [t.dtype for t in tensors],
        [t.device for t in tensors],
    )


def _dtensor_fingerprint(tensor: Any) -> Tuple[Any, ...]:
    local = local_tensor(tensor)
    key = placement_key(tensor) if local is not tensor else None
    return (type(tensor), local.data_ptr(), local.shape, local.stride(), local.dtype, local.device, key)


class StructureMatch(NamedTuple):
    """A state of a plan's structure: its flattened form, the tensor each entry is copied from (in
    entry order), and every tensor leaf in walk order (for ComponentPlan.tensors_hold)."""

    flat: FlatState
    sources: List[torch.Tensor]
    tensors: List[Any]


@dataclass(eq=False)
class ComponentPlan:
    """What one component's first save worked out, reused while its state keeps its structure."""

    prepared: "PreparedComponent"
    """The component declaration the plan was made for (another declaration plans again)."""
    template: Node
    leaf_names: List[str]
    """The tensor name of each tensor leaf in walk order (aliases repeat a name)."""
    refs: Dict[str, str]
    dtensors: bool
    fingerprints: Any
    scalars: bytes
    skeleton: bytes
    entry_leaves: List[int]
    """For each staged entry, the tensor leaf it is copied from."""
    staged: "StagedComponent"
    """The snapshot the plan was made from: writer, entries, total, chunks. It holds that save's
    tensors, so their memory cannot be freed and reused by another tensor: a data_ptr equal to the
    plan's is the same memory."""
    state_is_skeleton: bool
    views: Optional[Tuple[Any, List[torch.Tensor]]] = field(default=None, repr=False)
    """(region, a view of it per entry), made once per region."""
    flat_sources: Optional[List[Optional[torch.Tensor]]] = field(default=None, repr=False)
    """Per entry, a flat view of its source where it may be copied in a group (see flat_sources)."""
    planned_copies: Optional[Tuple[Any, Optional["PlannedCopies"]]] = field(default=None, repr=False)
    """(region, the copies that fill it), made once per region."""

    @classmethod
    def make(cls, prepared: "PreparedComponent", state: Any, staged: "StagedComponent") -> Optional["ComponentPlan"]:
        """A plan from a full snapshot (`staged`) of `state`; None if the state cannot be matched cheaply."""
        names: List[str] = []
        template = build_template(state, "", staged.flat.refs, names)
        if template is None:
            return None
        tensors: List[Any] = []
        scalars: List[Any] = []
        _collect(template, state, tensors, scalars)
        first_leaf: Dict[str, int] = {}
        for index, name in enumerate(names):
            first_leaf.setdefault(name, index)
        dtensors = any(is_dtensor(t) for t in tensors)
        try:
            packed = _pack_scalars(scalars)
            fingerprints = _fingerprints(tensors, dtensors)
            refs = (tensor_ref(name) for name in names)
            encoded = [encode_scalar(v) for v in scalars]
            rebuilt = pack_skeleton(_build(template, refs, iter(encoded)))
        except (TypeError, ValueError, OverflowError, AttributeError, RuntimeError, UnsupportedStateError):
            return None
        if rebuilt != staged.flat.skeleton:  # key paths that collide ("a/b" and a -> b): plan nothing
            return None
        return cls(
            prepared=prepared,
            template=template,
            leaf_names=names,
            refs=staged.flat.refs,
            dtensors=dtensors,
            fingerprints=fingerprints,
            scalars=packed,
            skeleton=staged.flat.skeleton,
            entry_leaves=[first_leaf[e.name] for e in staged.entries],
            staged=staged,
            state_is_skeleton=staged.state is staged.flat.skeleton,
            flat_sources=flat_sources(staged.entries, staged.sources),
        )

    def match_structure(self, state: Any) -> Optional["StructureMatch"]:
        """If `state` still has the plan's structure and its non-tensor values can be encoded: its
        flattened form and tensors; otherwise None. The tensors' memory, shapes, strides, dtypes and
        devices are left to tensors_hold() (microseconds per tensor: a save checks them while it copies)."""
        tensors: List[Any] = []
        scalars: List[Any] = []
        try:
            _collect(self.template, state, tensors, scalars)
            if len(tensors) != len(self.leaf_names):
                return None
            packed = _pack_scalars(scalars)
            if packed != self.scalars:
                encoded = [encode_scalar(v) for v in scalars]
                refs = (tensor_ref(name) for name in self.leaf_names)
                self.skeleton = pack_skeleton(_build(self.template, refs, iter(encoded)))
                self.scalars = packed
        except (_Miss, TypeError, ValueError, OverflowError, AttributeError, RuntimeError, UnsupportedStateError):
            return None
        leaves = [local_tensor(tensors[i]) for i in self.entry_leaves] if self.dtensors else None
        sources = leaves if leaves is not None else [tensors[i] for i in self.entry_leaves]
        flat = FlatState(self.skeleton, dict(zip(self.leaf_names, tensors)), self.refs)
        return StructureMatch(flat, sources, tensors)

    def tensors_hold(self, tensors: List[Any]) -> bool:
        """True if `tensors` (a StructureMatch's) have the memory, shapes, strides, dtypes and devices
        the plan was made for."""
        try:
            return bool(_fingerprints(tensors, self.dtensors) == self.fingerprints)
        except (TypeError, ValueError, AttributeError, RuntimeError):
            return False

    def region_views(self, region: Any) -> List[torch.Tensor]:
        """A view of `region` per entry, typed like its source (kept while the region stays the same)."""
        if self.views is None or self.views[0] is not region:
            self.views = (region, region_views(region, self.staged.entries, self.staged.header_room))
        return self.views[1]

    def copies(self, region: Any) -> Optional["PlannedCopies"]:
        """The copies that fill `region` with every entry, for a state that fits the plan (kept while
        the region stays the same); None where a source is not a host tensor."""
        if self.planned_copies is None or self.planned_copies[0] is not region:
            staged = self.staged
            planned = plan_copies(region, staged.entries, staged.sources, self.flat_sources, staged.header_room)
            self.planned_copies = (region, planned)
        return self.planned_copies[1]


GROUPED_BELOW_BYTES = 1 << 20
"""Tensors smaller than this are copied in groups: their per-copy cost outweighs their bytes."""

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
"""Types copied in groups (a subclass may dispatch its views and cat elsewhere)."""


class PlannedCopies(NamedTuple):
    """How a save fills a region: `groups` of small tensors that lie back to back, one torch.cat each
    (a flat view of the region and a flat view of each source), and every other tensor alone."""

    groups: List[Tuple[torch.Tensor, List[torch.Tensor]]]
    destinations: List[torch.Tensor]
    sources: List[torch.Tensor]


def flat_sources(entries: Sequence[Any], sources: Sequence[torch.Tensor]) -> Optional[List[Optional[torch.Tensor]]]:
    """Per entry, a flat view of its source where it may be copied in a group (a plain contiguous
    host tensor of the entry's dtype, under GROUPED_BELOW_BYTES), else None; None if a source is not
    on the host (device copies are queued tensor by tensor on a side stream). Made where the plan is
    made, on the thread that saves: the state's tensors are only ever touched there."""
    if any(source.device.type != "cpu" for source in sources):
        return None
    return [
        source.detach().view(-1)
        if entry.nbytes < GROUPED_BELOW_BYTES
        and type(source) in _PLAIN_TENSORS
        and source.dtype == torch_dtype(entry.dtype)
        and source.is_contiguous()
        else None
        for entry, source in zip(entries, sources)
    ]


def plan_copies(
    region: Any,
    entries: Sequence[Any],
    sources: Sequence[torch.Tensor],
    flat: Optional[Sequence[Optional[torch.Tensor]]],
    base: int,
) -> Optional[PlannedCopies]:
    """Plan the copies of the entries of a body that starts at `base`: entries whose `flat` source
    view is given and that lie back to back in the body with one dtype are grouped, the others copied
    alone from their `sources`. None if `flat` is (a source is not on the host). Touches only the
    region: it may run in the thread that allocates it.

    The sources are the plan's own tensors: a state that fits the plan has tensors of the same memory,
    shape, strides and dtype, so views made once of the plan's read what a save must copy (measured:
    10,000 tensors of 4 KiB in 8 ms with one cat, against 11 ms with _foreach_copy_)."""
    if flat is None:
        return None
    planned = PlannedCopies([], [], [])
    run: List[torch.Tensor] = []
    run_start = run_end = 0
    run_dtype = torch.uint8

    def close_run() -> None:
        if len(run) > 1:
            planned.groups.append((region.block(base + run_start, run_end - run_start, run_dtype), list(run)))
        elif run:
            planned.destinations.append(region.block(base + run_start, run_end - run_start, run_dtype))
            planned.sources.append(run[0])
        run.clear()

    for entry, source, flat_source in zip(entries, sources, flat):
        dtype = torch_dtype(entry.dtype)
        if flat_source is None:
            planned.destinations.append(region.tensor(entry, dtype, base))
            planned.sources.append(source)
            continue
        if not run or dtype != run_dtype or entry.offset != run_end:
            close_run()
            run_start, run_dtype = entry.offset, dtype
        run.append(flat_source)
        run_end = entry.offset + entry.nbytes
    close_run()
    return planned


def region_views(region: Any, entries: Sequence[Any], base: int) -> List[torch.Tensor]:
    """A view of `region` for each entry of a body that starts at `base`, with the entry's dtype and shape."""
    return [region.tensor(entry, torch_dtype(entry.dtype), base) for entry in entries]
