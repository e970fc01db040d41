"""Shared fixtures: real daemon processes, in-process clients posing as ranks."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers, fidelity_cases and workers import as plain modules

from helpers import Daemon, running_s3_server, start_daemon

from ckptd.client import CheckpointClient, RankInfo, Topology


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long stress variants")
    parser.addoption(
        "--run-slurm", action="store_true", help="run the cluster-script tests (installs Slurm; ./dev test-slurm)"
    )


RUN_DIR = pytest.StashKey[str]()
FAILED = pytest.StashKey[bool]()


def pytest_configure(config: Any) -> None:
    """Give the session a runtime directory of its own (XDG_RUNTIME_DIR, which its daemons inherit):
    the sockets, locks and logs of the hundreds of daemons a run starts, some of them killed on
    purpose, go there and not into the user's own (where a real daemon may be serving)."""
    run_dir = tempfile.mkdtemp(prefix="ckptd-tests-")
    config.stash[RUN_DIR] = run_dir
    os.environ["XDG_RUNTIME_DIR"] = run_dir


def pytest_unconfigure(config: Any) -> None:
    """Remove the session's runtime directory, unless a test failed (its daemons' logs are there)."""
    run_dir = config.stash.get(RUN_DIR, None)
    if run_dir is None:
        return
    if config.stash.get(FAILED, False):
        sys.stderr.write(f"kept the failed session's daemon sockets, locks and logs in {run_dir}\n")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Note whether the session failed, for pytest_unconfigure."""
    session.config.stash[FAILED] = exitstatus not in (0, 5)  # 5: no tests collected


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    """Long stress variants (marked slow) run only with --run-slow; CI runs their bounded versions.
    The cluster-script tests (marked slurm) run only with --run-slurm."""
    for marker, option in (("slow", "--run-slow"), ("slurm", "--run-slurm")):
        if config.getoption(option):
            continue
        skipped = [item for item in items if item.get_closest_marker(marker)]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons for a test; every one is stopped (and must not have crashed) at teardown."""
    started: List[Daemon] = []

    def factory(*extra: str, root: Optional[Path] = None, wait: bool = True, endpoint: Optional[str] = None) -> Daemon:
        daemon = start_daemon(
            root or tmp_path / "ckpt", tmp_path / f"daemon{len(started)}.log", *extra, wait=wait, endpoint=endpoint
        )
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One daemon serving tmp_path/ckpt."""
    return daemon_factory()


@pytest.fixture
def client_factory(daemon: Daemon) -> Iterator[Callable[..., CheckpointClient]]:
    """In-process clients posing as ranks of a single-node job (real sockets, real shared memory)."""
    clients: List[CheckpointClient] = []

    def factory(rank: int = 0, world_size: int = 1, **options: Any) -> CheckpointClient:
        options.setdefault("auto_start", False)
        options.setdefault("timeout", 60.0)
        client = CheckpointClient(
            str(daemon.root), RankInfo(rank, Topology.single_node(world_size)), endpoint=daemon.endpoint, **options
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close(timeout=10)


@pytest.fixture(scope="module")
def _module_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, Dict[str, str]]]:
    """One S3 server for a test module (each test uses prefixes of its own): (endpoint, environment)."""
    with pytest.MonkeyPatch.context() as patch:
        with running_s3_server(patch, tmp_path_factory.mktemp("s3") / "moto.log") as endpoint:
            import boto3

            boto3.session.Session().client("s3").create_bucket(Bucket="ckptd-test")
            yield endpoint, {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@pytest.fixture
def s3_server(_module_s3_server: Tuple[str, Dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> str:
    """A real S3-compatible server (moto, server mode) on loopback with a bucket `ckptd-test`, the
    AWS environment of this test (and of the daemons it starts) pointing at it; yields its endpoint URL."""
    endpoint, environment = _module_s3_server
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return endpoint
