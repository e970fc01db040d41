"""The configuration both sides agree on: environment names, `ckptd` exit codes, and the options a
client may give a daemon it auto-starts, rendered as `ckptd serve` arguments.

Pure Python: no torch, no zmq, no I/O. The defaults of these options are stated once, in the
daemon's `DaemonConfig` (ckptd.service.server); None here always means "the daemon's default".
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

ENDPOINT_ENV = "CKPTD_ENDPOINT"
"""The daemon endpoint a client connects to (and `ckptd status` asks) when none is given."""
NODE_RANK_ENV = "CKPTD_NODE_RANK"
"""`ckptd serve --node` when the flag is not given: this node's index in the job."""
NUM_NODES_ENV = "CKPTD_NUM_NODES"
"""`ckptd serve --num-nodes` when the flag is not given: the job's node count."""
LEADER_ENV = "CKPTD_LEADER"
"""`ckptd serve --leader` when the flag is not given: HOST:PORT of node 0's commit leader."""
CLUSTER_SECRET_ENV = "CKPTD_CLUSTER_SECRET"
"""`ckptd serve --cluster-secret` when the flag is not given: the job's shared secret file."""

ENVIRONMENT: Tuple[str, ...] = (ENDPOINT_ENV, NODE_RANK_ENV, NUM_NODES_ENV, LEADER_ENV, CLUSTER_SECRET_ENV)
"""Every environment variable ckptd's Python code reads."""


class ExitCode(enum.IntEnum):
    """Exit statuses of the `ckptd` command (the client reads them from a daemon it started)."""

    OK = 0
    """Done; for `verify`, every file matched."""
    ERROR = 1
    """The command failed (a checkpoint did not verify, a file could not be written, ...)."""
    USAGE = 2
    """Settings refused: bad arguments, or a daemon configuration that cannot work. Starting the
    same daemon again will fail again, so a client that started it gives up at once."""
    ALREADY_SERVED = 3
    """Another daemon already serves the root on this node, or the endpoint is in the way."""


_UNIONS = (Union, getattr(types, "UnionType", Union))


def flag(name: str) -> str:
    """The `ckptd serve` flag of option `name` (`max_write_mbps` -> `--max-write-mbps`)."""
    return "--" + name.replace("_", "-")


def _unwrap_optional(hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in _UNIONS and len(args) == 1:
        return args[0]
    return hint


def is_repeated(hint: Any) -> bool:
    """True for an option given once per value (`Tuple[str, ...]`, optional or not): `--tier A --tier B`."""
    inner = _unwrap_optional(hint)
    args = typing.get_args(inner)
    return typing.get_origin(inner) is tuple and len(args) == 2 and args[1] is Ellipsis


def scalar_type(hint: Any) -> type:
    """The value type of a resolved field annotation: `int` for `int` and for `Optional[int]`; `str`
    for a repeated option `Tuple[str, ...]`."""
    inner = _unwrap_optional(hint)
    if is_repeated(inner):
        inner = typing.get_args(inner)[0]
    if isinstance(inner, type):
        return inner
    raise TypeError(f"not a scalar option type: {hint!r}")


@dataclass(frozen=True)
class DaemonOptions:
    """What a client may ask of a daemon it auto-starts: each field is the `ckptd serve` option of
    the same name (`flag(name)`), and None leaves the daemon's default (see `ckptd serve --help`).
    The client itself chooses the root and endpoint, and the node and node count in a multi-node job
    unless given here."""

    node: Optional[int] = None
    num_nodes: Optional[int] = None
    leader: Optional[str] = None
    cluster_secret: Optional[str] = None
    max_write_mbps: Optional[float] = None
    save_timeout: Optional[float] = None
    write_threads: Optional[int] = None
    nice: Optional[int] = None
    exit_when_idle: Optional[float] = None
    peer_timeout: Optional[float] = None
    metrics_port: Optional[int] = None
    metrics_address: Optional[str] = None
    claim_ttl: Optional[float] = None
    tier: Optional[Tuple[str, ...]] = None
    tier_copy_mbps: Optional[float] = None
    node_local_root: Optional[bool] = None
    replicate_to_partner: Optional[bool] = None
    partner_port: Optional[int] = None

    def __post_init__(self) -> None:
        kinds = _option_kinds()
        repeated = _repeated_options()
        for name, value in self.values().items():
            kind = (int, float) if kinds[name] is float else kinds[name]
            if name in repeated:
                if not isinstance(value, tuple) or not all(isinstance(v, kind) for v in value):
                    raise TypeError(
                        f"DaemonOptions.{name} must be a tuple of {kinds[name].__name__} or None, not {value!r}"
                    )
            elif isinstance(value, bool) is not (kinds[name] is bool) or not isinstance(value, kind):
                raise TypeError(f"DaemonOptions.{name} must be {kinds[name].__name__} or None, not {value!r}")

    def values(self) -> Dict[str, Any]:
        """The options that are set, by name, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def fill(self, **fallbacks: Any) -> "DaemonOptions":
        """A copy where each of `fallbacks` sets a field this one leaves None."""
        return replace(self, **{name: value for name, value in fallbacks.items() if getattr(self, name) is None})

    def argv(self) -> List[str]:
        """The `ckptd serve` arguments that ask for these options (none for a field left None)."""
        repeated = _repeated_options()
        argv: List[str] = []
        for name, value in self.values().items():
            if isinstance(value, bool):  # a switch: given or not
                argv.extend([flag(name)] if value else [])
                continue
            for one in value if name in repeated else (value,):
                argv.extend((flag(name), str(one)))
        return argv


DaemonArgs = Union[DaemonOptions, Sequence[str]]
"""What a client takes as `daemon_args`: DaemonOptions, or `ckptd serve` arguments as strings, passed
through as given (after the client's own, so that they override them)."""


def with_fallbacks(daemon_args: DaemonArgs, **fallbacks: Any) -> DaemonArgs:
    """`daemon_args` with `fallbacks` (DaemonOptions fields) wherever it does not set them itself."""
    if isinstance(daemon_args, DaemonOptions):
        return daemon_args.fill(**fallbacks)
    return (*DaemonOptions(**fallbacks).argv(), *serve_argv(daemon_args))


def serve_argv(daemon_args: DaemonArgs) -> List[str]:
    """The `ckptd serve` arguments `daemon_args` stands for."""
    if isinstance(daemon_args, DaemonOptions):
        return daemon_args.argv()
    if isinstance(daemon_args, (str, bytes)) or not all(isinstance(arg, str) for arg in daemon_args):
        raise TypeError(f"daemon_args must be DaemonOptions or a sequence of strings, not {daemon_args!r}")
    return list(daemon_args)


@functools.lru_cache(maxsize=None)
def _repeated_options() -> "frozenset[str]":
    """The DaemonOptions fields given once per value."""
    return frozenset(name for name, hint in typing.get_type_hints(DaemonOptions).items() if is_repeated(hint))


@functools.lru_cache(maxsize=None)
def _option_kinds() -> Dict[str, type]:
    """Each DaemonOptions field's value type."""
    return {name: scalar_type(hint) for name, hint in typing.get_type_hints(DaemonOptions).items()}
