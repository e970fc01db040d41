"""A trainer that saves a small state every step for a long run, and records its own resident memory
and open file descriptors as it goes (tests/test_long_run.py).

Usage: long_run_trainer.py ROOT ENDPOINT SAVES SAMPLE_EVERY OUT_JSONL
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ckptd.client import CheckpointError, CheckpointManager, RankInfo, SharingPattern, StateComponent, Topology
from ckptd.proto.retention import RetentionPolicy


class Tagged:
    """A model-sized stateful whose tensors hold the step they were saved at."""

    def __init__(self) -> None:
        self.weights = torch.zeros(256 * 1024 // 4)
        self.step = 0

    def state_dict(self) -> dict:
        return {"w": self.weights, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.weights.copy_(state["w"])
        self.step = state["step"]


class Provider:
    def __init__(self) -> None:
        self.model = Tagged()

    def get_state_components(self) -> list:
        return [StateComponent("model", self.model, SharingPattern.GLOBAL)]


def resident_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    root, endpoint, saves, sample_every, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    provider = Provider()
    manager = CheckpointManager(
        provider,
        root,
        endpoint=endpoint,
        auto_start=False,
        timeout=60,
        rank_info=RankInfo(0, Topology.single_node(1), job_id="long-run"),
        retention=RetentionPolicy(keep_last=3),
    )
    failures = 0
    last_error = ""
    with open(out, "w") as samples:
        for step in range(1, saves + 1):
            provider.model.weights.fill_(float(step))
            provider.model.step = step
            try:
                manager.save_checkpoint(step)
            except CheckpointError as exc:
                failures += 1
                last_error = str(exc)
            if step % sample_every == 0:
                record = {
                    "step": step,
                    "rss_kib": resident_kib(os.getpid()),
                    "fds": open_fds(os.getpid()),
                    "failures": failures,
                    "last_error": last_error,
                }
                samples.write(json.dumps(record) + "\n")
                samples.flush()
    manager.close()


if __name__ == "__main__":
    main()
