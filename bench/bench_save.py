#!/usr/bin/env python3
"""Benchmark: ckptd against its peers (torch.save, torch.distributed.checkpoint) on one machine.

One command, one table:

    .venv/bin/python bench/bench_save.py                      # full size: ~1.27 GB state, 3 repeats
    .venv/bin/python bench/bench_save.py --scale 0.05 --repeats 2   # a quick run
    .venv/bin/python bench/bench_save.py --device cuda              # the state on the GPU (bench/run_cuda.sh)

The driver (this script without --row) runs every row in a fresh subprocess
(`bench_save.py --row NAME --state A|B ...`), so each row's trainer peak RSS is its own, then
prints one table and writes JSON (--json, default bench/results/latest.json).
See bench/README.md for what each row and column means and the targets they are read against.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import inspect
import json
import math
import mmap
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")
RESULT_MARK = "@@bench-row "
DISTURBED = 0.10  # other processes used more than this share of the machine during a row's saves

# (id, label shown in the table)
ROWS: List[Tuple[str, str]] = [
    ("memcpy", "memcpy limit"),
    ("write", "write+fsync limit"),
    ("write_direct", "O_DIRECT write+fsync"),
    ("torch_save", "torch.save + fsync"),
    ("dcp_save", "dcp.save"),
    ("dcp_async_default", "dcp.async_save default"),
    ("dcp_async_best", "dcp.async_save best"),
    ("ckptd", "ckptd"),
    ("ckptd_overlap", "ckptd overlap"),
]
LABELS = dict(ROWS)
ROW_IDS = [r for r, _ in ROWS]
BLOCKING_ROWS = {"memcpy", "write", "write_direct", "torch_save", "dcp_save"}
LOAD_ROWS = {"torch_save": "torch.load", "dcp_save": "dcp.load", "ckptd": "ckptd load_checkpoint()"}
DEFAULT_ROWS_B = ["memcpy", "dcp_async_best", "ckptd", "ckptd_overlap"]

# State A: a decoder-style transformer LM. At --scale 1: vocab 32000, d_model 768, 8 layers, untied
# output head -> 105.9M parameters; with AdamW's two moments that is 1.27 GB (1.18 GiB) of tensors.
LM_VOCAB, LM_D, LM_LAYERS = 32000, 768, 8
# State B: many small tensors, to expose per-tensor overhead.
SMALL_COUNT, SMALL_ELEMS = 10_000, 1024  # 4 KiB each (fp32), 41 MB in all at --scale 1

# The throughput probe: a small MLP trained in the trainer process, fixed size (independent of --scale).
MLP_IN, MLP_HIDDEN, MLP_BATCH = 512, 1024, 128


# --------------------------------------------------------------------------------------------
# small helpers (no torch)
# --------------------------------------------------------------------------------------------

def proc_status(pid: Any = "self") -> Dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssShmem, ...); {} if gone."""
    fields: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0])
                elif name == "State" and parts:
                    fields["State_" + parts[0]] = 1
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return fields


def machine_cpu_seconds() -> Tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine so far, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    values += [0] * (8 - len(values))
    idle, steal = values[3] + values[4], values[7]
    return (sum(values) - idle - steal) / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: Any = "self") -> Optional[float]:
    """utime + stime of a whole process (all its threads) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class RowNotApplicable(Exception):
    """This row cannot run here (for example O_DIRECT on a filesystem without it): printed as n/a."""


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap memory back to the OS, so a baseline RSS is not inflated by freed garbage."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mb(kb: Optional[int]) -> Optional[float]:
    return None if kb is None else kb / 1024.0


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def pid_gone(pid: int) -> bool:
    status = proc_status(pid)
    return not status or "State_Z" in status or "State_X" in status


class RssSampler:
    """Polls /proc/<pid>/status of this process and of a background writer, keeping the peaks of
    RssAnon and RssShmem (VmHWM has no per-kind peak). 20 ms period: costs well under 1% of a core."""

    def __init__(self, writer_pid: Callable[[], Optional[int]], period: float = 0.02) -> None:
        self._writer_pid = writer_pid
        self._period = period
        self.peak: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sample()
        except OSError:
            pass

    def _bump(self, key: str, value: Optional[int]) -> None:
        if value is not None and value > self.peak.get(key, -1):
            self.peak[key] = value

    def sample(self) -> None:
        me = proc_status()
        self._bump("self_anon", me.get("RssAnon"))
        self._bump("self_shmem", me.get("RssShmem"))
        pid = self._writer_pid()
        if pid:
            other = proc_status(pid)
            self._bump("writer_anon", other.get("RssAnon"))
            self._bump("writer_shmem", other.get("RssShmem"))
            self._bump("writer_rss", other.get("VmRSS"))
            self._bump("writer_hwm", other.get("VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.sample()
            except Exception:  # never let the sampler disturb the measurement
                pass


# ---- page cache: evict, and check residency with mincore --------------------------------------

_libc: Any = None


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = libc
    return _libc


def resident_fraction(paths: Sequence[str]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (mincore on a fresh read-only mapping)."""
    try:
        libc = _get_libc()
    except OSError:
        return None
    total = resident = 0
    page = mmap.PAGESIZE
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                raw = bytes(vec)
                resident += pages - raw.count(0)
                total += pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def evict(paths: Sequence[str], drop_caches: str) -> Tuple[str, Optional[float]]:
    """Drop `paths` from the page cache. posix_fadvise(DONTNEED) per file first (the files are
    fsynced, so their pages are clean); /proc/sys/vm/drop_caches (system-wide; it also evicts
    torch's own libraries) only when asked to ("always"), or in "auto" mode when fadvise left
    more than 5% of the pages resident. Returns (method used, resident fraction after)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    method = "fadvise"
    resident = resident_fraction(paths)
    if drop_caches == "always" or (drop_caches == "auto" and (resident is None or resident > 0.05)):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
            method = "fadvise+drop_caches"
            resident = resident_fraction(paths)
        except OSError:
            method = "fadvise (drop_caches not permitted)"
    return method, resident


def files_under(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for dirpath, _, names in os.walk(path):
        found.extend(os.path.join(dirpath, n) for n in names)
    return sorted(found)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# the row process: build one state, measure one way of saving it
# --------------------------------------------------------------------------------------------

def lm_dims(scale: float) -> Dict[str, int]:
    """LM shape for --scale: d_model and vocab both scale with sqrt(scale), layers stay, so every
    term of the parameter count (layers*12*d^2 and 2*vocab*d) scales linearly with `scale`."""
    root = math.sqrt(scale)
    d = max(8.0, LM_D * root)
    heads = max(1, round(d / 64))
    d_model = max(heads, round(d / heads) * heads)
    return {"vocab": max(16, round(LM_VOCAB * root)), "d_model": d_model, "heads": heads, "layers": LM_LAYERS}


class RowContext:
    """One state (A or B) live in this process, with what the savers need from it.

    `device` is where the state lives ("cpu" or "cuda"): the model and the optimizer step that
    creates AdamW's state run there, and state B's tensors are made there."""

    def __init__(self, torch: Any, state: str, scale: float, device: str = "cpu") -> None:
        self.torch = torch
        self.state = state
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(0)
        if state == "A":
            self._build_lm(scale)
        else:
            self._build_small(scale)
        self.sync()
        self.tensors = self._all_tensors()
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    def sync(self) -> None:
        """Wait for all work queued on the device (every stream): call before a timer stops. No-op on CPU."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def sync_stream(self) -> None:
        """Wait for the current stream only, as a training step that reads its loss (loss.item()) would;
        copies a background saver runs on its own stream are not waited for. No-op on CPU."""
        if self.cuda:
            self.torch.cuda.current_stream(self.device).synchronize()

    def host_empty(self, like: Any) -> Any:
        """An uninitialized host tensor shaped like `like`; page-locked (pinned) when the state is on
        the GPU, so device-to-host copies into it run at full speed and may be asynchronous."""
        if self.cuda:
            return self.torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
        return self.torch.empty_like(like)

    def _build_lm(self, scale: float) -> None:
        torch = self.torch
        nn = torch.nn
        dims = lm_dims(scale)

        class LM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(dims["vocab"], dims["d_model"])
                self.blocks = nn.ModuleList(
                    nn.TransformerEncoderLayer(dims["d_model"], dims["heads"], 4 * dims["d_model"], dropout=0.0,
                                               batch_first=True, norm_first=True)
                    for _ in range(dims["layers"])
                )
                self.norm = nn.LayerNorm(dims["d_model"])
                self.head = nn.Linear(dims["d_model"], dims["vocab"], bias=False)

            def forward(self, tokens: Any) -> Any:
                x = self.embed(tokens)
                for block in self.blocks:
                    x = block(x)
                return self.head(self.norm(x))

        model = LM().to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=1000)
        tokens = torch.randint(dims["vocab"], (2, 16), device=self.device)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, dims["vocab"]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.statefuls: Dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        self.params = sum(p.numel() for p in model.parameters())
        self.dims = dims
        self.probe = model.embed.weight  # load_state_dict copies into it in place: checks loads really load

    def _build_small(self, scale: float) -> None:
        torch = self.torch

        class TensorBag:
            """A stateful holding many small tensors; loads copy in place."""

            def __init__(self, tensors: Dict[str, Any]) -> None:
                self.tensors = tensors

            def state_dict(self) -> Dict[str, Any]:
                return dict(self.tensors)

            def load_state_dict(self, state: Dict[str, Any]) -> None:
                with torch.no_grad():
                    for name, tensor in self.tensors.items():
                        tensor.copy_(state[name])

        count = max(10, round(SMALL_COUNT * min(1.0, scale * 10)))  # --scale 0.1 and up: all 10,000
        bag = TensorBag({f"t{i:05d}": torch.randn(SMALL_ELEMS, device=self.device) for i in range(count)})
        self.statefuls = {"tensors": bag}
        self.params = count * SMALL_ELEMS
        self.dims = {"tensors": count, "elements_each": SMALL_ELEMS}
        self.probe = bag.tensors["t00000"]

    def state_dict(self) -> Dict[str, Any]:
        """The plain nested state dict (tensors are the live ones, not copies)."""
        return {key: s.state_dict() for key, s in self.statefuls.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, s in self.statefuls.items():
            s.load_state_dict(state[key])

    def _all_tensors(self) -> List[Any]:
        found: List[Any] = []
        seen = set()

        def walk(value: Any) -> None:
            if isinstance(value, self.torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
                if key not in seen:
                    seen.add(key)
                    found.append(value)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)

        walk(self.state_dict())
        return found


class Pending:
    """An in-flight save as the bench sees it."""

    def __init__(self, done: Callable[[], bool], wait: Callable[[], Any], staged_at: Optional[Callable[[], Optional[float]]] = None):
        self.done = done
        self.wait = wait
        self.staged_at = staged_at or (lambda: None)


def finished() -> Pending:
    return Pending(lambda: True, lambda: None)


class Saver:
    """One row: how it saves, what process writes in the background, how it loads."""

    blocking = True
    background = False  # a blocking row that can also run its save in a background thread
    has_load = False
    config: Dict[str, Any] = {}

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        self.ctx = ctx
        self.torch = ctx.torch
        self.workdir = workdir
        self.last_output: Optional[str] = None

    def save(self, i: int) -> Pending:
        raise NotImplementedError

    def background_save(self, i: int) -> Optional[Pending]:
        """For the throughput phase of a blocking row: the same save in a background thread, or None."""
        return None

    def writer_pid(self) -> Optional[int]:
        return None

    def ready_after(self, since: float) -> Optional[float]:
        """Seconds from `since` (before construction) until the saver's own buffers were ready, for
        savers that allocate in the background; None for the others."""
        return None

    def load(self) -> None:
        raise NotImplementedError

    def load_files(self) -> List[str]:
        assert self.last_output is not None
        return files_under(self.last_output)

    def close(self) -> None:
        pass


class MemcpySaver(Saver):
    """Copy every tensor into preallocated, prefaulted buffers of the same shape. On CPU: host
    buffers like the tensors. On CUDA: the device-to-host limit, pinned host buffers filled with
    non-blocking copies, then a synchronize."""

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        self.buffers = [ctx.host_empty(t) for t in ctx.tensors]
        self.save(-1)  # prefault

    def save(self, i: int) -> Pending:
        with self.torch.no_grad():
            for buffer, tensor in zip(self.buffers, self.ctx.tensors):
                buffer.copy_(tensor, non_blocking=self.ctx.cuda)
        self.ctx.sync()
        return finished()


def fill_with_state(torch: Any, target: Any, tensors: Sequence[Any]) -> None:
    """Copy the state's bytes, tensor after tensor, into the uint8 host tensor `target` (which also
    prefaults it): the write limits write the same bytes as the savers, zero pages included. Device
    tensors are copied to the host here, once, at setup: the write limits measure the disk alone."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            target[offset:offset + flat.numel()].copy_(flat)
            offset += flat.numel()
    target[offset:].fill_(0)


class WriteSaver(Saver):
    """One sequential write of the state's bytes from a prefaulted buffer, then fsync."""

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        self.buffer = self.torch.empty(ctx.nbytes, dtype=self.torch.uint8)
        fill_with_state(self.torch, self.buffer, ctx.tensors)
        self.view = memoryview(self.buffer.numpy()).cast("B")

    prefix, flags = "write", 0
    background = True

    def save(self, i: int) -> Pending:
        path = os.path.join(self.workdir, f"{self.prefix}-{i:03d}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self.flags, 0o644)
        try:
            view = self.view
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.last_output = path
        return finished()

    def background_save(self, i: int) -> Optional[Pending]:
        """The bare write in a thread (os.write and fsync release the GIL): what the I/O alone costs
        the training loop, the reference for the background writers' throughput."""
        thread = threading.Thread(target=self.save, args=(i,), name="bench-write", daemon=True)
        thread.start()
        return Pending(lambda: not thread.is_alive(), thread.join)


class DirectWriteSaver(WriteSaver):
    """The same write with O_DIRECT (page cache bypassed, as ckptd's daemon writes where it can),
    from a page-aligned prefaulted buffer, the length rounded up to a page; then fsync."""

    prefix = "direct"

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        Saver.__init__(self, ctx, workdir)
        if not hasattr(os, "O_DIRECT"):
            raise RowNotApplicable("this platform has no O_DIRECT")
        size = -(-ctx.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.buffer = mmap.mmap(-1, size)  # anonymous mappings are page-aligned
        self.view = memoryview(self.buffer)
        staged = self.torch.frombuffer(self.buffer, dtype=self.torch.uint8)
        fill_with_state(self.torch, staged, ctx.tensors)
        del staged
        self.flags = os.O_DIRECT
        probe = os.path.join(workdir, "direct-probe")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        except OSError as exc:
            raise RowNotApplicable(f"O_DIRECT is not supported in {workdir}: {exc.strerror}") from None
        finally:
            if os.path.exists(probe):
                os.unlink(probe)

    def close(self) -> None:
        self.view.release()
        self.buffer.close()


class TorchSaveSaver(Saver):
    has_load = True

    def save(self, i: int) -> Pending:
        path = os.path.join(self.workdir, f"torch-{i:03d}.pt")
        with open(path, "wb") as f:
            self.torch.save(self.ctx.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        self.last_output = path
        return finished()

    def load(self) -> None:
        # Read into host memory; load_state_dict copies into the live (possibly GPU) model and moves
        # the optimizer state to its parameters' device, as ckptd's load does.
        assert self.last_output is not None
        self.ctx.load_state_dict(self.torch.load(self.last_output, map_location="cpu"))


class DcpSaver(Saver):
    has_load = True

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        import torch.distributed.checkpoint as dcp

        self.dcp = dcp

    def _path(self, i: int) -> str:
        self.last_output = os.path.join(self.workdir, f"dcp-{i:03d}")
        return self.last_output

    def save(self, i: int) -> Pending:
        self.dcp.save(dict(self.ctx.statefuls), checkpoint_id=self._path(i))
        return finished()

    def load(self) -> None:
        # Statefuls: DCP reads into their state_dict() tensors in place, then calls load_state_dict().
        self.dcp.load(dict(self.ctx.statefuls), checkpoint_id=self.last_output)


class DcpAsyncDefaultSaver(DcpSaver):
    blocking = False
    has_load = False

    def save(self, i: int) -> Pending:
        result = self.dcp.async_save(dict(self.ctx.statefuls), checkpoint_id=self._path(i))
        return _dcp_pending(result)


def _dcp_pending(result: Any) -> Pending:
    """A Future (older torch; sync staging) or an AsyncSaveResponse (async staging)."""
    staging = getattr(result, "staging_completion", None)
    upload = getattr(result, "upload_completion", result)
    staged: Dict[str, float] = {}
    if staging is not None:
        staging.add_done_callback(lambda _f: staged.setdefault("t", time.perf_counter()))
    return Pending(upload.done, upload.result, lambda: staged.get("t"))


class DcpAsyncBestSaver(DcpSaver):
    """A kept DefaultStager (shared memory, async staging; pinned memory and non-blocking copies
    only when the state is on the GPU), reused across saves, writing in DCP's background process."""

    blocking = False
    has_load = False

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        accel = ctx.cuda  # pinned staging and non-blocking copies pay off only for device tensors
        try:
            self.options = StagingOptions(
                use_pinned_memory=accel, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=accel
            )
        except TypeError as exc:  # an older StagingOptions
            raise RowNotApplicable(f"StagingOptions in this torch takes other options: {exc}") from None
        # Sharing storages with the checkpoint process: torch's default strategy passes one file
        # descriptor per storage (two while pickling), which runs out of descriptors for state B's
        # 10,000 tensors; switch to named shared-memory files when the limit is too low.
        import resource

        import torch.multiprocessing as tmp

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 4 * len(ctx.tensors) + 1024
        if soft < need and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
            soft = min(hard, need)
        if soft < need and "file_system" in tmp.get_all_sharing_strategies():
            tmp.set_sharing_strategy("file_system")
        self.stager = DefaultStager(self.options)
        self.config = {"staging_options": repr(self.options), "async_checkpointer_type": "PROCESS",
                       "stager": "DefaultStager, kept across saves", "sharing_strategy": tmp.get_sharing_strategy()}
        self.kind = AsyncCheckpointerType.PROCESS
        # The PROCESS executor needs an initialized process group (it broadcasts its TCPStore
        # address): a 1-rank gloo group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        self.dist = dist

    def save(self, i: int) -> Pending:
        result = self.dcp.async_save(
            dict(self.ctx.statefuls), checkpoint_id=self._path(i), async_checkpointer_type=self.kind,
            async_stager=self.stager,
        )
        return _dcp_pending(result)

    def _process(self) -> Any:
        try:
            from torch.distributed.checkpoint import _async_process_executor as executor
        except ImportError:
            return None
        return getattr(executor, "_CHECKPOINT_PROCESS", None)

    def writer_pid(self) -> Optional[int]:
        process = self._process()
        return getattr(getattr(process, "_save_process", None), "pid", None)

    def close(self) -> None:
        self.stager.close()
        process = self._process()
        if process is not None:
            try:
                from torch.distributed.checkpoint._async_process_executor import _CheckpointSaveProcessControlOpts

                process._send(_CheckpointSaveProcessControlOpts.TERMINATE)
                process._save_process.join(timeout=10)
            except Exception:
                pass
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class CkptdSaver(Saver):
    blocking = False
    has_load = True
    overlap = False

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        from ckptd.client import CheckpointManager, SharingPattern, StateComponent
        from ckptd.proto import layout

        statefuls = ctx.statefuls

        class Provider:
            def get_state_components(self) -> List[Any]:
                return [StateComponent(key, s, SharingPattern.GLOBAL) for key, s in statefuls.items()]

        self.root = os.path.join(workdir, "ckpt")
        os.makedirs(self.root)
        self.manager = CheckpointManager(Provider(), self.root, auto_start=True)
        self._lock_path = layout.daemon_lock_path(self.root)
        self._daemon_pid: Optional[int] = None

    def save(self, i: int) -> Pending:
        if self.overlap:
            handle = self.manager.save_checkpoint(i + 1, overlap=True)
        else:
            handle = self.manager.save_checkpoint(i + 1)
        staged: Dict[str, float] = {}
        if self.overlap and hasattr(handle, "wait_staged"):
            def waiter() -> None:
                handle.wait_staged()
                staged["t"] = time.perf_counter()

            threading.Thread(target=waiter, name="bench-wait-staged", daemon=True).start()

        def wait() -> None:
            self.last_output = handle.wait()

        return Pending(handle.done, wait, lambda: staged.get("t"))

    def ready_after(self, since: float) -> Optional[float]:
        self.manager.wait_staging_allocated()
        ready_at = self.manager.client.staging_allocated_at
        return None if ready_at is None else ready_at - since

    def writer_pid(self) -> Optional[int]:
        if self._daemon_pid is None:
            try:
                with open(self._lock_path) as f:
                    text = f.read().strip()
                self._daemon_pid = int(text) if text.isdigit() else None
            except OSError:
                return None
        return self._daemon_pid

    def load(self) -> None:
        self.manager.load_checkpoint()

    def close(self) -> None:
        self.manager.close()
        pid = self.writer_pid()
        if pid is not None and not pid_gone(pid):
            # The auto-started daemon (a process this row started) would exit by itself after its
            # idle timeout; stop it now so it does not linger into the next row.
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 15
            while not pid_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


class CkptdOverlapSaver(CkptdSaver):
    overlap = True


SAVERS = {
    "memcpy": MemcpySaver,
    "write": WriteSaver,
    "write_direct": DirectWriteSaver,
    "torch_save": TorchSaveSaver,
    "dcp_save": DcpSaver,
    "dcp_async_default": DcpAsyncDefaultSaver,
    "dcp_async_best": DcpAsyncBestSaver,
    "ckptd": CkptdSaver,
    "ckptd_overlap": CkptdOverlapSaver,
}


def row_unavailable(row: str) -> Optional[str]:
    """Why this row cannot run with the installed torch/ckptd (printed as n/a), or None."""
    try:
        if row in ("dcp_save", "dcp_async_default", "dcp_async_best"):
            import torch.distributed.checkpoint as dcp

            if row == "dcp_save" and not hasattr(dcp, "save"):
                return "torch.distributed.checkpoint.save is missing in this torch"
            if row != "dcp_save" and not hasattr(dcp, "async_save"):
                return "torch.distributed.checkpoint.async_save is missing in this torch"
            if row == "dcp_async_best":
                try:
                    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
                    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
                except ImportError as exc:
                    return f"no DefaultStager/StagingOptions/AsyncCheckpointerType in this torch ({exc})"
                if not hasattr(AsyncCheckpointerType, "PROCESS"):
                    return "AsyncCheckpointerType.PROCESS is missing in this torch"
                if "async_stager" not in inspect.signature(dcp.async_save).parameters:
                    return "async_save takes no async_stager in this torch"
                import torch.distributed as dist

                if not dist.is_available() or not dist.is_gloo_available():
                    return "torch.distributed with gloo is not available"
        if row == "ckptd_overlap":
            from ckptd.client import CheckpointManager

            if "overlap" not in inspect.signature(CheckpointManager.save_checkpoint).parameters:
                return "save_checkpoint(step, overlap=True) is not implemented in this ckptd"
    except ImportError as exc:
        return f"import failed: {exc}"
    return None


def disk_probe(torch: Any, ctx: RowContext, path: str) -> float:
    """Seconds to write the state's bytes straight from the live tensors into a new file (buffered,
    like the write+fsync limit) and fsync it: the disk's speed at this moment, for this row. Device
    tensors are copied to the host one at a time first; those copies are not counted."""
    started = time.perf_counter()
    copying = 0.0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for tensor in ctx.tensors:
            t = time.perf_counter()
            host = tensor.detach().cpu()  # the tensor itself when it is on the host already
            copying += time.perf_counter() - t
            view = memoryview(host.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started - copying


def run_row(args: argparse.Namespace) -> Dict[str, Any]:
    row, state = args.row, args.state
    result: Dict[str, Any] = {"row": row, "state": state, "label": LABELS[row], "status": "ok"}
    reason = row_unavailable(row)
    if reason is not None:
        result.update(status="n/a", reason=reason)
        return result

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    workdir = args.dir
    os.makedirs(workdir, exist_ok=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(cuda_unavailable_reason(torch))
    built = time.perf_counter()
    ctx = RowContext(torch, state, args.scale, args.device)
    result.update(
        torch_version=torch.__version__, threads=torch.get_num_threads(), state_bytes=ctx.nbytes,
        state_tensors=len(ctx.tensors), params=ctx.params, dims=ctx.dims, build_s=round(time.perf_counter() - built, 3),
        device=ctx.device.type, device_name=torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
    )

    # The throughput probe, built and warmed before the baseline RSS is taken; on the state's device.
    mlp = torch.nn.Sequential(torch.nn.Linear(MLP_IN, MLP_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
                              torch.nn.ReLU(), torch.nn.Linear(MLP_HIDDEN, MLP_IN)).to(ctx.device)
    mlp_params = list(mlp.parameters())
    x, y = torch.randn(MLP_BATCH, MLP_IN, device=ctx.device), torch.randn(MLP_BATCH, MLP_IN, device=ctx.device)

    def train_step() -> None:
        # Plain SGD by hand: a torch.optim optimizer would import torch._dynamo (seconds) in rows
        # that have no optimizer of their own (state B).
        for p in mlp_params:
            p.grad = None
        torch.nn.functional.mse_loss(mlp(x), y).backward()
        with torch.no_grad():
            torch._foreach_add_(mlp_params, [p.grad for p in mlp_params], alpha=-1e-4)
        ctx.sync_stream()  # a GPU step counts once it has run, not when it is queued

    def train_for(seconds: float) -> float:
        start = time.perf_counter()
        steps = 0
        while True:
            train_step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps / elapsed

    for _ in range(5):
        train_step()

    # The disk's speed drifts (a shared host): each row that writes probes it before and after its
    # saves, so its durable time can also be read against the disk it actually had.
    probes: List[float] = []
    probe = not args.no_disk_probe and row != "memcpy"
    if probe:
        probes.append(disk_probe(torch, ctx, os.path.join(workdir, "disk-probe-before.bin")))

    # Baseline: state and probe built, nothing of the saver yet (its buffers are part of its cost).
    # Freeze what exists now (torch's import graph, the state) so the gc.collect() before each save
    # and any automatic collection during one do not rescan it: the same for every row.
    gc.collect()
    gc.freeze()
    malloc_trim()
    base = proc_status()
    result["trainer_base_rss_mb"] = mb(base.get("VmRSS"))
    result["peak_reset"] = reset_peak_rss()
    setup = time.perf_counter()
    saver = SAVERS[row](ctx, workdir)
    result["saver_setup_s"] = round(time.perf_counter() - setup, 3)
    # A trainer builds its checkpointer, then trains before its first save: the first save is timed
    # after `settle` seconds of the training loop (the same for every row), so work a saver does in
    # the background at construction counts where it happens. `ready_s` says how long that took.
    settle_end = time.perf_counter() + args.settle
    while time.perf_counter() < settle_end:
        train_step()
    ready = saver.ready_after(setup)
    result["saver_ready_s"] = None if ready is None else round(ready, 3)
    result["writer_process"] = None
    result["saver_config"] = saver.config

    blocked: List[float] = []
    durable: List[float] = []
    staged: List[float] = []
    kept: List[float] = []
    base_rates: List[float] = []
    inflight_rates: List[float] = []
    durable_loaded: List[float] = []
    saves = 1 + args.repeats
    try:
        with RssSampler(saver.writer_pid) as sampler:
            # How much of the machine other processes used meanwhile (a disturbed row is flagged).
            phase_start = time.perf_counter()
            machine0 = machine_cpu_seconds()
            pid = saver.writer_pid()
            ours0 = (cpu_seconds() or 0.0) + ((cpu_seconds(pid) or 0.0) if pid else 0.0)
            cpu_self0 = cpu_seconds()
            cpu_writer0: Optional[float] = None
            for i in range(saves):
                gc.collect()
                ctx.sync()  # nothing queued before the save is timed with it
                t0 = time.perf_counter()
                pending = saver.save(i)
                t1 = time.perf_counter()
                pending.wait()
                t2 = time.perf_counter()
                staged_at = pending.staged_at()
                blocked.append(t1 - t0)
                durable.append(t2 - t0)
                staged.append((staged_at if staged_at is not None else t1) - t0)
                if i == 0:  # CPU per warm save: from the end of the first save (the writer exists by then)
                    cpu_self0 = cpu_seconds()
                    pid = saver.writer_pid()
                    cpu_writer0 = cpu_seconds(pid) if pid else None
            if saves > 1:
                cpu_self1 = cpu_seconds()
                if cpu_self0 is not None and cpu_self1 is not None:
                    result["trainer_cpu_s_per_save"] = (cpu_self1 - cpu_self0) / (saves - 1)
                pid = saver.writer_pid()
                cpu_writer1 = cpu_seconds(pid) if pid else None
                if cpu_writer0 is not None and cpu_writer1 is not None:
                    result["writer_cpu_s_per_save"] = (cpu_writer1 - cpu_writer0) / (saves - 1)
            in_background = not saver.blocking or saver.background
            if in_background and not args.no_throughput:
                window = min(3.0, max(0.3, median(durable[1:] or durable) or 0.3))
                for j in range(args.repeats):
                    gc.collect()
                    before = train_for(window)
                    t0 = time.perf_counter()
                    pending = saver.save(saves + j) if not saver.blocking else saver.background_save(saves + j)
                    t1 = time.perf_counter()
                    steps = 0
                    while True:  # at least one step, then until durable
                        train_step()
                        steps += 1
                        if pending.done():
                            break
                    t2 = time.perf_counter()
                    pending.wait()
                    loaded = time.perf_counter() - t0
                    after = train_for(window)  # baseline on both sides: a drifting load cancels out
                    base_rate = (before + after) / 2
                    rate = steps / (t2 - t1)
                    base_rates.append(base_rate)
                    inflight_rates.append(rate)
                    kept.append(rate / base_rate)
                    durable_loaded.append(loaded)
            elapsed = time.perf_counter() - phase_start
            machine1 = machine_cpu_seconds()
            pid = saver.writer_pid()
            ours1 = (cpu_seconds() or 0.0) + ((cpu_seconds(pid) or 0.0) if pid else 0.0)
            cores = os.cpu_count() or 1
            result["other_load"] = max(0.0, (machine1[0] - machine0[0]) - (ours1 - ours0)) / (elapsed * cores)
            result["steal"] = (machine1[1] - machine0[1]) / (elapsed * cores)
        peak = proc_status()
        if probe:
            probes.append(disk_probe(torch, ctx, os.path.join(workdir, "disk-probe-after.bin")))
            result["disk_probe_s"] = probes
        writer_pid = saver.writer_pid()
        if writer_pid:
            final = proc_status(writer_pid)
            result["writer_process"] = writer_pid
            result["writer_hwm_mb"] = mb(final.get("VmHWM") or sampler.peak.get("writer_hwm"))
            result["writer_peak_anon_mb"] = mb(sampler.peak.get("writer_anon"))
            result["writer_peak_shmem_mb"] = mb(sampler.peak.get("writer_shmem"))
        result["trainer_peak_rss_mb"] = mb(peak.get("VmHWM"))
        result["trainer_peak_anon_mb"] = mb(sampler.peak.get("self_anon"))
        result["trainer_peak_shmem_mb"] = mb(sampler.peak.get("self_shmem"))

        if saver.has_load:
            expected = ctx.probe.detach().clone()
            loads: Dict[str, float] = {}
            ok = True
            reset_peak_rss()
            for mode in ("cold", "warm"):
                with torch.no_grad():
                    ctx.probe.view(-1)[: min(4096, ctx.probe.numel())].fill_(-12345.0)
                gc.collect()
                if mode == "cold":
                    method, resident = evict(saver.load_files(), args.drop_caches)
                    result["cold_method"], result["cold_resident_fraction"] = method, resident
                ctx.sync()
                t0 = time.perf_counter()
                saver.load()
                ctx.sync()  # copies into the GPU model may still be queued
                loads[mode] = time.perf_counter() - t0
                ok = ok and bool(torch.equal(ctx.probe, expected))
            result.update(load_cold_s=loads["cold"], load_warm_s=loads["warm"], load_ok=ok,
                          load_peak_rss_mb=mb(proc_status().get("VmHWM")), load_label=LOAD_ROWS.get(row))
    finally:
        saver.close()

    warm_blocked = blocked[1:] or blocked
    warm_durable = durable[1:] or durable
    warm_staged = staged[1:] or staged
    result.update(
        blocked_all_s=blocked, durable_all_s=None if row == "memcpy" else durable, staged_all_s=staged,
        blocked_first_s=blocked[0], blocked_warm_s=median(warm_blocked),
        staged_first_s=staged[0], staged_warm_s=median(warm_staged),
        durable_first_s=None if row == "memcpy" else durable[0],
        durable_warm_s=None if row == "memcpy" else median(warm_durable),
        throughput_kept=median(kept), throughput_kept_all=kept, baseline_steps_per_s=median(base_rates),
        inflight_steps_per_s=median(inflight_rates), durable_under_training_s=median(durable_loaded),
    )
    return result


def row_main(args: argparse.Namespace) -> int:
    try:
        result = run_row(args)
    except RowNotApplicable as exc:
        result = {"row": args.row, "state": args.state, "label": LABELS[args.row], "status": "n/a", "reason": str(exc)}
    except BaseException as exc:  # report, never hang the driver
        traceback.print_exc()
        result = {"row": args.row, "state": args.state, "label": LABELS[args.row], "status": "error",
                  "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------------
# the driver: one subprocess per row, then the table and the JSON
# --------------------------------------------------------------------------------------------

def machine_info(target_dir: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info["target_fs"] = filesystem_of(target_dir)
    info["ckptd_commit"] = _git_describe()
    try:  # without importing torch here (seconds): the rows report the version they ran with too
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:
        info["torch"] = "unknown"
    return info


def _git_describe() -> Optional[str]:
    """The repository's commit (read-only git commands), '+changes' when client/service/proto differ from it."""
    repo = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "client", "service", "proto"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+changes" if dirty else "")) or None


def filesystem_of(path: str) -> str:
    path = os.path.realpath(path)
    best, fs = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, fs = parts[1], f"{parts[2]} on {parts[1]}"
    except OSError:
        pass
    return fs


def run_subprocess_row(args: argparse.Namespace, state: str, row: str, workdir: str) -> Dict[str, Any]:
    command = [
        sys.executable, os.path.abspath(__file__), "--row", row, "--state", state, "--scale", repr(args.scale),
        "--repeats", str(args.repeats), "--settle", str(args.settle), "--threads", str(args.threads), "--dir", workdir,
        "--drop-caches", args.drop_caches, "--device", args.device,
    ]
    if args.no_throughput:
        command.append("--no-throughput")
    if args.no_disk_probe:
        command.append("--no-disk-probe")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.row_timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"row": row, "state": state, "label": LABELS[row], "status": "error",
                "reason": f"timed out after {args.row_timeout:g} s", "stderr_tail": _tail(exc.stderr)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result: Optional[Dict[str, Any]] = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if result is None:
        result = {"row": row, "state": state, "label": LABELS[row], "status": "error",
                  "reason": f"row process exited {proc.returncode} without a result"}
    if result.get("status") == "error":
        result["stderr_tail"] = _tail(proc.stderr)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def _tail(text: Any, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def add_ratios(results: Dict[str, Dict[str, Any]]) -> None:
    """Ratios against the limits of the same state: warm blocked / memcpy, durable / (memcpy + write)."""
    memcpy = results.get("memcpy", {}).get("blocked_warm_s")
    write = results.get("write", {}).get("durable_warm_s")
    direct = results.get("write_direct", {}).get("durable_warm_s")
    limit = memcpy + write if memcpy is not None and write is not None else None
    limit_direct = memcpy + direct if memcpy is not None and direct is not None else None
    for r in results.values():
        if r.get("status") != "ok":
            continue
        if memcpy and r.get("blocked_warm_s") is not None:
            r["blocked_warm_x_memcpy"] = r["blocked_warm_s"] / memcpy
        if memcpy and r.get("staged_warm_s") is not None:
            r["staged_warm_x_memcpy"] = r["staged_warm_s"] / memcpy
        if limit and r.get("durable_warm_s") is not None:
            r["durable_warm_x_limit"] = r["durable_warm_s"] / limit
        if limit_direct and r.get("durable_warm_s") is not None:
            r["durable_warm_x_limit_direct"] = r["durable_warm_s"] / limit_direct
        if memcpy and r.get("durable_warm_s") is not None and r.get("disk_probe_s"):
            r["durable_warm_x_probe"] = r["durable_warm_s"] / (memcpy + statistics.mean(r["disk_probe_s"]))


def fmt_s(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_x(v: Optional[float]) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def fmt_mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def table_rows(state: str, results: Dict[str, Dict[str, Any]], state_rows: Sequence[str]) -> List[List[str]]:
    out = []
    for row in state_rows:
        r = results.get(row, {"status": "error", "reason": "not run"})
        label = LABELS[row]
        if _disturbed(r):
            label += " !"
        if r.get("status") == "n/a":
            out.append([state, label, "n/a"] + [""] * 8)
            continue
        if r.get("status") != "ok":
            out.append([state, label, "error: " + str(r.get("reason", ""))[:60]] + [""] * 8)
            continue
        trainer = fmt_mb(r.get("trainer_peak_rss_mb"))
        if r.get("trainer_peak_rss_mb") is not None and r.get("trainer_base_rss_mb") is not None:
            trainer += f" (+{r['trainer_peak_rss_mb'] - r['trainer_base_rss_mb']:.0f})"
        writer = "-"
        if r.get("writer_hwm_mb") is not None:
            writer = f"{fmt_mb(r['writer_hwm_mb'])} / {fmt_mb(r.get('writer_peak_anon_mb'))}"
        kept = r.get("throughput_kept")
        async_row = row not in BLOCKING_ROWS
        loads = row in LOAD_ROWS and r.get("load_cold_s") is not None
        out.append([
            state, label,
            fmt_s(r.get("blocked_first_s")) + (f" (ready {fmt_s(r['saver_ready_s'])})" if r.get("saver_ready_s") else ""),
            fmt_s(r.get("blocked_warm_s")) + fmt_x(r.get("blocked_warm_x_memcpy")),
            (fmt_s(r.get("staged_warm_s")) + fmt_x(r.get("staged_warm_x_memcpy"))) if async_row else "-",
            fmt_s(r.get("durable_warm_s")) + fmt_x(r.get("durable_warm_x_limit")),
            f"{kept * 100:.0f}%" if kept is not None else "-",
            trainer, writer,
            fmt_s(r.get("load_cold_s")) if loads else "-",
            fmt_s(r.get("load_warm_s")) if loads else "-",
        ])
    return out


HEADER = ["state", "row", "blocked first (s, buffers ready)", "blocked warm (s, x memcpy)", "staged warm (s, x memcpy)",
          "durable (s, x memcpy+write)", "throughput kept", "trainer peak RSS MB (+over base)",
          "writer MB: HWM / anon", "load cold (s)", "load warm (s)"]


def render_table(rows: List[List[str]]) -> str:
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), sep] + [line(r) for r in rows])


def evaluate_targets(all_results: Dict[str, Dict[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The issue's targets, read off this run for ckptd (and ckptd overlap where it ran)."""
    checks: List[Dict[str, Any]] = []
    a, b = all_results.get("A", {}), all_results.get("B", {})

    def add(name: str, value: Optional[float], limit: Optional[float], text: str, passed: Optional[bool] = None) -> None:
        if passed is None and value is not None and limit is not None:
            passed = value <= limit
        checks.append({"target": name, "value": value, "limit": limit, "pass": passed, "text": text})

    for row in ("ckptd", "ckptd_overlap"):
        r = a.get(row, {})
        if r.get("status") != "ok":
            continue
        tag = LABELS[row]
        v = r.get("blocked_warm_x_memcpy")
        add(f"{tag}: warm blocked <= 1.25x memcpy", v, 1.25, f"{v:.2f}x" if v is not None else "-")
        dcp_default = a.get("dcp_async_default", {})
        if dcp_default.get("status") == "ok":
            add(f"{tag}: first save blocked < dcp.async_save default", r["blocked_first_s"], None,
                f"{r['blocked_first_s']:.3f} s vs {dcp_default['blocked_first_s']:.3f} s"
                + (f" (staging memory ready {r['saver_ready_s']:.2f} s after construction)" if r.get("saver_ready_s") else ""),
                r["blocked_first_s"] < dcp_default["blocked_first_s"])
        v = r.get("durable_warm_x_limit")
        vd = r.get("durable_warm_x_limit_direct")
        vp = r.get("durable_warm_x_probe")
        extra = [f"{vd:.2f}x memcpy + O_DIRECT write"] if vd is not None else []
        if vp is not None:
            extra.append(f"{vp:.2f}x memcpy + this row's own disk probes")
        add(f"{tag}: durable <= 1.2x (memcpy + write)", v, 1.2, (f"{v:.2f}x" if v is not None else "-")
            + (f" ({'; '.join(extra)})" if extra else ""))
        v = r.get("throughput_kept")
        cpu = [f"{who} CPU {r[key]:.2f} s per warm save" for who, key in
               (("daemon", "writer_cpu_s_per_save"), ("trainer", "trainer_cpu_s_per_save")) if r.get(key) is not None]
        add(f"{tag}: throughput kept >= 90%", v, None, (f"{v * 100:.0f}%" if v is not None else "-")
            + (f" ({', '.join(cpu)})" if cpu else ""), None if v is None else v >= 0.9)
        peak, base, nbytes = r.get("trainer_peak_rss_mb"), r.get("trainer_base_rss_mb"), r.get("state_bytes")
        if peak is not None and base is not None and nbytes:
            extra = (peak - base) * 2**20
            add(f"{tag}: trainer memory <= live state + 1.05x staged bytes", extra / nbytes, 1.05,
                f"peak {peak:.0f} MB = base {base:.0f} MB (live state {nbytes / 2**20:.0f} MB) + {extra / 2**20:.0f} MB "
                f"= {extra / nbytes:.2f}x the staged bytes")
        rb = b.get(row, {})
        if r.get("writer_peak_anon_mb") is not None and rb.get("writer_peak_anon_mb") is not None:
            grow = r["writer_peak_anon_mb"] - rb["writer_peak_anon_mb"]
            span = (r["state_bytes"] - rb["state_bytes"]) / 2**20
            add(f"{tag}: daemon RSS not growing with checkpoint size", grow / span if span > 0 else None, 0.05,
                f"daemon anon peak {r['writer_peak_anon_mb']:.0f} MB (state A, {r['state_bytes'] / 2**20:.0f} MB) vs "
                f"{rb['writer_peak_anon_mb']:.0f} MB (state B, {rb['state_bytes'] / 2**20:.0f} MB): "
                f"{grow:+.0f} MB over {span:.0f} MB more state")
        dcp_b = b.get("dcp_async_best", {})
        if rb.get("status") == "ok" and dcp_b.get("status") == "ok":
            add(f"{tag}: state B warm blocked <= dcp.async_save best", rb["blocked_warm_s"], dcp_b["blocked_warm_s"],
                f"{rb['blocked_warm_s']:.3f} s vs {dcp_b['blocked_warm_s']:.3f} s "
                f"(dcp best staged after {fmt_s(dcp_b.get('staged_warm_s'))} s)")
        tl = a.get("torch_save", {})
        if row == "ckptd" and r.get("load_cold_s") is not None and tl.get("load_cold_s") is not None:
            add("ckptd: load <= torch.load (cold)", r["load_cold_s"], tl["load_cold_s"],
                f"{r['load_cold_s']:.2f} s vs {tl['load_cold_s']:.2f} s")
            add("ckptd: load <= torch.load (warm)", r["load_warm_s"], tl["load_warm_s"],
                f"{r['load_warm_s']:.2f} s vs {tl['load_warm_s']:.2f} s")
    return checks


def _outside_load(r: Dict[str, Any]) -> float:
    return (r.get("other_load") or 0.0) + (r.get("steal") or 0.0)


def _disturbed(r: Optional[Dict[str, Any]]) -> bool:
    return bool(r) and ((r.get("other_load") or 0) > DISTURBED or (r.get("steal") or 0) > DISTURBED)  # type: ignore[union-attr]


def driver_main(args: argparse.Namespace) -> int:
    device = device_info(args.device)  # first: --device cuda without CUDA exits here, before any row runs
    rows_a = _parse_rows(args.rows)
    rows_b = _parse_rows(args.rows_b)
    states = [s.strip().upper() for s in args.states.split(",") if s.strip()]
    base_dir = args.dir or tempfile.gettempdir()
    os.makedirs(base_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ckptd-bench-", dir=base_dir)
    command = shlex.join([sys.executable, *sys.argv])
    machine = machine_info(work)
    machine.update(device)
    print(f"ckptd bench: {machine.get('cores')} cores, torch {machine.get('torch')}, device {device_label(machine)}, "
          f"target {machine['target_fs']} ({work})", file=sys.stderr, flush=True)
    all_results: Dict[str, Dict[str, Dict[str, Any]]] = {s: {} for s in states}
    jobs = [(state, row) for state in states for row in (rows_a if state == "A" else rows_b)]
    started = time.perf_counter()

    def run_one(job: Tuple[str, str]) -> Dict[str, Any]:
        state, row = job
        best: Optional[Dict[str, Any]] = None
        retries = args.retries if args.jobs == 1 else 0  # with --jobs the rows disturb each other anyway
        for attempt in range(1 + retries):
            if args.jobs == 1:
                print(f"  state {state}: {LABELS[row]}{' (again)' if attempt else ''} ...", end="", file=sys.stderr, flush=True)
            result = run_subprocess_row(args, state, row, os.path.join(work, f"{state}-{row}-{attempt}"))
            status = result.get("status")
            note = f"{result.get('wall_s', 0):.0f} s" if status == "ok" else f"{status}: {result.get('reason')}"
            if _disturbed(result):
                note += f", disturbed (other processes {result['other_load'] * 100:.0f}%, steal {result['steal'] * 100:.0f}%)"
            print(f" {note}" if args.jobs == 1 else f"  state {state}: {LABELS[row]}: {note}", file=sys.stderr, flush=True)
            if status == "error" and result.get("stderr_tail"):
                print(result["stderr_tail"], file=sys.stderr, flush=True)
            # Keep the attempt during which the machine was quietest (a signal outside the row's own figures).
            if best is None or _outside_load(result) < _outside_load(best):
                best = result
            best["attempts"] = attempt + 1
            if not _disturbed(result):
                break
        assert best is not None
        return best

    try:
        if args.jobs == 1:
            outcomes = [run_one(job) for job in jobs]
        else:
            from concurrent.futures import ThreadPoolExecutor

            longest_first = sorted(jobs, key=lambda job: job[1] != "dcp_async_best")  # it spawns a process
            with ThreadPoolExecutor(args.jobs) as pool:
                done = dict(zip(longest_first, pool.map(run_one, longest_first)))
            outcomes = [done[job] for job in jobs]
        for (state, row), result in zip(jobs, outcomes):
            all_results[state][row] = result
        for state in states:
            add_ratios(all_results[state])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - started

    table = []
    for state in states:
        table += table_rows(state, all_results[state], rows_a if state == "A" else rows_b)
    targets = evaluate_targets(all_results)
    notes = footnotes(args, all_results, machine)
    print()
    print(f"ckptd save benchmark, {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"machine: {machine.get('cores')} cores ({machine.get('cpu', 'unknown CPU')}), {machine.get('mem_total_gb')} GB RAM, "
          f"torch {machine.get('torch')}, Python {machine.get('python')}, target {machine['target_fs']}, "
          f"ckptd at {machine.get('ckptd_commit') or 'unknown commit'}")
    print(f"device: {device_label(machine)}" + (": the state and the throughput MLP live on the GPU"
                                                 if machine["device"] == "cuda" else ""))
    print(f"command: {command}")
    for state in states:
        print(state_line(state, all_results[state]))
    print()
    print(render_table(table))
    print()
    for note in notes:
        print(note)
    if targets:
        print()
        flagged = [LABELS[r] for r in ("memcpy", "write", "ckptd", "ckptd_overlap", "dcp_async_best", "torch_save")
                   for st in states if _disturbed(all_results[st].get(r))]
        print("targets (issue 3), this run" + (f" (disturbed rows involved: {', '.join(flagged)}; see !):" if flagged else ":"))
        for t in targets:
            mark = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            print(f"  [{mark}] {t['target']}: {t['text']}")
    print(f"\n(total {total_s:.0f} s)")

    payload = {
        "command": command, "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "config": {"device": args.device, "scale": args.scale, "repeats": args.repeats, "threads": args.threads, "states": states,
                   "rows_a": rows_a, "rows_b": rows_b, "drop_caches": args.drop_caches,
                   "throughput": not args.no_throughput, "disk_probe": not args.no_disk_probe, "jobs": args.jobs, "retries": args.retries},
        "results": all_results, "targets": targets, "notes": notes, "table": render_table(table),
        "total_s": round(total_s, 1),
    }
    json_path = os.path.abspath(args.json)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"JSON: {json_path}")
    return 0


def device_label(machine: Dict[str, Any]) -> str:
    if machine.get("device") != "cuda":
        return "cpu"
    return f"cuda ({machine.get('gpu')}, CUDA {machine.get('cuda')})"


def state_line(state: str, results: Dict[str, Dict[str, Any]]) -> str:
    any_ok = next((r for r in results.values() if r.get("status") == "ok"), None)
    if any_ok is None:
        return f"state {state}: no row ran"
    nbytes, dims = any_ok["state_bytes"], any_ok.get("dims", {})
    if state == "A":
        what = (f"LM {any_ok['params'] / 1e6:.1f}M params fp32 (vocab {dims.get('vocab')}, d_model {dims.get('d_model')}, "
                f"{dims.get('layers')} layers) + AdamW state after one step + LinearLR")
    else:
        what = f"{dims.get('tensors')} tensors of {dims.get('elements_each')} fp32 elements in one state dict"
    return f"state {state}: {what}: {nbytes / 1e9:.3f} GB in {any_ok['state_tensors']} tensors"


def footnotes(args: argparse.Namespace, all_results: Dict[str, Dict[str, Dict[str, Any]]], machine: Dict[str, Any]) -> List[str]:
    notes = []
    if args.jobs > 1:
        notes.append(f"WARNING: --jobs {args.jobs}: rows ran concurrently, so these timings, memory and throughput "
                     "figures disturb each other; use them to check the bench runs, not to compare.")
    if args.device == "cuda":
        notes.append(
            f"Device cuda ({machine.get('gpu')}): the state (model and AdamW state; state B's tensors) and the "
            "throughput MLP live on the GPU. memcpy limit: device-to-host copy into preallocated pinned host buffers "
            "(non_blocking, then torch.cuda.synchronize()), so x memcpy reads against the D2H limit. write limits: "
            "the same bytes from a host buffer filled once at setup (the disk alone). torch.save, DCP and ckptd save "
            "the GPU tensors as they are (their own device-to-host copies) and load back into the GPU model; the "
            "device is synchronized before every timed save and load and at the end of every timed load. "
            "throughput: GPU training steps, each waiting for its own stream (as loss.item() would), not for the "
            "copies a saver runs on a side stream."
        )
    notes += [
        f"Each row runs in a fresh process: 1 first save + {args.repeats} warm saves (medians of the warm ones), then, "
        f"for rows that write in the background, {args.repeats} more saves with the MLP training loop running.",
        f"Threads: OMP_NUM_THREADS={args.threads} and torch.set_num_threads({args.threads}) in every row process "
        f"(default: all {machine.get('cores')} cores, as a trainer would use them); background writers get no cores of their own.",
        f"blocked first: the first save, after {args.settle:g} s of the training loop (--settle) since the saver was built; "
        "buffers ready: seconds from building the saver until the staging memory it allocates in the background "
        "(ckptd: allocated and prefaulted at construction) was ready. "
        "blocked: until the save call returns. staged: until the live tensors may change again (dcp best: its "
        "staging future; ckptd overlap: handle.wait_staged()). durable: until the checkpoint is on disk (fsync/commit).",
        "x memcpy: warm time / memcpy limit's warm time; x memcpy+write: durable / (memcpy limit + write+fsync limit), same "
    "state (the buffered write; the O_DIRECT row, the way ckptd's daemon writes, is shown for reference).",
        "throughput kept: MLP steps/s while the save is in flight (after it returns, until durable) / steps/s in windows just "
        "before and after, median; for the two write limits, while the same write runs in a background thread (what the "
        "I/O alone costs).",
        "trainer peak RSS: VmHWM of the row process over the saves (reset after building the state); +over base: above "
        "its RSS with the state built. writer: the background process (ckptd daemon, DCP's checkpoint process): "
        "VmHWM / peak RssAnon (its mapping of the trainer's staging memory counts as RssShmem, not anon).",
    ]
    for state, results in all_results.items():
        probes = [p for r in results.values() for p in (r.get("disk_probe_s") or [])]
        if probes:
            notes.append(
                f"disk drift, state {state}: each writing row wrote the state once with write+fsync before and after its saves "
                f"(disk probe): {min(probes):.2f} to {max(probes):.2f} s over the run (median {statistics.median(probes):.2f} s). "
                "durable_warm_x_probe in the JSON reads each row against its own probes."
            )
    methods = sorted({r.get("cold_method") for s in all_results.values() for r in s.values() if r.get("cold_method")})
    resident = [r.get("cold_resident_fraction") for s in all_results.values() for r in s.values()
                if r.get("cold_resident_fraction") is not None]
    if methods:
        notes.append(
            f"load cold: page cache dropped for the checkpoint's files with {', '.join(methods)}; pages still resident "
            f"after (mincore): at most {max(resident) * 100:.1f}%." if resident else
            f"load cold: page cache dropped for the checkpoint's files with {', '.join(methods)}."
        )
        labels = ", ".join(f"{LABELS[k]} -> {v}" for k, v in LOAD_ROWS.items())
        notes.append(f"load: {labels}, each into the existing model/optimizer/scheduler; ckptd verifies checksums "
                     "(its default). warm: the same load again at once.")
    disturbed = [
        f"{state} {r['label']} (other processes {r.get('other_load', 0) * 100:.0f}%, steal {r.get('steal', 0) * 100:.0f}%)"
        for state, results in all_results.items() for r in results.values()
        if _disturbed(r)
    ]
    rerun = [f"{state} {r['label']} ({r['attempts']} attempts)" for state, results in all_results.items()
             for r in results.values() if (r.get("attempts") or 1) > 1]
    if rerun:
        notes.append(f"Rerun because other load disturbed them (the quietest attempt is shown): {'; '.join(rerun)}.")
    if disturbed:
        notes.append(f"! disturbed: other processes (or the hypervisor, as steal) took more than {DISTURBED * 100:.0f}% of "
                     f"the machine's CPU during these rows' saves, so their times and throughput are not comparable; "
                     f"rerun when the machine is quiet: {'; '.join(disturbed)}.")
    else:
        loads = [r.get("other_load") for rs in all_results.values() for r in rs.values() if r.get("other_load") is not None]
        if loads:
            notes.append(f"Other processes took at most {max(loads) * 100:.0f}% of the machine's CPU during any row's saves "
                         f"(rows above {DISTURBED * 100:.0f}% would be marked !).")
    bad_loads = [f"{s}/{r['row']}" for s, rs in all_results.items() for r in rs.values() if r.get("load_ok") is False]
    if bad_loads:
        notes.append(f"WARNING: a load did not restore the saved values: {', '.join(bad_loads)}")
    for state, results in all_results.items():
        for r in results.values():
            if r.get("status") in ("n/a", "error"):
                notes.append(f"{state} {r['label']}: {r['status']}: {r.get('reason')}")
    return notes


def _parse_rows(text: str) -> List[str]:
    if text.strip() == "all":
        return list(ROW_IDS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_IDS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROW_IDS} or 'all'")
    return [r for r in ROW_IDS if r in rows]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the state (model, optimizer state, state B's tensors) and the throughput MLP live "
                             "(default cpu). cuda: memcpy limit = device-to-host copy into pinned buffers; the other "
                             "rows save the GPU state as they are")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the state's size (1: ~1.27 GB LM + AdamW; 0.05 for a quick run)")
    parser.add_argument("--repeats", type=int, default=3, help="warm saves per row (medians reported; default 3)")
    parser.add_argument("--dir", default=None,
                        help="target directory; the bench works in a fresh temporary directory under it "
                             "(default: under /tmp) and removes it afterwards")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON results (default bench/results/latest.json)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch/OpenMP threads in each row process (default: all cores)")
    parser.add_argument("--states", default="A,B", help="states to run: A, B or A,B (default)")
    parser.add_argument("--rows", default="all", help=f"rows for state A, comma-separated from {ROW_IDS} (default all)")
    parser.add_argument("--rows-b", default=",".join(DEFAULT_ROWS_B),
                        help=f"rows for state B (default {','.join(DEFAULT_ROWS_B)}; 'all' for every row)")
    parser.add_argument("--drop-caches", choices=("auto", "always", "never"), default="auto",
                        help="cold loads: posix_fadvise(DONTNEED) always; /proc/sys/vm/drop_caches too when "
                             "'always', or when fadvise left pages resident ('auto', default)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of the training loop between building a saver and its first save (default 5)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the training-throughput saves")
    parser.add_argument("--no-disk-probe", action="store_true",
                        help="skip the write+fsync of the state before and after each row's saves (disk drift)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows run at once (default 1). More only for smoke tests: concurrent rows disturb "
                             "each other's timings, memory and throughput")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a row again, up to this many times, when other processes took more than 10%% of the "
                             "machine during it; the quietest attempt is kept (default 2)")
    parser.add_argument("--row-timeout", type=float, default=1800, help="seconds one row may take (default 1800)")
    parser.add_argument("--row", choices=ROW_IDS, help=argparse.SUPPRESS)
    parser.add_argument("--state", choices=("A", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def cuda_unavailable_reason(torch: Any) -> str:
    """One line: why --device cuda cannot run here."""
    if not torch.version.cuda:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    else:
        why = f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no usable GPU"
    return f"--device cuda: CUDA is not available: {why}; run on a CUDA machine, or use --device cpu"


def device_info(device: str) -> Dict[str, Any]:
    """The device the rows will put the state on, for the header and the JSON; exits at once with
    a one-line message when --device cuda cannot run here."""
    if device == "cpu":
        return {"device": "cpu"}
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{os.path.basename(__file__)}: error: {cuda_unavailable_reason(torch)}")
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.row:
        if not args.state or not args.dir:
            raise SystemExit("--row needs --state and --dir")
        return row_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
