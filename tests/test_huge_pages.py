"""Staging memory on 2 MiB pages: ckptd reads the `huge=` mode of the tmpfs its regions live in,
and in a mount namespace of its own whose /dev/shm is a tmpfs mounted `huge=within_size`,
`huge=advise` or `huge=never`, a trainer stages on 2 MiB pages (under `huge=never` collapsed onto
them by ckptd, unless told not to), its daemon maps them whole, and a real save through that daemon
(started in that namespace) commits a checkpoint that loads back exactly. The machine's own
/dev/shm is never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from helpers import with_own_dev_shm

from ckptd.disk.runtime import staging_huge_pages

TESTS = Path(__file__).resolve().parent


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
        ("tmpfs /dev tmpfs rw,huge=always 0 0\nshm /dev/shm ramfs rw 0 0", None),  # nearest, whatever its type
        ("tmpfs /dev/shm tmpfs rw 0 0\ntmpfs /dev/shm tmpfs rw,huge=always 0 0", "always"),  # the last mounted
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


TRAINER = r"""
import json, os, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import torch
from helpers import Holder, start_daemon

from ckptd.client import CheckpointManager, RankInfo, SharingPattern, StateComponent, Topology
from ckptd.client.staging import StagingRegion
from ckptd.disk.memory_maps import collapse_works_in
from ckptd.disk.runtime import staging_huge_pages
from ckptd.proto.layout import REGION_DIR


def pmd_mapped_kb_of(pid):
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("ShmemPmdMapped:"))


def pmd_mapped_kb(path):
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(" " + path))
    return next(int(line.split()[1]) for line in lines[start + 1 :] if line.startswith("ShmemPmdMapped:"))


class Provider:
    def __init__(self, holder):
        self.holder = holder

    def get_state_components(self):
        return [StateComponent("model", self.holder, SharingPattern.GLOBAL)]


huge_pages = sys.argv[3] == "huge_pages"
report = {"mode": staging_huge_pages(), "collapse_works": collapse_works_in(REGION_DIR)}
region = StagingRegion(8 * 2**20, huge_pages)
report["region_pmd_kb"] = pmd_mapped_kb(region.path)
region.close()

work = Path(sys.argv[2])
single = RankInfo(0, Topology.single_node(1))
weights = {f"w{i}": torch.full((1024, 1024), float(i)) + torch.arange(1024.0) for i in range(6)}  # 24 MiB
daemon = start_daemon(work / "ckpt", work / "daemon.log")
try:
    with CheckpointManager(
        Provider(Holder({"step": 7, **weights})), str(daemon.root), endpoint=daemon.endpoint, auto_start=False,
        rank_info=single, huge_pages=huge_pages,
    ) as manager:
        report["allocated"] = manager.wait_staging_allocated(30)
        report["staged_pmd_kb"] = [pmd_mapped_kb(os.path.join(REGION_DIR, n)) for n in manager.client._pool.names()]
        path = manager.save_checkpoint(7).wait(60)
        report["daemon_pmd_kb"] = pmd_mapped_kb_of(daemon.process.pid)
    fresh = Provider(Holder({}))
    CheckpointManager(fresh, str(daemon.root), rank_info=single, connect=False).load_checkpoint(path)
    report["loaded_step"] = fresh.holder.value["step"]
    report["loaded_exactly"] = [name for name, t in weights.items() if torch.equal(fresh.holder.value[name], t)]
finally:
    daemon.stop()
report["daemon_traceback"] = "Traceback" in daemon.log()
print(json.dumps(report))
"""


def _trainer_in_private_shm(huge: str, pages: str, work: Path) -> Dict[str, Any]:
    """Run TRAINER with a /dev/shm of its own (a 256 MiB tmpfs mounted `huge=<huge>`), staging with
    huge_pages on or off (`pages`); its report."""
    assert os.geteuid() == 0 and shutil.which("unshare"), (
        "this test mounts a /dev/shm of its own: it needs root and unshare(1), as ./dev test has"
    )
    command = with_own_dev_shm(f"size=256m,huge={huge}", sys.executable, "-c", TRAINER, str(TESTS), str(work), pages)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: Dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


@pytest.mark.parametrize(
    ("huge", "pages", "mode"),
    [
        ("within_size", "huge_pages", "within_size"),
        ("advise", "huge_pages", "advise"),
        ("never", "huge_pages", None),  # collapsed onto 2 MiB pages by ckptd (Linux 6.1)
        ("never", "4k_pages", None),
    ],
)
def test_staging_takes_2mib_pages_where_the_kernel_allows_and_a_save_loads_back_exactly(
    tmp_path: Path, huge: str, pages: str, mode: Optional[str]
) -> None:
    report = _trainer_in_private_shm(huge, pages, tmp_path)
    assert report["mode"] == mode
    if mode or (pages == "huge_pages" and report["collapse_works"]):  # every page of a region is a 2 MiB one
        assert report["region_pmd_kb"] == 8 * 1024, report
        assert report["staged_pmd_kb"] and all(kb >= 2048 for kb in report["staged_pmd_kb"]), report
        assert report["daemon_pmd_kb"] >= min(report["staged_pmd_kb"]), f"the daemon maps 4 KiB entries: {report}"
    else:
        assert report["region_pmd_kb"] == 0 and report["staged_pmd_kb"] == [0], report
        assert report["daemon_pmd_kb"] == 0, report
    assert report["allocated"] and report["loaded_step"] == 7
    assert report["loaded_exactly"] == [f"w{i}" for i in range(6)], report
    assert not report["daemon_traceback"]
