"""State fidelity end to end: every case saved through a real daemon and loaded back exactly."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from fidelity_cases import FIDELITY_CASES, assert_state_equal
from helpers import Daemon, Holder
from torch import nn

from ckptd.client import CheckpointManager, SharingPattern, StateComponent, UnsupportedStateError
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology

SINGLE = RankInfo(0, Topology.single_node(1))


class Provider:
    def __init__(self, statefuls: Dict[str, Any], pattern: SharingPattern = SharingPattern.GLOBAL) -> None:
        self.statefuls, self.pattern = statefuls, pattern

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent(key, stateful, self.pattern) for key, stateful in self.statefuls.items()]


def manager(daemon: Daemon, provider: Any) -> CheckpointManager:
    return CheckpointManager(
        provider, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE, timeout=60
    )


@pytest.mark.parametrize("pattern", [SharingPattern.GLOBAL, SharingPattern.PER_RANK])
def test_every_fidelity_case_round_trips_through_the_daemon(daemon: Daemon, pattern: SharingPattern) -> None:
    originals = {key: build() for key, build in FIDELITY_CASES.items()}
    with manager(daemon, Provider({k: Holder(v) for k, v in originals.items()}, pattern)) as saver:
        path = saver.save_checkpoint(1).wait(60)
    fresh = {key: Holder(None) for key in FIDELITY_CASES}
    loader = CheckpointManager(Provider(fresh, pattern), str(daemon.root), rank_info=SINGLE, connect=False)
    assert loader.load_checkpoint() == path
    for key, expected in ((k, FIDELITY_CASES[k]()) for k in FIDELITY_CASES):
        assert_state_equal(expected, fresh[key].value, path=key)
    tied = fresh["tensors_tied"].value
    shared = [v for v in _tensors(tied)]
    assert len(shared) >= 2 and all(t is shared[0] for t in shared), "tied tensors must load as one tensor"


def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_stay_tied_after_loading(daemon: Daemon) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    with manager(daemon, Provider({"model": model})) as saver:
        saver.save_checkpoint(1).wait(60)
    torch.manual_seed(1)
    fresh = TiedLM()
    CheckpointManager(Provider({"model": fresh}), str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint()
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_unsupported_value_fails_in_the_save_call_naming_the_path(daemon: Daemon) -> None:
    state = {"a": {"b": [1, {"c": object()}]}}
    with manager(daemon, Provider({"weird": Holder(state)})) as saver:
        with pytest.raises(UnsupportedStateError, match=r"'weird'.*a/b/1/c"):
            saver.save_checkpoint(1)
    assert not any(p.name.startswith("step_") for p in daemon.root.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned staging, device-to-host copies)")
def test_cuda_tensors_stage_through_pinned_regions(daemon: Daemon) -> None:
    state = {
        "w": torch.randn(256, 256, device="cuda"),
        "half": torch.randn(64, device="cuda").half(),
        "cpu": torch.arange(5),
    }
    with manager(daemon, Provider({"model": Holder(state)})) as saver:
        saver.save_checkpoint(1).wait(60)
    fresh = Holder(None)
    CheckpointManager(Provider({"model": fresh}), str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint()
    assert torch.equal(fresh.value["w"], state["w"].cpu()) and torch.equal(fresh.value["half"], state["half"].cpu())
    assert torch.equal(fresh.value["cpu"], state["cpu"])


def test_rng_streams_continue_exactly_after_save_and_load(daemon: Daemon) -> None:
    import random

    import numpy as np

    from ckptd.client import RNGState

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    with manager(daemon, Provider({"rng": RNGState()}, SharingPattern.PER_RANK)) as saver:
        saver.save_checkpoint(1).wait(60)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    CheckpointManager(
        Provider({"rng": RNGState()}, SharingPattern.PER_RANK), str(daemon.root), rank_info=SINGLE, connect=False
    ).load_checkpoint()
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
