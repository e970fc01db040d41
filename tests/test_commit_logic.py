"""The commit leader's logic without a daemon: the manifest built from the nodes' reports, and the
order in which ready saves commit (a real CheckpointStore on a temporary root, no sockets)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from ckptd.disk.manifests import read_manifest
from ckptd.disk.root import read_latest
from ckptd.proto import layout
from ckptd.proto.cluster import NodeReport, ScopeFiles
from ckptd.proto.errors import ProtocolError
from ckptd.proto.manifest import FileRecord
from ckptd.proto.messages import ComponentPart, Outcome
from ckptd.proto.patterns import SharingPattern, place
from ckptd.proto.sharding import ChunkSpec, chunk_index_entry
from ckptd.proto.topology import Topology
from ckptd.service.errors import CommitRejected
from ckptd.service.leader import Announce, LocalCommitLeader, build_manifest
from ckptd.service.store import CheckpointStore

TWO_NODES = Topology(((0,), (1,)))
PATTERNS = {"model": SharingPattern.GLOBAL, "rng": SharingPattern.PER_RANK}


def files_of(key: str, scope: str) -> ScopeFiles:
    tensor, state = layout.shard_paths(key, scope)
    return ScopeFiles(FileRecord(tensor, 4096, "xxh3_64:0", {}), FileRecord(state, 1, "xxh3_64:1"))


def node_report(step: int, node: int, job: str = "run", metrics: Dict[str, float] | None = None) -> NodeReport:
    """Node `node`'s report of a save of two components by the one rank it holds."""
    (rank,) = TWO_NODES.node_ranks(node)
    parts, files = [], {}
    for key, pattern in PATTERNS.items():
        placement = place(pattern, rank, TWO_NODES)
        writer = placement.writer_rank == rank
        parts.append(ComponentPart(key, pattern, writer=writer))
        if writer:
            files[key] = {placement.scope: files_of(key, placement.scope)}
    return NodeReport(
        job,
        step,
        node,
        TWO_NODES,
        {rank: tuple(parts)},
        files,
        versions={"node": str(node)},
        metrics=metrics or {"node": float(node)},
    )


def recorder(announced: List[Outcome]) -> Announce:
    """An announce callback that records the outcomes in order."""

    async def announce(outcome: Outcome) -> None:
        announced.append(outcome)

    return announce


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["node 0 first", "node 1 first"])
def test_the_manifest_lists_each_copy_once_with_its_writer_and_readers(order: Tuple[int, int]) -> None:
    manifest = build_manifest([node_report(7, node) for node in order])
    assert manifest.step == 7 and manifest.job == "run" and manifest.topology == TWO_NODES
    model = manifest.components["model"]
    assert list(model.scopes) == ["global"]
    assert model.scopes["global"].writer_rank == 0 and sorted(model.scopes["global"].readers) == [0, 1]
    rng = manifest.components["rng"]
    assert {name: (s.writer_rank, s.readers) for name, s in rng.scopes.items()} == {
        "rank-00000": (0, [0]),
        "rank-00001": (1, [1]),
    }
    assert manifest.metrics == {"node": 0.0} and manifest.versions == {"node": "0"}  # rank 0's, in any order
    assert len(manifest.files()) == 6


def test_a_scope_no_node_wrote_rejects_the_commit() -> None:
    reports = [node_report(7, 0), node_report(7, 1)]
    reports[1].files.clear()  # node 1 says its rank's PER_RANK part is durable, but lists no file
    with pytest.raises(CommitRejected, match="component 'rng': no file was written for scope rank-00001"):
        build_manifest(reports)


def test_nodes_that_disagree_on_the_components_reject_the_commit() -> None:
    reports = [node_report(7, 0), node_report(7, 1)]
    reports[1].parts[1] = reports[1].parts[1][:1]
    with pytest.raises(
        CommitRejected,
        match=r"ranks disagree on the components of this checkpoint: rank 0 has "
        r"\['model', 'rng'\], rank 1 has \['model'\]",
    ):
        build_manifest(reports)


@pytest.mark.asyncio
async def test_saves_ready_together_commit_lowest_step_first_and_latest_names_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    announced: List[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        leader = LocalCommitLeader(store, executor)
        leader.deliver_outcomes_to(recorder(announced))
        for step in (3, 1, 2):
            store.create_tmp_dir(step, "run")
        for step in (3, 1, 2):  # every node of each save reports before the committer runs
            for node in (1, 0):
                await leader.report(node_report(step, node))
        assert leader.reported_nodes() == {}
        await leader.close()
    assert [(o.step, o.committed) for o in announced] == [(1, True), (2, True), (3, True)]
    assert read_latest(store.root) == 3
    assert [read_manifest(o.path or "").step for o in announced] == [1, 2, 3]


@pytest.mark.asyncio
async def test_a_save_waits_for_every_node_and_an_abort_drops_it(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    announced: List[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        leader = LocalCommitLeader(store, executor)
        leader.deliver_outcomes_to(recorder(announced))
        store.create_tmp_dir(5, "run")
        await leader.report(node_report(5, 0))
        await asyncio.sleep(0)
        assert leader.reported_nodes() == {("run", 5): {0}} and announced == []
        await leader.abort("run", 5, "rank 1 did not hand over")
        await leader.report(node_report(5, 1))  # a late report of an aborted save starts it again, alone
        assert leader.reported_nodes() == {("run", 5): {1}}
        await leader.close()
    assert [(o.step, o.committed, o.reason) for o in announced] == [(5, False, "rank 1 did not hand over")]
    assert read_latest(store.root) is None


def sharded_report(node: int, rows: Dict[int, Tuple[int, int]]) -> NodeReport:
    """Node `node`'s report of a SHARDED tensor "w" of 4 x 2, its rank holding rows [start, start + n)."""
    (rank,) = TWO_NODES.node_ranks(node)
    start, count = rows[rank]
    tensor, state = layout.shard_paths("train", f"rank-{rank:05d}")
    entry = chunk_index_entry("F32", ChunkSpec((4, 2), (start, 0)), (count, 2), ["xxh3_64:0"])
    files = {
        "train": {
            f"rank-{rank:05d}": ScopeFiles(
                FileRecord(tensor, 4096, "xxh3_64:0", {"w": entry}), FileRecord(state, 1, "x")
            )
        }
    }
    part = ComponentPart("train", SharingPattern.SHARDED, writer=True)
    return NodeReport("run", 3, node, TWO_NODES, {rank: (part,)}, files, versions={}, metrics={})


def test_sharded_chunks_that_tile_commit_and_any_rank_reads_them() -> None:
    manifest = build_manifest([sharded_report(n, {0: (0, 2), 1: (2, 2)}) for n in (0, 1)])
    record = manifest.components["train"]
    assert record.pattern is SharingPattern.SHARDED
    assert {name: scope.readers for name, scope in record.scopes.items()} == {
        "rank-00000": [0, 1],
        "rank-00001": [0, 1],
    }


@pytest.mark.parametrize(
    ("rows", "problem"),
    [({0: (0, 2), 1: (3, 1)}, "cover 6 of its 8 elements"), ({0: (0, 3), 1: (2, 2)}, "overlap")],
    ids=["a gap", "an overlap"],
)
def test_sharded_chunks_that_do_not_tile_reject_the_commit(rows: Dict[int, Tuple[int, int]], problem: str) -> None:
    with pytest.raises(CommitRejected, match=problem):
        build_manifest([sharded_report(n, rows) for n in (0, 1)])


def test_a_report_names_a_known_topology_by_its_digest_and_an_unknown_one_is_refused() -> None:
    report = node_report(3, 1)
    full = report.to_wire()
    named = report.to_wire(with_topology=False)
    assert named["topology"] is None and named["topology_id"] == TWO_NODES.digest
    known = {TWO_NODES.digest: NodeReport.from_wire(full).topology}
    assert NodeReport.from_wire(named, known).topology == TWO_NODES
    with pytest.raises(ProtocolError, match="is unknown here; send it in full"):
        NodeReport.from_wire(named, {})
    with pytest.raises(ProtocolError, match="does not match its digest"):
        NodeReport.from_wire({**full, "topology_id": Topology(((0, 1),)).digest})
    assert Topology(((0, 2), (1,))).digest != Topology(((0,), (1, 2))).digest
    assert [TWO_NODES.node_of(rank) for rank in (0, 1)] == [0, 1]
    with pytest.raises(ValueError, match="rank 2 is not in a job of world size 2"):
        TWO_NODES.node_of(2)
