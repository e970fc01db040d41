"""Damaged checkpoints: loading a damaged one by path refuses with an error naming the file;
loading the newest falls back to the newest one that verifies, with a warning naming the skipped one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from helpers import Daemon, Holder

from ckptd.client import CheckpointManager, SharingPattern, StateComponent, VerificationError
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology

SINGLE = RankInfo(0, Topology.single_node(1))


def truncate(d: Path) -> str:
    shard = d / "model" / "global.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return "model/global.safetensors"


def flip_byte(d: Path) -> str:
    shard = d / "model" / "global.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return "model/global.safetensors"


def flip_state_byte(d: Path) -> str:
    state = d / "extra" / "rank-00000.msgpack"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0x01
    state.write_bytes(bytes(data))
    return "extra/rank-00000.msgpack"


def edit_manifest(d: Path) -> str:
    manifest = json.loads((d / "checkpoint_manifest.json").read_text())
    manifest["components"]["model"]["scopes"]["global"]["tensor_file"]["checksum"] = "xxh3_64:0000000000000000"
    (d / "checkpoint_manifest.json").write_text(json.dumps(manifest))
    return "model/global.safetensors"


def break_manifest(d: Path) -> str:
    (d / "checkpoint_manifest.json").write_text('{"format_version": 1, "step": ')
    return "checkpoint_manifest.json"


def delete_manifest(d: Path) -> str:
    (d / "checkpoint_manifest.json").unlink()
    return "checkpoint_manifest.json"


def delete_listed_file(d: Path) -> str:
    (d / "model" / "global.safetensors").unlink()
    return "model/global.safetensors"


def plant_symlink(d: Path) -> str:
    shard = d / "model" / "global.safetensors"
    target = d.parent / "elsewhere.safetensors"
    target.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(target)
    return "model/global.safetensors"


DAMAGE: List[Callable[[Path], str]] = [
    truncate,
    flip_byte,
    flip_state_byte,
    edit_manifest,
    break_manifest,
    delete_manifest,
    delete_listed_file,
    plant_symlink,
]


class Provider:
    def __init__(self, value: float) -> None:
        self.model = Holder({"w": torch.full((1000,), value)})
        self.extra = Holder({"note": f"saved with {value}"})

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("extra", self.extra, SharingPattern.PER_RANK),
        ]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_damaged_checkpoint_is_refused_and_load_falls_back(
    daemon: Daemon, damage: Callable[[Path], str], caplog: pytest.LogCaptureFixture
) -> None:
    with CheckpointManager(
        Provider(1.0), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        good = manager.save_checkpoint(1).wait(30)
    with CheckpointManager(
        Provider(2.0), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        bad = Path(manager.save_checkpoint(2).wait(30))
    named = damage(bad)

    fresh = Provider(0.0)
    loader = CheckpointManager(fresh, str(daemon.root), rank_info=SINGLE, connect=False)
    with pytest.raises(VerificationError, match=named.replace(".", r"\.")):
        loader.load_checkpoint(str(bad))
    assert fresh.model.value["w"][0].item() == 0.0, "nothing is restored from a checkpoint that does not verify"

    with caplog.at_level(logging.WARNING):
        assert loader.load_checkpoint() == good
    assert f"skipping checkpoint {bad}" in caplog.text and named in caplog.text
    assert torch.equal(fresh.model.value["w"], torch.full((1000,), 1.0))
    assert fresh.extra.value == {"note": "saved with 1.0"}


def test_ckptd_verify_names_each_bad_file_and_sets_the_exit_code(daemon: Daemon) -> None:
    import subprocess
    import sys

    with CheckpointManager(
        Provider(1.0), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        manager.save_checkpoint(1).wait(30)
        second = Path(manager.save_checkpoint(2).wait(30))

    def verify(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ckptd.service", "verify", str(path)], capture_output=True, text=True, timeout=60
        )

    result = verify(daemon.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("OK ") == 2
    flip_byte(second)
    delete_listed_file_state = second / "extra" / "rank-00000.msgpack"
    delete_listed_file_state.unlink()
    result = verify(daemon.root)
    assert result.returncode == 1
    assert f"BAD {second}" in result.stdout and "OK " in result.stdout
    assert "model/global.safetensors checksum" in result.stdout
    assert "extra/rank-00000.msgpack is listed in the manifest but missing" in result.stdout
    assert verify(second).returncode == 1 and verify(daemon.root / "step_00000001").returncode == 0


def test_a_planted_pickle_is_never_executed(daemon: Daemon, tmp_path: Path) -> None:
    import os
    import pickle

    import xxhash

    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # what unpickling would run
            return (os.system, (f"touch {sentinel}",))

    with CheckpointManager(
        Provider(1.0), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        directory = Path(manager.save_checkpoint(1).wait(30))
    payload = pickle.dumps({"w": Exploit()})
    manifest = json.loads((directory / "checkpoint_manifest.json").read_text())
    for rel, scope in (
        ("model/global.msgpack", manifest["components"]["model"]["scopes"]["global"]["state_file"]),
        ("model/global.safetensors", manifest["components"]["model"]["scopes"]["global"]["tensor_file"]),
    ):
        (directory / rel).write_bytes(
            payload if rel.endswith("msgpack") else len(payload).to_bytes(8, "little") + payload
        )
        data = (directory / rel).read_bytes()
        scope.update(size=len(data), checksum=f"xxh3_64:{xxhash.xxh3_64(data).hexdigest()}")  # checksums match
    (directory / "checkpoint_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationError):
        CheckpointManager(Provider(0.0), str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint(
            str(directory)
        )
    assert not sentinel.exists()
