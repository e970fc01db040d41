"""Storage tiers on one daemon: committed checkpoints copied from the root into slower tiers in the
background (commit protocol, own retention and `latest`), loads from the nearest tier whose copy
verifies, and a copy cut by kill -9 redone at the next start."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
from helpers import Daemon, Holder, wait_for

from ckptd.client import CheckpointManager, LoadedCheckpoint, RankInfo, RetentionPolicy, SharingPattern, StateComponent
from ckptd.disk.files import FileProblem
from ckptd.disk.root import checkpoint_path, checkpoint_steps, leftovers, read_latest
from ckptd.disk.tiers import read_tiers_record
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto.config import ExitCode
from ckptd.proto.formats import Checksum
from ckptd.proto.manifest import FileRecord
from ckptd.proto.tiers import TierSpec, TierSpecError, parse_tier, parse_tiers
from ckptd.proto.topology import Topology
from ckptd.service.commands import query_status, render_status
from ckptd.service.shard_writer import Throttle
from ckptd.service.tier_targets import copy_listed_file

SINGLE = RankInfo(0, Topology.single_node(1))
MIB = 2**20


class Trainer:
    """Two components whose every tensor is tagged with the step it was saved at."""

    def __init__(self, numel: int = 1024) -> None:
        self.model = Holder(OrderedDict(w=torch.zeros(numel), b=torch.zeros(8, dtype=torch.float64)))
        self.progress = Holder({"step": 0})

    def at_step(self, step: int) -> "Trainer":
        self.model.value["w"].fill_(step)
        self.model.value["b"].fill_(-step)
        self.progress.value = {"step": step}
        return self

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("trainer", self.progress, SharingPattern.GLOBAL),
        ]

    def step_held(self) -> int:
        """The step every value holds (fails if they disagree: a mixed checkpoint)."""
        step = self.progress.value["step"]
        assert torch.equal(self.model.value["w"], torch.full_like(self.model.value["w"], step))
        assert torch.equal(self.model.value["b"], torch.full_like(self.model.value["b"], -step))
        return int(step)


def manager_for(daemon: Daemon, trainer: Trainer, **options: Any) -> CheckpointManager:
    """A manager saving `trainer` through the test's daemon."""
    return CheckpointManager(
        trainer, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE, **options
    )


def ckptd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ckptd.service", *args], capture_output=True, text=True, timeout=60)
    assert not check or done.returncode == 0, done.stderr
    return done


def tier_status(daemon: Daemon, name: str) -> Dict[str, Any]:
    return next(t for t in query_status(daemon.endpoint, 10)["tiers"] if t["name"] == name)


def loaded_step(root: Path, tiers: tuple = (), **options: Any) -> LoadedCheckpoint:
    """Load into a fresh trainer; returns what was loaded after checking it holds one step."""
    fresh = Trainer()
    manager = CheckpointManager(fresh, str(root), rank_info=SINGLE, connect=False, tiers=tiers, **options)
    loaded = manager.load_checkpoint()
    assert fresh.step_held() == loaded.step
    return loaded


def assert_tier_holds_verified_steps(tier: Path) -> List[int]:
    steps = checkpoint_steps(str(tier), with_manifest=True)
    for step in steps:
        path = checkpoint_path(str(tier), step)
        assert verify_checkpoint(path) == [], path
        fresh = Trainer()
        CheckpointManager(fresh, str(tier), rank_info=SINGLE, connect=False).load_checkpoint(path)
        assert fresh.step_held() == step
    return steps


def test_tier_descriptions_parse_and_bad_ones_say_what_is_wrong() -> None:
    spec = parse_tier("shared=/lustre/job:every=10:keep_last=5")
    assert spec == TierSpec("shared", "/lustre/job", every=10, keep_last=5)
    assert parse_tier(spec.to_arg()) == spec
    assert spec.wants(20) and not spec.wants(15)
    assert spec.retention == RetentionPolicy(keep_last=5)
    s3 = parse_tier("s3=s3://bucket1/job/run/:every=50:keep_every=1000")
    assert s3 == TierSpec("s3", "s3://bucket1/job/run", every=50, keep_every=1000)
    assert parse_tier(s3.to_arg()) == s3
    for text, message in [
        ("shared", "expected NAME=PATH"),
        ("../x=/a", "not a safe name"),
        ("root=/a", "the daemon's root"),
        ("s=relative/path", "must be absolute"),
        ("s=/a:every=0", "positive integer"),
        ("s=/a:every=x", "positive integer"),
        ("s=/a:often=2", "unknown option"),
        ("s=/a:every=2:every=3", "given twice"),
        ("s3=s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3=s3://bucket1/a//b", "empty, '.' or '..' part"),
        ("web=http://host/path", "an absolute path or an s3:// URL"),
    ]:
        with pytest.raises(TierSpecError, match=message):
            parse_tier(text)
    with pytest.raises(TierSpecError, match="same name"):
        parse_tiers(["a=/x", "a=/y"])
    with pytest.raises(TierSpecError, match="same path"):
        parse_tiers(["a=/x", "b=/x/"])


@pytest.mark.parametrize(
    "tier, message", [("nonsense", "expected NAME=PATH"), ("inner={root}/inner", "overlaps the root")]
)
def test_the_daemon_refuses_a_bad_tier_at_start(tmp_path: Path, tier: str, message: str) -> None:
    root = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "serve", "--root", str(root), "--tier", tier.format(root=root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert message in done.stderr


def test_committed_steps_are_copied_into_the_tier_with_its_own_retention(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    daemon = daemon_factory("--tier", f"shared={shared}:every=2:keep_last=2")
    trainer = Trainer()
    with manager_for(daemon, trainer, retention=RetentionPolicy(keep_last=1)) as manager:
        for step in range(1, 8):
            trainer.at_step(step)
            manager.save_checkpoint(step).wait(60)
        assert wait_for(lambda: read_latest(str(shared)) == 6 and tier_status(daemon, "shared")["copying"] is None)
    assert assert_tier_holds_verified_steps(shared) == [4, 6]
    assert leftovers(str(shared)) == []
    status = tier_status(daemon, "shared")
    assert status["latest"] == 6 and status["copies"] >= 2 and status["last_error"] is None
    assert status["bytes_copied"] > 0 and status["bytes_waiting"] == 0
    assert [t.name for t in read_tiers_record(str(daemon.root))] == ["shared"]
    assert checkpoint_steps(str(daemon.root), with_manifest=True)[-1] == 7

    # the operator commands given the root cover the tier too
    listed = json.loads(ckptd("ls", str(daemon.root), "--json").stdout)
    assert [c["step"] for c in listed["checkpoints"]][-1] == 7  # 6 too, if it was held for its copy at 7
    assert [(t["name"], [c["step"] for c in t["checkpoints"]]) for t in listed["tiers"]] == [("shared", [4, 6])]
    assert "tier shared (every 2)" in ckptd("ls", str(daemon.root)).stdout
    verified = ckptd("verify", str(daemon.root)).stdout
    assert all(f"OK  {checkpoint_path(str(shared), step)}" in verified for step in (4, 6)), verified
    checkpoint_path_6 = Path(checkpoint_path(str(shared), 6))
    next((checkpoint_path_6 / "model").glob("*.safetensors")).write_bytes(b"damaged")
    assert ckptd("verify", str(daemon.root), check=False).returncode == ExitCode.ERROR
    (shared / ".tmp-step_00000008-copyabc").mkdir()
    cleaned = json.loads(ckptd("gc", str(daemon.root), "--min-age", "0", "--json").stdout)
    assert cleaned["tiers"][0]["tier"] == "shared"
    assert cleaned["tiers"][0]["leftovers"] == [str(shared / ".tmp-step_00000008-copyabc")]
    assert cleaned["tiers"][0]["policy"]["keep_last"] == 2


def test_the_root_keeps_a_step_until_its_copy_is_done_and_a_behind_tier_skips_to_the_newest(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A throttled tier (0.5 MB/s, 1 MB a checkpoint) falls behind saves made every step with the
    root keeping only the newest: each copy still completes from a step retention wanted gone."""
    shared = tmp_path / "shared"
    daemon = daemon_factory("--tier", f"shared={shared}", "--tier-copy-mbps", "0.5")
    trainer = Trainer(numel=MIB // 4)
    with manager_for(daemon, trainer, retention=RetentionPolicy(keep_last=1)) as manager:
        trainer.at_step(1)
        manager.save_checkpoint(1).wait(60)
        assert wait_for(lambda: tier_status(daemon, "shared")["copying"] == 1)
        shown = render_status(query_status(daemon.endpoint, 10), {})
        assert f"tier shared ({shared}, every 1): latest step None, copying step 1" in shown, shown
        for step in range(2, 6):
            trainer.at_step(step)
            manager.save_checkpoint(step).wait(60)
        assert os.path.isdir(checkpoint_path(str(daemon.root), 1)), "retention deleted a step being copied"
        assert tier_status(daemon, "shared")["pending"] == 5
        assert wait_for(lambda: read_latest(str(shared)) == 5, timeout=30)
    assert assert_tier_holds_verified_steps(shared) == [1, 5]  # 2-4 were skipped for the newest
    assert "step 2 is skipped for the newer step 3" in daemon.log()


def test_a_load_falls_back_tier_by_tier_and_says_where_it_came_from(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared, archive = tmp_path / "shared", tmp_path / "archive"
    tiers = (f"shared={shared}", f"archive={archive}:every=2")
    daemon = daemon_factory(*[arg for tier in tiers for arg in ("--tier", tier)])
    trainer = Trainer()
    with manager_for(daemon, trainer) as manager:
        for step in (1, 2, 3):
            trainer.at_step(step)
            manager.save_checkpoint(step).wait(60)
        assert wait_for(lambda: read_latest(str(shared)) == 3 and read_latest(str(archive)) == 2)
    root = daemon.root
    loaded = loaded_step(root, tiers)
    assert (loaded.step, loaded.tier, loaded) == (3, "root", checkpoint_path(str(root), 3))

    # the root's copy of step 3 is corrupt: the same step comes from the shared tier
    model_file = next((Path(checkpoint_path(str(root), 3)) / "model").glob("*.safetensors"))
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ckptd"):
        loaded = loaded_step(root, tiers)
    assert (loaded.step, loaded.tier) == (3, "shared")
    assert "skipping" in caplog.text and "tier root" in caplog.text

    # a replaced node: the root is empty, and the tiers come from the manager's own list
    daemon.stop()
    shutil.rmtree(root)
    os.makedirs(root)
    assert (loaded_step(root, tiers).step, loaded_step(root, tiers).tier) == (3, "shared")
    shutil.rmtree(shared)
    assert (loaded_step(root, tiers).step, loaded_step(root, tiers).tier) == (2, "archive")


def test_a_copy_cut_by_kill_9_leaves_no_checkpoint_and_is_redone_at_the_next_start(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    args = ("--tier", f"shared={shared}", "--tier-copy-mbps", "1")
    daemon = daemon_factory(*args)
    trainer = Trainer(numel=2 * MIB // 4)
    with manager_for(daemon, trainer) as manager:
        trainer.at_step(4)
        manager.save_checkpoint(4).wait(60)
        assert wait_for(lambda: tier_status(daemon, "shared")["bytes_copied"] > 0)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    assert checkpoint_steps(str(shared)) == [] and read_latest(str(shared)) is None
    assert leftovers(str(shared)), "the interrupted copy should have left its tmp directory"

    restarted = daemon_factory(*args[:2])
    assert wait_for(lambda: read_latest(str(shared)) == 4)
    # the copy goes on to the tier's retention record (an atomic write: a tmp file for a moment)
    assert wait_for(lambda: leftovers(str(shared)) == []), leftovers(str(shared))
    assert assert_tier_holds_verified_steps(shared) == [4]
    assert "left by an interrupted copy" in restarted.log()


def test_a_source_file_that_does_not_match_its_record_is_not_copied(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(3 * 4096 + 100))  # a page-aligned bulk (O_DIRECT) and a tail
    good = Checksum()
    good.update(source.read_bytes())
    seen: List[int] = []
    record = FileRecord("m", source.stat().st_size, good.hexdigest())
    copy_listed_file(str(source), str(tmp_path / "copy"), record, Throttle(None), lambda _, n: seen.append(n))
    assert (tmp_path / "copy").read_bytes() == source.read_bytes() and sum(seen) == record.size
    for bad, reason in [
        (FileRecord("m", record.size, "xxh3-64:0000000000000000"), "does not match the manifest"),
        (FileRecord("m", record.size - 1, good.hexdigest()), f"holds {record.size} bytes"),
    ]:
        with pytest.raises(FileProblem, match=reason):
            copy_listed_file(str(source), str(tmp_path / "bad"), bad, Throttle(None), lambda *_: None)
        assert not (tmp_path / "bad").exists()


def test_a_stopping_daemon_finishes_the_copies_it_has_queued(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    daemon = daemon_factory("--tier", f"shared={shared}", "--tier-copy-mbps", "1")
    trainer = Trainer(numel=MIB // 4)
    with manager_for(daemon, trainer) as manager:
        trainer.at_step(7)
        manager.save_checkpoint(7).wait(60)
    assert read_latest(str(shared)) is None  # 1 MiB at 1 MB/s: still copying
    assert daemon.stop(timeout=60) == 0
    assert read_latest(str(shared)) == 7 and assert_tier_holds_verified_steps(shared) == [7]
