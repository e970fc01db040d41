"""Public API contracts: component validation, providers, loading rules and their errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import Daemon, Holder, short_endpoint

from ckptd.client import (
    CheckpointError,
    CheckpointManager,
    SharingPattern,
    StateComponent,
)
from ckptd.client.topology import RankInfo
from ckptd.proto.layout import UnsafeNameError
from ckptd.proto.topology import Topology

SINGLE = RankInfo(0, Topology.single_node(1))


@pytest.mark.parametrize("key", ["../../x", "/abs", "a/b", "a\0b", "..", ".hidden", "", "x" * 200, "a..b"])
def test_unsafe_component_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeNameError, match="not a safe name"):
        StateComponent(key, Holder({}), SharingPattern.GLOBAL)


def test_component_rules() -> None:
    with pytest.raises(ValueError, match="PER_GROUP needs process_group_name"):
        StateComponent("pp", Holder({}), SharingPattern.PER_GROUP)
    with pytest.raises(ValueError, match="validate_replication applies only to REPLICATED"):
        StateComponent("m", Holder({}), SharingPattern.GLOBAL, validate_replication=True)
    with pytest.raises(UnsafeNameError):
        StateComponent("m", Holder({}), SharingPattern.PER_GROUP, process_group_name="../g")
    with pytest.raises(TypeError, match="state_dict"):
        StateComponent("m", object(), SharingPattern.GLOBAL)
    component = StateComponent("m", Holder({}), "REPLICATED", validate_replication=True)
    assert component.sharing_pattern is SharingPattern.REPLICATED


class LegacyProvider:
    def __init__(self, value: Dict[str, Any]) -> None:
        self.holder = Holder(value)

    def get_statefuls_for_save(self) -> Dict[str, Any]:
        return {"trainer": self.holder}

    def get_statefuls_for_load(self) -> Dict[str, Any]:
        return {"trainer": self.holder}


def test_legacy_provider_still_works_as_global_with_a_warning(daemon: Daemon) -> None:
    with pytest.warns(DeprecationWarning, match="get_state_components"):
        manager = CheckpointManager(
            LegacyProvider({"step": 3, "w": torch.ones(2)}),
            str(daemon.root),
            endpoint=daemon.endpoint,
            auto_start=False,
            rank_info=SINGLE,
        )
    with manager:
        path = manager.save_checkpoint(3).wait(30)
    fresh = LegacyProvider({})
    with pytest.warns(DeprecationWarning):
        CheckpointManager(fresh, str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint(path)
    assert fresh.holder.value["step"] == 3 and torch.equal(fresh.holder.value["w"], torch.ones(2))


class GroupProvider:
    def __init__(self, groups: Dict[str, Any] | None) -> None:
        self.groups = groups

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("stage", Holder({}), SharingPattern.PER_GROUP, process_group_name="stage")]

    def __getattr__(self, name: str) -> Any:
        if name == "get_process_groups" and self.groups is not None:
            return lambda: self.groups
        raise AttributeError(name)


def test_per_group_without_its_process_group_fails_before_a_daemon_starts(tmp_path: Path) -> None:
    endpoint = short_endpoint()
    for groups, message in ((None, "no get_process_groups"), ({"data": object()}, r"'stage'.*has \['data'\]")):
        with pytest.raises(CheckpointError, match=message):
            CheckpointManager(GroupProvider(groups), str(tmp_path / "ckpt"), endpoint=endpoint, rank_info=SINGLE)
    assert not os.path.exists(endpoint[len("ipc://") :])  # auto_start never got to start one


class Provider:
    def __init__(self, components: List[StateComponent]) -> None:
        self.components = components

    def get_state_components(self) -> List[StateComponent]:
        return self.components


def test_missing_components_required_error_optional_warning(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    saved = Provider([StateComponent("model", Holder({"w": torch.zeros(3)}), SharingPattern.GLOBAL)])
    with CheckpointManager(saved, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE) as m:
        m.save_checkpoint(1).wait(30)
    extra_optional = StateComponent("ema", Holder("untouched"), SharingPattern.GLOBAL, required=False)
    model = Holder(None)
    loader = CheckpointManager(
        Provider([StateComponent("model", model, SharingPattern.GLOBAL), extra_optional]),
        str(daemon.root),
        rank_info=SINGLE,
        connect=False,
    )
    with caplog.at_level(logging.WARNING):
        loader.load_checkpoint()
    assert "optional component 'ema'" in caplog.text and extra_optional.stateful.value == "untouched"
    assert torch.equal(model.value["w"], torch.zeros(3))
    required = CheckpointManager(
        Provider([StateComponent("ema", Holder(None), SharingPattern.GLOBAL)]),
        str(daemon.root),
        rank_info=SINGLE,
        connect=False,
    )
    with pytest.raises(CheckpointError, match="required component 'ema' is not in"):
        required.load_checkpoint()


def test_per_rank_state_refuses_a_different_topology(daemon: Daemon, tmp_path: Path) -> None:
    provider = Provider(
        [
            StateComponent("rng", Holder({"seed": 1}), SharingPattern.PER_RANK),
            StateComponent("model", Holder({"w": torch.ones(2)}), SharingPattern.GLOBAL),
        ]
    )
    with CheckpointManager(
        provider, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as m:
        m.save_checkpoint(1).wait(30)
    two_ranks = RankInfo(0, Topology.single_node(2))
    global_only = Provider([StateComponent("model", Holder(None), SharingPattern.GLOBAL)])
    CheckpointManager(global_only, str(daemon.root), rank_info=two_ranks, connect=False).load_checkpoint()
    assert torch.equal(global_only.components[0].stateful.value["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"saved with world size 1 .* this job has world size 2"):
        CheckpointManager(provider, str(daemon.root), rank_info=two_ranks, connect=False).load_checkpoint()


def test_no_checkpoint_yet_is_a_clear_error(tmp_path: Path) -> None:
    manager = CheckpointManager(Provider([]), str(tmp_path / "empty"), rank_info=SINGLE, connect=False)
    assert manager.latest_checkpoint() is None
    with pytest.raises(CheckpointError, match="no committed checkpoint under"):
        manager.load_checkpoint()


def test_load_restores_into_the_existing_tensors(daemon: Daemon) -> None:
    model = torch.nn.Linear(64, 32)
    provider = Provider([StateComponent("model", model, SharingPattern.GLOBAL)])
    with CheckpointManager(
        provider, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as m:
        m.save_checkpoint(1).wait(30)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    addresses = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    CheckpointManager(provider, str(daemon.root), rank_info=SINGLE, connect=False).load_checkpoint()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == addresses
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
