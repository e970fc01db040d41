"""What a row process runs beside its saves: the training loop whose speed the throughput columns
measure (a small MLP on the state's device), and the disk probes each writing row takes before and
after its saves (the disk's speed drifts on a shared host).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, List

from bench_limits import disk_probe
from bench_state import RowContext

# The throughput probe: a small MLP trained in the trainer process, fixed size (independent of --scale).
MLP_IN, MLP_HIDDEN, MLP_BATCH = 512, 1024, 128


class TrainingProbe:
    """The training loop whose speed the throughput columns measure: the MLP above, on the state's
    device, trained by hand-written SGD."""

    def __init__(self, torch: Any, ctx: RowContext) -> None:
        nn = torch.nn
        self.torch = torch
        self.ctx = ctx
        self.mlp = nn.Sequential(
            nn.Linear(MLP_IN, MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, MLP_IN),
        ).to(ctx.device)
        self.params = list(self.mlp.parameters())
        self.x = torch.randn(MLP_BATCH, MLP_IN, device=ctx.device)
        self.y = torch.randn(MLP_BATCH, MLP_IN, device=ctx.device)

    def step(self) -> None:
        """One training step, waited for on the device."""
        torch = self.torch
        # Plain SGD by hand: a torch.optim optimizer would import torch._dynamo (seconds) in rows
        # that have no optimizer of their own (state B).
        for p in self.params:
            p.grad = None
        torch.nn.functional.mse_loss(self.mlp(self.x), self.y).backward()
        with torch.no_grad():
            torch._foreach_add_(self.params, [p.grad for p in self.params], alpha=-1e-4)
        self.ctx.sync_stream()  # a GPU step counts once it has run, not when it is queued

    def rate_for(self, seconds: float) -> float:
        """Train for at least `seconds` (whole steps); return the steps per second."""
        start = time.perf_counter()
        steps = 0
        while True:
            self.step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps / elapsed

    def train_until(self, deadline: float) -> int:
        """Train until perf_counter() reaches `deadline`; returns the steps trained."""
        steps = 0
        while time.perf_counter() < deadline:
            self.step()
            steps += 1
        return steps


@dataclass
class DiskProbes:
    """The disk probes of one row (before and after its saves), in seconds; none when disabled."""

    enabled: bool
    seconds: List[float] = field(default_factory=list)

    def take(self, ctx: RowContext, workdir: str, when: str) -> None:
        """Write the state once with write+fsync (outside every timing) if probes are enabled."""
        if self.enabled:
            self.seconds.append(disk_probe(ctx.torch, ctx, os.path.join(workdir, f"disk-probe-{when}.bin")))
