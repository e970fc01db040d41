"""Two simulated nodes on this machine: two daemons (node 0 leads the commit over CURVE-authenticated
TCP), 2 ranks each. The job that saves the checkpoints the first tests share runs as two torchrun
launches (--nnodes 2, static rendezvous on 127.0.0.1); the other jobs' ranks get the environment those
give them, forked by the session's RankForker (tests/helpers.py) so as not to import torch each time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
import zmq
from helpers import (
    Daemon,
    ForkedJob,
    Holder,
    rank_forker,
    short_endpoint,
    start_daemon,
    torchrun_environment,
    wait_for,
)

from ckptd.client import CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.errors import DaemonUnavailableError
from ckptd.client.loading import read_manifest, read_scopes, select_scopes, verify_file
from ckptd.client.saving import CheckpointClient
from ckptd.client.topology import RankInfo
from ckptd.disk.runtime import daemon_lock_path
from ckptd.proto import cluster, messages
from ckptd.proto.ownership import CLAIM_FILE
from ckptd.proto.topology import Topology
from ckptd.service.curve import CurveKeys, load_secret

WORKER = Path(__file__).parent / "workers" / "train_job.py"
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
TWO_NODE_JOB = ("--pair-stride", "2", "--spread")
"""PER_GROUP pairs that span the nodes ({0,2}, {1,3}); the model REPLICATED and spread across both nodes."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """One daemon per simulated node, all serving the same root."""

    root: Path
    secret: Path
    leader_port: int
    daemons: List[Daemon]

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def start_cluster(base: Path, per_node_args: Sequence[Sequence[str]] = ((), ())) -> Cluster:
    root, secret, port = base / "ckpt", base / "cluster.secret", free_port()
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    nodes = Cluster(root, secret, port, [])
    try:
        for node, extra in enumerate(per_node_args):
            nodes.daemons.append(
                start_daemon(
                    root,
                    base / f"daemon-node{node}.log",
                    "--node",
                    str(node),
                    "--num-nodes",
                    str(NODES),
                    "--leader",
                    f"127.0.0.1:{port}",
                    "--cluster-secret",
                    str(secret),
                    "--peer-timeout",
                    "3",
                    *extra,
                )
            )
    except BaseException:
        nodes.stop()
        raise
    return nodes


def torchrun_nodes(
    mode: str,
    root: Path,
    out: Path,
    endpoints: Sequence[str],
    *extra: str,
    env: Sequence[Dict[str, str]] = ({}, {}),
    worker: Path = WORKER,
    launcher: str = "forked",
) -> List[Any]:
    """Launch `worker` on every simulated node (as a cluster job script would), without waiting; one
    handle per node (wait(timeout), returncode, kill()). `endpoints`: each node's daemon (none: the
    worker auto-starts one); `env`: extra env per node. `launcher` "torchrun": a `torchrun --nnodes 2`
    per node (static rendezvous); "forked": the ranks with the environment those give them, forked by
    the session's RankForker (tests/helpers.py), which spares each rank and launcher importing torch."""
    master_port = free_port()
    args = [str(worker), mode, "--root", str(root), "--out", str(out), *extra]
    if launcher == "forked":
        run_id, ranks = uuid.uuid4().hex[:12], []
        for rank in range(WORLD):
            node = rank // PER_NODE
            rank_env = {**os.environ, "OMP_NUM_THREADS": "1", **env[node]}
            rank_env.update(torchrun_environment(rank, WORLD, NODES, master_port, run_id))
            command = [*args, *(["--endpoint", endpoints[node]] if endpoints else [])]
            ranks.append((command, rank_env, out / f"torchrun-{mode}-node{node}.log"))
        job = rank_forker().start(ranks)
        return [ForkedNode(job, node) for node in range(NODES)]
    assert launcher == "torchrun", launcher
    processes = []
    for node in range(NODES):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={NODES}",
            f"--node-rank={node}",
            f"--nproc-per-node={PER_NODE}",
            "--master-addr=127.0.0.1",
            f"--master-port={master_port}",
            *args,
        ]
        if endpoints:
            command += ["--endpoint", endpoints[node]]
        log = open(out / f"torchrun-{mode}-node{node}.log", "wb")
        processes.append(
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **env[node]}
            )
        )
    return processes


class ForkedNode:
    """One simulated node's ranks of a forked job, handled like the node's torchrun process."""

    def __init__(self, job: ForkedJob, node: int) -> None:
        self.job, self.node = job, node
        self.returncode: Optional[int] = None

    def wait(self, timeout: float) -> int:
        try:
            codes = self.job.wait(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(f"node {self.node}", timeout) from None
        mine = codes[self.node * PER_NODE : (self.node + 1) * PER_NODE]
        self.returncode = next((code for code in mine if code != 0), 0)
        return self.returncode

    def kill(self) -> None:
        self.job.kill()


def wait_all(processes: List[Any], out: Path, mode: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for node, process in enumerate(processes):
        try:
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise AssertionError(f"node {node} timed out:\n{_log(out, mode, node)}") from None
        assert process.returncode == 0, f"node {node} failed:\n{_log(out, mode, node)}"


def _log(out: Path, mode: str, node: int) -> str:
    return (out / f"torchrun-{mode}-node{node}.log").read_text(errors="replace")[-6000:]


def results(out: Path, mode: str) -> Dict[int, Any]:
    return {r: json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(WORLD)}


@pytest.fixture(scope="module")
def two_node_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Steps 3 and 4 saved by the 2-node job TWO_NODE_JOB."""
    base = tmp_path_factory.mktemp("two_nodes")
    out = base / "out"
    out.mkdir()
    nodes = start_cluster(base)
    try:
        endpoints = [d.endpoint for d in nodes.daemons]
        processes = torchrun_nodes("save", nodes.root, out, endpoints, *TWO_NODE_JOB, launcher="torchrun")
        wait_all(processes, out, "save")
    finally:
        nodes.stop()
    for daemon in nodes.daemons:
        assert "Traceback" not in daemon.log(), daemon.log()
    return {"root": nodes.root, "out": out, "saved": results(out, "save"), "daemons": nodes.daemons}


def test_every_rank_of_both_nodes_gets_the_one_committed_path(two_node_checkpoints: Dict[str, Any]) -> None:
    for rank, result in two_node_checkpoints["saved"].items():
        assert [os.path.basename(p) for p in result["paths"]] == ["step_00000003", "step_00000004"], rank
    leader_log, follower_log = (d.log() for d in two_node_checkpoints["daemons"])
    assert "committed step 4 at" in leader_log and "committed step 4 at" not in follower_log  # one commit, by node 0
    assert "event=committed step=4" in follower_log  # node 1 resolved its ranks from the leader's announcement
    assert "node 1's daemon joined" in leader_log


def test_two_node_checkpoint_reloads_bitwise_on_fresh_processes(two_node_checkpoints: Dict[str, Any]) -> None:
    root, out = two_node_checkpoints["root"], two_node_checkpoints["out"]
    wait_all(torchrun_nodes("load", root, out, [], *TWO_NODE_JOB), out, "load")
    components = {"model", "optimizer", "scheduler", "dataloader", "rng", "pair_state", "node_cache", "trainer"}
    for rank, loaded in results(out, "load").items():
        assert set(loaded["checked"]) == {f"{s}/{c}" for s in (3, 4) for c in components}, rank


def test_two_node_files_follow_the_dedup_table(two_node_checkpoints: Dict[str, Any]) -> None:
    root = two_node_checkpoints["root"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    expected_scopes = {
        "model": {"share-00000", "share-00001"},
        "optimizer": {"global"},
        "scheduler": {"global"},
        "trainer": {"global"},
        "dataloader": {f"rank-{r:05d}" for r in range(WORLD)},
        "rng": {f"rank-{r:05d}" for r in range(WORLD)},
        "pair_state": {"group-pair-00000", "group-pair-00001"},
        "node_cache": {"node-00000", "node-00001"},
    }
    for step in (3, 4):
        directory = root / f"step_{step:08d}"
        manifest = read_manifest(str(directory))
        assert manifest.topology.nodes == ((0, 1), (2, 3))
        assert manifest.groups == {"pair": [[0, 2], [1, 3]]}
        assert {k: set(c.scopes) for k, c in manifest.components.items()} == expected_scopes
        pair = manifest.components["pair_state"].scopes["group-pair-00001"]
        assert (pair.writer_rank, pair.readers) == (1, [1, 3])  # written on node 0, read on node 1 too
        node1 = manifest.components["node_cache"].scopes["node-00001"]
        assert (node1.writer_rank, node1.readers) == (2, [2, 3])
        model = manifest.components["model"]
        shares = [model.scopes[f"share-{n:05d}"] for n in range(NODES)]
        assert model.spread and [(s.writer_rank, s.readers) for s in shares] == [(0, [0, 1, 2, 3]), (2, [0, 1, 2, 3])]
        names = [set(s.tensor_file.tensors) for s in shares]
        assert all(names) and not names[0] & names[1]  # both nodes wrote a part, no tensor twice
        assert names[0] | names[1] == {"0.weight", "0.bias", "2.weight", "2.bias"}
        listed = {f.path for f in manifest.files()}
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        assert on_disk == listed | {"checkpoint_manifest.json"}
        for record in manifest.files():
            verify_file(str(directory), record)


def test_a_spread_model_loads_on_any_topology(two_node_checkpoints: Dict[str, Any]) -> None:
    root, out = two_node_checkpoints["root"], two_node_checkpoints["out"]
    directory = str(root / "step_00000004")
    manifest = read_manifest(directory)
    alone = RankInfo(0, Topology.single_node(1))  # one process, where the job had 2 nodes x 2 ranks
    model = read_scopes(directory, select_scopes(manifest, "model", manifest.components["model"], alone))
    expected = torch.load(out / "reference_rank3.pt", weights_only=False)[4]["state"]["model"]
    assert model.keys() == expected.keys()
    assert all(torch.equal(model[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match=r"PER_NODE and was saved with world size 4 on 2 node\(s\)"):
        select_scopes(manifest, "node_cache", manifest.components["node_cache"], alone)


def test_daemons_auto_started_on_each_node_commit_together(tmp_path: Path) -> None:
    out, root, secret = tmp_path / "out", tmp_path / "ckpt", tmp_path / "cluster.secret"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    endpoints = [short_endpoint() for _ in range(NODES)]
    cluster_env = {"CKPTD_LEADER": f"127.0.0.1:{free_port()}", "CKPTD_CLUSTER_SECRET": str(secret)}
    env = [{"CKPTD_ENDPOINT": endpoint, **cluster_env} for endpoint in endpoints]
    try:
        wait_all(torchrun_nodes("save", root, out, [], env=env), out, "save")
    finally:
        pids = [int(Path(daemon_lock_path(str(root), node)).read_text()) for node in range(NODES)]
        for pid in pids:  # the daemons local rank 0 of each node started (they would exit after 30 s idle)
            os.kill(pid, signal.SIGTERM)
    for rank, result in results(out, "save").items():
        assert [os.path.basename(p) for p in result["paths"]] == ["step_00000003", "step_00000004"], rank
    assert read_manifest(str(root / "step_00000004")).topology.nodes == ((0, 1), (2, 3))
    assert wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in pids), timeout=30)


def test_auto_start_without_cluster_settings_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CKPTD_LEADER", "CKPTD_CLUSTER_SECRET", "CKPTD_NUM_NODES", "CKPTD_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    two_nodes = RankInfo(0, Topology(((0,), (1,))), job_id="job")
    with pytest.raises(DaemonUnavailableError, match="needs --leader HOST:PORT .* and --cluster-secret FILE"):
        CheckpointClient(str(tmp_path / "ckpt"), two_nodes, endpoint=short_endpoint(), connect_timeout=30)


@pytest.mark.parametrize("lost", [1, 0], ids=["follower", "leader"])
def test_losing_a_node_daemon_mid_save_fails_every_rank_and_keeps_the_previous(tmp_path: Path, lost: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # the lost node writes at 1 MB/s, so its 2 x 4 MiB of step 2 is still being written when it is killed
    throttled = [("--max-write-mbps", "1") if node == lost else () for node in range(NODES)]
    nodes = start_cluster(tmp_path, per_node_args=throttled)
    try:
        processes = torchrun_nodes("lose-node", nodes.root, out, [d.endpoint for d in nodes.daemons])
        assert wait_for(lambda: len(list(out.glob("handed_over_rank*"))) == WORLD, timeout=180), _log(
            out, "lose-node", 0
        ) + _log(out, "lose-node", 1)
        nodes.daemons[lost].process.send_signal(signal.SIGKILL)
        wait_all(processes, out, "lose-node")
    finally:
        nodes.stop()
    outcome = results(out, "lose-node")
    for rank, result in outcome.items():
        assert result["first"].endswith("step_00000001"), rank
        assert "second" not in result, (rank, result)
        assert "step 2" in result["error"], (rank, result["error"])
        assert result["latest"].endswith("step_00000001") and result["loaded"].endswith("step_00000001"), rank
    survivors = [outcome[r]["error"] for r in range(WORLD) if r // PER_NODE != lost]
    expected = "node(s) [1]" if lost == 1 else "node 0's daemon (the commit leader)"
    assert all(expected in e and "stopped answering" in e for e in survivors), survivors
    # (a killed leader leaves the run's claim behind: nothing wrong with that, the run has ended)
    assert sorted(p.name for p in nodes.root.iterdir() if p.name != CLAIM_FILE) == ["latest", "step_00000001"]
    assert "Traceback" not in nodes.daemons[1 - lost].log()


def _exchange(sock: zmq.Socket, msg_type: str, body: Dict[str, Any], wait_ms: int = 1500) -> Any:
    """Send one frame and return the decoded reply, or None if the frame could not go out or got no answer
    (a DEALER without a completed handshake has nowhere to send)."""
    try:
        sock.send(messages.encode(msg_type, body, 7), flags=zmq.NOBLOCK)
    except zmq.Again:
        return None
    if sock.poll(wait_ms):
        return messages.decode(sock.recv())
    return None


def test_only_daemons_holding_the_secret_can_talk_to_the_leader(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, per_node_args=((),))  # the leader alone; node 1 never comes
    leader = f"tcp://127.0.0.1:{nodes.leader_port}"
    keys = CurveKeys.derive(load_secret(str(nodes.secret)))
    report = {
        "job": "intruder",
        "step": 5,
        "node": 1,
        "topology": {"nodes": [[0], [1]]},
        "parts": [],
        "files": [],
        "versions": {},
        "metrics": {},
        "started_at": 0.0,
        "timings": {},
    }
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)
        plain.connect(leader)
        stranger = ctx.socket(zmq.DEALER)  # knows the leader's public key, not the secret
        stranger_public, stranger_secret = zmq.curve_keypair()
        stranger.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        stranger.setsockopt(zmq.CURVE_PUBLICKEY, stranger_public)
        stranger.setsockopt(zmq.CURVE_SECRETKEY, stranger_secret)
        stranger.connect(leader)
        for sock in (plain, stranger):
            assert _exchange(sock, cluster.NODE_HELLO, {"node": 1, "instance": "x"}) is None
            assert _exchange(sock, cluster.NODE_REPORT, report) is None
        member = ctx.socket(zmq.DEALER)  # the positive control: a follower's keys, derived from the secret
        member.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        member.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        member.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        member.connect(leader)
        reply = _exchange(member, cluster.NODE_HELLO, {"node": 1, "instance": "member"}, wait_ms=10000)
        assert reply is not None and reply.type == messages.OK and reply.body["instance"]
        bad = _exchange(member, cluster.NODE_REPORT, {**report, "files": [["../../x", "global", {}, {}]]})
        assert bad is not None and bad.type == messages.ERROR and bad.body["code"] == "invalid_name"
    finally:
        ctx.destroy(linger=0)
        nodes.stop()
    log = nodes.daemons[0].log()
    assert "refused a daemon connection with an unknown CURVE key" in log
    assert "intruder" not in log and not [p for p in nodes.root.iterdir() if p.name.startswith("step_")]


def test_a_multi_node_daemon_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd.service",
            "serve",
            "--root",
            str(tmp_path / "ckpt"),
            "--endpoint",
            f"ipc://{tmp_path}/d.sock",
            "--node",
            "1",
            "--num-nodes",
            "2",
            "--leader",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")},
    )
    assert result.returncode == 2 and "--cluster-secret" in result.stderr
    loose = tmp_path / "loose.secret"
    loose.write_text("x" * 64)
    loose.chmod(0o644)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd.service",
            "serve",
            "--root",
            str(tmp_path / "ckpt"),
            "--endpoint",
            f"ipc://{tmp_path}/d.sock",
            "--node",
            "1",
            "--num-nodes",
            "2",
            "--leader",
            "127.0.0.1:1",
            "--cluster-secret",
            str(loose),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "chmod 600" in result.stderr


def _restart_node(nodes: Cluster, base: Path, node: int, extra: Sequence[str]) -> None:
    """SIGKILL node `node`'s daemon and start it again at once on the same endpoint."""
    old = nodes.daemons[node]
    old.process.send_signal(signal.SIGKILL)
    old.process.wait()
    nodes.daemons[node] = start_daemon(
        nodes.root,
        base / f"daemon-node{node}-again.log",
        "--node",
        str(node),
        "--num-nodes",
        str(NODES),
        "--leader",
        f"127.0.0.1:{nodes.leader_port}",
        "--cluster-secret",
        str(nodes.secret),
        *extra,
        endpoint=old.endpoint,
    )


@pytest.mark.parametrize("restarted", [1, 0], ids=["follower", "leader"])
def test_a_node_daemon_restarted_mid_save_aborts_the_save_on_every_node(tmp_path: Path, restarted: int) -> None:
    """A daemon that restarts (faster than --peer-timeout) while a save waits for it: the leader aborts
    the save when the follower comes back, a follower aborts it when a new leader answers; the ranks of
    the node that kept its daemon get the reason, those of the restarted one a settled 'not committed'."""
    # the restarted node writes its 4 MB of step 2 at 1 MB/s, so the other node waits for it
    slow = ("--peer-timeout", "10", "--max-write-mbps", "1")
    fast = ("--peer-timeout", "10")
    nodes = start_cluster(tmp_path, per_node_args=[slow if node == restarted else fast for node in range(NODES)])
    topology = Topology(((0,), (1,)))
    ranks = [
        CheckpointClient(
            str(nodes.root),
            RankInfo(r, topology, job_id="restarts"),
            endpoint=nodes.daemons[r].endpoint,
            auto_start=False,
            timeout=30,
            daemon_timeout=5,
        )
        for r in range(NODES)
    ]
    try:
        first = [c.save(1, _tensor_state(1.0, 16)) for c in ranks]
        assert first[0].wait(30) == first[1].wait(30)
        second = [c.save(2, _tensor_state(2.0, 2**20 if r == restarted else 16)) for r, c in enumerate(ranks)]
        assert wait_for(lambda: any(nodes.root.glob(".tmp-step_00000002-*/*/*.safetensors")), timeout=10)
        started = time.monotonic()
        _restart_node(nodes, tmp_path, restarted, slow)
        expected = (
            "node 1's daemon restarted while the save was in flight"
            if restarted == 1
            else "step 2 aborted: node 0's daemon (the commit leader) restarted before it decided this save"
        )
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            second[1 - restarted].wait(30)
        with pytest.raises(CheckpointError, match="step 2 was not committed: the ckptd daemon .* was restarted"):
            second[restarted].wait(30)
        assert time.monotonic() - started < 20
    finally:
        for c in ranks:
            c.close(timeout=5)
        nodes.stop()
    assert not (nodes.root / "step_00000002").exists()
    assert (nodes.root / "latest").read_text().strip() == "step_00000001"
    for record in read_manifest(str(nodes.root / "step_00000001")).files():
        verify_file(str(nodes.root / "step_00000001"), record)


def _tensor_state(value: float, numel: int) -> List[PreparedComponent]:
    """One PER_NODE component (every node writes its own copy) of `numel` floats."""
    return [
        PreparedComponent(StateComponent("model", Holder({"w": torch.full((numel,), value)}), SharingPattern.PER_NODE))
    ]
