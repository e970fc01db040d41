"""Save plans: a repeat save of a state with the same structure reuses the plan (client and daemon),
holds exactly its own step's values, and any change of structure is planned again."""

from __future__ import annotations

import os
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List

import msgpack
import numpy as np
import pytest
import pytest_asyncio
import torch
import zmq
import zmq.asyncio
from helpers import Daemon, Holder, raw_save_body, saved_state

from ckptd.client import CheckpointClient, PreparedComponent, SharingPattern, StateComponent
from ckptd.client.codec import flatten_state
from ckptd.client.save_plan import ComponentPlan
from ckptd.client.snapshot import snapshot
from ckptd.client.topology import RankInfo
from ckptd.disk.manifests import read_manifest
from ckptd.proto import messages
from ckptd.proto.messages import PlannedSave, SaveRequest
from ckptd.proto.topology import Topology
from ckptd.service.errors import SaveRejected
from ckptd.service.plans import SavePlans
from ckptd.service.shard_headers import ShardHeaders

RANK0 = RankInfo(0, Topology.single_node(1))


def components(state_of: Dict[str, Holder]) -> List[PreparedComponent]:
    return [PreparedComponent(StateComponent(key, h, SharingPattern.GLOBAL)) for key, h in state_of.items()]


def plan_of(state: Any) -> ComponentPlan:
    """A plan made from a real snapshot of `state` (one GLOBAL component)."""
    plans: Dict[str, ComponentPlan] = {}
    snapshot(components({"c": Holder(state)}), RANK0, plans)
    return plans["c"]


def matched(plan: ComponentPlan, state: Any) -> Any:
    """The flattened `state` if it still fits `plan` (structure and tensors), else None."""
    found = plan.match_structure(state)
    return None if found is None or not plan.tensors_hold(found.tensors) else found.flat


def tied_module() -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    module[1].weight = module[0].weight
    return module


# (name, state before, state after: same structure, other values)
HITS: List[Any] = [
    ("scalars change", lambda: {"w": torch.ones(3), "step": 1, "lr": 0.1}, lambda s: {**s, "step": 2, "lr": 0.05}),
    ("minus zero", lambda: {"w": torch.ones(3), "x": 0.0}, lambda s: {**s, "x": -0.0}),
    ("bool for int value", lambda: {"w": torch.ones(3), "x": 1}, lambda s: {**s, "x": True}),
    ("nan", lambda: {"w": torch.ones(3), "x": 1.0}, lambda s: {**s, "x": float("nan")}),
    ("numpy scalar", lambda: {"w": torch.ones(3), "x": np.float32(1.5)}, lambda s: {**s, "x": np.float32(2.5)}),
    (
        "dtype, Size, device",
        lambda: {"w": torch.ones(3), "d": torch.float32, "s": torch.Size([2]), "v": torch.device("cpu")},
        lambda s: {**s, "d": torch.bfloat16, "s": torch.Size([3, 4])},
    ),
    ("tuples and lists", lambda: {"t": (torch.ones(2), 1), "l": [torch.zeros(2), "a"]}, None),
    ("module with _metadata", lambda: torch.nn.Linear(3, 2).state_dict(), None),
    ("tied weights", lambda: tied_module().state_dict(), None),
]


@pytest.mark.parametrize("name,before,change", HITS, ids=[h[0] for h in HITS])
def test_a_state_of_the_same_structure_fits_its_plan_and_gets_the_full_skeleton(
    name: str, before: Callable[[], Any], change: Any
) -> None:
    state = before()
    plan = plan_of(state)
    after = change(state) if change is not None else state
    flat = matched(plan, after)
    assert flat is not None, f"{name}: the plan should hold"
    assert flat.skeleton == flatten_state(after, "c").skeleton


def _mutations() -> List[Any]:
    def tensor_resized(s: Dict[str, Any]) -> None:
        s["w"] = torch.ones(4)

    def tensor_replaced(s: Dict[str, Any]) -> None:
        s["w"] = torch.ones(3)

    def dtype_changed(s: Dict[str, Any]) -> None:
        s["w"] = s["w"].to(torch.float64)

    def key_added(s: Dict[str, Any]) -> None:
        s["new"] = 1

    def key_removed(s: Dict[str, Any]) -> None:
        del s["step"]

    def keys_reordered(s: Dict[str, Any]) -> None:
        step = s.pop("step")
        s["step"] = step
        s.move_to_end("w")

    def scalar_becomes_tensor(s: Dict[str, Any]) -> None:
        s["step"] = torch.tensor(1)

    def tensor_becomes_scalar(s: Dict[str, Any]) -> None:
        s["w"] = 3

    def list_grows(s: Dict[str, Any]) -> None:
        s["hist"].append(4)

    def tuple_becomes_list(s: Dict[str, Any]) -> None:
        s["pair"] = list(s["pair"])

    def alias_made(s: Dict[str, Any]) -> None:
        s["v"] = s["w"]

    def view_changed(s: Dict[str, Any]) -> None:
        s["w"] = s["w"].as_strided((3,), (0,))

    return [
        tensor_resized,
        tensor_replaced,
        dtype_changed,
        key_added,
        key_removed,
        keys_reordered,
        scalar_becomes_tensor,
        tensor_becomes_scalar,
        list_grows,
        tuple_becomes_list,
        alias_made,
        view_changed,
    ]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_any_change_of_structure_misses_the_plan(mutate: Callable[[Dict[str, Any]], None]) -> None:
    state: Dict[str, Any] = OrderedDict(
        w=torch.ones(3), v=torch.zeros(3), step=1, hist=[1, 2, 3], pair=(torch.ones(1), "x")
    )
    plan = plan_of(state)
    assert matched(plan, state) is not None
    mutate(state)
    assert matched(plan, state) is None


def test_int_keys_of_another_type_miss_the_plan() -> None:
    plan = plan_of({1: torch.ones(2), 2: torch.zeros(2)})
    assert matched(plan, {1: torch.ones(2), 2: torch.zeros(2)}) is None  # new tensors: new memory
    state = {1: torch.ones(2), 2: torch.zeros(2)}
    plan = plan_of(state)
    assert matched(plan, dict(state)) is not None
    assert matched(plan, {True: state[1], 2: state[2]}) is None


def test_colliding_key_paths_get_no_plan() -> None:
    plans: Dict[str, ComponentPlan] = {}
    state = {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    (staged,) = snapshot(components({"c": Holder(state)}), RANK0, plans)
    assert staged.plan is None and not plans


def test_repeat_saves_use_the_plan_and_each_holds_its_own_step(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    client = client_factory()
    model = OrderedDict(w=torch.zeros(1000), b=torch.zeros(10, dtype=torch.float64))
    trainer: Dict[str, Any] = {"step": 0, "lr": 1.0, "hist": torch.zeros(4, dtype=torch.int32)}
    parts = components({"model": Holder(model), "trainer": Holder(trainer)})
    planned = []
    for step in range(1, 6):
        model["w"].fill_(step)
        model["b"].fill_(-step)
        trainer["hist"].fill_(step)
        trainer.update(step=step, lr=1.0 / step)
        handle = client.save(step, parts)
        planned.append(handle.planned)
        path = handle.wait(60)
        got_model, got_trainer = saved_state(path, "model"), saved_state(path, "trainer")
        assert torch.equal(got_model["w"], torch.full((1000,), float(step)))
        assert torch.equal(got_model["b"], torch.full((10,), -float(step), dtype=torch.float64))
        assert got_trainer["step"] == step and got_trainer["lr"] == 1.0 / step
        assert torch.equal(got_trainer["hist"], torch.full((4,), step, dtype=torch.int32))
    assert planned == [False, True, True, True, True]


def test_components_declared_anew_at_every_save_use_the_plan_until_the_declaration_changes(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    """Providers often build their components at every save: a new StateComponent, a new wrapper
    around the same optimizer or RNG (examples/fsdp2_train.py's OptimizerState). The plan checks the
    state, not its holder; a change in what the save sends (here the metadata) plans again."""
    client = client_factory()
    model = {"w": torch.zeros(1000), "step": 0}

    def save(step: int, metadata: Dict[str, Any]) -> bool:
        model["w"].fill_(step)
        model["step"] = step
        parts = [PreparedComponent(StateComponent("model", Holder(model), SharingPattern.GLOBAL, metadata=metadata))]
        handle = client.save(step, parts)
        path = handle.wait(60)
        got = saved_state(path, "model")
        assert torch.equal(got["w"], torch.full((1000,), float(step))) and got["step"] == step
        assert read_manifest(path).components["model"].metadata == metadata
        return handle.planned

    assert [save(step, {"v": 1}) for step in range(1, 5)] == [False, True, True, True]
    assert [save(step, {"v": 2}) for step in range(5, 7)] == [False, True]


def test_a_changed_structure_is_planned_again_and_saved_right(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    client = client_factory()
    module = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    parts = [
        PreparedComponent(StateComponent("model", module, SharingPattern.GLOBAL)),
        PreparedComponent(StateComponent("optim", optimizer, SharingPattern.GLOBAL)),
    ]
    extra = Holder({"x": torch.zeros(2)})
    parts.append(PreparedComponent(StateComponent("extra", extra, SharingPattern.GLOBAL)))

    def save(step: int) -> bool:
        with torch.no_grad():
            module.weight.fill_(step)
        handle = client.save(step, parts)
        path = handle.wait(60)
        assert torch.equal(saved_state(path, "model")["weight"], torch.full((4, 8), float(step)))
        assert torch.equal(saved_state(path, "extra")["x"], extra.value["x"])
        state = saved_state(path, "optim")["state"]
        for index, param in enumerate(module.parameters()):
            if index in optimizer.state:
                assert torch.equal(state[index]["exp_avg"], optimizer.state[param]["exp_avg"])
        return handle.planned

    assert save(1) is False
    assert save(2) is True
    module(torch.ones(2, 8)).sum().backward()
    optimizer.step()  # creates the optimizer's state: a new structure
    assert save(3) is False
    optimizer.step()  # updates it in place: the same structure
    assert save(4) is True
    extra.value = {"x": torch.arange(5.0)}  # a bigger tensor: a bigger staging region
    assert save(5) is False
    assert save(6) is True
    extra.value["x"] = torch.arange(5.0) * 2  # same shape, new memory
    assert save(7) is False
    assert save(8) is True


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_restarted_daemon_gets_the_full_request_again(
    daemon_factory: Callable[..., Daemon], daemon: Daemon, overlap: bool
) -> None:
    client = CheckpointClient(
        str(daemon.root), RANK0, endpoint=daemon.endpoint, auto_start=False, timeout=60, connect_timeout=30
    )
    module = torch.nn.Linear(16, 16)
    parts = [PreparedComponent(StateComponent("model", module, SharingPattern.GLOBAL))]
    try:
        for step in (1, 2):
            with torch.no_grad():
                module.weight.fill_(step)
            assert client.save(step, parts, overlap=overlap).wait(60)
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        daemon_factory(root=daemon.root, endpoint=daemon.endpoint)
        with torch.no_grad():
            module.weight.fill_(3)
        handle = client.save(3, parts, overlap=overlap)
        path = handle.wait(60)
        assert handle.planned is False
        assert torch.equal(saved_state(path, "model")["weight"], torch.full((16, 16), 3.0))
        with torch.no_grad():
            module.weight.fill_(4)
        handle = client.save(4, parts, overlap=overlap)
        assert torch.equal(saved_state(handle.wait(60), "model")["weight"], torch.full((16, 16), 4.0))
        assert handle.planned is True
    finally:
        client.close(timeout=5)


# --- the daemon's side, through raw sockets ------------------------------------------------------


def full_body(daemon: Daemon, step: int, plan_id: int) -> Dict[str, Any]:
    body = raw_save_body(str(daemon.root), step, key="trainer", state={"step": step})
    body["plan_id"] = plan_id
    return body


def planned_body(plan_id: int, step: int, **overrides: Any) -> Dict[str, Any]:
    body = {
        "plan_id": plan_id,
        "step": step,
        "parts": [{"key": "trainer", "lease": 1, "state": msgpack.packb({"step": step}), "digests": None}],
        "metrics": {},
        "expires_at": time.monotonic() + 600,
    }
    body.update(overrides)
    return body


class RawClient:
    """One DEALER connection to the daemon, as a client process would hold it."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._ids = iter(range(1, 1_000_000))

    async def request(self, msg_type: str, body: Dict[str, Any]) -> messages.Envelope:
        msg_id = next(self._ids)
        await self.socket.send(messages.encode(msg_type, body, msg_id))
        while True:  # skip notifications (released, committed)
            assert await self.socket.poll(10_000), "the daemon did not answer"
            reply = messages.decode(await self.socket.recv())
            if reply.id == msg_id:
                return reply


@pytest_asyncio.fixture
async def raw_clients(daemon: Daemon) -> Any:
    context = zmq.asyncio.Context()
    clients: List[RawClient] = []

    def make() -> RawClient:
        clients.append(RawClient(context, daemon.endpoint))
        return clients[-1]

    yield make
    for client in clients:
        client.socket.close()
    context.term()


def committed_step(daemon: Daemon, step: int) -> Any:
    path = daemon.root / f"step_{step:08d}"
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return saved_state(str(path), "trainer")


@pytest.mark.asyncio
async def test_the_daemon_checks_a_planned_save_as_strictly_as_a_full_request(
    daemon: Daemon, raw_clients: Callable[[], RawClient]
) -> None:
    owner, stranger = raw_clients(), raw_clients()
    unknown = await owner.request(messages.SAVE_PLANNED, planned_body(7, 1))
    assert unknown.type == messages.ERROR and unknown.body["code"] == "unknown_plan", unknown.body
    registered = await owner.request(messages.SAVE, full_body(daemon, 1, plan_id=7))
    assert registered.type == messages.ACCEPTED, registered.body
    assert committed_step(daemon, 1) == {"step": 1}

    again = await owner.request(messages.SAVE_PLANNED, planned_body(7, 2))
    assert again.type == messages.ACCEPTED, again.body
    assert committed_step(daemon, 2) == {"step": 2}, "a planned save holds its own step's state"

    refusals = [
        (stranger, planned_body(7, 10), "unknown_plan", "no plan 7 of this client"),
        (owner, planned_body(8, 11), "unknown_plan", "no plan 8"),
        (
            owner,
            planned_body(7, 12, parts=[{"key": "other", "lease": 1, "state": b"", "digests": None}]),
            "invalid_request",
            "not the plan's",
        ),
        (owner, planned_body(7, 13, parts=["trainer"]), "invalid_request", "must be a map"),
        (
            owner,
            planned_body(7, 14, parts=[{"key": "trainer", "lease": 1, "state": None, "digests": None}]),
            "invalid_request",
            "must send the component's non-tensor state",
        ),
        (owner, planned_body(7, -1), "invalid_request", "non-negative"),
        (owner, planned_body(7, 15, expires_at=time.monotonic() - 1), "expired", "after the client stopped waiting"),
        (owner, planned_body(7, 1), "conflict", "already committed"),
    ]
    for client, body, code, text in refusals:
        reply = await client.request(messages.SAVE_PLANNED, body)
        assert reply.type == messages.ERROR and reply.body["code"] == code, (code, reply.body)
        assert text in reply.body["message"], reply.body
    still = await owner.request(messages.SAVE_PLANNED, planned_body(7, 4))
    assert still.type == messages.ACCEPTED, still.body
    assert committed_step(daemon, 4) == {"step": 4}
    assert (await owner.request(messages.BYE, {})).type == messages.OK
    gone = await owner.request(messages.SAVE_PLANNED, planned_body(7, 5))
    assert gone.body["code"] == "unknown_plan", "a client's goodbye drops its plans"


def test_the_daemon_keeps_a_bounded_number_of_plans_and_drops_those_of_gone_clients(tmp_path: Path) -> None:
    plans = SavePlans(limit=2)

    def request(plan_id: int) -> SaveRequest:
        body = raw_save_body(str(tmp_path), key="trainer")
        body["plan_id"] = plan_id
        return SaveRequest.from_wire(body)

    headers = {plan_id: ShardHeaders() for plan_id in (1, 2, 3)}
    for plan_id in (1, 2, 3):
        plans.remember(b"client", request(plan_id), {"trainer": "global"}, headers[plan_id])
    assert len(plans) == 2
    with pytest.raises(SaveRejected, match="no plan 1 of this client"):
        plans.recall(b"client", PlannedSave.from_wire(planned_body(1, 2)))
    recalled, scopes, its_headers = plans.recall(b"client", PlannedSave.from_wire(planned_body(3, 2)))
    assert (
        recalled.step == 2 and recalled.parts[0].state == msgpack.packb({"step": 2}) and scopes == {"trainer": "global"}
    )
    assert its_headers is headers[3], "a plan's shard headers live and go with it"
    again, _, _ = plans.recall(b"client", PlannedSave.from_wire(planned_body(3, 3)))
    assert again.parts[0].tensors is recalled.parts[0].tensors, (
        "planned saves share their plan's tensors (ShardHeaders)"
    )
    plans.forget_gone(lambda pid: pid == os.getpid())
    assert len(plans) == 2
    plans.forget_gone(lambda pid: False)
    assert len(plans) == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_the_first_save_finds_its_copies_and_region_views_made_while_the_memory_was_allocated(
    client_factory: Callable[..., CheckpointClient], overlap: bool
) -> None:
    client = client_factory()
    model = OrderedDict(w=torch.zeros(100_000), b=torch.zeros(10))
    parts = components({"model": Holder(model)})
    client.allocate_ahead(parts)
    assert client.wait_staging_allocated(30)
    plan = client._plans["model"]
    assert plan.views is not None and plan.planned_copies is not None, "the allocation did not plan the copies"
    views, copies = plan.views[1], plan.planned_copies[1]
    model["w"].fill_(3.0)
    handle = client.save(1, parts, overlap=overlap)
    assert plan.views[1] is views and plan.planned_copies[1] is copies  # the save used what was made ahead
    assert torch.equal(saved_state(handle.wait(60), "model")["w"], torch.full((100_000,), 3.0))


def _changed_in_place() -> List[Any]:
    """Changes to a planned tensor that keep the tensor object: the plan's copy would read stale memory."""

    def set_to_new_memory(w: torch.Tensor) -> torch.Tensor:
        w.set_(torch.full((300,), 7.0))
        return w

    def resized(w: torch.Tensor) -> torch.Tensor:
        w.resize_(400).fill_(7.0)
        return w

    def data_of_another_dtype(w: torch.Tensor) -> torch.Tensor:
        w.data = torch.full((300,), 7, dtype=torch.int32)
        return w

    def strides_changed(w: torch.Tensor) -> torch.Tensor:
        w.set_(w.untyped_storage(), 0, (150,), (2,))
        w.fill_(7.0)
        return w

    return [set_to_new_memory, resized, data_of_another_dtype, strides_changed]


@pytest.mark.parametrize("change", _changed_in_place(), ids=lambda f: f.__name__)
def test_a_tensor_changed_in_place_after_its_plan_is_saved_from_what_it_is_now(
    client_factory: Callable[..., CheckpointClient], change: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """A repeat save copies from views made of the plan's tensors while it checks that the plan
    still holds. A tensor whose memory, shape, strides or dtype changed in place misses, and the
    component is staged again in full from the same state dict, in the same save."""
    client = client_factory()
    small = {f"s{i}": torch.full((4,), float(i)) for i in range(50)}  # a group copied with one cat
    model: Dict[str, Any] = {"w": torch.zeros(300), **small}
    parts = components({"model": Holder(model)})
    for step in (1, 2):
        model["w"].fill_(step)
        handle = client.save(step, parts)
        assert torch.equal(saved_state(handle.wait(60), "model")["w"], torch.full((300,), float(step)))
    assert handle.planned
    expected = change(model["w"]).clone()
    handle = client.save(3, parts)
    got = saved_state(handle.wait(60), "model")
    assert handle.planned is False, "the changed tensor should have been planned again"
    assert got["w"].dtype == expected.dtype and torch.equal(got["w"], expected)
    assert all(torch.equal(got[k], v) for k, v in small.items())
    model["w"].fill_(8)
    handle = client.save(4, parts)
    assert handle.planned and torch.equal(saved_state(handle.wait(60), "model")["w"], torch.full_like(expected, 8))


class NewTensorsAtEverySave:
    """A state dict of new tensors at every call, as torch.get_rng_state() returns."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"t": torch.full((3,), float(self.step)), "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]


def test_a_component_that_misses_at_every_save_leaves_the_others_to_their_plans(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    """An RNG state's plan never holds: the save stages that component again in full and leaves the
    others as their plans staged them; every checkpoint holds its own step."""
    client = client_factory()
    model = {"w": torch.zeros(100_000), **{f"s{i}": torch.zeros(4) for i in range(20)}}
    fresh = NewTensorsAtEverySave()
    parts = components({"model": Holder(model), "rng": fresh})  # type: ignore[dict-item]
    model_plans = []
    for step in range(1, 6):
        for tensor in model.values():
            tensor.fill_(step)
        fresh.step = step
        path = client.save(step, parts).wait(60)
        model_plans.append(client._plans["model"])
        got = saved_state(path, "model")
        assert all(torch.equal(got[k], torch.full_like(v, step)) for k, v in model.items()), f"step {step}"
        assert torch.equal(saved_state(path, "rng")["t"], torch.full((3,), float(step)))
    assert all(plan is model_plans[0] for plan in model_plans), "the model was planned again"


def test_repeat_saves_of_mixed_tensors_hold_their_step_through_the_grouped_copies(
    client_factory: Callable[..., CheckpointClient],
) -> None:
    """Small tensors of one dtype are copied in groups, the rest one by one: every kind of tensor
    comes back with its own step's values."""
    client = client_factory()
    state: Dict[str, Any] = {
        "big": torch.zeros(300_000),  # over GROUPED_BELOW_BYTES: alone
        "a": torch.zeros(5),
        "b": torch.zeros(3, 2),
        "scalar": torch.tensor(0.0),
        "empty": torch.zeros(0),
        "transposed": torch.zeros(4, 6).t(),  # not contiguous: alone
        "half": torch.zeros(7, dtype=torch.bfloat16),
        "flags": torch.zeros(9, dtype=torch.bool),
        "ints": torch.zeros(6, dtype=torch.int64),
        "param": torch.nn.Parameter(torch.zeros(8)),
    }
    parts = components({"c": Holder(state)})
    for step in range(1, 5):
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.fill_(step % 2 == 0 if key == "flags" else step)
        handle = client.save(step, parts)
        got = saved_state(handle.wait(60), "c")
        assert handle.planned == (step > 1)
        for key, tensor in state.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor.detach()), f"step {step}: {key}"
    copies = client._plans["c"].planned_copies
    assert copies is not None and copies[1] is not None
    assert copies[1].groups and len(copies[1].destinations) >= 2  # both kinds were used


def test_a_group_is_copied_one_by_one_where_cat_has_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd.client.snapshot import _copy_group

    def no_kernel(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("cat has no kernel for this dtype")

    monkeypatch.setattr(torch, "cat", no_kernel)
    destination = torch.zeros(7)
    _copy_group(destination, [torch.full((3,), 1.0), torch.full((4,), 2.0)])
    assert torch.equal(destination, torch.tensor([1.0, 1, 1, 2, 2, 2, 2]))
