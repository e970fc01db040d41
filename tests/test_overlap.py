"""Overlap mode: save_checkpoint returns before parameters are copied, yet a checkpoint can never
mix two steps: optimizer.step() waits for the copy, and buffers that forward changes are copied first."""

from __future__ import annotations

from typing import Any, List

import torch
from helpers import Daemon
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckptd.client import CheckpointManager, SharingPattern, StateComponent
from ckptd.client.loading import read_manifest, read_scope, select_scope
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology

SINGLE = RankInfo(0, Topology.single_node(1))


class Trainer:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(2048, 4096), nn.BatchNorm1d(4096), nn.Linear(4096, 2048))  # ~16.8M params
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.step()

    def get_state_components(self) -> List[StateComponent]:
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("optimizer", self.optimizer, SharingPattern.GLOBAL),
        ]

    def forward_backward(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.randn(8, 2048)).square().mean().backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()


def load_component(path: str, key: str) -> Any:
    manifest = read_manifest(path)
    return read_scope(path, select_scope(manifest, key, manifest.components[key], SINGLE))


def test_overlap_checkpoint_never_mixes_two_steps(daemon: Daemon) -> None:
    trainer = Trainer()
    expected_model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    expected_momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()]
    seen_by_later_hook: List[bool] = []
    with CheckpointManager(
        trainer, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        handle = manager.save_checkpoint(1, overlap=True)
        # registered after ckptd's hook, so it runs after it: the copy must be finished by then
        probe = register_optimizer_step_pre_hook(lambda *_: seen_by_later_hook.append(handle.staged()))
        try:
            trainer.step()  # forward changes BatchNorm statistics, step changes weights and momentum
        finally:
            probe.remove()
        path = handle.wait(60)
    assert seen_by_later_hook == [True]
    assert not torch.equal(trainer.model[0].weight, expected_model["0.weight"])  # training moved on
    saved_model = load_component(path, "model")
    for name, tensor in expected_model.items():
        assert torch.equal(saved_model[name], tensor), name
    saved_optimizer = load_component(path, "optimizer")
    for index, momentum in enumerate(expected_momentum):
        assert torch.equal(saved_optimizer["state"][index]["momentum_buffer"], momentum)


def test_overlap_returns_before_the_parameter_copy_and_wait_staged_blocks(daemon: Daemon) -> None:
    trainer = Trainer()
    with CheckpointManager(
        trainer, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as manager:
        manager.save_checkpoint(1).wait(60)  # warm the staging pool
        handle = manager.save_checkpoint(2, overlap=True)
        # 16.8M parameters plus momentum (134 MB) are still being copied when the call returns
        not_staged_at_return = not handle.staged()
        handle.wait_staged(60)
        assert handle.staged()
        assert handle.wait(60).endswith("step_00000002")
    assert not_staged_at_return
