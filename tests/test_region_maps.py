"""The daemon maps each client's staging region once and keeps the mapping across saves (a fresh
mapping faults every page in again), and unmaps it when the client replaces the region, says
goodbye, or is gone: its shared memory is never held past its use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import pytest
import torch
from helpers import Daemon, Holder, saved_state

from ckptd.client import CheckpointClient, PreparedComponent, SharingPattern, StateComponent
from ckptd.disk.memory_maps import collapse_works_in
from ckptd.disk.runtime import staging_huge_pages
from ckptd.service.regions import RegionMaps, pid_alive

MIB = 2**20


def mapped_regions(pid: int) -> Dict[str, int]:
    """ckptd staging regions mapped by process `pid`: name -> number of mappings."""
    counts: Dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path[ (deleted)]]
            path = fields[5].strip().removesuffix(" (deleted)") if len(fields) > 5 else ""
            name = os.path.basename(path) if path.startswith("/dev/shm/") else ""
            if name.startswith("ckptd-"):
                counts[name] = counts.get(name, 0) + 1
    return counts


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def shmem_mapped_by_2mib_entries(pid: int) -> int:
    """Bytes of shared memory process `pid` maps with one page-table entry per 2 MiB page."""
    with open(f"/proc/{pid}/smaps") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("ShmemPmdMapped:"))


@pytest.mark.parametrize("huge_pages", [True, False], ids=["huge_pages", "4k_pages"])
def test_a_region_is_mapped_once_across_saves_and_unmapped_when_replaced_or_the_client_leaves(
    daemon: Daemon, client_factory: Callable[..., CheckpointClient], huge_pages: bool
) -> None:
    client = client_factory(huge_pages=huge_pages)
    state = OrderedDict(w=torch.zeros(16 * MIB // 4))
    parts = [PreparedComponent(StateComponent("model", Holder(state), SharingPattern.GLOBAL))]
    pid = daemon.process.pid
    faults: List[int] = []
    names: List[Dict[str, int]] = []
    for step in range(1, 5):
        state["w"].fill_(step)
        before = minor_faults(pid)
        path = client.save(step, parts).wait(60)
        faults.append(minor_faults(pid) - before)
        assert torch.equal(saved_state(path, "model")["w"], torch.full_like(state["w"], step))
        names.append(mapped_regions(pid))
    (region,) = names[0]
    assert all(n == {region: 1} for n in names), f"the daemon mapped the region again: {names}"
    huge = client.staging.huge_page_bytes()
    if huge_pages and collapse_works_in("/dev/shm"):
        assert huge == 16 * MIB, f"the region should lie on 2 MiB pages: {huge} bytes do"
    if huge:  # the daemon maps them at an aligned address: one entry, one fault, one pin per 2 MiB
        assert shmem_mapped_by_2mib_entries(pid) >= huge, open(f"/proc/{pid}/smaps").read()
        assert sum(faults) < 64, faults
    elif staging_huge_pages() is None:
        # the first save faults the region in (fault-around maps up to 16 pages a fault); repeats do not.
        pages = 16 * MIB // os.sysconf("SC_PAGE_SIZE")
        assert faults[0] > pages // 32, faults
        assert max(faults[1:]) < pages // 32, f"repeat saves faulted the region in again: {faults}"

    state["w"] = torch.arange(32 * MIB // 4, dtype=torch.float32)  # outgrows its region: a new one
    path = client.save(5, parts).wait(60)
    assert torch.equal(saved_state(path, "model")["w"], state["w"])
    (grown,) = mapped_regions(pid)
    assert grown != region and not os.path.exists(f"/dev/shm/{region}")

    client.close(timeout=10)  # goodbye: the daemon lets go of the client's memory
    assert mapped_regions(pid) == {}


def test_the_regions_of_a_client_gone_without_a_goodbye_are_unmapped() -> None:
    """RegionMaps on its own, with a real region of a real process that then exits."""
    maker = (
        "import os,sys;n=f'ckptd-{os.getuid()}-{os.getpid()}-test';"
        "fd=os.open('/dev/shm/'+n,os.O_RDWR|os.O_CREAT,0o600);os.ftruncate(fd,1<<20);os.write(fd,b'x'*4096);"
        "print(n,flush=True);sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", maker], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    name = child.stdout.readline().decode().strip()
    assert name == f"ckptd-{os.getuid()}-{child.pid}-test"
    maps = RegionMaps()
    try:
        first = maps.acquire(b"conn", "model", name, 1 << 20, child.pid)
        assert maps.acquire(b"conn", "model", name, 1 << 20, child.pid) is first
        assert bytes(first.view(4)) == b"xxxx"
        maps.forget_gone(pid_alive)
        assert len(maps) == 1 and mapped_regions(os.getpid()) == {name: 1}
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    maps.forget_gone(pid_alive)
    assert len(maps) == 0 and mapped_regions(os.getpid()) == {}
    assert not os.path.exists(f"/dev/shm/{name}"), "the gone client's region name was left behind"
