"""The peer systems measured side by side with ckptd: torch.save (+ fsync), and
torch.distributed.checkpoint's save, async_save with its defaults, and async_save in the best
configuration this torch offers (a kept DefaultStager writing in DCP's checkpoint process).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

from bench_saver import Pending, RowNotApplicable, Saver, finished
from bench_state import RowContext
from bench_system import free_port


class TorchSaveSaver(Saver):
    """torch.save of the nested state dict into one file, flush, fsync; torch.load to load."""

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
    """dcp.save of the statefuls (one process, no process group); dcp.load to load."""

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


def dcp_pending(result: Any) -> Pending:
    """The Pending of a dcp.async_save: a Future (older torch; sync staging) or an
    AsyncSaveResponse (async staging)."""
    staging = getattr(result, "staging_completion", None)
    upload = getattr(result, "upload_completion", result)
    staged: Dict[str, float] = {}
    if staging is not None:
        staging.add_done_callback(lambda _f: staged.setdefault("t", time.perf_counter()))
    return Pending(upload.done, upload.result, lambda: staged.get("t"))


class DcpAsyncDefaultSaver(DcpSaver):
    """dcp.async_save with its defaults (synchronous staging, writing in a thread of the trainer)."""

    blocking = False
    has_load = False

    def save(self, i: int) -> Pending:
        result = self.dcp.async_save(dict(self.ctx.statefuls), checkpoint_id=self._path(i))
        return dcp_pending(result)


def _staging_options(accel: bool) -> Any:
    """DCP's StagingOptions for the best row: shared memory and async staging; pinned memory and
    non-blocking copies only for device tensors (`accel`)."""
    from torch.distributed.checkpoint.staging import StagingOptions

    try:
        return StagingOptions(
            use_pinned_memory=accel, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=accel
        )
    except TypeError as exc:  # an older StagingOptions
        raise RowNotApplicable(f"StagingOptions in this torch takes other options: {exc}") from None


def _share_storages_with(tensor_count: int) -> None:
    """Make sharing `tensor_count` storages with the checkpoint process possible.

    torch's default strategy passes one file descriptor per storage (two while pickling), which runs
    out of descriptors for state B's 10,000 tensors: raise the descriptor limit, and switch to named
    shared-memory files when that is not enough."""
    import resource

    import torch.multiprocessing as tmp

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * tensor_count + 1024
    if soft < need and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        soft = min(hard, need)
    if soft < need and "file_system" in tmp.get_all_sharing_strategies():
        tmp.set_sharing_strategy("file_system")


def _init_single_rank_group(dist: Any) -> None:
    """A 1-rank gloo process group: DCP's PROCESS executor needs one (it broadcasts its TCPStore address)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


class DcpAsyncBestSaver(DcpSaver):
    """A kept DefaultStager (shared memory, async staging; pinned memory and non-blocking copies
    only when the state is on the GPU), reused across saves, writing in DCP's background process."""

    blocking = False
    has_load = False

    def __init__(self, ctx: RowContext, workdir: str) -> None:
        super().__init__(ctx, workdir)
        import torch.distributed as dist
        import torch.multiprocessing as tmp
        from torch.distributed.checkpoint.staging import DefaultStager
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.options = _staging_options(ctx.cuda)  # pinned staging, non-blocking copies pay off only on a device
        _share_storages_with(len(ctx.tensors))
        self.stager = DefaultStager(self.options)
        self.config = {
            "staging_options": repr(self.options),
            "async_checkpointer_type": "PROCESS",
            "stager": "DefaultStager, kept across saves",
            "sharing_strategy": tmp.get_sharing_strategy(),
        }
        self.kind = AsyncCheckpointerType.PROCESS
        _init_single_rank_group(dist)
        self.dist = dist

    def save(self, i: int) -> Pending:
        result = self.dcp.async_save(
            dict(self.ctx.statefuls),
            checkpoint_id=self._path(i),
            async_checkpointer_type=self.kind,
            async_stager=self.stager,
        )
        return dcp_pending(result)

    def _process(self) -> Any:
        try:
            from torch.distributed.checkpoint import _async_process_executor as executor
        except ImportError:
            return None
        return getattr(executor, "_CHECKPOINT_PROCESS", None)

    def writer_pid(self) -> Optional[int]:
        process = self._process()
        return getattr(getattr(process, "_save_process", None), "pid", None)

    def _stop_process(self) -> None:
        process = self._process()
        if process is not None:
            try:
                from torch.distributed.checkpoint._async_process_executor import _CheckpointSaveProcessControlOpts

                process._send(_CheckpointSaveProcessControlOpts.TERMINATE)
                process._save_process.join(timeout=10)
            except Exception:
                pass

    def close(self) -> None:
        self.stager.close()
        self._stop_process()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
