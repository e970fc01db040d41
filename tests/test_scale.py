"""The commit path across simulated nodes in network namespaces, with partitions (issue 17; the
bounded version of bench/bench_scale.py): real daemons talking over veth links, light ranks over the
real protocol (tests/netns_cluster.py). Needs root, as CI has."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from helpers import wait_for
from netns_cluster import LightRanks, NetnsCluster, SaveResult, netns_available

from ckptd.client.loading import read_manifest

pytestmark = pytest.mark.skipif(not netns_available(), reason="network namespaces need root and iproute2")

NODES, RANKS_PER_NODE, PEER_TIMEOUT = 3, 2, 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NetnsCluster]:
    secret = tmp_path / "cluster.secret"
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    with NetnsCluster(NODES, peer_timeout=PEER_TIMEOUT) as nodes:
        nodes.start(secret)
        yield nodes


def saves(cluster: NetnsCluster, plan: List[tuple]) -> List[SaveResult]:
    """Run `plan`, a list of (step, action before the save or None), through one set of light ranks."""

    async def run() -> List[SaveResult]:
        ranks = LightRanks(cluster, RANKS_PER_NODE, job=f"test-{cluster.tag}")  # one run: it owns the root
        await ranks.connect()
        try:
            results = []
            for step, before in plan:
                if before is not None:
                    before()
                results.append(await ranks.save(step, timeout=6 * PEER_TIMEOUT + 10))
            return results
        finally:
            ranks.close()

    return asyncio.run(run())


def assert_every_rank_in(cluster: NetnsCluster, step: int) -> None:
    """A committed step holds every rank's state: no save commits without every node."""
    manifest = read_manifest(str(cluster.root / f"step_{step:08d}"))
    assert manifest.step == step
    assert sorted(manifest.components["rng"].scopes) == [f"rank-{r:05d}" for r in range(NODES * RANKS_PER_NODE)]


def test_saves_commit_across_namespaces_and_the_leader_sees_every_node(cluster: NetnsCluster) -> None:
    results = saves(cluster, [(step, None) for step in range(1, 4)])
    assert all(r.committed for r in results), results
    for step in range(1, 4):
        assert_every_rank_in(cluster, step)

    def caught_up() -> bool:  # the followers' views arrive with their next heartbeat
        rows = cluster.status(0)["cluster"]["nodes"]
        return all(row["alive"] and row.get("last_committed") == 3 and row["lag_steps"] == 0 for row in rows)

    assert wait_for(caught_up, timeout=4 * PEER_TIMEOUT), cluster.status(0)["cluster"]["nodes"]
    view = cluster.status(0)["cluster"]
    assert [row["node"] for row in view["nodes"]] == list(range(NODES))
    reports = view["traffic"]["received"]["node_report"][0]
    assert reports == 3 * (NODES - 1)  # one report per follower per save: O(nodes), not O(ranks)
    shown = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "status", "--cluster", "--endpoint", cluster.endpoint(0)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(shown.splitlines()) == NODES + 1 and shown.count(" yes ") == NODES, shown
    cluster_json = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "status", "--cluster", "--json", "--endpoint", cluster.endpoint(0)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(json.loads(cluster_json)["nodes"]) == NODES
    refused = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "status", "--cluster", "--endpoint", cluster.endpoint(1)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "node 0's daemon" in refused.stderr


@pytest.mark.parametrize("cut", [2, 0], ids=["follower", "leader"])
def test_a_partitioned_node_aborts_the_save_in_time_and_later_saves_commit(cluster: NetnsCluster, cut: int) -> None:
    started = time.monotonic()
    (before,) = saves(cluster, [(1, None)])
    assert before.committed
    cluster.partition(cut)
    try:
        (during,) = saves(cluster, [(2, None)])
        took = time.monotonic() - started
    finally:
        cluster.heal(cut)
    assert not during.committed
    assert took < 4 * PEER_TIMEOUT + 8, took
    if cut == 0:
        assert any("commit leader" in reason for reason in during.reasons), during.reasons
    else:
        assert any(f"node(s) [{cut}]" in reason for reason in during.reasons), during.reasons
    assert not (cluster.root / "step_00000002").exists()
    deadline = time.monotonic() + 6 * PEER_TIMEOUT
    while cluster.joined() < NODES - 1:
        assert time.monotonic() < deadline, cluster.logs(range(NODES))
        time.sleep(0.2)
    results = saves(cluster, [(3, None), (4, None)])
    assert any(r.committed for r in results), (results, cluster.logs(range(NODES)))
    assert results[-1].committed, results
    assert_every_rank_in(cluster, 4)


def test_a_partition_shorter_than_the_peer_timeout_costs_no_save(cluster: NetnsCluster) -> None:
    healer = threading.Timer(PEER_TIMEOUT / 2, cluster.heal, (1,))

    def cut_for_a_while() -> None:  # the save runs while node 1 is cut off, and it heals mid-save
        cluster.partition(1)
        healer.start()

    try:
        results = saves(cluster, [(1, None), (2, cut_for_a_while), (3, None)])
    finally:
        healer.join()
    assert all(r.committed for r in results), results
    for step in (1, 2, 3):
        assert_every_rank_in(cluster, step)


def test_a_node_in_the_other_root_mode_gets_every_save_aborted_with_the_reason(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    # Node 1's node-local root is its own directory, as on a real node: were it the shared root, node 0's
    # start-up sweep of leftovers could take node 1's temporary files mid-write.
    with NetnsCluster(
        2,
        peer_timeout=PEER_TIMEOUT,
        node_args={1: ["--node-local-root"]},
        local_roots={1: tmp_path / "node1-local"},
    ) as nodes:
        nodes.start(secret)

        async def one_save() -> SaveResult:
            ranks = LightRanks(nodes, 1)
            await ranks.connect()
            try:
                return await ranks.save(1, timeout=30)
            finally:
                ranks.close()

        result = asyncio.run(one_save())
    assert not result.committed
    assert any(
        "node 1's daemon runs with --node-local-root and node 0's with a shared root" in r for r in result.reasons
    )


def test_the_scale_bench_prints_ckptd_beside_its_floor(tmp_path: Path) -> None:
    """bench/bench_scale.py, tiny: every save commits, and the floor's three receiver kinds each
    measured a broadcast (the figures the closing notes quote stay producible)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_scale.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--nodes", "3", "--saves", "3", "--idle", "0.5", "--floor-rounds", "3"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "scale_1rpn.json").read_text())
    assert row["nodes"] == 3 and row["failed"] == 0
    assert 0 < row["told_after_publish_ms"] <= row["commit_latency_ms"]
    for kind in ("zmq.asyncio", "LoopSocket", "blocking"):
        assert row[f"floor_{kind}_ms"] > 0, kind
    assert "bare broadcast, LoopSocket receivers ms" in result.stdout
