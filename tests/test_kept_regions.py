"""In a root on /dev/shm (a node-local fast tier), the daemon keeps each staged region as the shard
file itself instead of copying it; the client stages the next saves into other regions and reuses a
region only once no checkpoint holds it. Every checkpoint must still hold exactly its own step."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterator, Set

import pytest
import torch
from helpers import Daemon, Holder
from safetensors import safe_open

from ckptd.client import CheckpointClient, PreparedComponent, RetentionPolicy, SharingPattern, StateComponent
from ckptd.client.loading import read_manifest, read_scope
from ckptd.disk.root import committed_checkpoints
from ckptd.proto.layout import REGIONS_PER_COMPONENT

MIB = 2**20


@pytest.fixture(params=["dev-shm", "disk"])
def root_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon], root_kind: str) -> Iterator[Daemon]:
    """The daemon the client fixtures use: its root on /dev/shm, or on disk under tmp_path."""
    if root_kind == "disk":
        yield daemon_factory()
        return
    root = Path(tempfile.mkdtemp(prefix="kept-regions-", dir="/dev/shm"))
    try:
        yield daemon_factory(root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def own_regions() -> Set[str]:
    """The staging regions of this process (the test's client) in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"ckptd-{os.getuid()}-{os.getpid()}-")}


def step_held(checkpoint: str) -> Dict[str, float]:
    """The values the checkpoint's model holds (each tensor is filled with one value), and the shards
    opened with the safetensors library."""
    (scope,) = read_manifest(checkpoint).components["model"].scopes.values()
    state = read_scope(checkpoint, scope)
    for shard in glob.glob(os.path.join(checkpoint, "**", "*.safetensors"), recursive=True):
        with safe_open(shard, framework="pt") as f:
            assert set(f.keys()) == {"w", "b"}
    values = {name: tensor.unique().tolist() for name, tensor in state.items()}
    assert all(len(v) == 1 for v in values.values()), values
    return {name: v[0] for name, v in values.items()}


def test_each_checkpoint_holds_its_own_step_whether_its_region_was_kept_or_copied(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient], root_kind: str
) -> None:
    client = client_factory(retention=RetentionPolicy(keep_last=2))
    state = OrderedDict(w=torch.zeros(4 * MIB // 4), b=torch.zeros(1000, dtype=torch.float64))
    parts = [PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))]
    client.allocate_ahead(parts)
    assert client.wait_staging_allocated(30)
    ahead = own_regions()  # where regions are kept: keep_last, one held by a tier copy, one for the next save
    assert len(ahead) == (4 if root_kind == "dev-shm" else 1), ahead
    used: Set[str] = set()
    for step in range(1, 9):
        state["w"].fill_(step)
        state["b"].fill_(-step)
        latest = client.save(step, parts).wait(60)
        used |= own_regions()
        assert len(own_regions()) <= REGIONS_PER_COMPONENT
        (shard,) = glob.glob(os.path.join(latest, "**", "*.safetensors"), recursive=True)
        links = os.stat(shard).st_nlink
        assert links == (2 if root_kind == "dev-shm" else 1), f"step {step}: {links} links to {shard}"
        for checkpoint in committed_checkpoints(str(daemon.root)):
            step_of = int(os.path.basename(checkpoint).split("_")[1])
            assert step_held(checkpoint) == {"w": step_of, "b": -step_of}, checkpoint
        if step == 2:  # loaded tensors outlive their checkpoint, whose region the client writes again
            (scope,) = read_manifest(latest).components["model"].scopes.values()
            loaded = read_scope(latest, scope)
    assert loaded["w"].unique().tolist() == [2] and loaded["b"].unique().tolist() == [-2]
    # kept regions come back once retention deletes their checkpoint: those allocated ahead serve every save
    assert (used == ahead) if root_kind == "disk" else (3 <= len(used) and used <= ahead), (used, ahead)

    client.close(timeout=10)
    assert not own_regions()
    kept = committed_checkpoints(str(daemon.root))
    assert len(kept) == 2
    for checkpoint in kept:  # the client's names are gone; the checkpoints' files keep the bytes
        step_of = int(os.path.basename(checkpoint).split("_")[1])
        assert step_held(checkpoint) == {"w": step_of, "b": -step_of}
    verify = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "verify", str(daemon.root)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_two_ranks_each_keep_their_regions_and_every_checkpoint_holds_one_step(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient], root_kind: str
) -> None:
    """Rank 0 writes a GLOBAL model, each rank its PER_RANK optimizer state: each rank's regions are
    its own, and every checkpoint holds one step of each, with each rank's own values."""
    clients = [client_factory(rank=r, world_size=2, retention=RetentionPolicy(keep_last=1)) for r in (0, 1)]
    states = [OrderedDict(m=torch.zeros(MIB // 4)) for _ in clients]
    opts = [OrderedDict(o=torch.zeros(MIB // 8), rank=torch.tensor(r)) for r in (0, 1)]
    parts = [
        [
            PreparedComponent(StateComponent("model", Holder(states[r]), SharingPattern.GLOBAL)),
            PreparedComponent(StateComponent("opt", Holder(opts[r]), SharingPattern.PER_RANK)),
        ]
        for r in (0, 1)
    ]
    for step in range(1, 6):
        for r in (1, 0):
            states[r]["m"].fill_(step)
            opts[r]["o"].fill_(step * 10 + r)
        handles = [clients[r].save(step, parts[r]) for r in (1, 0)]
        (latest,) = {h.wait(60) for h in handles}
        shards = glob.glob(os.path.join(latest, "**", "*.safetensors"), recursive=True)
        assert len(shards) == 3  # the model once, each rank's optimizer state
        assert {os.stat(s).st_nlink for s in shards} == ({2} if root_kind == "dev-shm" else {1})
        (checkpoint,) = committed_checkpoints(str(daemon.root))  # keep_last=1
        manifest = read_manifest(checkpoint)
        (model,) = manifest.components["model"].scopes.values()
        assert read_scope(checkpoint, model)["m"].unique().tolist() == [step]
        held = {}
        for scope in manifest.components["opt"].scopes.values():
            state = read_scope(checkpoint, scope)
            held[int(state["rank"])] = state["o"].unique().tolist()
        assert held == {0: [step * 10], 1: [step * 10 + 1]}, (step, held)
