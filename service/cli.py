"""The `ckptd` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any, List, Optional

from ckptd.service import commands as commands_module
from ckptd.service.curve import write_secret
from ckptd.service.server import DaemonConfig, DaemonConfigError, DaemonError, DaemonServer
from ckptd.proto.manifest import ManifestError
from ckptd.proto.ownership import CLAIM_TTL_S
from ckptd.service.catalog import read_manifest_file
from ckptd.service.verify import checkpoint_dirs, verify_checkpoint

log = logging.getLogger("ckptd")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ALREADY_SERVED = 3


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one subcommand per action."""
    parser = argparse.ArgumentParser(prog="ckptd", description="Asynchronous checkpoint service for PyTorch.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node-local writer daemon for a checkpoint root")
    serve.add_argument("--root", required=True, help="checkpoint root directory")
    serve.add_argument("--endpoint", help="ZeroMQ endpoint to listen on (default: per-user ipc:// socket for the root)")
    serve.add_argument("--node", type=int, default=_env_int("CKPTD_NODE_RANK", 0),
                       help="this node's index in the job (default $CKPTD_NODE_RANK or 0); node 0's daemon commits")
    serve.add_argument("--num-nodes", type=int, default=_env_int("CKPTD_NUM_NODES", 1),
                       help="nodes in the job, one daemon each (default $CKPTD_NUM_NODES or 1)")
    serve.add_argument("--leader", default=os.environ.get("CKPTD_LEADER"), metavar="HOST:PORT",
                       help="node 0's commit leader: node 0 listens on PORT, the others connect to HOST:PORT "
                            "(default $CKPTD_LEADER; needed when --num-nodes > 1)")
    serve.add_argument("--cluster-secret", default=os.environ.get("CKPTD_CLUSTER_SECRET"), metavar="FILE",
                       help="secret shared by the job's daemons, from `ckptd keygen` (default $CKPTD_CLUSTER_SECRET; "
                            "needed when --num-nodes > 1)")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics at http://ADDRESS:PORT/metrics (default: off)")
    serve.add_argument("--metrics-address", default="127.0.0.1",
                       help="address the metrics listen on (default 127.0.0.1; 0.0.0.0 for a cluster scraper)")
    serve.add_argument("--peer-timeout", type=float, default=10.0,
                       help="seconds without a heartbeat before another node's daemon counts as gone (default 10)")
    serve.add_argument("--claim-ttl", type=float, default=CLAIM_TTL_S, metavar="SECONDS",
                       help="how long another host's claim on a shared root counts as a live run's after its last "
                            f"renewal (default {CLAIM_TTL_S:g})")
    serve.add_argument("--max-write-mbps", type=float, help="cap on write bandwidth in MB/s (default: no cap)")
    serve.add_argument("--save-timeout", type=float, default=600.0,
                       help="seconds a save may take from its first rank's hand-over to commit before it aborts")
    serve.add_argument("--write-threads", type=int, default=4, help="shard writer threads (default 4)")
    serve.add_argument("--nice", type=int, default=10,
                       help="CPU niceness to add, so training processes get the CPU first (default 10; 0 keeps it)")
    serve.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                       help="exit once no client process is alive and nothing happened for SECONDS")
    keygen = commands.add_parser("keygen", help="create the secret file that authenticates a job's daemons")
    keygen.add_argument("path", help="file to create (mode 0600; refuses to overwrite)")
    verify = commands.add_parser("verify", help="check every file of a checkpoint (or of every checkpoint under a root)")
    verify.add_argument("path", help="a checkpoint directory, or a checkpoint root")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr (default: when stderr is a terminal)")
    _add_operator_commands(commands)
    return parser


def _add_operator_commands(commands: argparse._SubParsersAction) -> None:
    ls = commands.add_parser("ls", help="list the checkpoints under a root, with retention and leftovers")
    ls.add_argument("root", help="checkpoint root")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    inspect = commands.add_parser("inspect", help="a checkpoint's manifest as a readable report")
    inspect.add_argument("path", help="a checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="the manifest as JSON")
    gc = commands.add_parser("gc", help="remove leftovers of interrupted saves and apply retention")
    gc.add_argument("root", help="checkpoint root")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    gc.add_argument("--min-age", type=float, default=commands_module.GC_MIN_AGE_S, metavar="SECONDS",
                    help="only remove leftovers untouched for this long: younger ones may be saves in flight "
                         "(default 3600)")
    gc.add_argument("--keep-last", type=int, help="retention: keep the newest N (default: the daemon's last policy)")
    gc.add_argument("--keep-every", type=int, help="retention: keep every step divisible by N")
    gc.add_argument("--keep-best", type=int, help="retention: keep the N best by --best-metric")
    gc.add_argument("--best-metric", help="metric name passed to save_checkpoint(metrics=...)")
    gc.add_argument("--best-mode", choices=("min", "max"), default="min", help="lower or higher is better (default min)")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    export = commands.add_parser("export", help="one component as consolidated safetensors files with an index")
    export.add_argument("path", help="a checkpoint directory")
    export.add_argument("--component", required=True, help="component key, e.g. model")
    export.add_argument("--out", required=True, help="output directory (new or empty)")
    export.add_argument("--scope", help="which copy of a PER_RANK/PER_GROUP/PER_NODE component (see `ckptd inspect`)")
    export.add_argument("--prefix", default="model", help="file name prefix (default model: model.safetensors)")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output file in GB (default 5)")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    status = commands.add_parser("status", help="the live daemon's saves in flight, with progress")
    status.add_argument("--endpoint", help="daemon endpoint (default $CKPTD_ENDPOINT, else the default for --root)")
    status.add_argument("--root", help="checkpoint root whose default endpoint to ask")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    status.add_argument("--json", action="store_true", help="machine-readable output")


class _ProgressBar:
    """A one-line progress bar of bytes checked, redrawn at most every 1%."""

    def __init__(self, stream: Any, total: int) -> None:
        self._stream, self._total, self._done, self._shown = stream, max(total, 1), 0, -1

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        percent = min(100, self._done * 100 // self._total)
        if percent != self._shown:
            self._shown = percent
            self._stream.write(f"\rverifying [{'#' * (percent // 4):<25}] {percent:3d}% "
                               f"of {self._total / 2**20:.0f} MiB")
            self._stream.flush()

    def finish(self) -> None:
        self._stream.write("\n")


def _listed_bytes(directories: List[str]) -> int:
    total = 0
    for directory in directories:
        try:
            total += sum(f.size for f in read_manifest_file(directory).files())
        except ManifestError:
            pass
    return total


def verify(args: argparse.Namespace) -> int:
    """`ckptd verify PATH|ROOT`: exit 0 only when every listed file matches its size and checksum."""
    directories = checkpoint_dirs(args.path) if os.path.isdir(args.path) else []
    if not directories:
        sys.stderr.write(f"ckptd verify: no checkpoint at or under {args.path}\n")
        return EXIT_ERROR
    bar = _ProgressBar(sys.stderr, _listed_bytes(directories)) if args.progress or (
        args.progress is None and sys.stderr.isatty()) else None
    results = {directory: verify_checkpoint(directory, bar.advance if bar else None) for directory in directories}
    if bar:
        bar.finish()
    if args.json:
        sys.stdout.write(json.dumps({d: [{"path": p.path, "reason": p.reason} for p in problems]
                                     for d, problems in results.items()}, indent=2) + "\n")
    else:
        for directory, problems in results.items():
            sys.stdout.write(f"{'BAD' if problems else 'OK '} {directory}\n")
            for problem in problems:
                sys.stdout.write(f"    {problem.path}: {problem.reason}\n")
    return EXIT_ERROR if any(results.values()) else EXIT_OK


def keygen(args: argparse.Namespace) -> int:
    """`ckptd keygen PATH`: write a new cluster secret."""
    try:
        write_secret(args.path)
    except FileExistsError:
        sys.stderr.write(f"ckptd keygen: {args.path} exists; remove it first to make a new secret\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"ckptd keygen: cannot create {args.path}: {exc.strerror}\n")
        return EXIT_ERROR
    sys.stdout.write(f"wrote {args.path}; give every daemon of the job --cluster-secret {args.path}\n")
    return EXIT_OK


def serve(args: argparse.Namespace) -> int:
    """`ckptd serve`: run the daemon in the foreground until SIGTERM/SIGINT (or idle exit)."""
    config = DaemonConfig(
        root=args.root, endpoint=args.endpoint, node=args.node, max_write_mbps=args.max_write_mbps,
        save_timeout=args.save_timeout, write_threads=args.write_threads, exit_when_idle=args.exit_when_idle,
        nice=args.nice, num_nodes=args.num_nodes, leader=args.leader, cluster_secret=args.cluster_secret,
        peer_timeout=args.peer_timeout, metrics_port=args.metrics_port, metrics_address=args.metrics_address,
        claim_ttl=args.claim_ttl,
    )
    try:
        asyncio.run(DaemonServer(config).serve())
    except DaemonConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except DaemonError as exc:
        log.error("%s", exc)
        return EXIT_ALREADY_SERVED
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `ckptd` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return serve(args)
    if args.command == "verify":
        return verify(args)
    if args.command == "keygen":
        return keygen(args)
    operator = {"ls": commands_module.ls, "inspect": commands_module.inspect, "gc": commands_module.gc,
                "export": commands_module.export, "status": commands_module.status}.get(args.command)
    return operator(args) if operator else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
