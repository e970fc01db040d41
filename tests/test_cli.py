"""The operator commands, each run as a subprocess against checkpoints a real daemon committed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
from helpers import Daemon, Holder, wait_for
from safetensors.torch import load_file

from ckptd.client import (
    CheckpointClient,
    CheckpointManager,
    PreparedComponent,
    RetentionPolicy,
    SharingPattern,
    StateComponent,
)


def ckptd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.service", *args], capture_output=True, text=True, timeout=timeout
    )


class Trainer:
    """A tiny model, its optimizer, and one PER_RANK component."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.counter = Holder({"seen": torch.arange(3)})

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("optimizer", self.optimizer, SharingPattern.GLOBAL),
            StateComponent("counter", self.counter, SharingPattern.PER_RANK),
        ]

    def step(self) -> None:
        self.model(torch.randn(2, 8)).sum().backward()
        self.optimizer.step()


def slow_manager(daemon: Daemon) -> CheckpointManager:
    """A manager whose one component is 8 MB (seconds of writing behind a throttled daemon)."""
    state = Holder({"w": torch.zeros(2 * 2**20)})

    class Big:
        def get_state_components(self) -> List[StateComponent]:
            return [StateComponent("model", state, SharingPattern.GLOBAL)]

    return CheckpointManager(Big(), str(daemon.root), endpoint=daemon.endpoint, auto_start=False)


@pytest.fixture
def saved(daemon: Daemon) -> Trainer:
    """Steps 1-3 committed under a keep-last-2 policy with a val_loss metric."""
    trainer = Trainer()
    with CheckpointManager(
        trainer, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, retention=RetentionPolicy(keep_last=2)
    ) as manager:
        for step in (1, 2, 3):
            trainer.step()
            manager.save_checkpoint(step, metrics={"val_loss": 1.0 / step}).wait(60)
    return trainer


def test_ls_lists_checkpoints_retention_and_leftovers(daemon: Daemon, saved: Trainer) -> None:
    (daemon.root / ".tmp-step_00000009-0123abcd" / "model").mkdir(parents=True)
    result = ckptd("ls", str(daemon.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 checkpoint(s), latest = 3" in lines[0] and "keep_last=2" in lines[1]
    rows = {line.split()[0]: line for line in lines if line[:1].isdigit()}
    assert set(rows) == {"2", "3"}
    assert " * " in rows["3"] and "counter,model,optimizer" in rows["3"] and "last 2" in rows["3"]
    assert ".tmp-step_00000009-0123abcd  interrupted save" in result.stdout
    listing = json.loads(ckptd("ls", str(daemon.root), "--json").stdout)
    assert [c["step"] for c in listing["checkpoints"]] == [2, 3] and listing["latest_step"] == 3
    assert listing["checkpoints"][1]["latest"] and listing["checkpoints"][0]["size_bytes"] > 0
    assert ckptd("ls", str(daemon.root / "nope")).returncode == 1


def test_inspect_reports_the_manifest(daemon: Daemon, saved: Trainer) -> None:
    path = daemon.root / "step_00000003"
    result = ckptd("inspect", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "step 3" in out and "world size 1 on 1 node(s)" in out and "val_loss=0.333333" in out
    assert "component 'model': GLOBAL, 1 copy" in out and "4 tensors (4 F32)" in out
    assert "component 'counter': PER_RANK" in out and "written by rank 0, read by ranks 0" in out
    manifest = json.loads((path / "checkpoint_manifest.json").read_text())
    assert manifest["components"]["model"]["scopes"]["global"]["tensor_file"]["checksum"] in out
    assert "write_s" in out and "total_s" in out
    assert json.loads(ckptd("inspect", str(path), "--json").stdout) == manifest
    missing = ckptd("inspect", str(daemon.root))
    assert missing.returncode == 1 and "checkpoint_manifest.json is missing" in missing.stderr


def test_gc_removes_old_leftovers_and_applies_retention(daemon: Daemon, saved: Trainer) -> None:
    old = daemon.root / ".tmp-step_00000007-0123abcd"
    young = daemon.root / ".tmp-step_00000008-4567cdef"
    for leftover in (old, young):
        (leftover / "model").mkdir(parents=True)
    an_hour_ago = time.time() - 7200
    os.utime(old / "model", (an_hour_ago, an_hour_ago))
    os.utime(old, (an_hour_ago, an_hour_ago))

    dry = ckptd("gc", str(daemon.root), "--dry-run", "--keep-last", "1", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["leftovers"] == [str(old)] and plan["deleted_steps"] == [2]
    assert old.exists() and (daemon.root / "step_00000002").exists()

    done = ckptd("gc", str(daemon.root), "--keep-last", "1")
    assert done.returncode == 0, done.stderr
    assert f"removed leftover {old}" in done.stdout and "deleted step_00000002 (retention)" in done.stdout
    assert not old.exists() and young.exists()  # the young one may be a save in flight
    assert sorted(p.name for p in daemon.root.iterdir() if p.name.startswith("step_")) == ["step_00000003"]
    again = ckptd("gc", str(daemon.root))  # the daemon's last policy (keep last 2) keeps what is left
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    assert ckptd("gc", str(daemon.root), "--keep-best", "1").returncode == 2  # no --best-metric


def test_export_makes_a_model_huggingface_tools_load(daemon: Daemon, saved: Trainer, tmp_path: Path) -> None:
    path = daemon.root / "step_00000003"
    out = tmp_path / "export"
    result = ckptd("export", str(path), "--component", "model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    probe = torch.randn(5, 8)
    assert torch.equal(fresh(probe), saved.model(probe))

    sharded = tmp_path / "sharded"
    result = ckptd("export", str(path), "--component", "model", "--out", str(sharded), "--max-shard-gb", "0.0000002")
    assert result.returncode == 0, result.stderr
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    merged = {k: v for f in files for k, v in load_file(str(sharded / f)).items()}
    assert merged.keys() == saved.model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in saved.model.state_dict().items())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in merged.values())

    assert ckptd("export", str(path), "--component", "nope", "--out", str(tmp_path / "n")).returncode == 1
    assert ckptd("export", str(path), "--component", "model", "--out", str(out)).returncode == 1  # not empty


def test_export_of_a_per_rank_component_needs_a_scope(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient], tmp_path: Path
) -> None:
    handles = [
        client_factory(rank, 2).save(
            1,
            [
                PreparedComponent(
                    StateComponent("counter", Holder({"seen": torch.full((3,), rank)}), SharingPattern.PER_RANK)
                )
            ],
        )
        for rank in (0, 1)
    ]
    path = handles[0].wait(60)
    refused = ckptd("export", path, "--component", "counter", "--out", str(tmp_path / "c"))
    assert refused.returncode == 1 and "PER_RANK with 2 different copies" in refused.stderr
    assert "choose one with --scope" in refused.stderr
    chosen = ckptd("export", path, "--component", "counter", "--scope", "rank-00001", "--out", str(tmp_path / "c"))
    assert chosen.returncode == 0, chosen.stderr
    assert torch.equal(load_file(str(tmp_path / "c" / "model.safetensors"))["seen"], torch.full((3,), 1))


def test_status_shows_a_save_in_flight(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--max-write-mbps", "2")  # 8 MB: about 4 s of writing
    with slow_manager(daemon) as manager:
        handle = manager.save_checkpoint(4)
        body: Any = {}

        def in_flight() -> bool:
            nonlocal body
            body = json.loads(ckptd("status", "--endpoint", daemon.endpoint, "--json").stdout)
            return bool(body["saves"]) and body["saves"][0]["bytes_written"] > 0

        assert wait_for(in_flight, timeout=20, interval=0.2)
        save = body["saves"][0]
        assert save["step"] == 4 and save["bytes_expected"] >= 8 * 2**20 and save["ranks_received"] == [0]
        text = ckptd("status", "--endpoint", daemon.endpoint).stdout
        assert "step 4: [" in text and "ranks handed over 1/1" in text
        assert f"root owned by: run {manager.rank_info.job_id} (rank 0, pid {os.getpid()} on host" in text
        handle.wait(60)
    after = ckptd("status", "--endpoint", daemon.endpoint)
    assert after.returncode == 0 and "last committed step: 4" in after.stdout and "no saves in flight" in after.stdout
    assert "root owned by: no live run" in after.stdout  # the run closed its manager
    dead = ckptd("status", "--endpoint", "ipc:///tmp/ckptd-test-nobody.sock", "--timeout", "1")
    assert dead.returncode == 1 and "no ckptd daemon answered" in dead.stderr


def test_verify_json_names_each_bad_file(daemon: Daemon, saved: Trainer) -> None:
    shard = daemon.root / "step_00000003" / "model" / "global.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = ckptd("verify", str(daemon.root), "--json", "--progress")
    assert result.returncode == 1 and "100% of" in result.stderr
    report = json.loads(result.stdout)
    assert report[str(daemon.root / "step_00000002")] == []
    (problem,) = report[str(daemon.root / "step_00000003")]
    assert problem["path"] == str(shard) and "checksum" in problem["reason"]


def test_gc_while_the_daemon_commits_leaves_the_save_alone(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("--max-write-mbps", "2")  # 8 MB: about 4 s of writing
    with slow_manager(daemon) as manager:
        manager.save_checkpoint(1).wait(60)
        handle = manager.save_checkpoint(2)
        assert wait_for(lambda: any(p.name.startswith(".tmp-step_00000002") for p in daemon.root.iterdir()), timeout=10)
        collected = ckptd("gc", str(daemon.root), "--keep-last", "1", "--json")
        assert collected.returncode == 0, collected.stderr
        report = json.loads(collected.stdout)
        assert report["leftovers"] == [] and report["deleted_steps"] == []  # step 1 is still latest
        assert handle.wait(60).endswith("step_00000002")
    assert json.loads(ckptd("gc", str(daemon.root), "--keep-last", "1", "--json").stdout)["deleted_steps"] == [1]
