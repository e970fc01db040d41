"""Staging a rank's state and handing it to the node daemon; handles that resolve on commit."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ckptd.client.codec import FlatState, flatten_state, safetensors_dtype
from ckptd.client.components import StateComponent
from ckptd.client.daemon import connect, resolve_endpoint
from ckptd.client.errors import CheckpointError
from ckptd.client.staging import PoolBusyError, StagingPool, StagingRegion
from ckptd.client.topology import RankInfo
from ckptd.client.transport import DaemonRequestError
from ckptd.proto import messages
from ckptd.proto.formats import CKPTD_VERSION, STATE_DIGEST_KEY, TensorEntry, content_digest, layout_tensors
from ckptd.proto.messages import ComponentPart, SaveRequest
from ckptd.proto.patterns import place

log = logging.getLogger(__name__)


class CheckpointSkipped(CheckpointError):
    """The save was skipped because the previous one still held the staging pool (policy 'skip')."""


class SaveHandle:
    """The future of one checkpoint: `wait()` returns its committed directory or raises."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.blocked_s = 0.0
        """Seconds `save_checkpoint` blocked the caller (staging plus hand-over)."""
        self._event = threading.Event()
        self._path: Optional[str] = None
        self._error: Optional[CheckpointError] = None

    def done(self) -> bool:
        """True once the checkpoint committed or failed; never blocks."""
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the checkpoint commits; return its directory or raise CheckpointError."""
        if not self._event.wait(timeout):
            raise CheckpointError(f"checkpoint of step {self.step} not committed within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._path is not None
        return self._path

    def _resolve(self, path: Optional[str] = None, error: Optional[CheckpointError] = None) -> None:
        if not self._event.is_set():
            self._path, self._error = path, error
            self._event.set()


@dataclass(frozen=True)
class PreparedComponent:
    """A component with its process group resolved to global ranks (PER_GROUP only)."""

    component: StateComponent
    group_ranks: Tuple[int, ...] = ()


class CheckpointClient:
    """One rank's connection to its node daemon: stages components and tracks their commits.

    `when_busy` is the back-pressure policy when the previous save still holds the staging
    regions: "wait" blocks until the daemon releases them, "skip" skips this save (every rank's
    handle then fails with the reason, since a checkpoint needs all ranks).
    """

    def __init__(
        self,
        root: str,
        rank_info: RankInfo,
        *,
        endpoint: Optional[str] = None,
        auto_start: bool = True,
        when_busy: str = "wait",
        timeout: float = 600.0,
        connect_timeout: float = 60.0,
        daemon_args: Sequence[str] = (),
    ) -> None:
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', not {when_busy!r}")
        self.root = os.path.realpath(root)
        self.rank_info = rank_info
        self.when_busy = when_busy
        self.timeout = timeout
        self.endpoint = resolve_endpoint(self.root, endpoint)
        self._pool = StagingPool()
        self._handles: Dict[int, SaveHandle] = {}
        self._lock = threading.Lock()
        self._connection = connect(
            self.root, self.endpoint, self._on_notification,
            may_start=auto_start and rank_info.local_rank == 0, wait_s=connect_timeout, daemon_args=daemon_args,
        )

    def save(self, step: int, components: Sequence[PreparedComponent], metrics: Optional[Mapping[str, float]] = None) -> SaveHandle:
        """Stage this rank's part of checkpoint `step` and hand it to the daemon; returns at once after."""
        started = time.perf_counter()
        handle = SaveHandle(step)
        with self._lock:
            if step in self._handles and not self._handles[step].done():
                raise CheckpointError(f"a save of step {step} is already in flight on this rank")
            self._handles[step] = handle
        regions: Dict[str, StagingRegion] = {}
        try:
            parts, regions = self._stage(step, components)
        except PoolBusyError as exc:
            self._send_skip(step, str(exc))
            handle._resolve(error=CheckpointSkipped(f"save of step {step} skipped: {exc}"))
            log.warning("save of step %d skipped: %s", step, exc)
            return handle
        except BaseException:
            self._forget(step)
            raise
        request = SaveRequest(
            root=self.root, step=step, rank=self.rank_info.rank, pid=os.getpid(), topology=self.rank_info.topology,
            parts=tuple(parts), job=self.rank_info.job_id, versions={"ckptd": CKPTD_VERSION, "torch": torch.__version__},
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        try:
            self._connection.request(messages.SAVE, request.to_wire(), timeout=self.timeout)
        except CheckpointError as exc:
            self._pool.release(r.name for r in regions.values())
            self._forget(step)
            if isinstance(exc, DaemonRequestError):
                raise CheckpointError(f"the daemon refused rank {self.rank_info.rank}'s part of step {step}: {exc}") from None
            raise
        handle.blocked_s = time.perf_counter() - started
        return handle

    def _stage(self, step: int, components: Sequence[PreparedComponent]) -> Tuple[List[ComponentPart], Dict[str, StagingRegion]]:
        rank, topology = self.rank_info.rank, self.rank_info.topology
        flats: List[Tuple[PreparedComponent, FlatState, bool, List[TensorEntry], int]] = []
        for prepared in components:
            comp = prepared.component
            placement = place(comp.sharing_pattern, rank, topology, comp.process_group_name, prepared.group_ranks or None)
            writer = placement.writer_rank == rank
            flat = flatten_state(comp.stateful.state_dict(), comp.key)
            entries: List[TensorEntry] = []
            total = 0
            if writer:
                entries, total = layout_tensors(
                    (name, safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in flat.tensors.items()
                )
            flats.append((prepared, flat, writer, entries, total))
        sizes = {p.component.key: total for p, _, writer, _, total in flats if writer and total}
        regions = self._pool.reserve(sizes, wait=self.when_busy == "wait", timeout=self.timeout) if sizes else {}
        try:
            parts = [self._stage_one(p, flat, writer, entries, total, regions.get(p.component.key))
                     for p, flat, writer, entries, total in flats]
        except BaseException:
            self._pool.release(r.name for r in regions.values())
            raise
        return parts, regions

    def _stage_one(
        self, prepared: PreparedComponent, flat: FlatState, writer: bool, entries: List[TensorEntry],
        total: int, region: Optional[StagingRegion],
    ) -> ComponentPart:
        comp = prepared.component
        digests: Optional[Dict[str, str]] = None
        if writer and region is not None:
            _copy_into(region, entries, flat)
        if comp.validate_replication:
            if writer and region is not None:
                digests = {e.name: content_digest(region.bytes_view(e.offset, e.nbytes)) for e in entries}
            else:
                digests = {name: _tensor_digest(t) for name, t in flat.tensors.items()}
            digests[STATE_DIGEST_KEY] = content_digest(flat.skeleton)
        return ComponentPart(
            key=comp.key, pattern=comp.sharing_pattern, required=comp.required, writer=writer,
            group_name=comp.process_group_name, group_ranks=prepared.group_ranks,
            validate_replication=comp.validate_replication, metadata=dict(comp.metadata or {}),
            region=region.name if region is not None else None, region_size=total,
            tensors=tuple(entries), state=flat.skeleton if writer else None, digests=digests,
        )

    def _send_skip(self, step: int, reason: str) -> None:
        body = SaveRequest(
            root=self.root, step=step, rank=self.rank_info.rank, pid=os.getpid(), topology=self.rank_info.topology,
            parts=(), job=self.rank_info.job_id,
        ).to_wire()
        body.update(skipped=True, reason=reason)
        try:
            self._connection.request(messages.SAVE, body, timeout=self.timeout)
        except CheckpointError as exc:
            log.warning("could not tell the daemon that step %d was skipped: %s", step, exc)

    def _on_notification(self, envelope: messages.Envelope) -> None:
        """Runs on the I/O thread."""
        body = envelope.body
        if envelope.type == messages.RELEASED:
            self._pool.release(r for r in body.get("regions", []) if isinstance(r, str))
            return
        step = body.get("step")
        with self._lock:
            handle = self._handles.get(step) if isinstance(step, int) else None
        if handle is None:
            return
        if envelope.type == messages.COMMITTED:
            handle._resolve(path=str(body.get("path")))
        elif envelope.type == messages.ABORTED:
            handle._resolve(error=CheckpointError(f"checkpoint of step {step} aborted: {body.get('reason')}"))

    def _forget(self, step: int) -> None:
        with self._lock:
            self._handles.pop(step, None)

    def in_flight(self) -> List[SaveHandle]:
        """Handles of saves not yet committed or failed."""
        with self._lock:
            return [h for h in self._handles.values() if not h.done()]

    def close(self, timeout: Optional[float] = None) -> None:
        """Wait for saves in flight (up to `timeout` each), then free the staging memory."""
        for handle in self.in_flight():
            try:
                handle.wait(timeout if timeout is not None else self.timeout)
            except CheckpointError as exc:
                log.warning("save of step %d did not commit before close: %s", handle.step, exc)
        deadline = time.monotonic() + 5.0
        while self._pool.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._connection.close()
        self._pool.close()


def _copy_into(region: StagingRegion, entries: List[TensorEntry], flat: FlatState) -> None:
    """Copy every tensor into its slot of the region (device-to-host on a side stream for CUDA)."""
    tensors = [flat.tensors[e.name] for e in entries]
    if any(t.is_cuda for t in tensors):
        region.pin_for_cuda()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for entry, tensor in zip(entries, tensors):
                region.tensor(entry, tensor.dtype).copy_(tensor.detach(), non_blocking=True)
        stream.synchronize()
        return
    for entry, tensor in zip(entries, tensors):
        region.tensor(entry, tensor.dtype).copy_(tensor.detach())


def _tensor_digest(tensor: torch.Tensor) -> str:
    """Digest of a tensor's bytes in row-major order, equal to the digest of its staged copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return content_digest(b"")
    as_bytes = flat.view(torch.uint8)
    return content_digest(_tensor_memory(as_bytes))


def _tensor_memory(tensor: torch.Tensor) -> memoryview:
    """Zero-copy memoryview of a contiguous CPU uint8 tensor."""
    buffer = (ctypes.c_char * tensor.numel()).from_address(tensor.data_ptr())
    return memoryview(buffer).cast("B")
