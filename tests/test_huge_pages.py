"""Staging memory on 2 MiB pages: ckptd reads the `huge=` mode of the tmpfs its regions live in,
and a real save through a real daemon, with /dev/shm remounted `huge=within_size` or `huge=advise`
for the test, stages into huge pages and commits a checkpoint that loads back exactly."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from helpers import Daemon, Holder

from ckptd.client import CheckpointManager, SharingPattern, StateComponent
from ckptd.client.staging import StagingRegion
from ckptd.client.topology import RankInfo
from ckptd.disk.runtime import staging_huge_pages
from ckptd.proto.layout import REGION_DIR
from ckptd.proto.topology import Topology

SINGLE = RankInfo(0, Topology.single_node(1))


@pytest.mark.parametrize(
    ("mounts", "expected"),
    [
        ("tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0", None),
        ("tmpfs /dev/shm tmpfs rw,relatime,size=24683784k,huge=never 0 0", None),
        ("tmpfs /dev/shm tmpfs rw,huge=advise 0 0", "advise"),
        ("tmpfs /dev/shm tmpfs rw,huge=deny 0 0", None),
        ("tmpfs /dev/shm tmpfs rw,huge=within_size 0 0", "within_size"),
        ("tmpfs /dev/shm tmpfs rw,huge=always 0 0", "always"),
        ("tmpfs /dev tmpfs rw,huge=always 0 0\ntmpfs /dev/shm tmpfs rw 0 0", None),  # the nearest mount counts
        ("tmpfs /dev tmpfs rw,huge=always 0 0", "always"),  # /dev/shm inside a huge tmpfs
        ("tmpfs /dev/shmem tmpfs rw,huge=always 0 0", None),  # a sibling path, not a parent
        ("/dev/vda / ext4 rw 0 0", None),
    ],
)
def test_the_huge_page_mode_is_read_from_the_mount_that_holds_the_regions(
    tmp_path: Path, mounts: str, expected: str
) -> None:
    table = tmp_path / "mounts"
    table.write_text(mounts + "\n")
    assert staging_huge_pages(str(table)) == expected


def test_an_unreadable_mount_table_means_small_pages(tmp_path: Path) -> None:
    assert staging_huge_pages(str(tmp_path / "missing")) is None


def _shm_options() -> str:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == REGION_DIR and parts[2] == "tmpfs":
                return parts[3]
    pytest.skip(f"{REGION_DIR} is not a tmpfs mount here")


@contextlib.contextmanager
def shm_mounted(huge: str) -> Iterator[None]:
    """/dev/shm remounted with `huge=` this mode meanwhile, then back to what it was."""
    if os.geteuid() != 0:
        pytest.skip("remounting /dev/shm needs root")
    before = [o for o in _shm_options().split(",") if o.startswith("huge=")]
    subprocess.run(["mount", "-o", f"remount,huge={huge}", REGION_DIR], check=True)
    try:
        yield
    finally:
        restore = before[0] if before else "huge=never"
        subprocess.run(["mount", "-o", f"remount,{restore}", REGION_DIR], check=True)


@pytest.fixture(params=["within_size", "advise"])
def huge_shm(request: pytest.FixtureRequest) -> Iterator[str]:
    """/dev/shm remounted with 2 MiB pages for the test, in each mode ckptd uses them."""
    with shm_mounted(request.param):
        yield request.param


def _pmd_mapped_kb(path: str) -> int:
    """ShmemPmdMapped of this process's mapping of the file `path`, from /proc/self/smaps."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(" " + path))
    for line in lines[start + 1 :]:
        if line.startswith("ShmemPmdMapped:"):
            return int(line.split()[1])
    raise AssertionError(f"no ShmemPmdMapped line for the mapping of {path}")


class Provider:
    def __init__(self, holder: Holder) -> None:
        self.holder = holder

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", self.holder, SharingPattern.GLOBAL)]


def test_regions_get_huge_pages_where_the_mount_gives_them(huge_shm: str) -> None:
    assert staging_huge_pages() == huge_shm
    region = StagingRegion(8 * 2**20)
    try:
        assert _pmd_mapped_kb(region.path) == 8 * 1024
    finally:
        region.close()


def test_regions_stay_on_small_pages_on_a_default_mount() -> None:
    with shm_mounted("never"):
        assert staging_huge_pages() is None
        region = StagingRegion(8 * 2**20)
        try:
            assert _pmd_mapped_kb(region.path) == 0
        finally:
            region.close()


def test_a_save_staged_in_huge_pages_commits_and_loads_back(huge_shm: str, daemon: Daemon) -> None:
    weights = {f"w{i}": torch.full((1024, 1024), float(i)) + torch.arange(1024.0) for i in range(6)}  # 24 MiB
    with CheckpointManager(
        Provider(Holder({"step": 7, **weights})),
        str(daemon.root),
        endpoint=daemon.endpoint,
        auto_start=False,
        rank_info=SINGLE,
    ) as manager:
        assert manager.wait_staging_allocated(30)
        regions = [os.path.join(REGION_DIR, name) for name in manager.client._pool.names()]
        assert regions and all(_pmd_mapped_kb(path) >= 2048 for path in regions), regions
        path = manager.save_checkpoint(7).wait(60)
    fresh = Provider(Holder({}))
    CheckpointManager(fresh, str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint(path)
    assert fresh.holder.value["step"] == 7
    for name, tensor in weights.items():
        assert torch.equal(fresh.holder.value[name], tensor), name
