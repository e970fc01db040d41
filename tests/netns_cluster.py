"""Simulated nodes in network namespaces, for the scale tests and bench/bench_scale.py (issue 17).

Each node is a real `ckptd serve` process in a network namespace of its own, joined to the others by
a veth pair to one bridge; the namespaces' addresses (10.77.0.0/16) are the only TCP targets. The
commit leader is node 0 at 10.77.0.1. The ranks are `LightRanks`: one asyncio process plays every
rank of every node over the real client protocol (ipc:// sockets, which namespaces do not separate),
each rank saving a tiny GLOBAL and PER_RANK state, so that hundreds of nodes fit in 2 cores.

Partitions: `partition(node)` takes the node's link down (this kernel has no `tc netem`); `heal`
brings it back up. Needs root (CI and `./dev` run as root); `netns_available()` says whether it can.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import msgpack
import zmq

from ckptd.proto import messages
from ckptd.service.loop_socket import LoopSocket

SUBNET = "10.77"
LEADER_PORT = 29650


def netns_available() -> bool:
    """True when this process may create network namespaces (root, with `ip`)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def node_address(node: int) -> str:
    """The address of node `node` inside its namespace."""
    return f"{SUBNET}.{node // 250}.{node % 250 + 1}"


@dataclass
class NetnsCluster:
    """N namespaces with one daemon each, sharing one checkpoint root (a shared filesystem)."""

    nodes: int
    peer_timeout: float = 10.0
    daemon_args: Sequence[str] = ()
    node_args: Dict[int, Sequence[str]] = field(default_factory=dict)
    """Extra `ckptd serve` arguments for single nodes."""
    local_roots: Dict[int, Path] = field(default_factory=dict)
    """Nodes whose daemon writes its own root instead of the shared one."""
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cks")))
    processes: List[subprocess.Popen] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.base / "root"

    def root_of(self, node: int) -> Path:
        """The root node `node`'s daemon writes."""
        return self.local_roots.get(node, self.root)

    @property
    def bridge(self) -> str:
        return f"ckb{self.tag}"

    def namespace(self, node: int) -> str:
        return f"ck{self.tag}n{node}"

    def veth(self, node: int) -> str:
        return f"ck{self.tag}v{node}"

    def endpoint(self, node: int) -> str:
        return f"ipc://{self.base}/n{node}.sock"

    def log_path(self, node: int) -> Path:
        return self.base / f"daemon{node}.log"

    def create_network(self) -> None:
        """The bridge, and each node's namespace with its veth pair (one `ip -batch` per kind)."""
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        host: List[str] = []
        for node in range(self.nodes):
            ns, veth = self.namespace(node), self.veth(node)
            host += [
                f"netns add {ns}",
                f"link add {veth} type veth peer name eth0 netns {ns}",
                f"link set {veth} master {self.bridge}",
                f"link set {veth} up",
            ]
        _ip_batch(host)
        for node in range(self.nodes):
            inside = ["link set lo up", f"addr add {node_address(node)}/16 dev eth0", "link set eth0 up"]
            _ip_batch(inside, namespace=self.namespace(node))

    def start(self, secret: Path) -> None:
        """One daemon per namespace; returns once every follower has joined the leader."""
        for node in range(self.nodes):
            self.root_of(node).mkdir(exist_ok=True)
            command = [
                "ip", "netns", "exec", self.namespace(node),
                sys.executable, "-m", "ckptd.service", "serve",
                "--root", str(self.root_of(node)), "--endpoint", self.endpoint(node),
                "--node", str(node), "--num-nodes", str(self.nodes),
                "--leader", f"{node_address(0)}:{LEADER_PORT}", "--cluster-secret", str(secret),
                "--peer-timeout", f"{self.peer_timeout:g}", "--write-threads", "1", "--nice", "0",
                *self.daemon_args, *self.node_args.get(node, ()),
            ]  # fmt: skip
            with open(self.log_path(node), "ab") as log:
                self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60 + self.nodes
        while True:
            joined = self.joined()
            if joined == self.nodes - 1:
                return
            dead = [n for n, p in enumerate(self.processes) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{joined}/{self.nodes - 1} followers joined; dead daemons {dead}\n{self.logs(dead[:3] or [0])}"
                )
            time.sleep(0.2)

    def status(self, node: int = 0, timeout: float = 5.0) -> Dict[str, Any]:
        """The daemon's `ckptd status` body."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint(node))
            sock.send(messages.encode(messages.STATUS, {}, 1))
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"node {node}'s daemon did not answer")
            return messages.decode(sock.recv()).body
        finally:
            sock.close(0)

    def joined(self) -> int:
        """Followers the leader sees alive (0 before it answers)."""
        try:
            nodes = self.status(0, timeout=1.0)["cluster"]["nodes"]
        except (TimeoutError, zmq.ZMQError, KeyError, TypeError):
            return 0
        return sum(1 for row in nodes[1:] if row.get("alive"))

    def partition(self, node: int) -> None:
        """Cut node `node` off the others (its link down)."""
        _ip("-n", self.namespace(node), "link", "set", "eth0", "down")

    def heal(self, node: int) -> None:
        """Bring node `node`'s link back."""
        _ip("-n", self.namespace(node), "link", "set", "eth0", "up")

    def pid(self, node: int) -> int:
        """The daemon's pid (`ip netns exec` execs it)."""
        return self.processes[node].pid

    def logs(self, nodes: Sequence[int]) -> str:
        return "\n".join(f"--- node {n} ---\n{self.log_path(n).read_text(errors='replace')[-3000:]}" for n in nodes)

    def stop(self) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def destroy(self) -> None:
        """Stop the daemons, remove the namespaces, links and files."""
        self.stop()
        _ip_batch([f"netns del {self.namespace(n)}" for n in range(self.nodes)], check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "NetnsCluster":
        self.create_network()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()


@dataclass
class SaveResult:
    """One save as the light ranks saw it."""

    step: int
    committed: bool
    reasons: List[str]
    handed_over_s: float
    """From the first request sent to the last ACCEPTED received."""
    commit_latency_s: float
    """From the last ACCEPTED (every rank handed over) to the last outcome received."""
    told_at: float
    """time.monotonic() when the last rank got its outcome (comparable with the leader's timeline)."""


class LightRanks:
    """Every rank of every node, played by one asyncio process over the real client protocol."""

    def __init__(self, cluster: NetnsCluster, ranks_per_node: int, job: Optional[str] = None) -> None:
        self.cluster = cluster
        self.ranks_per_node = ranks_per_node
        self.world = cluster.nodes * ranks_per_node
        self.job = job or f"scale-{uuid.uuid4().hex[:8]}"
        self.topology = {
            "nodes": [list(range(n * ranks_per_node, (n + 1) * ranks_per_node)) for n in range(cluster.nodes)]
        }
        self._ctx = zmq.Context()
        self._sockets: List[LoopSocket] = []

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for rank in range(self.world):
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.cluster.endpoint(rank // self.ranks_per_node))
            self._sockets.append(LoopSocket(sock, loop))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self._ctx.term()

    def request(self, rank: int, step: int) -> Dict[str, Any]:
        """A rank's save request: a GLOBAL state rank 0 writes and a PER_RANK state every rank writes,
        each tagged with the step."""

        def part(key: str, pattern: str, writer: bool, state: Any) -> Dict[str, Any]:
            return {
                "key": key, "pattern": pattern, "required": True, "writer": writer, "group_name": None,
                "group_ranks": [], "validate_replication": False, "metadata": {}, "region": None, "lease": 1,
                "region_size": 0, "tensors": [], "state": msgpack.packb(state) if writer else None, "digests": None,
            }  # fmt: skip

        return {
            "root": str(self.cluster.root_of(rank // self.ranks_per_node)),
            "step": step,
            "rank": rank,
            "pid": os.getpid(),
            "job": self.job,
            "topology": self.topology,
            "parts": [
                part("trainer", "GLOBAL", rank == 0, {"step": step}),
                part("rng", "PER_RANK", True, {"step": step, "rank": rank}),
            ],
            "versions": {},
            "metrics": {},
            "expires_at": time.monotonic() + 600,
        }

    async def save(self, step: int, timeout: float = 120.0) -> SaveResult:
        """Every rank hands over `step`; waits for every rank's outcome."""
        started = time.monotonic()
        for rank, sock in enumerate(self._sockets):
            sock.send(messages.encode(messages.SAVE, self.request(rank, step), step))
        accepted_at, outcomes = await asyncio.wait_for(self._collect(step), timeout)
        done = time.monotonic()
        reasons = sorted({str(body.get("reason")) for kind, body in outcomes if kind != messages.COMMITTED})
        return SaveResult(
            step,
            committed=not reasons,
            reasons=reasons,
            handed_over_s=accepted_at - started,
            commit_latency_s=done - accepted_at,
            told_at=done,
        )

    async def _collect(self, step: int) -> tuple:
        accepted: List[float] = []
        outcomes: List[tuple] = []

        async def one(sock: LoopSocket) -> None:
            outcome = None
            while outcome is None:
                envelope = messages.decode(await sock.recv())
                if envelope.type == messages.ACCEPTED:
                    accepted.append(time.monotonic())
                elif envelope.type in (messages.COMMITTED, messages.ABORTED) and envelope.body.get("step") == step:
                    outcome = (envelope.type, envelope.body)
                elif envelope.type == messages.ERROR:
                    accepted.append(time.monotonic())
                    outcome = (messages.ERROR, {"reason": envelope.body.get("message")})
            outcomes.append(outcome)

        await asyncio.gather(*(one(sock) for sock in self._sockets))
        return (max(accepted) if accepted else time.monotonic()), outcomes


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ip_batch(commands: List[str], check: bool = True, namespace: Optional[str] = None) -> None:
    where = ["-n", namespace] if namespace else []
    result = subprocess.run(
        ["ip", *where, "-force", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {result.stderr.strip()[-500:]}")
