"""Retention: the pure keep rule, and a real daemon applying it after each commit."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from helpers import Daemon, Holder

from ckptd.client import CheckpointManager, RetentionPolicy, SharingPattern, StateComponent
from ckptd.client.loading import committed_checkpoints, hold_for_loading
from ckptd.disk.manifests import manifest_path
from ckptd.proto.manifest import Manifest
from ckptd.proto.retention import RETENTION_FILE, kept_steps
from ckptd.proto.topology import Topology
from ckptd.service.store import CheckpointStore


def test_keep_rules_combine_and_always_keep_the_newest() -> None:
    metrics = {1: 5.0, 2: 1.0, 3: math.nan, 4: 3.0, 5: 2.0, 6: 9.0}
    checkpoints = [(s, {"loss": v}) for s, v in metrics.items()] + [(7, {})]
    kept = kept_steps(checkpoints, RetentionPolicy(keep_last=2, keep_every=3, keep_best=2, best_metric="loss"))
    assert kept == {
        2: ["best 2 by loss (min)"],
        3: ["every 3"],
        5: ["best 2 by loss (min)"],
        6: ["last 2", "every 3"],
        7: ["newest", "last 2"],
    }
    best_max = kept_steps(checkpoints, RetentionPolicy(keep_best=1, best_metric="loss", best_mode="max"))
    assert set(best_max) == {6, 7}  # NaN and a missing metric never rank
    assert set(kept_steps(checkpoints, RetentionPolicy())) == set(range(1, 8))
    assert kept_steps([], RetentionPolicy(keep_last=1)) == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_last": 0}, "keep_last must be a positive integer"),
        ({"keep_every": 2.5}, "keep_every must be a positive integer"),
        ({"keep_best": 2}, "keep_best and best_metric go together"),
        ({"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"}, "best_mode must be 'min' or 'max'"),
    ],
)
def test_bad_policies_say_what_is_wrong(kwargs: Dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def _steps(root: Path) -> List[int]:
    return sorted(int(Path(p).name[5:]) for p in committed_checkpoints(str(root)))


def test_the_daemon_keeps_what_the_policy_says_after_each_commit(daemon: Daemon) -> None:
    state = Holder({"w": torch.zeros(64)})

    class Trainer:
        def get_state_components(self) -> List[StateComponent]:
            return [StateComponent("model", state, SharingPattern.GLOBAL)]

    policy = RetentionPolicy(keep_last=2, keep_every=4, keep_best=1, best_metric="val_loss")
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.6, 5: 0.4, 6: 0.3, 7: 0.8}
    with CheckpointManager(
        Trainer(), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, retention=policy
    ) as manager:
        seen = []
        for step, loss in losses.items():
            state.value["w"].fill_(step)
            manager.save_checkpoint(step, metrics={"val_loss": loss}).wait(60)
            seen.append(_steps(daemon.root))
        assert seen[-1] == [2, 4, 6, 7]  # best (0.2), every 4, the last 2
        assert seen[2] == [2, 3] and seen[4] == [2, 4, 5]
        record = json.loads((daemon.root / RETENTION_FILE).read_text())
        assert record["policy"]["keep_last"] == 2
        assert record["kept"]["2"] == ["best 1 by val_loss (min)"]
        assert "latest" in record["kept"]["7"] and "newest" in record["kept"]["7"]

        # A checkpoint a loader holds is kept until the loader lets go; deletion leaves no leftovers.
        with hold_for_loading(str(daemon.root / "step_00000006")):
            manager.save_checkpoint(8, metrics={"val_loss": 0.7}).wait(60)
            assert _steps(daemon.root) == [2, 4, 6, 7, 8]
            assert json.loads((daemon.root / RETENTION_FILE).read_text())["kept"]["6"][0].startswith("being loaded")
        manager.save_checkpoint(9, metrics={"val_loss": 0.7}).wait(60)
        assert _steps(daemon.root) == [2, 4, 8, 9]
        assert not [p.name for p in daemon.root.iterdir() if p.name.startswith(".tmp-")]
        state.value["w"].fill_(-1)
        assert manager.load_checkpoint().endswith("step_00000009")
        assert torch.equal(state.value["w"], torch.full((64,), 7.0))  # last filled at step 7


def test_a_half_deleted_checkpoint_is_never_loaded_and_is_cleaned_at_start(daemon_factory, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    half = root / ".tmp-step_00000003-deleted-1234abcd"  # a crash between the rename and the removal
    (half / "model").mkdir(parents=True)
    (half / "checkpoint_manifest.json").write_text("{}")
    assert committed_checkpoints(str(root)) == []
    daemon_factory(root=root)
    assert not half.exists()


def _commit_step(store: CheckpointStore, step: int, val_loss: float, job: str) -> None:
    manifest = Manifest(
        step=step,
        topology=Topology.single_node(1),
        groups={},
        components={},
        versions={},
        created_at="",
        committed_at="",
        timings={},
        metrics={"val_loss": val_loss},
        job=job,
    )
    store.commit(store.create_tmp_dir(step, job), step, manifest.to_json())


def test_retention_reads_a_manifest_again_once_it_is_another_file(tmp_path: Path) -> None:
    """Retention remembers what it read of each manifest; a manifest replaced on disk is read anew."""
    store = CheckpointStore(str(tmp_path / "root"))
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="val_loss")
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.9)):
        _commit_step(store, step, loss, job="a")
    store.advance_latest(3)
    assert store.apply_retention(policy) == [1]  # keeps 2 (best) and 3 (last)
    # Step 2's manifest is rewritten (as by an operator or another daemon) with a worse metric.
    path = Path(manifest_path(store.final_path(2)))
    path.write_text(path.read_text().replace('"val_loss":0.1', '"val_loss":0.95'))
    _commit_step(store, 4, 0.3, job="b")
    store.advance_latest(4)
    assert store.apply_retention(policy) == [2, 3]  # 4 is now both the best and the last
    record = json.loads((Path(store.root) / RETENTION_FILE).read_text())
    assert "best 1 by val_loss (min)" in record["kept"]["4"]
    assert record["deleted"] == [[1, "a"], [2, "a"], [3, "a"]]
