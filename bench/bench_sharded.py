"""Sharded state (issue 14): ckptd's SHARDED pattern against torch.distributed.checkpoint, in one run.

An FSDP2 model with AdamW (state after one step) of --gb GB in total, on 2 ranks (gloo, CPU):

- save (2 ranks): the memcpy of every local shard (the floor), ckptd `save_checkpoint` (SHARDED model
  and optimizer components, through an auto-started daemon), `dcp.save` and `dcp.async_save`: how
  long each call blocks the trainer (median of the warm saves) and until the checkpoint is durable.
- load at another world size (4 ranks, FSDP2 over 4): `manager.load_checkpoint()` against `dcp.load`
  of the same state, page cache dropped first (cold) and not (warm); and each rank's peak memory
  above what it held before the load, against its shard plus the largest saved chunk.
- HSDP (2 ranks, a 2 x 1 mesh: every rank holds the whole state): bytes on disk of ckptd and of
  dcp.save against one copy of the state.

    .venv/bin/python bench/bench_sharded.py                 # 1 GB of state (about 4 min on 2 cores)
    .venv/bin/python bench/bench_sharded.py --gb 0.02 --repeats 1   # smoke

Prints one table and the targets, and writes JSON (default bench/results/sharded.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
SAVE_WORLD, LOAD_WORLD = 2, 4
LAYERS = 8


def _torchrun(nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*command, str(Path(__file__)), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


# --- the ranks -----------------------------------------------------------------------------------


def _width(gb: float) -> int:
    """The width d of LAYERS d x d linear layers whose weights, bias and two AdamW moments make `gb`."""
    return max(8, int(math.sqrt(gb * 1e9 / (3 * 4 * LAYERS))))


def _build(gb: float, layout: str) -> Any:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = _width(gb)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(LAYERS)))
    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


class _OptimState:
    def __init__(self, model: Any, optim: Any) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> Any:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optim)

    def load_state_dict(self, state: Any) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optim, state)


class _Provider:
    def __init__(self, model: Any, optim: Any) -> None:
        self.model, self.optim = model, optim

    def get_state_components(self) -> List[Any]:
        from ckptd.client import SharingPattern, StateComponent

        return [
            StateComponent("model", self.model, SharingPattern.SHARDED),
            StateComponent("optim", _OptimState(self.model, self.optim), SharingPattern.SHARDED),
        ]


def _local_tensors(model: Any, optim: Any) -> List[Any]:
    """Every local shard the rank holds (parameters and optimizer moments)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    values = list(model_sd.values()) + [v for s in optim_sd["state"].values() for v in s.values()]
    return [v.to_local() if hasattr(v, "to_local") else v for v in values]


def _dcp_state(model: Any, optim: Any) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd}


def _rank_save(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ckptd.client import CheckpointManager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optim = _build(args.gb, "fsdp")
    shards = _local_tensors(model, optim)
    result: Dict[str, Any] = {"shard_bytes": sum(t.numel() * t.element_size() for t in shards)}
    targets = [torch.empty_like(t) for t in shards]
    for target in targets:
        target.fill_(0)
    memcpy = []
    for _ in range(args.repeats + 1):
        dist.barrier()  # every rank copies at once, as in a save (alone, a rank's copy measured up to 1.5x faster)
        started = time.perf_counter()
        for source, target in zip(shards, targets):
            target.copy_(source)
        memcpy.append(time.perf_counter() - started)
    del targets
    result["memcpy"] = memcpy[1:]

    manager = CheckpointManager(_Provider(model, optim), args.root, endpoint=args.endpoint, auto_start=False)
    blocked, durable = [], []
    for step in range(args.repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        handle = manager.save_checkpoint(step + 1)
        blocked.append(time.perf_counter() - started)
        handle.wait(600)
        durable.append(time.perf_counter() - started)
    manager.close()
    result["ckptd_first"] = blocked[0]
    result["ckptd_blocked"], result["ckptd_durable"] = blocked[1:], durable[1:]

    for name in ("dcp_save", "dcp_async"):
        blocked, durable = [], []
        for repeat in range(args.repeats + 1):
            state = _dcp_state(model, optim)
            directory = os.path.join(args.dcp_dir, f"{name}-{repeat}")
            dist.barrier()
            started = time.perf_counter()
            if name == "dcp_save":
                dcp.save(state, checkpoint_id=directory)
                blocked.append(time.perf_counter() - started)
            else:
                future = dcp.async_save(state, checkpoint_id=directory)
                blocked.append(time.perf_counter() - started)
                future.result()
            durable.append(time.perf_counter() - started)
        result[f"{name}_first"] = blocked[0]
        result[f"{name}_blocked"], result[f"{name}_durable"] = blocked[1:], durable[1:]
    Path(args.out, f"save-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cold(paths: List[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(directory: str) -> List[str]:
    return [str(p) for p in Path(directory).rglob("*") if p.is_file()]


def _rank_load(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from ckptd.client import CheckpointManager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optim = _build(args.gb, "fsdp")  # initializes the optimizer's state, as a resuming trainer does
    shards = _local_tensors(model, optim)
    result: Dict[str, Any] = {"shard_bytes": sum(t.numel() * t.element_size() for t in shards)}
    ckptd_dir = str(Path(args.root, "latest").read_text().strip())
    ckptd_path = os.path.join(args.root, ckptd_dir)
    dcp_path = os.path.join(args.dcp_dir, "dcp_save-0")
    manager = CheckpointManager(_Provider(model, optim), args.root, connect=False)
    for mode in ("cold", "warm"):
        for name in ("ckptd", "dcp"):
            if mode == "cold" and rank == 0:
                _cold(_files(ckptd_path if name == "ckptd" else dcp_path))
            dist.barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kb("VmRSS")
            started = time.perf_counter()
            if name == "ckptd":
                manager.load_checkpoint(ckptd_path)
            else:
                state = _dcp_state(model, optim)
                dcp.load(state, checkpoint_id=dcp_path)
                set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
            seconds = time.perf_counter() - started
            dist.barrier()
            result[f"{name}_{mode}"] = seconds
            result[f"{name}_{mode}_peak_extra_kb"] = _status_kb("VmHWM") - before
    Path(args.out, f"load-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _rank_hsdp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ckptd.client import CheckpointManager

    dist.init_process_group("gloo")
    model, optim = _build(args.gb, "hsdp")
    with CheckpointManager(_Provider(model, optim), args.root, endpoint=args.endpoint, auto_start=False) as manager:
        manager.save_checkpoint(1).wait(600)
    dcp.save(_dcp_state(model, optim), checkpoint_id=os.path.join(args.dcp_dir, "hsdp"))
    if dist.get_rank() == 0:
        one_copy = sum(t.numel() * t.element_size() for t in _local_tensors(model, optim))
        Path(args.out, "hsdp.json").write_text(json.dumps({"one_copy": one_copy}))
    dist.barrier()
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------------------


def _tensor_bytes_on_disk(directory: str) -> int:
    """Bytes of every file of a checkpoint, manifest and metadata included."""
    return sum(os.path.getsize(p) for p in _files(directory))


def _largest_chunk(checkpoint: str) -> int:
    from ckptd.client.loading import read_manifest
    from ckptd.proto.formats import SAFETENSORS_DTYPES

    manifest = read_manifest(checkpoint)
    return max(
        math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]]
        for record in manifest.components.values()
        for scope in record.scopes.values()
        for entry in scope.tensor_file.tensors.values()
    )


def _start_daemon(root: str, log: str) -> subprocess.Popen:
    endpoint_dir = tempfile.mkdtemp(prefix="ckptd-bench-")
    endpoint = f"ipc://{endpoint_dir}/d.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "ckptd.service", "serve", "--root", root, "--endpoint", endpoint],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    process.endpoint = endpoint  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while not os.path.exists(endpoint[len("ipc://") :]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return process


def _med(values: List[float]) -> float:
    return statistics.median(values)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    base = tempfile.mkdtemp(prefix="ckptd-bench-sharded-", dir=args.dir)
    try:
        out = os.path.join(base, "out")
        os.makedirs(out)
        results: Dict[str, Any] = {"gb": args.gb, "repeats": args.repeats, "width": _width(args.gb)}
        for phase in ("save", "hsdp"):
            root, dcp_dir = os.path.join(base, f"{phase}-ckptd"), os.path.join(base, f"{phase}-dcp")
            daemon = _start_daemon(root, os.path.join(base, f"{phase}-daemon.log"))
            try:
                common = ["--gb", str(args.gb), "--repeats", str(args.repeats), "--root", root, "--dcp-dir", dcp_dir]
                common += ["--out", out, "--endpoint", daemon.endpoint]  # type: ignore[attr-defined]
                _torchrun(SAVE_WORLD, "--rank-job", phase, *common)
            finally:
                daemon.terminate()
                daemon.wait(60)
            if phase == "save":
                results["save"] = [json.loads(Path(out, f"save-rank{r}.json").read_text()) for r in range(SAVE_WORLD)]
                _torchrun(LOAD_WORLD, "--rank-job", "load", *common[:-2])
                results["load"] = [json.loads(Path(out, f"load-rank{r}.json").read_text()) for r in range(LOAD_WORLD)]
                latest = os.path.join(root, Path(root, "latest").read_text().strip())
                results["largest_chunk"] = _largest_chunk(latest)
            else:
                latest = os.path.join(root, Path(root, "latest").read_text().strip())
                results["hsdp"] = {
                    "one_copy": json.loads(Path(out, "hsdp.json").read_text())["one_copy"],
                    "ckptd_bytes": _tensor_bytes_on_disk(latest),
                    "dcp_bytes": _tensor_bytes_on_disk(os.path.join(dcp_dir, "hsdp")),
                }
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _report(results: Dict[str, Any]) -> str:
    save, load = results["save"], results["load"]
    memcpy = max(_med(r["memcpy"]) for r in save)  # the slowest rank bounds the step
    lines = [
        f"sharded state: {results['gb']:.2f} GB (FSDP2, {LAYERS} x Linear({results['width']}), AdamW), "
        f"saved on {SAVE_WORLD} ranks, loaded on {LOAD_WORLD}; medians of {results['repeats']} warm saves, "
        "slowest rank",
        "",
        "| row | blocked first s | blocked warm s (x memcpy) | durable s |",
        "|---|---|---|---|",
        f"| memcpy of the local shards | - | {memcpy:.4f} (1.00x) | - |",
    ]
    for key, label in (("ckptd", "ckptd SHARDED"), ("dcp_save", "dcp.save"), ("dcp_async", "dcp.async_save")):
        first = max(r[f"{key}_first"] for r in save)
        blocked = max(_med(r[f"{key}_blocked"]) for r in save)
        durable = max(_med(r[f"{key}_durable"]) for r in save)
        lines.append(f"| {label} | {first:.4f} | {blocked:.4f} ({blocked / memcpy:.2f}x) | {durable:.4f} |")
    shard = max(r["shard_bytes"] for r in load)
    chunk = results["largest_chunk"]
    lines += [
        "",
        f"| load {SAVE_WORLD} -> {LOAD_WORLD} ranks | cold s | warm s | peak above pre-load, MB per rank (x shard + chunk) |",
        "|---|---|---|---|",
    ]
    for key, label in (("ckptd", "ckptd load_checkpoint"), ("dcp", "dcp.load + set_state_dict")):
        cold = max(r[f"{key}_cold"] for r in load)
        warm = max(r[f"{key}_warm"] for r in load)
        peak = max(max(r[f"{key}_cold_peak_extra_kb"], r[f"{key}_warm_peak_extra_kb"]) for r in load) * 1024
        lines.append(f"| {label} | {cold:.3f} | {warm:.3f} | {peak / 2**20:.1f} ({peak / (shard + chunk):.2f}x) |")
    hsdp = results["hsdp"]
    lines += [
        "",
        "| HSDP 2 x 1, bytes on disk | MB | x one copy |",
        "|---|---|---|",
        f"| one copy of the state | {hsdp['one_copy'] / 2**20:.1f} | 1.00x |",
        f"| ckptd | {hsdp['ckptd_bytes'] / 2**20:.1f} | {hsdp['ckptd_bytes'] / hsdp['one_copy']:.2f}x |",
        f"| dcp.save | {hsdp['dcp_bytes'] / 2**20:.1f} | {hsdp['dcp_bytes'] / hsdp['one_copy']:.2f}x |",
    ]
    ckptd_blocked = max(_med(r["ckptd_blocked"]) for r in save)
    ckptd_load = max(r["ckptd_cold"] for r in load), max(r["ckptd_warm"] for r in load)
    dcp_load = max(r["dcp_cold"] for r in load), max(r["dcp_warm"] for r in load)
    ckptd_peak = max(max(r["ckptd_cold_peak_extra_kb"], r["ckptd_warm_peak_extra_kb"]) for r in load) * 1024
    targets = [
        (
            "blocked warm <= 1.25x memcpy of the local shards",
            ckptd_blocked <= 1.25 * memcpy,
            f"{ckptd_blocked / memcpy:.2f}x",
        ),
        (
            f"load at {LOAD_WORLD} ranks no slower than dcp.load (cold, warm)",
            ckptd_load[0] <= dcp_load[0] and ckptd_load[1] <= dcp_load[1],
            f"{ckptd_load[0] / dcp_load[0]:.2f}x, {ckptd_load[1] / dcp_load[1]:.2f}x",
        ),
        (
            "peak memory per rank during the reshard <= shard + one chunk",
            ckptd_peak <= shard + chunk,
            f"{ckptd_peak / (shard + chunk):.2f}x",
        ),
        (
            "HSDP bytes on disk = one copy (within 1%: headers, manifest)",
            hsdp["ckptd_bytes"] <= 1.01 * hsdp["one_copy"],
            f"{hsdp['ckptd_bytes'] / hsdp['one_copy']:.3f}x",
        ),
    ]
    lines += ["", "targets:"] + [f"  [{'met' if ok else 'MISSED'}] {name}: {value}" for name, ok, value in targets]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="state size in GB (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="warm saves per row (default 3)")
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: under /tmp)")
    parser.add_argument("--json", default=str(HERE / "results" / "sharded.json"), help="JSON results")
    parser.add_argument("--rank-job", choices=("save", "load", "hsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--dcp-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_job is not None:
        {"save": _rank_save, "load": _rank_load, "hsdp": _rank_hsdp}[args.rank_job](args)
        return 0
    results = _run(args)
    report = _report(results)
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}\n")
    print(report)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
