"""Test helpers: real daemon processes on private endpoints, torchrun launches, small statefuls."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import msgpack
import pytest

from ckptd.client.daemon import connect
from ckptd.client.errors import DaemonUnavailableError
from ckptd.disk import runtime


@dataclass
class Daemon:
    """A `ckptd serve` process started by a test."""

    root: Path
    endpoint: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_endpoint() -> str:
    """A private ipc:// endpoint in this session's runtime directory (conftest), with a path short
    enough for the 107-byte socket limit."""
    directory = runtime.runtime_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return f"ipc://{directory}/test-{uuid.uuid4().hex[:10]}.sock"


def start_daemon(root: Path, log_path: Path, *extra: str, endpoint: Optional[str] = None, wait: bool = True) -> Daemon:
    """Start `ckptd serve` for `root` and wait until it answers."""
    endpoint = endpoint or short_endpoint()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ckptd.service", "serve", "--root", str(root), "--endpoint", endpoint, *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(root, endpoint, process, log_path)
    if wait:
        wait_until_serving(daemon)
    return daemon


def wait_until_serving(daemon: Daemon, timeout: float = 30.0) -> None:
    """Block until the daemon answers a hello, or fail with its log."""
    try:
        connection, _ = connect(str(daemon.root), daemon.endpoint, lambda _: None, may_start=False, wait_s=timeout)
    except DaemonUnavailableError:
        raise AssertionError(f"daemon did not come up; log:\n{daemon.log()}") from None
    connection.close()


def with_own_dev_shm(tmpfs_options: str, *command: str) -> List[str]:
    """`command` run in a mount namespace of its own whose /dev/shm is a fresh tmpfs mounted with
    `tmpfs_options` (needs root and unshare(1)); the machine's /dev/shm is left as it is."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o {tmpfs_options} tmpfs /dev/shm && exec "$@"',
        "sh",
        *command,
    ]


def raw_save_body(
    root: str,
    step: int = 1,
    rank: int = 0,
    world_size: int = 1,
    key: str = "model",
    job: str = "raw",
    state: Any = None,
) -> Dict[str, Any]:
    """A valid save request body, as a client would send it: one GLOBAL component with no tensors,
    whose non-tensor state (`state`, default {"a": 1}) rank 0 writes."""
    part = {
        "key": key,
        "pattern": "GLOBAL",
        "required": True,
        "writer": rank == 0,
        "group_name": None,
        "group_ranks": [],
        "validate_replication": False,
        "metadata": {},
        "region": None,
        "lease": 1,
        "region_size": 0,
        "tensors": [],
        "state": msgpack.packb({"a": 1} if state is None else state) if rank == 0 else None,
        "digests": None,
    }
    return {
        "root": root,
        "step": step,
        "rank": rank,
        "pid": os.getpid(),
        "job": job,
        "topology": {"nodes": [list(range(world_size))]},
        "parts": [part],
        "versions": {},
        "metrics": {},
        "expires_at": time.monotonic() + 600,
    }


class Holder:
    """A minimal stateful around one state value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state_dict: Any) -> None:
        self.value = state_dict


def torchrun_environment(rank: int, world: int, nodes: int, port: int, run_id: str) -> Dict[str, str]:
    """What torchrun puts in a rank's environment: `world` ranks over `nodes` nodes of equal size, the
    rendezvous store of rank 0 on loopback `port`."""
    per_node = world // nodes
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % per_node),
        "GROUP_RANK": str(rank // per_node),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(per_node),
        "ROLE_WORLD_SIZE": str(world),
        "GROUP_WORLD_SIZE": str(nodes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def torchrun(
    script: Path, nproc: int, *args: str, timeout: float = 240, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """Run `script` as a standalone job of `nproc` ranks with the environment torchrun gives them (one
    node, rendezvous on loopback; the script makes its gloo group), and fail with its output if a rank
    fails (the others are then terminated, as torchrun does). Each rank is a fresh process forked by
    the session's RankForker, which imported torch once: the examples' own tests, the multi-node tests
    and the deploy wrapper's run `python -m torch.distributed.run` itself."""
    port, run_id = free_port(), uuid.uuid4().hex[:12]
    logs = Path(tempfile.mkdtemp(prefix="ckptd-ranks-"))
    base = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    ranks = []
    for rank in range(nproc):
        rank_env = {**base, **torchrun_environment(rank, nproc, 1, port, run_id)}
        ranks.append(([str(script), *args], rank_env, logs / f"rank{rank}.log"))
    try:
        try:
            codes = rank_forker().run(ranks, timeout)
        except TimeoutError:
            codes = None
        output = "\n".join(f"[rank{r}] " + log.read_text(errors="replace") for r, (_, _, log) in enumerate(ranks))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    if codes is None or any(codes):
        what = f"timed out after {timeout} s" if codes is None else f"exit statuses {codes}"
        raise AssertionError(f"torchrun {script.name} {' '.join(args)} failed ({what}):\n{output[-12000:]}")
    return subprocess.CompletedProcess([str(script), *args], 0, output, "")


class ForkedJob:
    """The ranks of one job a RankForker started."""

    def __init__(self, forker: RankForker, pids: List[int]) -> None:
        self.forker, self.pids = forker, pids
        self.codes: Optional[List[int]] = None

    def wait(self, timeout: float) -> List[int]:
        """Every rank's exit status (-N: killed by signal N); TimeoutError if one still runs after `timeout`."""
        if self.codes is None:
            self.codes = self.forker._reply("codes", timeout)
        return self.codes

    def kill(self) -> None:
        """SIGKILL every rank still running and reap them."""
        if self.codes is None:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.wait(30)


_FORKER: Optional["RankForker"] = None


def rank_forker() -> "RankForker":
    """This test session's RankForker (started at the first use, ended when the session ends)."""
    global _FORKER
    if _FORKER is None or _FORKER.process.poll() is not None:
        _FORKER = RankForker(Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / "rank-forker.log")
        atexit.register(_FORKER.close)
    return _FORKER


def saved_state(checkpoint: str, key: str) -> Any:
    """The state component `key` holds in a committed checkpoint (a component saved in one copy),
    read back and verified."""
    from ckptd.client.loading import read_manifest, read_scope

    (scope,) = read_manifest(checkpoint).components[key].scopes.values()
    return read_scope(checkpoint, scope)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll until `predicate()` is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def running_s3_server(monkeypatch: pytest.MonkeyPatch, log_path: Path, authenticate: bool = False) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto in server mode) on loopback; the standard AWS environment
    points boto3 at it (AWS_ENDPOINT_URL_S3, test credentials), in this process and in the daemons
    started after. With `authenticate`, it checks every request's credentials (and knows none).
    Yields its endpoint URL."""
    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (an authenticating server refuses the anonymous probe)
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError(f"moto server did not start: {log_path.read_text()}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
        log.close()


RANK_FORKER = Path(__file__).parent / "workers" / "rank_forker.py"


class RankForker:
    """Starts the ranks of jobs as processes forked from one that imported torch and ckptd once
    (tests/workers/rank_forker.py): fresh rank processes without paying torch's import for each."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(RANK_FORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        self.replies: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _reply(self, key: str, timeout: float) -> List[int]:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no {key} from the rank forker within {timeout} s") from None
        if reply is None:
            raise AssertionError(f"the rank forker exited: {self.log_path.read_text(errors='replace')[-4000:]}")
        return list(reply[key])

    def start(self, ranks: Sequence[Tuple[Sequence[str], Dict[str, str], Path]]) -> "ForkedJob":
        """Start one job: each rank (argv: script and arguments, its whole environment, the file its
        output is appended to) forked at once. One job at a time: wait for it before the next."""
        assert self.process.stdin is not None
        job = [{"argv": list(argv), "env": env, "log": str(log)} for argv, env, log in ranks]
        self.process.stdin.write(json.dumps({"ranks": job}) + "\n")
        self.process.stdin.flush()
        return ForkedJob(self, self._reply("pids", 120))

    def run(self, ranks: Sequence[Tuple[Sequence[str], Dict[str, str], Path]], timeout: float) -> List[int]:
        """Run one job (as `start`); the ranks' exit statuses once all have exited. After `timeout`
        every rank still running is SIGKILLed and TimeoutError raised."""
        job = self.start(ranks)
        try:
            return job.wait(timeout)
        except TimeoutError:
            job.kill()
            raise

    def close(self) -> None:
        """End the forker (its ranks have all exited by now)."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
