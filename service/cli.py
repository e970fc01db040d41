"""The `ckptd` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ckptd.disk.manifests import read_manifest
from ckptd.disk.objectstore import ObjectStoreError, ObjectStoreRoot
from ckptd.disk.root import checkpoint_dirs, node_copy_of, partner_root
from ckptd.disk.tiers import read_tiers_record
from ckptd.disk.verify import Problem, verify_checkpoint
from ckptd.proto import layout
from ckptd.proto.config import (
    CLUSTER_SECRET_ENV,
    ENDPOINT_ENV,
    LEADER_ENV,
    NODE_RANK_ENV,
    NUM_NODES_ENV,
    ExitCode,
    flag,
    is_repeated,
    scalar_type,
)
from ckptd.proto.manifest import ManifestError
from ckptd.proto.tiers import is_object_store
from ckptd.service import commands as commands_module
from ckptd.service.curve import write_secret
from ckptd.service.errors import DaemonConfigError, DaemonError
from ckptd.service.server import DaemonConfig, DaemonServer

log = logging.getLogger("ckptd")


@dataclass(frozen=True)
class _Flag:
    """How `ckptd serve` presents one DaemonConfig field; its type and default come from DaemonConfig."""

    help: str
    unset: str = ""
    """What a default of None means, for --help."""
    env: Optional[str] = None
    """The environment variable that, when set, replaces DaemonConfig's default."""
    metavar: Optional[str] = None


_SERVE_FLAGS: Dict[str, _Flag] = {
    "root": _Flag("checkpoint root directory"),
    "endpoint": _Flag("ZeroMQ endpoint to listen on", unset="per-user ipc:// socket for the root"),
    "node": _Flag("this node's index in the job; node 0's daemon commits", env=NODE_RANK_ENV),
    "num_nodes": _Flag("nodes in the job, one daemon each", env=NUM_NODES_ENV),
    "leader": _Flag(
        "node 0's commit leader: node 0 listens on PORT, the others connect to HOST:PORT; needed when --num-nodes > 1",
        env=LEADER_ENV,
        metavar="HOST:PORT",
    ),
    "cluster_secret": _Flag(
        "secret shared by the job's daemons, from `ckptd keygen`; needed when --num-nodes > 1",
        env=CLUSTER_SECRET_ENV,
        metavar="FILE",
    ),
    "metrics_port": _Flag("serve Prometheus metrics at http://ADDRESS:PORT/metrics", unset="off", metavar="PORT"),
    "metrics_address": _Flag("address the metrics listen on; 0.0.0.0 for a cluster scraper"),
    "peer_timeout": _Flag("seconds without a heartbeat before another node's daemon counts as gone"),
    "claim_ttl": _Flag(
        "how long another host's claim on a shared root counts as a live run's after its last renewal",
        metavar="SECONDS",
    ),
    "max_write_mbps": _Flag("cap on write bandwidth in MB/s", unset="no cap"),
    "save_timeout": _Flag("seconds a save may take from its first rank's hand-over to commit before it aborts"),
    "write_threads": _Flag("shard writer threads"),
    "nice": _Flag("CPU niceness to add, so training processes get the CPU first; 0 keeps it"),
    "tier": _Flag(
        "a slower tier filled from the root in the background, nearest first; repeat for more",
        unset="none",
        metavar="NAME=PATH[:every=N][:keep_last=K][:keep_every=M]",
    ),
    "tier_copy_mbps": _Flag(
        "cap on the bandwidth of the copies into the tiers and to the partner node, in MB/s", unset="no cap"
    ),
    "node_local_root": _Flag(
        "the root is on this node only (tmpfs, local NVMe): each node commits its own files there, and a load "
        "takes the files its node lacks from the other nodes or the next tier"
    ),
    "replicate_to_partner": _Flag(
        "also send this node's files of each checkpoint to the next node's daemon (a ring), so that a replaced "
        "node's state is still on a fast tier; implies --node-local-root"
    ),
    "partner_port": _Flag("TCP port the partner copies arrive on", unset="any free port", metavar="PORT"),
    "exit_when_idle": _Flag(
        "exit once no client process is alive and nothing happened for SECONDS", unset="never", metavar="SECONDS"
    ),
}
"""One entry per DaemonConfig field, in --help order."""


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(spec: _Flag, default: Any) -> str:
    """The flag's help with its default: the environment variable first, then DaemonConfig's value."""
    if spec.env:
        return f"{spec.help} (default ${spec.env}" + (f" or {_shown(default)})" if default is not None else ")")
    if default is None:
        return f"{spec.help} (default: {spec.unset})" if spec.unset else spec.help
    return f"{spec.help} (default {_shown(default)})"


def _env_default(name: Optional[str], kind: type, default: Any) -> Any:
    """`default`, unless environment variable `name` holds a value of `kind` (an int: digits only)."""
    raw = os.environ.get(name) if name else None
    if raw is None or (kind is int and not raw.strip().isdigit()):
        return default
    try:
        return kind(raw)
    except ValueError:
        return default


class _AppendTuple(argparse.Action):
    """A repeated flag collected into a tuple (argparse's "append" cannot start from an immutable default)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, (*getattr(namespace, self.dest), values))


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    """One flag per DaemonConfig field (`flag(name)`), typed and defaulted by the field."""
    config_fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    if set(config_fields) != set(_SERVE_FLAGS):
        raise RuntimeError(
            f"ckptd serve flags and DaemonConfig fields differ: {set(config_fields) ^ set(_SERVE_FLAGS)}"
        )
    hints = typing.get_type_hints(DaemonConfig)
    for name, spec in _SERVE_FLAGS.items():
        kind, default = scalar_type(hints[name]), config_fields[name].default
        if kind is bool:
            serve.add_argument(flag(name), action="store_true", help=f"{spec.help} (default: off)")
        elif is_repeated(hints[name]):
            serve.add_argument(
                flag(name), type=kind, action=_AppendTuple, default=(), metavar=spec.metavar, help=_help(spec, None)
            )
        elif default is dataclasses.MISSING:
            serve.add_argument(flag(name), type=kind, required=True, metavar=spec.metavar, help=spec.help)
        else:
            serve.add_argument(
                flag(name),
                type=kind,
                default=_env_default(spec.env, kind, default),
                metavar=spec.metavar,
                help=_help(spec, default),
            )


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The DaemonConfig parsed `ckptd serve` arguments ask for."""
    return DaemonConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DaemonConfig)})


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one subcommand per action."""
    parser = argparse.ArgumentParser(prog="ckptd", description="Asynchronous checkpoint service for PyTorch.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node-local writer daemon for a checkpoint root")
    _add_serve_options(serve)
    keygen = commands.add_parser("keygen", help="create the secret file that authenticates a job's daemons")
    keygen.add_argument("path", help="file to create (mode 0600; refuses to overwrite)")
    verify = commands.add_parser(
        "verify", help="check every file of a checkpoint (or of every checkpoint under a root)"
    )
    verify.add_argument("path", help="a checkpoint directory, or a checkpoint root")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
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
    gc.add_argument(
        "--min-age",
        type=float,
        default=commands_module.GC_MIN_AGE_S,
        metavar="SECONDS",
        help="only remove leftovers untouched for this long: younger ones may be saves in flight (default 3600)",
    )
    gc.add_argument("--keep-last", type=int, help="retention: keep the newest N (default: the daemon's last policy)")
    gc.add_argument("--keep-every", type=int, help="retention: keep every step divisible by N")
    gc.add_argument("--keep-best", type=int, help="retention: keep the N best by --best-metric")
    gc.add_argument("--best-metric", help="metric name passed to save_checkpoint(metrics=...)")
    gc.add_argument(
        "--best-mode", choices=("min", "max"), default="min", help="lower or higher is better (default min)"
    )
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    export = commands.add_parser("export", help="one component as consolidated safetensors files with an index")
    export.add_argument("path", help="a checkpoint directory")
    export.add_argument("--component", required=True, help="component key, e.g. model")
    export.add_argument("--out", required=True, help="output directory (new or empty)")
    export.add_argument("--scope", help="which copy of a PER_RANK/PER_GROUP/PER_NODE component (see `ckptd inspect`)")
    export.add_argument(
        "--select",
        help="only the tensors under this key path, named relative to it (e.g. model, of a SHARDED train state)",
    )
    export.add_argument("--prefix", default="model", help="file name prefix (default model: model.safetensors)")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output file in GB (default 5)")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    status = commands.add_parser("status", help="the live daemon's saves in flight, with progress")
    status.add_argument("--endpoint", help=f"daemon endpoint (default ${ENDPOINT_ENV}, else the default for --root)")
    status.add_argument("--root", help="checkpoint root whose default endpoint to ask")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--cluster",
        action="store_true",
        help="every node's daemon as node 0's daemon (the commit leader) sees it: alive, last heartbeat, "
        "saves in flight with durable ranks, lag",
    )


class _ProgressBar:
    """A one-line progress bar of bytes checked, redrawn at most every 1%."""

    def __init__(self, stream: Any, total: int) -> None:
        self._stream, self._total, self._done, self._shown = stream, max(total, 1), 0, -1

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        percent = min(100, self._done * 100 // self._total)
        if percent != self._shown:
            self._shown = percent
            self._stream.write(
                f"\rverifying [{'#' * (percent // 4):<25}] {percent:3d}% of {self._total / 2**20:.0f} MiB"
            )
            self._stream.flush()

    def finish(self) -> None:
        self._stream.write("\n")


def _listed_bytes(directories: List[str]) -> int:
    total = 0
    for directory in directories:
        try:
            total += sum(f.size for f in read_manifest(directory).files())
        except ManifestError:
            pass
    return total


def verify(args: argparse.Namespace) -> int:
    """`ckptd verify PATH|ROOT`: exit 0 only when every listed file matches its size and checksum;
    given a root, its tiers' checkpoints are checked too (an object store's read in full)."""
    directories = checkpoint_dirs(args.path) if os.path.isdir(args.path) else []
    stores: List[str] = []
    node = node_copy_of(os.path.realpath(args.path))
    partial = set(directories) if node is not None else set()  # one node's copies: the others hold the rest
    if node is not None:
        partners = checkpoint_dirs(partner_root(args.path))
        directories += partners
        partial.update(partners)
    if directories and directories != [args.path]:  # a root: its tiers' checkpoints too
        for spec in read_tiers_record(os.path.realpath(args.path)):
            if is_object_store(spec.path):
                stores.append(spec.path)
            else:
                directories += checkpoint_dirs(spec.path)
    if not directories:
        sys.stderr.write(f"ckptd verify: no checkpoint at or under {args.path}\n")
        return ExitCode.ERROR
    bar = (
        _ProgressBar(sys.stderr, _listed_bytes(directories))
        if args.progress or (args.progress is None and sys.stderr.isatty())
        else None
    )
    results = {
        directory: verify_checkpoint(directory, bar.advance if bar else None, held_only=directory in partial)
        for directory in directories
    }
    if bar:
        bar.finish()
    for url in stores:
        results.update(_verify_object_store(url))
    if args.json:
        sys.stdout.write(
            json.dumps(
                {d: [{"path": p.path, "reason": p.reason} for p in problems] for d, problems in results.items()},
                indent=2,
            )
            + "\n"
        )
    else:
        if node is not None:
            sys.stdout.write(
                f"{args.path} is node {node}'s root (--node-local-root): its checkpoints hold that node's files, "
                "and partner/ the previous node's; the other files are on the other nodes\n"
            )
        for directory, problems in results.items():
            sys.stdout.write(f"{'BAD' if problems else 'OK '} {directory}\n")
            for problem in problems:
                sys.stdout.write(f"    {problem}\n")
    return ExitCode.ERROR if any(results.values()) else ExitCode.OK


def _verify_object_store(url: str) -> Dict[str, List[Problem]]:
    """Each committed checkpoint of an object-store tier -> its problems (one, if it cannot be listed)."""
    try:
        root = ObjectStoreRoot(url)
        steps = root.committed_steps()
    except ObjectStoreError as exc:
        return {url: [Problem(url, f"cannot be listed: {exc}")]}
    return {f"{url}/{layout.checkpoint_dir_name(step)}": root.verify(step) for step in steps}


def keygen(args: argparse.Namespace) -> int:
    """`ckptd keygen PATH`: write a new cluster secret."""
    try:
        write_secret(args.path)
    except FileExistsError:
        sys.stderr.write(f"ckptd keygen: {args.path} exists; remove it first to make a new secret\n")
        return ExitCode.ERROR
    except OSError as exc:
        sys.stderr.write(f"ckptd keygen: cannot create {args.path}: {exc.strerror}\n")
        return ExitCode.ERROR
    sys.stdout.write(f"wrote {args.path}; give every daemon of the job --cluster-secret {args.path}\n")
    return ExitCode.OK


def serve(args: argparse.Namespace) -> int:
    """`ckptd serve`: run the daemon in the foreground until SIGTERM/SIGINT (or idle exit)."""
    try:
        asyncio.run(DaemonServer(daemon_config(args)).serve())
    except DaemonConfigError as exc:
        log.error("%s", exc)
        return ExitCode.USAGE
    except DaemonError as exc:
        log.error("%s", exc)
        return ExitCode.ALREADY_SERVED
    return ExitCode.OK


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
    operator = {
        "ls": commands_module.ls,
        "inspect": commands_module.inspect,
        "gc": commands_module.gc,
        "export": commands_module.export,
        "status": commands_module.status,
    }.get(args.command)
    return operator(args) if operator else ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
