"""`ckptd serve --metrics-port`: scraped over HTTP during and after real saves; the counters move."""

from __future__ import annotations

import re
import urllib.request
from typing import Callable, Dict, List

import torch
from helpers import Daemon, Holder, free_port, wait_for

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointManager,
    PreparedComponent,
    SharingPattern,
    StateComponent,
)
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology


def scrape(port: int) -> Dict[str, float]:
    """Samples by name (with labels), from the Prometheus text format."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([-+0-9.eE]+|NaN)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_metrics_count_saves_bytes_phases_and_aborts(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = daemon_factory("--max-write-mbps", "4", "--metrics-port", str(port), "--save-timeout", "3")
    before = scrape(port)
    assert before["ckptd_saves_started_total"] == 0 and before["ckptd_saves_in_flight"] == 0
    state = Holder({"w": torch.ones(2**20)})  # 4 MiB: about a second of writing

    class Trainer:
        def get_state_components(self) -> List[StateComponent]:
            return [StateComponent("model", state, SharingPattern.GLOBAL)]

    with CheckpointManager(Trainer(), str(daemon.root), endpoint=daemon.endpoint, auto_start=False) as manager:
        handle = manager.save_checkpoint(1)
        during: Dict[str, float] = {}

        def writing() -> bool:
            during.update(scrape(port))
            return during["ckptd_saves_in_flight"] == 1 and during["ckptd_bytes_written_total"] > 0

        assert wait_for(writing, timeout=20, interval=0.1)
        assert during["ckptd_saves_started_total"] == 1 and during["ckptd_staged_bytes_mapped"] >= 4 * 2**20
        handle.wait(60)
    after = scrape(port)
    assert after["ckptd_saves_committed_total"] == 1 and after["ckptd_saves_in_flight"] == 0
    assert after["ckptd_bytes_written_total"] >= 4 * 2**20 and after["ckptd_last_committed_step"] == 1
    assert after["ckptd_staged_bytes_mapped"] == 0
    for phase in ("handoff", "write", "fsync", "commit"):
        assert after[f'ckptd_save_phase_seconds_count{{phase="{phase}"}}'] == 1, phase
    assert after['ckptd_save_phase_seconds_sum{phase="write"}'] > 0.5

    # Rank 1 of 2 never hands over: the save times out and is counted as aborted.
    lonely = CheckpointClient(
        str(daemon.root), RankInfo(0, Topology.single_node(2)), endpoint=daemon.endpoint, auto_start=False
    )
    try:
        aborted = lonely.save(2, [PreparedComponent(StateComponent("x", Holder({"v": 1}), SharingPattern.PER_RANK))])
        try:
            aborted.wait(30)
        except CheckpointError:
            pass
    finally:
        lonely.close(timeout=10)
    final = scrape(port)
    assert final["ckptd_saves_aborted_total"] == 1 and final["ckptd_saves_started_total"] == 2
    assert "event=committed step=1" in daemon.log() and "event=aborted step=2" in daemon.log()
