"""A full disk: every rank's save fails naming the path and ENOSPC, nothing partial is left, the
previous checkpoint is intact, the daemon keeps serving, and a save after space is freed commits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from helpers import Daemon, Holder, wait_for

from ckptd.client import CheckpointClient, CheckpointError, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.loading import latest_checkpoint, read_manifest, verify_file
from ckptd.client.topology import RankInfo
from ckptd.proto.ownership import CLAIM_FILE
from ckptd.proto.topology import Topology


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def state(megabytes: int) -> list[PreparedComponent]:
    return [
        PreparedComponent(
            StateComponent("model", Holder({"w": torch.ones(megabytes * 2**18)}), SharingPattern.REPLICATED)
        )
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_fails_every_rank_and_keeps_the_previous_checkpoint(
    small_disk: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    root = small_disk / "ckpt"
    daemon = daemon_factory(root=root)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (9 * 2**20))
    ranks = [
        CheckpointClient(
            str(root), RankInfo(r, Topology.single_node(2)), endpoint=daemon.endpoint, auto_start=False, timeout=30
        )
        for r in range(2)
    ]
    try:
        first = [c.save(1, state(1)) for c in ranks]
        assert first[0].wait(30) == first[1].wait(30)
        second = [c.save(2, state(8)) for c in ranks]
        for handle in second:
            with pytest.raises(
                CheckpointError, match=r"step 2 .*No space left on device \[ENOSPC\] .*ckpt/\.tmp-step_00000002"
            ):
                handle.wait(30)
        # the aborted save's directory goes once the last rank's write has failed too
        # (and the claim of the run, which is still live)
        assert wait_for(
            lambda: sorted(p.name for p in root.iterdir()) == [CLAIM_FILE, "latest", "step_00000001"], timeout=30
        )
        assert latest_checkpoint(str(root)).endswith("step_00000001")
        for record in read_manifest(str(root / "step_00000001")).files():
            verify_file(str(root / "step_00000001"), record)
        filler.unlink()
        third = [c.save(3, state(8)) for c in ranks]
        assert third[0].wait(30).endswith("step_00000003") and third[1].wait(30) == third[0].wait(30)
    finally:
        for client in ranks:
            client.close(timeout=5)
    assert daemon.process.poll() is None
