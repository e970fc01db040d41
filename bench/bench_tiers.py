"""Storage tiers (issue 16), in one run: the blocked time of a save at every training step with a
shared tier filled in the background (the root on disk, and the root in /dev/shm) against today's
single root on disk, and the restart-to-resumed time of a new process loading the same state from
each tier (the shared one with its page cache dropped and the fast tier wiped, as on a replaced node).

    .venv/bin/python bench/bench_tiers.py                        # 1.2 GB state (about 2 min on 2 cores)
    .venv/bin/python bench/bench_tiers.py --scale 0.05 --steps 4 # smoke

Each part runs in a process of its own (a fresh trainer), prints one table and the target, and
writes JSON (default bench/results/tiers.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHM = "/dev/shm"


S3_URL = "s3://ckptd-bench/run"


def _tiers_arg(shared: str, every: int) -> str:
    return f"shared={shared}:every={every}:keep_last=2"


def _s3_tier_arg(every: int) -> str:
    return f"s3={S3_URL}:every={every}:keep_last=2"


@contextlib.contextmanager
def _s3_server(log_path: str, enabled: bool = True) -> Iterator[bool]:
    """An S3-compatible server (moto) on loopback with a bucket, the AWS environment pointing at it;
    yields False (and nothing runs) where moto is not installed or it is not `enabled`."""
    if not enabled:
        yield False
        return
    try:
        import boto3
        import moto  # noqa: F401
    except ImportError:
        yield False
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.session.Session().client("s3").create_bucket(Bucket="ckptd-bench")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield True
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _manager(ctx: Any, root: str, tiers: tuple, **options: Any) -> Any:
    from bench_ckptd import _provider

    from ckptd.client import CheckpointManager, RetentionPolicy

    return CheckpointManager(
        _provider(ctx.statefuls), root, auto_start=True, tiers=tiers, retention=RetentionPolicy(keep_last=2), **options
    )


def save_part(args: argparse.Namespace) -> Dict[str, Any]:
    """A training loop that saves at every step (policy "wait"); blocked seconds per save, and the
    training seconds each save costs: the loop trains on until every save is durable, and the steps
    it did are set against the rate of training alone (before and after), so the blocked time and
    the slowdown while the daemon writes both count."""
    import torch
    from bench_probes import TrainingProbe
    from bench_state import RowContext

    from ckptd.proto.tiers import parse_tiers

    torch.set_num_threads(args.threads)
    ctx = RowContext(torch, "A", args.scale)
    probe = TrainingProbe(torch, ctx)
    tiers = tuple(args.tier)
    manager = _manager(ctx, args.root, tiers)
    manager.wait_staging_allocated()
    window = min(2.0, args.steps * args.step_s / 2)  # training alone, before and after: the undisturbed rate
    rate_before = probe.rate_for(window)
    blocked: List[float] = []
    handles = []
    trained = 0
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        trained += probe.train_until(time.perf_counter() + args.step_s)
        t0 = time.perf_counter()
        handles.append(manager.save_checkpoint(step))
        blocked.append(time.perf_counter() - t0)
    while not all(h.done() for h in handles):
        probe.step()
        trained += 1
    elapsed = time.perf_counter() - started
    handles[-1].wait()
    rate = (rate_before + probe.rate_for(window)) / 2
    copied_s = None
    if tiers:
        newest = max(s for s in range(1, args.steps + 1) if s % args.every == 0)
        deadline = time.monotonic() + 600
        while not all(_tier_latest(spec) == newest for spec in parse_tiers(tiers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        copied_s = time.perf_counter() - started
    manager.close()
    return {
        "blocked_s": blocked,
        "blocked_median_s": statistics.median(blocked[1:] or blocked),
        "training_lost_per_save_s": (elapsed - trained / rate) / args.steps,
        "loop_s": elapsed,
        "train_s": args.steps * args.step_s,
        "tier_filled_s": copied_s,
        "state_bytes": ctx.nbytes,
    }


def _tier_latest(spec: Any) -> Optional[int]:
    from ckptd.disk.objectstore import ObjectStoreRoot
    from ckptd.disk.root import read_latest
    from ckptd.proto.tiers import is_object_store

    return ObjectStoreRoot(spec.path).latest_step() if is_object_store(spec.path) else read_latest(spec.path)


def resume_part(args: argparse.Namespace) -> Dict[str, Any]:
    """A restarted trainer: build the state, load the newest checkpoint; seconds of each."""
    started = time.perf_counter()
    import torch
    from bench_state import RowContext

    torch.set_num_threads(args.threads)
    ctx = RowContext(torch, "A", args.scale)
    built = time.perf_counter()
    manager = _manager(ctx, args.root, tuple(args.tier), connect=False)
    loaded = manager.load_checkpoint()
    done = time.perf_counter()
    return {"step": loaded.step, "tier": loaded.tier, "build_s": built - started, "load_s": done - built}


def _run_part(part: str, args: argparse.Namespace, root: str, tiers: List[str]) -> Dict[str, Any]:
    command = [sys.executable, __file__, "--part", part, "--root", root, "--scale", str(args.scale)]
    command += ["--steps", str(args.steps), "--step-s", str(args.step_s), "--every", str(args.every)]
    command += ["--threads", str(args.threads)] + [arg for tier in tiers for arg in ("--tier", tier)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{part} part failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def _evict(root: str) -> None:
    from bench_system import evict, files_under

    files = [f for f in files_under(root) if os.path.isfile(f)]
    if files:
        evict(files, "auto")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="state size (1: the 1.2 GB LM + AdamW)")
    parser.add_argument("--steps", type=int, default=8, help="training steps, one save each")
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds of training per step")
    parser.add_argument("--every", type=int, default=4, help="the shared tier gets every N-th step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the disk root and the shared tier go (default: a tmp dir)")
    parser.add_argument("--out", default=str(HERE / "results" / "tiers.json"))
    parser.add_argument("--no-object-store", action="store_true", help="skip the restart from the object store")
    parser.add_argument("--part", choices=("save", "resume"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--tier", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        result = save_part(args) if args.part == "save" else resume_part(args)
        print(json.dumps(result))
        return 0

    disk = tempfile.mkdtemp(prefix="ckptd-bench-tiers-", dir=args.dir)
    fast = tempfile.mkdtemp(prefix="ckptd-bench-tiers-", dir=SHM)
    from_s3: Optional[Dict[str, Any]] = None
    try:
        with _s3_server(f"{disk}/moto.log", enabled=not args.no_object_store) as have_s3:
            disk_root, fast_root, shared = f"{disk}/root", f"{fast}/root", f"{disk}/shared"
            tiers = [_tiers_arg(shared, args.every)]
            print(f"tiers bench: disk {disk}, fast tier {fast_root}, tiers {tiers}", file=sys.stderr)
            today = _run_part("save", args, disk_root, [])
            disk_tiered = _run_part("save", args, f"{disk}/root2", [_tiers_arg(f"{disk}/shared2", args.every)])
            shutil.rmtree(f"{disk}/root2")
            shutil.rmtree(f"{disk}/shared2")
            tiered = _run_part("save", args, fast_root, tiers)
            newest_copy = max(s for s in range(1, args.steps + 1) if s % args.every == 0)
            _evict(disk_root)
            from_disk_root = _run_part("resume", args, disk_root, [])
            from_fast = _run_part("resume", args, fast_root, tiers)
            shutil.rmtree(fast_root)  # a replaced node: its fast tier is gone
            os.makedirs(fast_root)
            _evict(shared)
            from_shared = _run_part("resume", args, fast_root, tiers)
            assert from_fast["step"] == args.steps and from_fast["tier"] == "root", from_fast
            assert from_shared["step"] == newest_copy and from_shared["tier"] == "shared", from_shared
            if have_s3:
                # filled by its own run: the S3 server shares this machine's 2 cores, so it stays out
                # of the timed saves above; then a node with nothing nearer restarts from it
                s3_tiers = [_s3_tier_arg(args.every)]
                _run_part("save", args, f"{fast}/s3-source", s3_tiers)
                shutil.rmtree(f"{fast}/s3-source")
                from_s3 = _run_part("resume", args, fast_root, s3_tiers)
                assert from_s3["step"] == newest_copy and from_s3["tier"] == "s3", from_s3
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(fast, ignore_errors=True)

    report = {
        "state_bytes": today["state_bytes"],
        "save_every_step": {
            "root_on_disk": today,
            "root_on_disk_plus_shared": disk_tiered,
            "fast_tier_plus_shared": tiered,
        },
        "resume": {
            "root_on_disk_cold": from_disk_root,
            "fast_tier": from_fast,
            "shared_tier_cold": from_shared,
            **({"object_store": from_s3} if from_s3 is not None else {}),
        },
    }
    _print(report, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"JSON: {args.out}")
    return 0


def _print(report: Dict[str, Any], args: argparse.Namespace) -> None:
    saves = report["save_every_step"]
    gb = report["state_bytes"] / 1e9
    print(f"\nsave at every step ({args.steps} steps of {args.step_s:g} s training, {gb:.2f} GB state, 'wait' policy):")
    print(
        "| configuration | blocked per save, median (s) | training lost per save (s) | loop (s) | slower tiers filled (s) |"
    )
    print("|---|---|---|---|---|")
    for name, label in (
        ("root_on_disk", "root on disk (today)"),
        ("root_on_disk_plus_shared", "root on disk + shared tier (same disk)"),
        ("fast_tier_plus_shared", "root in /dev/shm + shared tier on disk"),
    ):
        r = saves[name]
        filled = "-" if r["tier_filled_s"] is None else f"{r['tier_filled_s']:.2f}"
        lost = r["training_lost_per_save_s"]
        print(f"| {label} | {r['blocked_median_s']:.3f} | {lost:.3f} | {r['loop_s']:.2f} | {filled} |")
    today, fast = (
        saves["root_on_disk"]["training_lost_per_save_s"],
        saves["fast_tier_plus_shared"]["training_lost_per_save_s"],
    )
    verdict = "PASS" if fast <= today else "FAIL"
    print(
        f"\n  [{verdict}] a save to the fast tier costs the training loop no more than a save today: "
        f"{fast:.3f} s against {today:.3f} s of training lost per save ({fast / today:.2f}x)"
    )
    print("\nrestart to resumed (a new process: import, build the state, load the newest checkpoint):")
    print("| load from | step | tier | restart-to-resumed (s) | of which load (s) |")
    print("|---|---|---|---|---|")
    resumes = report["resume"]
    labels = {
        "root_on_disk_cold": "root on disk (today, page cache dropped)",
        "fast_tier": "fast tier (/dev/shm)",
        "shared_tier_cold": "shared tier (fast tier wiped, page cache dropped)",
    }
    if "object_store" in resumes:
        labels["object_store"] = "object store (S3 API, moto on loopback; nothing nearer)"
    for name, label in labels.items():
        r = resumes[name]
        print(f"| {label} | {r['step']} | {r['tier']} | {r['process_wall_s']:.2f} | {r['load_s']:.2f} |")
    fast, shared = resumes["fast_tier"], resumes["shared_tier_cold"]
    ratio_load = shared["load_s"] / fast["load_s"]
    ratio_wall = shared["process_wall_s"] / fast["process_wall_s"]
    verdict = "PASS" if ratio_load >= 3 else "FAIL"
    print(
        f"\n  [{verdict}] the fast tier resumes >= 3x faster than the shared tier: load {ratio_load:.1f}x "
        f"({fast['load_s']:.2f} s vs {shared['load_s']:.2f} s); whole restart {ratio_wall:.2f}x (import and "
        "building the state cost the same from either tier)"
    )


if __name__ == "__main__":
    sys.exit(main())
