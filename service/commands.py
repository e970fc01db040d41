"""The operator commands of `ckptd`: ls, inspect, gc, export, status (each returns an exit status)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

import zmq

from ckptd.disk import runtime
from ckptd.disk.manifests import read_manifest
from ckptd.disk.objectstore import ObjectStoreError, ObjectStoreRoot
from ckptd.disk.retention import saved_policy
from ckptd.disk.tiers import read_tiers_record
from ckptd.proto import layout, messages
from ckptd.proto.config import ENDPOINT_ENV, ExitCode
from ckptd.proto.manifest import ComponentRecord, Manifest, ManifestError
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.retention import RetentionPolicy
from ckptd.proto.sharding import chunks_in_scopes
from ckptd.proto.tiers import TierSpec, is_object_store
from ckptd.service.catalog import Catalog, catalog, object_store_catalog
from ckptd.service.errors import ExportError
from ckptd.service.export import export_component
from ckptd.service.store import CheckpointStore
from ckptd.service.tier_targets import ObjectStoreTarget

GC_MIN_AGE_S = 3600.0
"""Leftovers younger than this may be a save in flight on some node (the save timeout is 600 s)."""


def _emit_json(data: Any, out: TextIO = sys.stdout) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(command: str, message: str) -> int:
    sys.stderr.write(f"ckptd {command}: {message}\n")
    return ExitCode.ERROR


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def ls(args: argparse.Namespace) -> int:
    """`ckptd ls ROOT`: one row per checkpoint, then the leftovers of interrupted saves."""
    if not os.path.isdir(args.root):
        return _fail("ls", f"{args.root} is not a directory")
    found = catalog(args.root)
    tiers: List[Tuple[TierSpec, Catalog]] = []
    unreachable: List[Tuple[TierSpec, str]] = []
    for spec in read_tiers_record(found.root):
        try:
            if is_object_store(spec.path):
                tiers.append((spec, object_store_catalog(ObjectStoreRoot(spec.path))))
            elif os.path.isdir(spec.path):
                tiers.append((spec, catalog(spec.path)))
        except ObjectStoreError as exc:
            unreachable.append((spec, str(exc)))
    if args.json:
        listed = [{"name": spec.name, **c.to_json()} for spec, c in tiers]
        listed += [{"name": spec.name, "root": spec.path, "error": error} for spec, error in unreachable]
        _emit_json({**found.to_json(), "tiers": listed})
        return ExitCode.OK
    text = [_render_catalog(found)]
    text += [f"\ntier {spec.name} (every {spec.every}):\n{_render_catalog(c)}" for spec, c in tiers]
    text += [f"\ntier {spec.name} ({spec.path}): cannot be listed: {error}" for spec, error in unreachable]
    sys.stdout.write("\n".join(text) + "\n")
    return ExitCode.OK


def _render_catalog(found: Catalog) -> str:
    rows = [
        [
            str(c.step),
            ("*" if c.latest else ""),
            c.committed_at or "-",
            human_bytes(c.size_bytes),
            ",".join(c.components) if not c.problem else f"UNREADABLE: {c.problem}",
            "; ".join(c.kept_because) or "-",
        ]
        for c in found.checkpoints
    ]
    text = [
        f"{found.root}: {len(found.checkpoints)} checkpoint(s), latest = "
        f"{found.latest_step if found.latest_step is not None else 'none'}"
    ]
    if found.policy:
        shown = ", ".join(f"{k}={v}" for k, v in found.policy.items() if v is not None)
        text.append(f"retention policy: {shown}")
    text.append(_table(["step", "latest", "committed at (UTC)", "size", "components", "kept because"], rows))
    if found.leftovers:
        text.append("leftovers (removed by the node-0 daemon at start, or by `ckptd gc`):")
        text += [
            f"  {left.path}  {left.kind}, {human_bytes(left.size_bytes)}, {left.age_s:.0f} s old"
            for left in found.leftovers
        ]
    return "\n".join(text)


def inspect(args: argparse.Namespace) -> int:
    """`ckptd inspect PATH`: a checkpoint's manifest as a readable report."""
    try:
        manifest = _object_store_manifest(args.path) if is_object_store(args.path) else read_manifest(args.path)
    except (ManifestError, ObjectStoreError, ValueError) as exc:
        return _fail("inspect", str(exc))
    if args.json:
        _emit_json(json.loads(manifest.to_json()))
        return ExitCode.OK
    sys.stdout.write(render_manifest(args.path, manifest) + "\n")
    return ExitCode.OK


def _object_store_manifest(url: str) -> Manifest:
    """The manifest of a checkpoint in an object-store tier, named `s3://BUCKET/PREFIX/step_N`."""
    base, _, name = url.rstrip("/").rpartition("/")
    step = layout.parse_checkpoint_dir_name(name)
    if step is None:
        raise ValueError(f"{url} does not name a checkpoint (s3://BUCKET/PREFIX/{layout.checkpoint_dir_name(0)})")
    return ObjectStoreRoot(base).read_manifest(step)


def render_manifest(path: str, manifest: Manifest) -> str:
    """The report `ckptd inspect` prints."""
    topo = manifest.topology
    lines = [
        f"checkpoint {path}",
        f"  step {manifest.step}, format {manifest.format_version}, created {manifest.created_at}, "
        f"committed {manifest.committed_at}",
        f"  versions: {', '.join(f'{k} {v}' for k, v in sorted(manifest.versions.items()))}",
        f"  topology: {topo.describe()}; nodes: "
        + " | ".join(f"node {i}: ranks {list(ranks)}" for i, ranks in enumerate(topo.nodes)),
    ]
    if manifest.groups:
        lines.append("  process groups: " + "; ".join(f"{name} = {groups}" for name, groups in manifest.groups.items()))
    if manifest.metrics:
        lines.append("  metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(manifest.metrics.items())))
    if manifest.timings:
        lines.append("  timings: " + ", ".join(f"{k} {v:.3f} s" for k, v in manifest.timings.items()))
    for key, record in manifest.components.items():
        extra = (
            (" (spread across nodes)" if record.spread else "")
            + (f" group {record.group_name!r}" if record.group_name else "")
            + (", replication validated" if record.validate_replication else "")
            + ("" if record.required else ", optional")
        )
        lines.append(
            f"  component {key!r}: {record.pattern.value}{extra}, {len(record.scopes)} cop{'y' if len(record.scopes) == 1 else 'ies'}"
        )
        for scope in record.scopes.values():
            dtypes: Dict[str, int] = {}
            for info in scope.tensor_file.tensors.values():
                dtypes[str(info.get("dtype"))] = dtypes.get(str(info.get("dtype")), 0) + 1
            lines.append(
                f"    {scope.scope}: written by rank {scope.writer_rank}, read by ranks {_ranks(scope.readers)}"
            )
            lines.append(
                f"      {scope.tensor_file.path}  {human_bytes(scope.tensor_file.size)}  xxh3 {scope.tensor_file.checksum}  "
                f"{len(scope.tensor_file.tensors)} tensors ({', '.join(f'{n} {d}' for d, n in sorted(dtypes.items())) or 'none'})"
            )
            lines.append(
                f"      {scope.state_file.path}  {human_bytes(scope.state_file.size)}  xxh3 {scope.state_file.checksum}"
            )
        if record.pattern is SharingPattern.SHARDED:
            lines.extend(_render_chunks(record))
    return "\n".join(lines)


def _render_chunks(record: ComponentRecord) -> List[str]:
    """A SHARDED component's tensors: global shape and dtype, then each chunk's box and file."""
    try:
        chunks = chunks_in_scopes(record.scopes.values())
    except ValueError as exc:
        return [f"    chunks cannot be listed: {exc}"]
    lines = ["    tensors (global shape; chunks as offsets+sizes in file):"]
    for name in sorted(chunks):
        first = chunks[name][0]
        boxes = "; ".join(
            f"{list(c.box.offsets)}+{list(c.box.sizes)} in {c.file.rsplit('/', 1)[-1]}"
            for c in sorted(chunks[name], key=lambda c: c.box.offsets)
        )
        lines.append(f"      {name}  {first.dtype} {list(first.global_shape)}: {len(chunks[name])} chunk(s): {boxes}")
    return lines


def _ranks(ranks: List[int]) -> str:
    if ranks and ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 3:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def gc(args: argparse.Namespace) -> int:
    """`ckptd gc ROOT`: remove leftovers older than --min-age, and apply a retention policy (the flags',
    else the one the daemon last applied). Safe beside a committing daemon: a leftover that is a save
    in flight is younger than --min-age, and deletes go through the daemon's own crash-safe path."""
    if not os.path.isdir(args.root):
        return _fail("gc", f"{args.root} is not a directory")
    try:
        policy = _policy_from_args(args) or saved_policy(args.root)
    except ValueError as exc:
        sys.stderr.write(f"ckptd gc: {exc}\n")
        return ExitCode.USAGE
    reports = [_gc_root(args, args.root, policy)]
    for spec in read_tiers_record(os.path.realpath(args.root)):  # each tier by its own policy
        if is_object_store(spec.path):
            try:
                reports.append(_gc_object_store(args, spec))
            except ObjectStoreError as exc:
                sys.stderr.write(f"ckptd gc: tier {spec.name}: {exc}\n")
        elif os.path.isdir(spec.path):
            reports.append(_gc_root(args, spec.path, saved_policy(spec.path) or spec.retention, spec.name))
    if args.json:
        _emit_json(reports[0] if len(reports) == 1 else {**reports[0], "tiers": reports[1:]})
        return ExitCode.OK
    for report in reports:
        _print_gc(args, report)
    return ExitCode.OK


def _gc_root(
    args: argparse.Namespace, root: str, policy: Optional[RetentionPolicy], tier: Optional[str] = None
) -> Dict[str, Any]:
    """Remove one root's (or tier's) old leftovers and apply `policy`; what was (or would be) removed."""
    store = CheckpointStore(root)
    now = time.time()
    old = [left for left in catalog(root).leftovers if left.age_s >= args.min_age]
    doomed: List[int] = []
    if policy is not None:
        _, doomed = store.plan_retention(policy)
    if not args.dry_run:
        removed = set(store.remove_leftovers(min_age_s=args.min_age))
        old = [left for left in old if left.path in removed]
        doomed = store.apply_retention(policy) if policy is not None else []
    report: Dict[str, Any] = {
        "dry_run": args.dry_run,
        "leftovers": [left.path for left in old],
        "deleted_steps": doomed,
        "policy": policy.to_wire() if policy else None,
        "seconds": round(time.time() - now, 3),
    }
    if tier is not None:
        report.update(tier=tier, root=store.root)
    return report


def _gc_object_store(args: argparse.Namespace, spec: TierSpec) -> Dict[str, Any]:
    """Abort an object-store tier's interrupted multipart uploads and apply its retention."""
    started = time.time()
    if args.dry_run:
        aborted, doomed = [], ObjectStoreTarget(spec.path, ObjectStoreRoot(spec.path)).plan_retention(spec.retention)
    else:
        target = ObjectStoreTarget(spec.path)
        aborted = target.open()
        doomed = target.apply_retention(spec.retention)
    return {
        "dry_run": args.dry_run,
        "leftovers": [f"interrupted upload of {key}" for key in aborted],
        "deleted_steps": doomed,
        "policy": spec.retention.to_wire(),
        "seconds": round(time.time() - started, 3),
        "tier": spec.name,
        "root": spec.path,
    }


def _print_gc(args: argparse.Namespace, report: Dict[str, Any]) -> None:
    where = f"tier {report['tier']}: " if "tier" in report else ""
    verb = "would remove" if args.dry_run else "removed"
    for path in report["leftovers"]:
        sys.stdout.write(f"{where}{verb} leftover {path}\n")
    for step in report["deleted_steps"]:
        sys.stdout.write(
            f"{where}{'would delete' if args.dry_run else 'deleted'} {layout.checkpoint_dir_name(step)} (retention)\n"
        )
    if not report["leftovers"] and not report["deleted_steps"]:
        sys.stdout.write(
            f"{where}nothing to remove"
            + ("" if report["policy"] else " (no retention policy: checkpoints are kept)")
            + "\n"
        )


def _policy_from_args(args: argparse.Namespace) -> Optional[RetentionPolicy]:
    if args.keep_last is None and args.keep_every is None and args.keep_best is None:
        return None
    return RetentionPolicy(
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        keep_best=args.keep_best,
        best_metric=args.best_metric,
        best_mode=args.best_mode,
    )


def export(args: argparse.Namespace) -> int:
    """`ckptd export PATH --component KEY --out DIR`: consolidated safetensors files plus an index."""
    try:
        result = export_component(
            args.path,
            args.component,
            args.out,
            scope=args.scope,
            prefix=args.prefix,
            max_shard_bytes=int(args.max_shard_gb * 10**9),
            select=args.select,
        )
    except (ExportError, ManifestError) as exc:
        return _fail("export", str(exc))
    if args.json:
        _emit_json(
            {
                "files": result.files,
                "index": result.index,
                "config": result.config,
                "tensors": result.tensors,
                "bytes": result.total_bytes,
            }
        )
    else:
        sys.stdout.write(
            f"exported {result.tensors} tensors ({human_bytes(result.total_bytes)}) of "
            f"{args.component!r} into {len(result.files)} file(s) in {args.out}"
            f"{' with its config.json' if result.config else ''}\n"
        )
    return ExitCode.OK


def query_status(endpoint: str, timeout_s: float) -> Dict[str, Any]:
    """The daemon's status at `endpoint`; raises TimeoutError if it does not answer."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(messages.encode(messages.STATUS, {}, 1))
        if not socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no ckptd daemon answered at {endpoint} within {timeout_s:g} s")
        envelope = messages.decode(socket.recv())
    finally:
        socket.close(0)
    if envelope.type != messages.OK:
        raise TimeoutError(f"the daemon at {endpoint} refused the status request: {envelope.body.get('message')}")
    return envelope.body


def status(args: argparse.Namespace) -> int:
    """`ckptd status`: the live daemon's saves in flight with progress, and its last commit."""
    endpoint = (
        args.endpoint or os.environ.get(ENDPOINT_ENV) or (runtime.default_endpoint(args.root) if args.root else None)
    )
    if endpoint is None:
        sys.stderr.write(f"ckptd status: give --endpoint or --root (or set {ENDPOINT_ENV})\n")
        return ExitCode.USAGE
    previous: Dict[int, tuple] = {}
    while True:
        try:
            body = query_status(endpoint, args.timeout)
        except (TimeoutError, messages.ProtocolError, zmq.ZMQError) as exc:
            return _fail("status", str(exc))
        if args.cluster:
            cluster_view = body.get("cluster") or {}
            if not cluster_view.get("leader"):
                where = cluster_view.get("leader_endpoint")
                return _fail(
                    "status",
                    "the cluster view is served by node 0's daemon (the commit leader)"
                    + (f"; this daemon reports to {where}" if where else "; this daemon serves a one-node job"),
                )
        if args.json:
            _emit_json(body["cluster"] if args.cluster else body)
        else:
            text = render_cluster(body["cluster"]) if args.cluster else render_status(body, previous)
            sys.stdout.write(("\x1b[2J\x1b[H" if args.watch and sys.stdout.isatty() else "") + text + "\n")
        sys.stdout.flush()
        if not args.watch:
            return ExitCode.OK
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return ExitCode.OK


def render_cluster(view: Dict[str, Any]) -> str:
    """One line per node's daemon: alive, last heartbeat, saves in flight with durable ranks, lag."""
    lines = [
        f"{'node':>5} {'alive':>5} {'heartbeat':>10} {'committed':>9} {'lag':>4}  saves in flight (step: durable/ranks)"
    ]
    for row in view.get("nodes", []):
        age = row.get("heartbeat_age_s")
        saves = ", ".join(
            f"{s['step']}: {s['ranks_durable']}/{s['ranks_expected']}{' reported' if s.get('reported') else ''}"
            for s in row.get("saves_in_flight") or []
        )
        lines.append(
            f"{row['node']:>5} {('yes' if row.get('alive') else 'NO'):>5} "
            f"{('-' if age is None else f'{age:.1f} s ago'):>10} {str(row.get('last_committed')):>9} "
            f"{str(row.get('lag_steps')):>4}  {saves or '-'}"
        )
    return "\n".join(lines)


def render_status(body: Dict[str, Any], previous: Dict[int, tuple]) -> str:
    """Progress bars for the saves in flight; `previous` (step -> (time, bytes)) gives throughput."""
    lines = [
        f"ckptd {body.get('version')} pid {body.get('pid')} serving {body.get('root')} at {body.get('endpoint')}",
        f"last committed step: {body.get('last_committed')}",
        f"root owned by: {body.get('owner') or 'no live run'}",
    ]
    saves = body.get("saves") or []
    if not saves:
        lines.append("no saves in flight")
    now = time.monotonic()
    for save in saves:
        done, total = save.get("bytes_written", 0), save.get("bytes_expected", 0)
        fraction = done / total if total else 0.0
        bar = "#" * int(fraction * 30)
        rate = ""
        step = save.get("step")
        if step in previous:
            then, before = previous[step]
            if now > then:
                rate = f"  {human_bytes((done - before) / (now - then))}/s"
        previous[step] = (now, done)
        lines.append(
            f"step {step}: [{bar:<30}] {fraction * 100:5.1f}%  {human_bytes(done)} of {human_bytes(total)}{rate}  "
            f"ranks handed over {len(save.get('ranks_received', []))}/{len(save.get('ranks_expected', []))}, "
            f"durable {len(save.get('ranks_durable', []))}, {save.get('seconds', 0):.1f} s"
        )
    lines.extend(_render_tier(tier) for tier in body.get("tiers") or [])
    return "\n".join(lines)


def _render_tier(tier: Dict[str, Any]) -> str:
    """One line per slower tier: its newest copy, what it is copying or waits to copy, throughput."""
    doing = ""
    if tier.get("copying") is not None:
        doing = f", copying step {tier['copying']} ({human_bytes(tier.get('bytes_waiting') or 0)} to go)"
    if tier.get("pending") is not None:
        doing += f", step {tier['pending']} waiting"
    rate = f", last copy {tier['last_copy_mbps']} MB/s" if tier.get("last_copy_mbps") is not None else ""
    error = f"; last error: {tier['last_error']}" if tier.get("last_error") else ""
    return (
        f"tier {tier.get('name')} ({tier.get('path')}, every {tier.get('every')}): latest step {tier.get('latest')}"
        f"{doing}{rate}{error}"
    )
