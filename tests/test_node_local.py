"""Node-local roots and partner copies (issue 16): simulated nodes on this machine, one daemon each
with a root of its own (`--replicate-to-partner`, so also `--node-local-root`), a shared tier every
node fills with its own files, and ranks in a real gloo process group (tests/workers/node_local_job.py;
each run's ranks are fresh processes, forked by tests/workers/rank_forker.py so as not to import torch each time).

A replaced node is simulated by wiping its root: the restarted job must load that node's state from
its partner's copy, bitwise; with the partner copy damaged too, from the shared tier, with a warning."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import msgpack
import pytest
import torch
import zmq
from helpers import Daemon, Holder, RankForker, free_port, start_daemon, wait_for

from ckptd.client import CheckpointManager, SharingPattern, StateComponent
from ckptd.client.loading import read_manifest, verify_file
from ckptd.service.curve import CurveKeys
from ckptd.service.partners import BEGIN, CHUNK, END_FILE, PartnerReceiver, PartnerSender
from ckptd.service.store import CheckpointStore

WORKER = Path(__file__).parent / "workers" / "node_local_job.py"
STEPS = 3


@dataclass
class Job:
    base: Path
    nodes: int
    per_node: int
    secret: Path
    leader_port: int
    daemons: List[Daemon]
    forker: RankForker
    runs: int = 0

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    def root(self, node: int) -> Path:
        return self.base / f"node{node}"

    def start(self) -> None:
        self.daemons = []
        for node in range(self.nodes):
            self.daemons.append(
                start_daemon(
                    self.root(node),
                    self.base / f"daemon-node{node}.log",
                    "--node", str(node),
                    "--num-nodes", str(self.nodes),
                    "--leader", f"127.0.0.1:{self.leader_port}",
                    "--cluster-secret", str(self.secret),
                    "--peer-timeout", "5",
                    "--replicate-to-partner",
                    "--tier", f"shared={self.shared}:every=1",
                )
            )  # fmt: skip

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def run(self, *args: str) -> str:
        """Every rank of the job runs the worker with `args` (a fresh process each, forked by the
        job's RankForker); returns the ranks' output."""
        port, ranks = free_port(), []
        out = self.base / "out"
        out.mkdir(exist_ok=True)
        self.runs += 1
        world = self.nodes * self.per_node
        for rank in range(world):
            node = rank // self.per_node
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank % self.per_node),
                "GROUP_RANK": str(node),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            command = [str(WORKER), *args, "--root", str(self.root(node))]
            command += ["--endpoint", self.daemons[node].endpoint, "--tier", f"shared={self.shared}", "--out", str(out)]
            ranks.append((command, env, self.base / f"run{self.runs}-rank{rank}.log"))
        try:
            codes = self.forker.run(ranks, timeout=120)
        except TimeoutError:
            raise AssertionError(f"job {args} timed out\n{self.logs()}") from None
        outputs = [log.read_text(errors="replace") for _, _, log in ranks]
        for rank, code in enumerate(codes):
            assert code == 0, f"rank {rank} failed ({code}):\n{outputs[rank][-4000:]}\n{self.logs()}"
        return "\n".join(outputs)

    def loaded(self) -> Dict[int, Dict[str, str]]:
        out = self.base / "out"
        return {r: json.loads((out / f"load_rank{r}.json").read_text()) for r in range(self.nodes * self.per_node)}

    def logs(self) -> str:
        return "\n".join(f"--- node {n} ---\n{d.log()[-3000:]}" for n, d in enumerate(self.daemons))


@pytest.fixture(params=[(2, 2), (3, 1)], ids=["2nodes-2ranks", "3nodes-1rank"])
def job(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Job]:
    nodes, per_node = request.param
    secret = tmp_path / "cluster.secret"
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    job = Job(tmp_path, nodes, per_node, secret, free_port(), [], RankForker(tmp_path / "rank-forker.log"))
    job.start()
    try:
        yield job
    finally:
        job.stop()
        job.forker.close()


def ckptd_verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd.service", "verify", str(root)], capture_output=True, text=True)


def flip_last_byte(path: Path) -> None:
    """Damage a file (a second call repairs it)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def wait_for_copies(job: Job, step: int) -> None:
    """Until every node holds its partner's copy of `step` and the shared tier has it."""
    wanted = [job.root(n) / "partner" / f"step_{step:08d}" for n in range(job.nodes)]
    wanted.append(job.shared / f"step_{step:08d}")
    assert wait_for(lambda: all(p.is_dir() for p in wanted), timeout=30), f"copies of step {step} missing\n{job.logs()}"


def test_a_replaced_node_resumes_from_its_partner_copy_then_from_the_shared_tier(job: Job) -> None:
    job.run("save", str(STEPS))
    wait_for_copies(job, STEPS)
    step_dir = f"step_{STEPS:08d}"
    manifest = read_manifest(str(job.root(0) / step_dir))
    listed = {record.path for record in manifest.files()}
    held = []
    for node in range(job.nodes):
        own = {str(p.relative_to(job.root(node) / step_dir)) for p in (job.root(node) / step_dir).rglob("*.*")}
        own.discard("checkpoint_manifest.json")
        assert own and own < listed, (node, own)  # each node's root holds its own files only
        partner = job.root(node) / "partner" / step_dir
        previous = (node - 1) % job.nodes
        previous_files = {
            str(p.relative_to(job.root(previous) / step_dir)) for p in (job.root(previous) / step_dir).rglob("*.*")
        }
        assert {
            str(p.relative_to(partner)) for p in partner.rglob("*.*")
        } == previous_files  # the previous node's files
        held.append(own)
    assert set().union(*held) == listed  # together the nodes hold the checkpoint, each file once
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1 :])
    for record in manifest.files():  # the shared tier got every node's files
        verify_file(str(job.shared / step_dir), record)
    verified = ckptd_verify(job.root(1))  # a node's own copies and partner copies verify as such
    assert verified.returncode == 0 and "is node 1's root" in verified.stdout, verified.stdout + verified.stderr
    assert (
        f"OK  {job.root(1) / step_dir}" in verified.stdout
        and f"OK  {job.root(1) / 'partner' / step_dir}" in verified.stdout
    )

    # a restart with node 0's own copy of the GLOBAL optimizer state damaged: node 0 reads the shared
    # tier; node 1 reads rank 0's files from its partner copy; a node that lacks them (node 2) gets
    # them from the next holder (node 1) after node 0 refuses
    optimizer = sorted((job.root(0) / step_dir / "optimizer").glob("*.safetensors"))[0]
    flip_last_byte(optimizer)
    try:
        output = job.run("load")
    finally:
        flip_last_byte(optimizer)
    loaded = job.loaded()
    node0 = range(job.per_node)
    assert {r: loaded[r]["tier"] for r in node0} == {r: "shared" for r in node0}, loaded
    assert {loaded[r]["tier"] for r in loaded if r not in node0} == {"root"}, (loaded, output)
    assert {r["step"] for r in loaded.values()} == {STEPS}

    if job.nodes == 3:  # node 1's own manifest is unreadable: it takes another node's and still reads its own files
        own_manifest = job.root(1) / step_dir / "checkpoint_manifest.json"
        good = own_manifest.read_bytes()
        own_manifest.write_bytes(b"{not json")
        try:
            output = job.run("load")
        finally:
            own_manifest.write_bytes(good)
        assert {(r["step"], r["tier"]) for r in job.loaded().values()} == {(STEPS, "root")}, output

    job.stop()  # node 1 is replaced: its root is gone
    shutil.rmtree(job.root(1))
    job.start()
    output = job.run("load")
    loaded = job.loaded()
    assert {r["step"] for r in loaded.values()} == {STEPS}, loaded
    assert {r["tier"] for r in loaded.values()} == {"root"}, loaded  # node 1's state came from its partner
    assert "skipping" not in output, output

    # the partner copy of node 1's files is damaged, and node 1 is replaced again
    partner = job.root(2 % job.nodes) / "partner" / step_dir
    flip_last_byte(sorted(p for p in partner.rglob("*.safetensors") if p.stat().st_size > 0)[0])
    verified = ckptd_verify(job.root(2 % job.nodes))
    assert verified.returncode != 0 and f"BAD {partner}" in verified.stdout, verified.stdout
    job.stop()
    shutil.rmtree(job.root(1))
    job.start()
    output = job.run("load")
    loaded = job.loaded()
    assert {r["step"] for r in loaded.values()} == {STEPS}, loaded  # still the newest step, bitwise
    node1 = [r for r in range(job.nodes * job.per_node) if r // job.per_node == 1]
    assert {loaded[r]["tier"] for r in node1} == {"shared"}, loaded
    assert "does not match the manifest" in output and "skipping checkpoint" in output, output


def _one_committed_step(tmp_path: Path) -> Path:
    """A root holding one committed checkpoint, saved through a real one-node daemon."""

    class Provider:
        model = Holder({"w": torch.full((4096,), 7.0)})

        def get_state_components(self) -> List[StateComponent]:
            return [StateComponent("model", self.model, SharingPattern.GLOBAL)]

    root = tmp_path / "source"
    daemon = start_daemon(root, tmp_path / "source-daemon.log")
    try:
        with CheckpointManager(Provider(), str(root), endpoint=daemon.endpoint, auto_start=False) as manager:
            manager.save_checkpoint(7).wait(60)
    finally:
        daemon.stop()
    return root


def test_the_partner_channel_refuses_strangers_and_bad_frames_and_keeps_serving(tmp_path: Path) -> None:
    source = _one_committed_step(tmp_path)
    step_dir = source / "step_00000007"
    manifest_text = (step_dir / "checkpoint_manifest.json").read_text()
    record = read_manifest(str(step_dir)).files()[0]
    secret = secrets.token_bytes(32)
    receiver = PartnerReceiver(str(tmp_path / "node1"), secret, None, "127.0.0.1")
    receiver.start()
    ctx = zmq.Context()

    job_keys = CurveKeys.derive(secret)

    def request(frames: List[bytes], keys: CurveKeys = job_keys, timeout_ms: int = 5000) -> Dict:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.CURVE_SERVERKEY, job_keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(receiver.endpoint)
        try:
            sock.send_multipart(frames)
            return dict(msgpack.unpackb(sock.recv()))
        finally:
            sock.close(0)

    def header(**fields: object) -> bytes:
        return msgpack.packb(fields)

    try:
        stranger = CurveKeys.derive(secrets.token_bytes(32))  # a peer without the job's secret gets no answer at all
        with pytest.raises(zmq.Again):
            request([header(type=BEGIN, step=7, node=0, manifest=manifest_text)], keys=stranger, timeout_ms=1500)
        refused = request([header(type=CHUNK, step=7, path=record.path, offset=0), b"x"])
        assert not refused["ok"] and "not begun" in refused["error"]
        assert request([b"\xc1not msgpack"])["error"] == "a frame without a readable header"
        assert request([header(type=BEGIN, step=7, node=0, manifest="{")])["ok"] is False
        assert request([header(type=BEGIN, step=7, node=0, manifest=manifest_text)]) == {"ok": True, "have": False}
        hostile = request([header(type=CHUNK, step=7, path="../../x", offset=0), b"x"])
        assert not hostile["ok"] and "is not a file of step 7" in hostile["error"]
        assert not (tmp_path / "x").exists() and not (tmp_path / "node1" / "x").exists()
        wrong = b"\0" * record.size  # the right size, the wrong bytes
        assert request([header(type=CHUNK, step=7, path=record.path, offset=0), wrong])["ok"]
        damaged = request([header(type=END_FILE, step=7, path=record.path)])
        assert not damaged["ok"] and "arrived damaged" in damaged["error"]
        assert CheckpointStore(str(tmp_path / "node1" / "partner")).committed_steps() == []

        # the receiver still serves: a real sender's copy commits, every file verified
        sender = PartnerSender(CheckpointStore(str(source)), 0, secret, lambda: receiver.endpoint)
        sender.start()
        copy = tmp_path / "node1" / "partner" / "step_00000007"
        assert wait_for(lambda: (copy / "checkpoint_manifest.json").exists(), timeout=20), sender.status()
        sender.close()
        for listed in read_manifest(str(copy)).files():
            verify_file(str(copy), listed)
    finally:
        ctx.destroy(linger=0)
        receiver.close()
