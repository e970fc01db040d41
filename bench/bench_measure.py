"""The row process (`bench_save.py --row NAME --state A|B ...`): build one state, measure one way of
saving it, and print the result as one JSON line after RESULT_MARK for the driver.

In order: build the state and the throughput probe, probe the disk, take the baseline RSS, set the
saver up and train for --settle seconds, then 1 first save and N warm saves, then (rows that write
in the background) N more saves with the training loop running; for the ckptd rows, the same saves
again, each in turn with the floor's (the memcpy limit, and memcpy + the O_DIRECT write in a thread),
in this process; then the loads; last, for the ckptd row only, one save made right after building a
second saver (no training in between).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from bench_limits import FloorSaver
from bench_probes import DiskProbes, TrainingProbe
from bench_rows import INTERLEAVED_ROWS, LABELS, LOAD_ROWS, RESULT_MARK, SAVERS, row_unavailable
from bench_saver import RowNotApplicable, Saver
from bench_state import RowContext, cuda_unavailable_reason
from bench_system import (
    RssSampler,
    cpu_seconds,
    evict,
    machine_cpu_seconds,
    malloc_trim,
    mb,
    median,
    proc_status,
    reset_peak_rss,
)


@dataclass
class SaveTimes:
    """Per save, seconds from its call until it returned (blocked), was staged, was durable."""

    blocked: List[float] = field(default_factory=list)
    durable: List[float] = field(default_factory=list)
    staged: List[float] = field(default_factory=list)


@dataclass
class InflightSample:
    """One save made with the training loop running: steps/s around it and while it was in flight,
    how long its call blocked and how long it was in flight after that, and seconds until it was
    durable."""

    base_rate: float
    rate: float
    durable_s: float
    blocked_s: float
    inflight_s: float

    @property
    def lost_s(self) -> float:
        """Training seconds this save cost: the blocked call, plus the in-flight time times the share
        of training speed lost meanwhile (not clamped: a negative share is noise and shows)."""
        return self.blocked_s + self.inflight_s * (1 - self.rate / self.base_rate)


@dataclass
class ThroughputSamples:
    """The saves made with the training loop running."""

    kept: List[float] = field(default_factory=list)
    base_rates: List[float] = field(default_factory=list)
    inflight_rates: List[float] = field(default_factory=list)
    durable_loaded: List[float] = field(default_factory=list)
    lost: List[float] = field(default_factory=list)

    def add(self, sample: InflightSample) -> None:
        """Record one save's figures."""
        self.base_rates.append(sample.base_rate)
        self.inflight_rates.append(sample.rate)
        self.kept.append(sample.rate / sample.base_rate)
        self.durable_loaded.append(sample.durable_s)
        self.lost.append(sample.lost_s)


@dataclass
class CpuMark:
    """When, the machine's (busy, steal) CPU-seconds, and this row's own processes' CPU-seconds."""

    at: float
    machine: Tuple[float, float]
    ours: float


def _import_torch(threads: int) -> Any:
    """torch, with `threads` threads and its irrelevant warnings silenced."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    return torch


def _build_state(torch: Any, args: argparse.Namespace, result: Dict[str, Any]) -> RowContext:
    """Build the row's state on its device and record what it is."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(cuda_unavailable_reason(torch))
    built = time.perf_counter()
    ctx = RowContext(torch, args.state, args.scale, args.device)
    result.update(
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        state_bytes=ctx.nbytes,
        state_tensors=len(ctx.tensors),
        params=ctx.params,
        dims=ctx.dims,
        build_s=round(time.perf_counter() - built, 3),
        device=ctx.device.type,
        device_name=torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
    )
    return ctx


def _take_baseline(result: Dict[str, Any]) -> None:
    """The baseline RSS: state and probe built, nothing of the saver yet (its buffers are part of its cost).

    Freeze what exists now (torch's import graph, the state) so the gc.collect() before each save
    and any automatic collection during one do not rescan it: the same for every row."""
    gc.collect()
    gc.freeze()
    malloc_trim()
    base = proc_status()
    result["trainer_base_rss_mb"] = mb(base.get("VmRSS"))
    result["peak_reset"] = reset_peak_rss()


def _set_up_saver(
    row: str, ctx: RowContext, workdir: str, settle: float, probe: TrainingProbe, result: Dict[str, Any]
) -> Saver:
    """Build the row's saver, then train for `settle` seconds before its first save.

    A trainer builds its checkpointer, then trains before its first save: the first save is timed
    after `settle` seconds of the training loop (the same for every row), so work a saver does in
    the background at construction counts where it happens. `saver_ready_s` says how long that took."""
    setup = time.perf_counter()
    saver = SAVERS[row](ctx, workdir)
    result["saver_setup_s"] = round(time.perf_counter() - setup, 3)
    result["settle_s"] = settle
    probe.train_until(time.perf_counter() + settle)
    ready = saver.ready_after(setup)
    result["saver_ready_s"] = None if ready is None else round(ready, 3)
    result["writer_process"] = None
    result["saver_config"] = saver.config
    return saver


def _our_cpu(saver: Saver) -> float:
    """CPU-seconds of this process and of the saver's writer process so far."""
    pid = saver.writer_pid()
    return (cpu_seconds() or 0.0) + ((cpu_seconds(pid) or 0.0) if pid else 0.0)


def _cpu_mark(saver: Saver) -> CpuMark:
    """Now, for measuring how much of the machine other processes take from here on."""
    at = time.perf_counter()
    machine = machine_cpu_seconds()
    return CpuMark(at, machine, _our_cpu(saver))


def _record_outside_load(result: Dict[str, Any], start: CpuMark, end: CpuMark) -> None:
    """The share of the machine other processes (other_load) and the hypervisor (steal) took."""
    elapsed = end.at - start.at
    cores = os.cpu_count() or 1
    result["other_load"] = max(0.0, (end.machine[0] - start.machine[0]) - (end.ours - start.ours)) / (elapsed * cores)
    result["steal"] = (end.machine[1] - start.machine[1]) / (elapsed * cores)


def _process_cpu(saver: Saver) -> Tuple[Optional[float], Optional[float]]:
    """CPU-seconds so far of this process and of the saver's writer process (None if none)."""
    own = cpu_seconds()
    pid = saver.writer_pid()
    return own, (cpu_seconds(pid) if pid else None)


def _record_cpu_per_save(
    result: Dict[str, Any],
    start: Tuple[Optional[float], Optional[float]],
    end: Tuple[Optional[float], Optional[float]],
    warm_saves: int,
) -> None:
    """Trainer and writer CPU-seconds per warm save, where both readings exist."""
    if start[0] is not None and end[0] is not None:
        result["trainer_cpu_s_per_save"] = (end[0] - start[0]) / warm_saves
    if start[1] is not None and end[1] is not None:
        result["writer_cpu_s_per_save"] = (end[1] - start[1]) / warm_saves


def _quiet(ctx: RowContext, pause: float) -> None:
    """What every timed save starts from: garbage collected, `pause` seconds idle (the same for every
    row: see --pause), nothing queued on the device."""
    gc.collect()
    time.sleep(pause)
    ctx.sync()


def _timed_copy(floor: FloorSaver, ctx: RowContext, pause: float) -> float:
    """Seconds the memcpy limit takes now: the floor saver's copy, timed as a save is."""
    _quiet(ctx, pause)
    t0 = time.perf_counter()
    floor.copy()
    ctx.sync()
    return time.perf_counter() - t0


def _timed_save(saver: Saver, ctx: RowContext, i: int, pause: float) -> Tuple[float, float, float]:
    """Save number `i` with nothing else running, `pause` seconds after the last one:
    (blocked, durable, staged) seconds."""
    _quiet(ctx, pause)
    t0 = time.perf_counter()
    pending = saver.save(i)
    t1 = time.perf_counter()
    pending.wait()
    t2 = time.perf_counter()
    staged_at = pending.staged_at()
    return t1 - t0, t2 - t0, (staged_at if staged_at is not None else t1) - t0


def _timed_saves(saver: Saver, ctx: RowContext, saves: int, pause: float, result: Dict[str, Any]) -> SaveTimes:
    """The first save and the warm ones; the CPU per warm save counts from the end of the first
    (the writer exists by then)."""
    times = SaveTimes()
    warm_start: Tuple[Optional[float], Optional[float]] = (None, None)
    for i in range(saves):
        blocked, durable, staged = _timed_save(saver, ctx, i, pause)
        times.blocked.append(blocked)
        times.durable.append(durable)
        times.staged.append(staged)
        if i == 0:
            warm_start = _process_cpu(saver)
    if saves > 1:
        _record_cpu_per_save(result, warm_start, _process_cpu(saver), saves - 1)
    return times


def _save_while_training(saver: Saver, probe: TrainingProbe, i: int, window: float) -> InflightSample:
    """Save number `i` with the training loop running from the moment the save returns until it is
    durable, between two windows of training alone (a drifting load cancels out)."""
    gc.collect()
    before = probe.rate_for(window)
    t0 = time.perf_counter()
    pending = saver.save(i) if not saver.blocking else saver.background_save(i)
    assert pending is not None
    t1 = time.perf_counter()
    steps = 0
    while True:  # at least one step, then until durable
        probe.step()
        steps += 1
        if pending.done():
            break
    t2 = time.perf_counter()
    pending.wait()
    loaded = time.perf_counter() - t0
    after = probe.rate_for(window)
    return InflightSample(
        base_rate=(before + after) / 2,
        rate=steps / (t2 - t1),
        durable_s=loaded,
        blocked_s=t1 - t0,
        inflight_s=t2 - t1,
    )


def _training_window(durable: List[float]) -> float:
    """Seconds of training alone before and after each save under training: about a save's durable time."""
    return min(3.0, max(0.3, median(durable[1:] or durable) or 0.3))


def _throughput_saves(
    saver: Saver, probe: TrainingProbe, first: int, repeats: int, durable: List[float]
) -> ThroughputSamples:
    """`repeats` saves with the training loop running; the windows last about as long as a save."""
    samples = ThroughputSamples()
    window = _training_window(durable)
    for j in range(repeats):
        samples.add(_save_while_training(saver, probe, first + j, window))
    return samples


def _measure_saves(
    args: argparse.Namespace, saver: Saver, ctx: RowContext, probe: TrainingProbe, result: Dict[str, Any]
) -> Tuple[SaveTimes, ThroughputSamples, RssSampler]:
    """All the row's saves, with RSS sampled and the machine's outside load measured throughout."""
    saves = 1 + args.repeats
    samples = ThroughputSamples()
    with RssSampler(saver.writer_pid) as sampler:
        start = _cpu_mark(saver)  # how much of the machine other processes used meanwhile
        times = _timed_saves(saver, ctx, saves, args.pause, result)
        in_background = not saver.blocking or saver.background
        if in_background and not args.no_throughput:
            samples = _throughput_saves(saver, probe, saves, args.training_repeats, times.durable)
        _record_outside_load(result, start, _cpu_mark(saver))
    return times, samples, sampler


@dataclass
class InterleavedSamples:
    """ckptd's saves taken in turn with the floor's, in the ckptd row's own process: a memcpy-limit
    copy beside each warm save; beside each save made with the training loop running, a floor sample
    (that copy, then the O_DIRECT write in a thread) and a checksummed floor sample (the write
    checksums as it goes, as ckptd's daemon does). Separate row processes see the machine at other
    moments (between runs the memcpy row alone moves by more than a target's margin), so the targets
    read these ratios."""

    memcpy: List[float] = field(default_factory=list)
    blocked: List[float] = field(default_factory=list)
    floor_lost: List[float] = field(default_factory=list)
    checksummed_floor_lost: List[float] = field(default_factory=list)
    lost: List[float] = field(default_factory=list)

    def as_result(self) -> Dict[str, Any]:
        """The row result's fields: every sample, their medians, and the ratios of the medians."""
        result: Dict[str, Any] = {}
        for name in ("memcpy", "blocked", "floor_lost", "checksummed_floor_lost", "lost"):
            samples = getattr(self, name)
            result[f"interleaved_{name}_all_s"] = samples
            result[f"interleaved_{name}_s"] = median(samples)
        for ratio, value, of in (
            ("blocked_x_memcpy", "blocked", "memcpy"),
            ("lost_x_floor", "lost", "floor_lost"),
            ("lost_x_checksummed_floor", "lost", "checksummed_floor_lost"),
        ):
            v, limit = result[f"interleaved_{value}_s"], result[f"interleaved_{of}_s"]
            result[f"interleaved_{ratio}"] = v / limit if v is not None and limit and limit > 0 else None
        return result


def _interleaved_samples(
    args: argparse.Namespace, saver: Saver, floor: FloorSaver, probe: TrainingProbe, first: int, window: float
) -> InterleavedSamples:
    """`args.repeats` warm saves, each in turn with a memcpy-limit copy, and `args.training_repeats`
    saves under training, each in turn with a floor sample and a checksummed floor sample; who goes
    first rotates, so a drift favours none."""
    ctx, samples, step = saver.ctx, InterleavedSamples(), first
    for k in range(args.repeats):
        for who in ("floor", "ckptd") if k % 2 == 0 else ("ckptd", "floor"):
            if who == "floor":
                samples.memcpy.append(_timed_copy(floor, ctx, args.pause))
            else:
                samples.blocked.append(_timed_save(saver, ctx, step, args.pause)[0])
                step += 1
    training = 0 if args.no_throughput or saver.blocking else args.training_repeats
    turns = ["floor", "checksummed floor", "ckptd"]
    for k in range(training):
        for who in turns[k % 3 :] + turns[: k % 3]:
            if who == "ckptd":
                samples.lost.append(_save_while_training(saver, probe, step, window).lost_s)
                step += 1
                continue
            floor.checksummed = who == "checksummed floor"
            lost = _save_while_training(floor, probe, 2 * k + floor.checksummed, window).lost_s
            (samples.checksummed_floor_lost if floor.checksummed else samples.floor_lost).append(lost)
    return samples


def _measure_interleaved(
    args: argparse.Namespace, saver: Saver, probe: TrainingProbe, times: SaveTimes, result: Dict[str, Any]
) -> None:
    """ckptd's saves in turn with the floor's (InterleavedSamples), after the row's own saves; the
    floor's buffer exists only meanwhile (the row's memory figures are read before)."""
    try:
        floor = FloorSaver(saver.ctx, os.path.join(saver.workdir, "interleaved-floor"))
    except RowNotApplicable as exc:
        result["interleaved_skipped"] = str(exc)
        return
    first = 1 + args.repeats + args.training_repeats  # after the steps the row's own saves used
    window = _training_window(times.durable)
    try:
        start = _cpu_mark(saver)
        samples = _interleaved_samples(args, saver, floor, probe, first, window)
        end = _cpu_mark(saver)
    finally:
        floor.close()
    outside: Dict[str, Any] = {}
    _record_outside_load(outside, start, end)
    result.update(samples.as_result(), interleaved_other_load=outside["other_load"])


def _record_writer_memory(result: Dict[str, Any], saver: Saver, sampler: RssSampler) -> None:
    """The background writer process's peak memory, where there is one."""
    writer_pid = saver.writer_pid()
    if writer_pid:
        final = proc_status(writer_pid)
        result["writer_process"] = writer_pid
        result["writer_hwm_mb"] = mb(final.get("VmHWM") or sampler.peak.get("writer_hwm"))
        result["writer_peak_anon_mb"] = mb(sampler.peak.get("writer_anon"))
        result["writer_peak_shmem_mb"] = mb(sampler.peak.get("writer_shmem"))


def _record_trainer_memory(result: Dict[str, Any], peak: Dict[str, int], sampler: RssSampler) -> None:
    """This (trainer) process's peak memory over the saves."""
    result["trainer_peak_rss_mb"] = mb(peak.get("VmHWM"))
    result["trainer_peak_anon_mb"] = mb(sampler.peak.get("self_anon"))
    result["trainer_peak_shmem_mb"] = mb(sampler.peak.get("self_shmem"))


def _timed_load(saver: Saver, ctx: RowContext, mode: str, drop_caches: str, result: Dict[str, Any]) -> float:
    """Spoil the probe tensor, evict the files if `mode` is "cold", then time one load (synchronized)."""
    with ctx.torch.no_grad():
        ctx.probe.view(-1)[: min(4096, ctx.probe.numel())].fill_(-12345.0)
    gc.collect()
    if mode == "cold":
        method, resident = evict(saver.load_files(), drop_caches)
        result["cold_method"], result["cold_resident_fraction"] = method, resident
    ctx.sync()
    t0 = time.perf_counter()
    saver.load()
    ctx.sync()  # copies into the GPU model may still be queued
    return time.perf_counter() - t0


def _measure_loads(saver: Saver, ctx: RowContext, row: str, drop_caches: str, result: Dict[str, Any]) -> None:
    """A cold and a warm load of the last save, each checked to restore the saved values."""
    torch = ctx.torch
    expected = ctx.probe.detach().clone()
    loads: Dict[str, float] = {}
    ok = True
    reset_peak_rss()
    for mode in ("cold", "warm"):
        loads[mode] = _timed_load(saver, ctx, mode, drop_caches, result)
        ok = ok and bool(torch.equal(ctx.probe, expected))
    result.update(
        load_cold_s=loads["cold"],
        load_warm_s=loads["warm"],
        load_ok=ok,
        load_peak_rss_mb=mb(proc_status().get("VmHWM")),
        load_label=LOAD_ROWS.get(row),
    )


def _summary(row: str, times: SaveTimes, samples: ThroughputSamples) -> Dict[str, Any]:
    """Every sample, the first save's figures and the medians of the warm ones (memcpy has no durable time)."""
    blocked, durable, staged = times.blocked, times.durable, times.staged
    warm_blocked = blocked[1:] or blocked
    warm_durable = durable[1:] or durable
    warm_staged = staged[1:] or staged
    return dict(
        blocked_all_s=blocked,
        durable_all_s=None if row == "memcpy" else durable,
        staged_all_s=staged,
        blocked_first_s=blocked[0],
        blocked_warm_s=median(warm_blocked),
        staged_first_s=staged[0],
        staged_warm_s=median(warm_staged),
        durable_first_s=None if row == "memcpy" else durable[0],
        durable_warm_s=None if row == "memcpy" else median(warm_durable),
        throughput_kept=median(samples.kept),
        throughput_kept_all=samples.kept,
        baseline_steps_per_s=median(samples.base_rates),
        inflight_steps_per_s=median(samples.inflight_rates),
        durable_under_training_s=median(samples.durable_loaded),
        train_lost_s=median(samples.lost),
        train_lost_all_s=samples.lost,
    )


def _measure_first_save_now(ctx: RowContext, workdir: str, result: Dict[str, Any]) -> None:
    """A second ckptd saver on a fresh root (its own auto-started daemon), saved at once after its
    construction, without the --settle seconds of training: that save's blocked and durable
    seconds, and when (after the construction started) its staging memory was ready.

    The allocation is read after the save (the thread's finish time), so the save is not delayed
    by waiting for it."""
    setup = time.perf_counter()
    saver = SAVERS["ckptd"](ctx, os.path.join(workdir, "first-now"))
    try:
        # Unrounded: the target compares the save with their difference, to well under a millisecond.
        result["saver_setup_now_s"] = time.perf_counter() - setup
        blocked, durable, _ = _timed_save(saver, ctx, 0, pause=0.0)  # right after construction
        ready = saver.ready_after(setup)
    finally:
        saver.close()
    result.update(
        blocked_first_now_s=blocked,
        durable_first_now_s=durable,
        saver_ready_now_s=ready,
    )


def run_row(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure one row (args.row) on one state (args.state); return its result for the JSON."""
    row = args.row
    result: Dict[str, Any] = {"row": row, "state": args.state, "label": LABELS[row], "status": "ok"}
    reason = row_unavailable(row)
    if reason is not None:
        result.update(status="n/a", reason=reason)
        return result

    torch = _import_torch(args.threads)
    workdir = args.dir
    os.makedirs(workdir, exist_ok=True)
    ctx = _build_state(torch, args, result)
    probe = TrainingProbe(torch, ctx)  # built and warmed before the baseline RSS is taken
    for _ in range(5):
        probe.step()
    # The disk's speed drifts (a shared host): each row that writes probes it before and after its
    # saves, so its durable time can also be read against the disk it actually had.
    disk = DiskProbes(enabled=not args.no_disk_probe and row != "memcpy")
    disk.take(ctx, workdir, "before")
    _take_baseline(result)
    saver = _set_up_saver(row, ctx, workdir, args.settle, probe, result)
    try:
        times, samples, sampler = _measure_saves(args, saver, ctx, probe, result)
        peak = proc_status()
        if disk.enabled:
            disk.take(ctx, workdir, "after")
            result["disk_probe_s"] = disk.seconds
        _record_writer_memory(result, saver, sampler)
        _record_trainer_memory(result, peak, sampler)
        if row in INTERLEAVED_ROWS:
            _measure_interleaved(args, saver, probe, times, result)
        if saver.has_load:
            _measure_loads(saver, ctx, row, args.drop_caches, result)
    finally:
        saver.close()
    result.update(_summary(row, times, samples))
    if row == "ckptd":  # after close: the first saver's staging memory and daemon are gone
        try:
            _measure_first_save_now(ctx, workdir, result)
        except Exception as exc:  # keep the row's other figures; the target line says why
            traceback.print_exc()
            result["first_now_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def _failed(args: argparse.Namespace, status: str, reason: str) -> Dict[str, Any]:
    return {"row": args.row, "state": args.state, "label": LABELS[args.row], "status": status, "reason": reason}


def row_main(args: argparse.Namespace) -> int:
    """Run one row and print its result after RESULT_MARK, whatever happens (never hang the driver)."""
    try:
        result = run_row(args)
    except RowNotApplicable as exc:
        result = _failed(args, "n/a", str(exc))
    except BaseException as exc:  # report, never hang the driver
        traceback.print_exc()
        result = _failed(args, "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
