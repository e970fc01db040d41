"""The pure rules in ckptd.proto: the dedup table, topology, layout checks, messages, manifest."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ckptd.disk.safetensors import encode_header
from ckptd.proto import Manifest, ManifestError, ProtocolError, SharingPattern, Topology, is_writer, messages, place
from ckptd.proto.formats import TensorEntry, check_tensor_layout, layout_tensors
from ckptd.proto.layout import checkpoint_dir_name, parse_checkpoint_dir_name

TWO_NODES = Topology.uniform(4, 2)  # node 0: ranks 0,1; node 1: ranks 2,3


@pytest.mark.parametrize(
    "pattern,group,expected",
    [
        (SharingPattern.GLOBAL, None, {0: ("global", 0), 1: ("global", 0), 2: ("global", 0), 3: ("global", 0)}),
        (SharingPattern.REPLICATED, None, {r: ("global", 0) for r in range(4)}),
        (SharingPattern.PER_RANK, None, {r: (f"rank-{r:05d}", r) for r in range(4)}),
        (
            SharingPattern.PER_NODE,
            None,
            {0: ("node-00000", 0), 1: ("node-00000", 0), 2: ("node-00001", 2), 3: ("node-00001", 2)},
        ),
        (
            SharingPattern.PER_GROUP,
            {0: [0, 2], 2: [0, 2], 1: [1, 3], 3: [1, 3]},
            {0: ("group-g-00000", 0), 2: ("group-g-00000", 0), 1: ("group-g-00001", 1), 3: ("group-g-00001", 1)},
        ),
    ],
)
def test_dedup_table(pattern: SharingPattern, group: dict | None, expected: dict) -> None:
    for rank, (scope, writer) in expected.items():
        ranks = group[rank] if group else None
        placement = place(pattern, rank, TWO_NODES, "g" if group else None, ranks)
        assert (placement.scope, placement.writer_rank) == (scope, writer)
        assert is_writer(pattern, rank, TWO_NODES, "g" if group else None, ranks) == (rank == writer)


def test_per_group_needs_membership() -> None:
    with pytest.raises(ValueError, match="not a member"):
        place(SharingPattern.PER_GROUP, 1, TWO_NODES, "g", [0, 2])


def test_topology_checks() -> None:
    assert TWO_NODES.node_of(3) == 1 and TWO_NODES.local_rank(3) == 1 and TWO_NODES.world_size == 4
    assert Topology.from_wire(TWO_NODES.to_wire()) == TWO_NODES
    for bad in ({"nodes": [[0, 0]]}, {"nodes": [[1]]}, {"nodes": []}, {"nodes": [["a"]]}, [1]):
        with pytest.raises(ValueError):
            Topology.from_wire(bad)


def test_layout_is_aligned_and_readable_by_safetensors(tmp_path) -> None:
    tensors = {
        "flag": torch.tensor([True, False, True]),
        "w": torch.randn(3, 5),
        "h": torch.randn(7).half(),
        "i": torch.arange(4, dtype=torch.int64),
        "e": torch.zeros(0, 2),
    }
    names = {"flag": "BOOL", "w": "F32", "h": "F16", "i": "I64", "e": "F32"}
    entries, total = layout_tensors((k, names[k], tuple(t.shape)) for k, t in tensors.items())
    assert [e.name for e in entries][0] == "i"  # widest dtype first keeps every tensor aligned
    assert all(e.offset % tensors[e.name].element_size() == 0 for e in entries)
    body = bytearray(total)
    for entry in entries:
        raw = tensors[entry.name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        body[entry.offset : entry.offset + entry.nbytes] = raw
    path = tmp_path / "x.safetensors"
    path.write_bytes(encode_header(entries, {"format": "pt"}) + bytes(body))
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_tensor_layout_checks() -> None:
    good = [TensorEntry("a", "F32", (2,), 0, 8), TensorEntry("b", "U8", (3,), 8, 3)]
    assert check_tensor_layout(good, 16) == 11
    with pytest.raises(ValueError, match="offset"):
        check_tensor_layout([TensorEntry("a", "F32", (2,), 4, 8)], 16)
    with pytest.raises(ValueError, match="do not match"):
        check_tensor_layout([TensorEntry("a", "F32", (2,), 0, 7)], 16)
    with pytest.raises(ValueError, match="region holds"):
        check_tensor_layout(good, 10)


def test_messages_round_trip_and_reject_garbage() -> None:
    part = messages.ComponentPart(
        key="model",
        pattern=SharingPattern.GLOBAL,
        writer=True,
        region="ckptd-0-1-a",
        region_size=8,
        tensors=(TensorEntry("w", "F32", (2,), 0, 8),),
        state=b"\x80",
    )
    request = messages.SaveRequest(root="/r", step=3, rank=0, pid=1, topology=Topology.single_node(1), parts=(part,))
    decoded = messages.decode(messages.encode(messages.SAVE, request.to_wire(), 5))
    assert decoded.id == 5 and messages.SaveRequest.from_wire(decoded.body) == request
    with pytest.raises(ProtocolError) as info:
        messages.decode(b"\x00" * (messages.MAX_FRAME_BYTES + 1))
    assert info.value.code == "bad_message"
    duplicate = request.to_wire()
    duplicate["parts"] = duplicate["parts"] * 2
    with pytest.raises(ProtocolError, match="duplicate component keys"):
        messages.SaveRequest.from_wire(duplicate)


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1, 2**63])
def test_a_pid_no_process_can_have_is_refused_before_anything_looks_it_up(pid: int) -> None:
    run = {"job": "j", "host": "h", "pid": 1, "rank": 0, "started_at": 0.0}
    request = messages.SaveRequest(root="/r", step=3, rank=0, pid=1, topology=Topology.single_node(1), parts=())
    for make, body in (
        (messages.Hello.from_wire, {"pid": pid, "root": "/r"}),
        (messages.Hello.from_wire, {"pid": 1, "root": "/r", "run": {**run, "pid": pid}}),
        (messages.SaveRequest.from_wire, {**request.to_wire(), "pid": pid}),
    ):
        with pytest.raises(ProtocolError, match="is not a process id") as info:
            make(body)
        assert info.value.code == "invalid_request"
    assert messages.Hello.from_wire({"pid": 2**22, "root": "/r"}).pid == 2**22


def test_checkpoint_dir_names() -> None:
    assert parse_checkpoint_dir_name(checkpoint_dir_name(42)) == 42
    assert parse_checkpoint_dir_name(".tmp-step_00000042-abc") is None


def test_manifest_refuses_paths_outside_the_checkpoint() -> None:
    text = """{"format_version": 1, "step": 1, "topology": {"nodes": [[0]]}, "groups": {}, "versions": {},
      "created_at": "", "committed_at": "", "timings": {}, "components": {"m": {"pattern": "GLOBAL",
      "required": true, "validate_replication": false, "scopes": {"global": {"writer_rank": 0, "readers": [0],
      "tensor_file": {"path": "../../etc/passwd", "size": 1, "checksum": "xxh3_64:0"},
      "state_file": {"path": "m/global.msgpack", "size": 1, "checksum": "xxh3_64:0"}}}}}}"""
    with pytest.raises((ManifestError, ValueError), match="etc/passwd|not a safe name|must be"):
        Manifest.from_json(text)
    with pytest.raises(ManifestError, match="format version"):
        Manifest.from_json('{"format_version": 99}')
