"""The driver (`bench_save.py` without --row): check the device, describe the machine, run every
row in a fresh subprocess (`bench_save.py --row NAME --state A|B ...`; again when other load
disturbed it), then hand the results to the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from bench_limits import staging_pages
from bench_report import AllResults, RunPlan, device_label, report_run
from bench_rows import LABELS, RESULT_MARK, is_disturbed, outside_load, parse_rows, with_floor_rows
from bench_state import cuda_unavailable_reason
from bench_targets import Result, add_ratios

from ckptd.disk.runtime import mount_of

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY_SCRIPT = os.path.join(HERE, "bench_save.py")  # what the row subprocesses run


def filesystem_of(path: str) -> str:
    """'<fstype> on <mount point>' of the mount holding `path`, from /proc/mounts."""
    mount = mount_of(path)
    return f"{mount.fstype} on {mount.point}" if mount is not None else "unknown"


def _git_describe() -> Optional[str]:
    """The repository's commit (read-only git commands), '+changes' when client/service/proto differ from it."""
    repo = os.path.dirname(HERE)
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--", "client", "service", "proto"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+changes" if dirty else "")) or None


def _cpu_and_memory(info: Dict[str, Any]) -> None:
    """Add the CPU model and the total RAM (GB) from /proc, where readable."""
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


def machine_info(target_dir: str) -> Dict[str, Any]:
    """The machine for the header and the JSON: cores, CPU, RAM, Python, the target filesystem,
    ckptd's commit, torch's version (without importing torch)."""
    info: Dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }
    _cpu_and_memory(info)
    info["target_fs"] = filesystem_of(target_dir)
    info["staging_pages"] = staging_pages()
    info["ckptd_commit"] = _git_describe()
    try:  # without importing torch here (seconds): the rows report the version they ran with too
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:
        info["torch"] = "unknown"
    return info


def device_info(device: str) -> Dict[str, Any]:
    """The device the rows will put the state on, for the header and the JSON; exits at once with
    a one-line message when --device cuda cannot run here."""
    if device == "cpu":
        return {"device": "cpu"}
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{os.path.basename(ENTRY_SCRIPT)}: error: {cuda_unavailable_reason(torch)}")
    return {
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Check the device (first: --device cuda without CUDA exits here, before any row runs) and the
    rows, make the run's work directory, describe the machine."""
    device = device_info(args.device)
    asked_a = parse_rows(args.rows)
    rows_a = with_floor_rows(asked_a)  # ckptd's training-lost floor is read off state A's limits
    rows_b = parse_rows(args.rows_b)
    states = [s.strip().upper() for s in args.states.split(",") if s.strip()]
    added = [LABELS[r] for r in rows_a if r not in asked_a]
    if added and "A" in states:
        print(f"state A: also running {', '.join(added)} (the training-lost floor needs them)", file=sys.stderr)
    base_dir = args.dir or tempfile.gettempdir()
    os.makedirs(base_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ckptd-bench-", dir=base_dir)
    command = shlex.join([sys.executable, *sys.argv])
    machine = machine_info(work)
    machine.update(device)
    print(
        f"ckptd bench: {machine.get('cores')} cores, torch {machine.get('torch')}, device {device_label(machine)}, "
        f"target {machine['target_fs']} ({work})",
        file=sys.stderr,
        flush=True,
    )
    return RunPlan(states=states, rows_a=rows_a, rows_b=rows_b, work=work, command=command, machine=machine)


def _tail(text: Any, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _row_command(args: argparse.Namespace, state: str, row: str, workdir: str) -> List[str]:
    """The command line of one row process, passing on the run's options."""
    command = [
        sys.executable,
        ENTRY_SCRIPT,
        "--row",
        row,
        "--state",
        state,
        "--scale",
        repr(args.scale),
        "--repeats",
        str(args.repeats),
        "--training-repeats",
        str(args.training_repeats),
        "--settle",
        str(args.settle),
        "--pause",
        str(args.pause),
        "--threads",
        str(args.threads),
        "--dir",
        workdir,
        "--drop-caches",
        args.drop_caches,
        "--device",
        args.device,
    ]
    if args.no_throughput:
        command.append("--no-throughput")
    if args.no_disk_probe:
        command.append("--no-disk-probe")
    return command


def _error(state: str, row: str, reason: str) -> Result:
    return {"row": row, "state": state, "label": LABELS[row], "status": "error", "reason": reason}


def run_subprocess_row(args: argparse.Namespace, state: str, row: str, workdir: str) -> Result:
    """Run one row in a fresh process (working in `workdir`, removed after); return its result."""
    command = _row_command(args, state, row, workdir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.row_timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        result = _error(state, row, f"timed out after {args.row_timeout:g} s")
        result["stderr_tail"] = _tail(exc.stderr)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    found: Optional[Result] = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            found = json.loads(line[len(RESULT_MARK) :])
    result = (
        found if found is not None else _error(state, row, f"row process exited {proc.returncode} without a result")
    )
    if result.get("status") == "error":
        result["stderr_tail"] = _tail(proc.stderr)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def _print_attempt(args: argparse.Namespace, state: str, row: str, result: Result) -> None:
    """One progress line on stderr (completing the '...' line when rows run one at a time)."""
    status = result.get("status")
    note = f"{result.get('wall_s', 0):.0f} s" if status == "ok" else f"{status}: {result.get('reason')}"
    if is_disturbed(result):
        note += f", disturbed (other processes {result['other_load'] * 100:.0f}%, steal {result['steal'] * 100:.0f}%)"
    print(f" {note}" if args.jobs == 1 else f"  state {state}: {LABELS[row]}: {note}", file=sys.stderr, flush=True)
    if status == "error" and result.get("stderr_tail"):
        print(result["stderr_tail"], file=sys.stderr, flush=True)


def run_with_retries(args: argparse.Namespace, work: str, job: Tuple[str, str]) -> Result:
    """Run one row, again (up to --retries times, only with --jobs 1) while other load disturbed it;
    keep the attempt during which the machine was quietest."""
    state, row = job
    best: Optional[Result] = None
    retries = args.retries if args.jobs == 1 else 0  # with --jobs the rows disturb each other anyway
    for attempt in range(1 + retries):
        if args.jobs == 1:
            print(
                f"  state {state}: {LABELS[row]}{' (again)' if attempt else ''} ...",
                end="",
                file=sys.stderr,
                flush=True,
            )
        result = run_subprocess_row(args, state, row, os.path.join(work, f"{state}-{row}-{attempt}"))
        _print_attempt(args, state, row, result)
        # Keep the attempt during which the machine was quietest (a signal outside the row's own figures).
        if best is None or outside_load(result) < outside_load(best):
            best = result
        best["attempts"] = attempt + 1
        if not is_disturbed(result):
            break
    assert best is not None
    return best


def _run_jobs(args: argparse.Namespace, work: str, jobs: List[Tuple[str, str]]) -> List[Result]:
    """Every job's result, in `jobs` order: one at a time, or --jobs at once (DCP best first: it spawns a process)."""
    if args.jobs == 1:
        return [run_with_retries(args, work, job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    longest_first = sorted(jobs, key=lambda job: job[1] != "dcp_async_best")  # it spawns a process
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(longest_first, pool.map(lambda job: run_with_retries(args, work, job), longest_first)))
    return [done[job] for job in jobs]


def run_all(args: argparse.Namespace, plan: RunPlan) -> AllResults:
    """Run every planned row, add the ratios against each state's limits; remove the work directory."""
    all_results: AllResults = {s: {} for s in plan.states}
    jobs = plan.jobs()
    try:
        outcomes = _run_jobs(args, plan.work, jobs)
        for (state, row), result in zip(jobs, outcomes):
            all_results[state][row] = result
        for state in plan.states:
            add_ratios(all_results[state])
    finally:
        shutil.rmtree(plan.work, ignore_errors=True)
    return all_results


def driver_main(args: argparse.Namespace) -> int:
    """Run the whole bench: every row, then the table and the JSON."""
    plan = plan_run(args)
    started = time.perf_counter()
    all_results = run_all(args, plan)
    total_s = time.perf_counter() - started
    report_run(args, plan, all_results, total_s)
    return 0
