"""One configuration surface: `ckptd serve` takes its flags and defaults from DaemonConfig, the client's
DaemonOptions render arguments that parse back into the same DaemonConfig, the manager's options are one
dataclass that keywords override, and environment names and exit codes are defined once, in proto."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import Holder, short_endpoint

from ckptd.client import (
    CheckpointClient,
    CheckpointManager,
    CheckpointManagerOptions,
    ClientOptions,
    DaemonOptions,
    RankInfo,
    RetentionPolicy,
    SharingPattern,
    StateComponent,
    Topology,
)
from ckptd.client import daemon as client_daemon
from ckptd.client import manager as manager_module
from ckptd.client import saving as saving_module
from ckptd.proto import config
from ckptd.proto.config import ENVIRONMENT, ExitCode, flag, is_repeated, scalar_type, serve_argv, with_fallbacks
from ckptd.service import cli
from ckptd.service.server import DaemonConfig

ROOT = "/ckpt/root"
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}
CLIENT_CHOSEN = {"root", "endpoint"}
"""DaemonConfig fields the client sets itself when it starts a daemon (not DaemonOptions)."""


@pytest.fixture(autouse=True)
def no_ckptd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags' environment defaults stay out of the way unless a test sets them."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def parse_serve(*argv: str) -> DaemonConfig:
    """What `ckptd serve ARGV` would run with."""
    return cli.daemon_config(cli.build_parser().parse_args(["serve", *argv]))


def sample_options() -> DaemonOptions:
    """DaemonOptions with every field set, to a value no default has (derived from the field types,
    so that a new option is covered without editing this test)."""
    values: Dict[str, Any] = {}
    for index, (name, hint) in enumerate(typing.get_type_hints(DaemonOptions).items(), start=2):
        kind = scalar_type(hint)
        value = {int: index, float: index + 0.25, str: f"value-{index}", bool: True}[kind]
        values[name] = (value, value * 2) if is_repeated(hint) else value
    return DaemonOptions(**values)


class Provider:
    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", Holder({"w": torch.ones(4)}), SharingPattern.GLOBAL)]


def test_serve_flags_default_to_daemon_config_defaults() -> None:
    args = cli.build_parser().parse_args(["serve", "--root", ROOT])
    for name, field in CONFIG_FIELDS.items():
        if name != "root":
            assert getattr(args, name) == field.default, name
    assert cli.daemon_config(args) == DaemonConfig(root=ROOT)


def test_serve_help_shows_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    starts = sorted((text.index(f" {flag(name)} "), name) for name in CONFIG_FIELDS)
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
        entry = text[start:end]
        field = CONFIG_FIELDS[name]
        if field.default is dataclasses.MISSING:
            continue
        assert "(default" in entry, entry
        if field.default is False:  # a switch
            assert "(default: off)" in entry, (name, entry)
        elif field.default not in (None, ()):
            shown = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
            assert re.search(rf"\(default [^)]*\b{re.escape(shown)}\)", entry), (name, entry)


def test_serve_flags_still_read_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.NODE_RANK_ENV, "2")
    monkeypatch.setenv(config.NUM_NODES_ENV, "3")
    monkeypatch.setenv(config.LEADER_ENV, "node0:7000")
    monkeypatch.setenv(config.CLUSTER_SECRET_ENV, "/etc/ckptd.secret")
    assert parse_serve("--root", ROOT) == DaemonConfig(
        root=ROOT, node=2, num_nodes=3, leader="node0:7000", cluster_secret="/etc/ckptd.secret"
    )
    assert parse_serve("--root", ROOT, "--node", "1", "--leader", "other:1").node == 1
    assert parse_serve("--root", ROOT, "--node", "1", "--leader", "other:1").leader == "other:1"
    monkeypatch.setenv(config.NODE_RANK_ENV, "not-a-number")
    assert parse_serve("--root", ROOT).node == 0


def test_daemon_options_name_every_daemon_setting_with_its_type() -> None:
    option_kinds = {name: scalar_type(hint) for name, hint in typing.get_type_hints(DaemonOptions).items()}
    config_kinds = {name: scalar_type(hint) for name, hint in typing.get_type_hints(DaemonConfig).items()}
    assert option_kinds == {name: kind for name, kind in config_kinds.items() if name not in CLIENT_CHOSEN}


def test_daemon_options_round_trip_through_the_cli() -> None:
    options = sample_options()
    endpoint = short_endpoint()
    parsed = parse_serve("--root", ROOT, "--endpoint", endpoint, *options.argv())
    assert parsed == DaemonConfig(root=ROOT, endpoint=endpoint, **options.values())
    assert parse_serve("--root", ROOT, *DaemonOptions().argv()) == DaemonConfig(root=ROOT)
    assert parse_serve("--root", ROOT, *DaemonOptions(nice=0).argv()).nice == 0


def test_daemon_options_refuse_values_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="write_threads must be int"):
        DaemonOptions(write_threads="4")
    with pytest.raises(TypeError, match="daemon_args must be DaemonOptions or a sequence of strings"):
        serve_argv("--nice 0")


def test_the_client_fills_in_what_the_options_leave_to_it() -> None:
    filled = with_fallbacks(DaemonOptions(nice=0, exit_when_idle=1.0), exit_when_idle=30.0, node=1)
    assert filled == DaemonOptions(nice=0, exit_when_idle=1.0, node=1)
    strings = with_fallbacks(["--exit-when-idle", "1"], exit_when_idle=30.0)
    assert parse_serve("--root", ROOT, *serve_argv(strings)).exit_when_idle == 1.0  # the caller's come last


@pytest.mark.parametrize(
    "daemon_args", [DaemonOptions(max_write_mbps=4.0), ["--max-write-mbps", "4"]], ids=["options", "strings"]
)
def test_an_auto_started_daemon_gets_the_options(
    daemon_args: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: List[List[str]] = []
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(client_daemon.subprocess, "Popen", lambda command, **_: started.append(command) or _Exited())
    client_daemon.start_daemon(ROOT, "ipc:///tmp/x.sock", daemon_args)
    serve = started[0].index("serve")
    assert parse_serve(*started[0][serve + 1 :]) == DaemonConfig(
        root=ROOT, endpoint="ipc:///tmp/x.sock", exit_when_idle=client_daemon.IDLE_EXIT_S, max_write_mbps=4.0
    )


class _Exited:
    pid = 0


class _Connected(Exception):
    """Raised by the stand-in for connect(), with what the client asked of it."""


@pytest.mark.parametrize(
    "daemon_args,expected",
    [
        (DaemonOptions(max_write_mbps=4.0), DaemonOptions(node=1, num_nodes=2, max_write_mbps=4.0)),
        (DaemonOptions(node=0), DaemonOptions(node=0, num_nodes=2)),
        (["--max-write-mbps", "4"], ("--node", "1", "--num-nodes", "2", "--max-write-mbps", "4")),
    ],
    ids=["options", "options-own-node", "strings"],
)
def test_a_multi_node_client_tells_its_daemon_its_place(
    daemon_args: Any, expected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def connect(*_: Any, daemon_args: Any, **__: Any) -> Any:
        raise _Connected(daemon_args)

    monkeypatch.setattr(saving_module, "connect", connect)
    rank_on_node_1 = RankInfo(2, Topology(((0, 1), (2, 3))), job_id="job")
    with pytest.raises(_Connected) as asked:
        CheckpointClient(str(tmp_path), rank_on_node_1, endpoint=short_endpoint(), daemon_args=daemon_args)
    assert asked.value.args[0] == expected


MANAGER_SETTINGS: Dict[str, Any] = dict(
    endpoint="ipc:///tmp/elsewhere.sock",
    auto_start=False,
    when_busy="skip",
    timeout=5.0,
    connect_timeout=7.0,
    daemon_args=DaemonOptions(nice=0, max_write_mbps=8.0),
    retention=RetentionPolicy(keep_last=2),
    daemon_timeout=3.0,
    tiers=("shared=/shared/job:every=5",),
    huge_pages=False,
    verify=False,
)
"""A value other than the default for every CheckpointManagerOptions field but `connect`."""


def test_the_manager_takes_options_or_keywords_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(MANAGER_SETTINGS) | {"connect"} == {f.name for f in dataclasses.fields(CheckpointManagerOptions)}
    given: List[ClientOptions] = []
    monkeypatch.setattr(manager_module, "CheckpointClient", lambda root, rank_info, options: given.append(options))
    rank = RankInfo(0, Topology.single_node(1), job_id="options")
    by_keywords = CheckpointManager(Provider(), str(tmp_path), rank_info=rank, connect=False, **MANAGER_SETTINGS)
    by_options = CheckpointManager(
        Provider(), str(tmp_path), CheckpointManagerOptions(connect=False, **MANAGER_SETTINGS), rank_info=rank
    )
    assert by_keywords.options == by_options.options == CheckpointManagerOptions(connect=False, **MANAGER_SETTINGS)
    assert by_keywords.verify is by_options.verify is False
    by_keywords.connect(), by_options.connect()  # hands the options to the client
    assert given == [by_keywords.options, by_options.options]
    overridden = CheckpointManager(Provider(), str(tmp_path), by_options.options, rank_info=rank, when_busy="wait")
    assert overridden.options == dataclasses.replace(by_options.options, when_busy="wait")


def test_string_daemon_args_are_kept_as_given() -> None:
    options = CheckpointManagerOptions(daemon_args=["--exit-when-idle", "1"])
    assert options == CheckpointManagerOptions(daemon_args=("--exit-when-idle", "1"))
    assert options.daemon_args == ("--exit-when-idle", "1")


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"when_busy": "later"}, "when_busy must be 'wait' or 'skip', not 'later'"),
        ({"daemon_timeout": 0}, "daemon_timeout must be positive, not 0"),
    ],
    ids=["when_busy", "daemon_timeout"],
)
def test_settings_are_checked_once_before_any_connection(setting: Dict[str, Any], message: str, tmp_path: Path) -> None:
    rank = RankInfo(0, Topology.single_node(1), job_id="checked")
    builders = [
        lambda: ClientOptions(**setting),
        lambda: CheckpointManagerOptions(**setting),
        lambda: CheckpointManager(Provider(), str(tmp_path), rank_info=rank, connect=False, **setting),
        lambda: CheckpointClient(str(tmp_path), rank, endpoint=short_endpoint(), auto_start=False, **setting),
    ]
    for build in builders:
        with pytest.raises(ValueError, match=re.escape(message)):
            build()


def test_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="when_bussy"):
        CheckpointManager(
            Provider(), str(tmp_path), rank_info=RankInfo(0, Topology.single_node(1)), connect=False, when_bussy="skip"
        )


def test_exit_codes_are_the_proto_ones_in_the_cli_and_the_client() -> None:
    assert cli.ExitCode is client_daemon.ExitCode is config.ExitCode
    for module in (cli, client_daemon, saving_module, manager_module):
        copies = {
            name: value
            for name, value in vars(module).items()
            if "EXIT" in name and isinstance(value, int) and not isinstance(value, ExitCode)
        }
        assert copies == {}, f"{module.__name__} defines its own exit codes: {copies}"


def test_environment_names_are_the_proto_ones_in_the_cli_and_the_client() -> None:
    assert client_daemon.ENDPOINT_ENV is config.ENDPOINT_ENV
    for module in (cli, client_daemon, saving_module, manager_module):
        source = Path(module.__file__).read_text()
        assert not re.findall(r"[\"']CKPTD_[A-Z_]+[\"']", source), module.__name__


def test_the_config_module_stays_pure() -> None:
    probe = "import sys, ckptd.proto.config; print(sorted({'torch', 'zmq'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
