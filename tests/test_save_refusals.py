"""The daemon's refusals and aborts of a save that docs/troubleshooting.md ("## Saving") lists, each
provoked for real against a `ckptd serve` process whose ranks are in-process clients of one job.

Every test checks the exception type, that the message names the documented cause, that it arrives
within seconds of the call that triggers it, and that the checkpoint committed before stays intact
(it verifies, holds its own step's state, `latest` still names it) while the failed step never
gets a directory under its final name.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest
import torch
from helpers import Daemon, Holder, wait_for

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointSkipped,
    PreparedComponent,
    RankInfo,
    SharingPattern,
    StateComponent,
    Topology,
)
from ckptd.client.loading import read_manifest, read_scope, select_scope
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto.layout import checkpoint_dir_name
from ckptd.service.coordinator import MAX_SAVES_IN_FLIGHT

JOB = "save-refusals"
"""The one job id every client of a test uses (the daemon admits one live run per root)."""
SMALL = 16
"""Elements of the default model tensor: a save writes a few KB."""
PROMPT_S = 5.0
"""An error counts as prompt when it arrives within this many seconds of the call that triggers it."""
TWO_RANKS = Topology.single_node(2)


def model(
    value: float, numel: int = SMALL, pattern: SharingPattern = SharingPattern.GLOBAL, key: str = "model"
) -> List[PreparedComponent]:
    """One component `key` holding a tensor full of `value`."""
    return [PreparedComponent(StateComponent(key, Holder({"w": torch.full((numel,), value)}), pattern))]


@pytest.fixture
def rank_of(daemon_factory: Callable[..., Daemon]) -> Iterator[Callable[..., CheckpointClient]]:
    """Clients posing as ranks of job JOB; every one is closed at teardown, before the daemons stop
    (this fixture depends on daemon_factory, so it is torn down first)."""
    clients: List[CheckpointClient] = []

    def factory(daemon: Daemon, rank: int, topology: Topology, **options: Any) -> CheckpointClient:
        options = {"auto_start": False, "timeout": 30.0, **options}
        client = CheckpointClient(
            str(daemon.root), RankInfo(rank, topology, job_id=JOB), endpoint=daemon.endpoint, **options
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close(timeout=10)


def close(client: CheckpointClient) -> None:
    """Close a client now; the fixture's teardown then finds it closed already (close is idempotent)."""
    client.close(timeout=10)


def commit_step_one(*ranks: CheckpointClient) -> None:
    """Every rank saves step 1 (value 1.0) and it commits: the checkpoint a failed save must not touch."""
    handles = [rank.save(1, model(1.0)) for rank in ranks]
    paths = {handle.wait(30) for handle in handles}
    assert len(paths) == 1 and paths.pop().endswith(checkpoint_dir_name(1))


def assert_previous_intact(root: Path, step: int = 1, value: float = 1.0, latest: bool = True) -> None:
    """Checkpoint `step` verifies against its manifest and holds its own step's state."""
    path = root / checkpoint_dir_name(step)
    assert verify_checkpoint(str(path)) == []
    manifest = read_manifest(str(path))
    assert manifest.step == step
    scope = select_scope(manifest, "model", manifest.components["model"], RankInfo(0, manifest.topology))
    restored = read_scope(str(path), scope)
    assert torch.equal(restored["w"], torch.full((SMALL,), value))
    if latest:
        assert (root / "latest").read_text().strip() == checkpoint_dir_name(step)


def assert_never_committed(root: Path, *steps: int) -> None:
    """No directory under the final name of `steps`, and (once the daemon cleaned up) no tmp directory."""
    for step in steps:
        assert not (root / checkpoint_dir_name(step)).is_dir(), f"step {step} has a final directory"
    leftovers = [f".tmp-{checkpoint_dir_name(step)}-*" for step in steps]
    assert wait_for(lambda: not any(any(root.glob(pattern)) for pattern in leftovers), timeout=10), sorted(
        p.name for p in root.iterdir()
    )


def test_too_many_saves_in_flight_is_refused_after_waiting_and_skipped_with_skip(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `... saves are already in flight on this node (steps [...]); wait for them to commit or time out`."""
    daemon = daemon_factory("--save-timeout", "60")
    rank0, rank1 = rank_of(daemon, 0, TWO_RANKS), rank_of(daemon, 1, TWO_RANKS)
    commit_step_one(rank0, rank1)
    held = list(range(2, 2 + MAX_SAVES_IN_FLIGHT))
    in_flight = [rank0.save(step, model(float(step))) for step in held]  # rank 1 does not save them (yet)
    assert not any(handle.done() for handle in in_flight)

    waiter = rank_of(daemon, 0, TWO_RANKS, timeout=1.0)
    busy = re.escape(
        f"{MAX_SAVES_IN_FLIGHT} saves are already in flight on this node (steps {held}); "
        "wait for them to commit or time out"
    )
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"the daemon refused rank 0's part of step 18: {busy}"):
        waiter.save(18, model(18.0))
    waited = time.monotonic() - started
    assert 0.5 <= waited < PROMPT_S, (
        f"the refusal came after {waited:.2f} s; the client should ask again until its 1 s timeout"
    )

    skipper = rank_of(daemon, 0, TWO_RANKS, when_busy="skip")
    started = time.monotonic()
    skipped = skipper.save(19, model(19.0))
    with pytest.raises(CheckpointSkipped, match=rf"save of step 19 skipped: {busy}"):
        skipped.wait(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 18, 19)

    for step in held:  # the refusals left the held saves alone: rank 1 completes them and they commit
        rank1.save(step, model(float(step)))
    assert [handle.wait(30) for handle in in_flight] == [str(daemon.root / checkpoint_dir_name(s)) for s in held]
    assert_previous_intact(daemon.root, latest=False)
    assert_never_committed(daemon.root, 18, 19)


def test_a_daemon_shutting_down_refuses_new_saves_and_finishes_the_ones_it_holds(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `the daemon is shutting down and takes no new save (step ...); the saves it holds finish first`."""
    daemon = daemon_factory("--save-timeout", "20")
    rank0, rank1 = rank_of(daemon, 0, TWO_RANKS), rank_of(daemon, 1, TWO_RANKS)
    waiter = rank_of(daemon, 0, TWO_RANKS, timeout=1.0)
    skipper = rank_of(daemon, 0, TWO_RANKS, when_busy="skip")
    commit_step_one(rank0, rank1)
    held = rank0.save(2, model(2.0))  # rank 1 never hands over step 2: the daemon holds it until --save-timeout
    held_at = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the daemon's loop handles the signal and starts draining
    assert daemon.process.poll() is None, "the daemon must drain the save it holds before it exits"

    started = time.monotonic()
    with pytest.raises(
        CheckpointError,
        match=r"the daemon refused rank 0's part of step 3: the daemon is shutting "
        r"down and takes no new save \(step 3\); the saves it holds finish first",
    ):
        waiter.save(3, model(3.0))
    assert time.monotonic() - started < PROMPT_S
    started = time.monotonic()
    skipped = skipper.save(4, model(4.0))
    with pytest.raises(
        CheckpointSkipped,
        match=r"save of step 4 skipped: the daemon is shutting down and takes no "
        r"new save \(step 4\)",
    ):
        skipped.wait(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    for client in (waiter, skipper):
        close(client)

    # the save the daemon holds still takes its missing part, commits, and then the daemon exits
    late = rank1.save(2, model(2.0))
    assert held.wait(PROMPT_S) == late.wait(PROMPT_S)
    close(rank1)
    close(rank0)
    assert daemon.process.wait(timeout=15) == 0, daemon.log()
    assert time.monotonic() - held_at < 20, "the daemon should exit once the save it held is settled"
    assert_previous_intact(daemon.root, latest=False)
    assert_previous_intact(daemon.root, step=2, value=2.0)
    assert_never_committed(daemon.root, 3, 4)


def test_a_job_spanning_more_nodes_than_the_daemon_was_started_for_is_refused(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `this daemon was started for a job of ... node(s) (ckptd serve --num-nodes), but the job spans ...`."""
    daemon = daemon_factory()
    commit_step_one(rank_of(daemon, 0, Topology.single_node(1)))
    two_nodes = rank_of(daemon, 0, Topology(((0,), (1,))))
    started = time.monotonic()
    with pytest.raises(
        CheckpointError,
        match=r"the daemon refused rank 0's part of step 2: this daemon was started for "
        r"a job of 1 node\(s\) \(ckptd serve --num-nodes\), but the job spans 2; "
        r"start one daemon per node",
    ):
        two_nodes.save(2, model(2.0))
    assert time.monotonic() - started < PROMPT_S
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 2)


def test_a_rank_of_another_node_is_refused(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `rank ... belongs to node ..., this daemon serves node ...`: rank 1 of a two-node job (one rank
    per node) reaches node 0's daemon."""
    secret = tmp_path / "cluster.secret"
    subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = daemon_factory(
        "--node", "0", "--num-nodes", "2", "--leader", f"127.0.0.1:{port}", "--cluster-secret", str(secret)
    )
    stray = rank_of(daemon, 1, Topology(((0,), (1,))))
    started = time.monotonic()
    with pytest.raises(
        CheckpointError,
        match=r"the daemon refused rank 1's part of step 2: rank 1 belongs to node 1, "
        r"this daemon serves node 0",
    ):
        stray.save(2, model(2.0))
    assert time.monotonic() - started < PROMPT_S
    assert_never_committed(daemon.root, 2)


def test_a_write_slower_than_the_save_timeout_aborts_the_step(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `step ... did not finish writing and committing within ... s`."""
    daemon = daemon_factory("--max-write-mbps", "1", "--save-timeout", "2")
    rank0 = rank_of(daemon, 0, Topology.single_node(1))
    commit_step_one(rank0)  # a few KB: milliseconds at 1 MB/s
    started = time.monotonic()
    slow = rank0.save(2, model(2.0, numel=1_250_000))  # every rank hands over 5 MB: about 5 s of writing
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint of step 2 aborted: step 2 did not finish writing and "
        r"committing within 2 s",
    ):
        slow.wait(15)
    aborted = time.monotonic() - started
    assert 1.5 <= aborted < 2 + PROMPT_S, f"aborted after {aborted:.2f} s, the daemon's --save-timeout is 2 s"
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 2)


def grouped(members: Tuple[int, ...]) -> List[PreparedComponent]:
    """A PER_GROUP component over process group 'pp', which this rank says holds `members`."""
    component = StateComponent(
        "stage", Holder({"w": torch.ones(SMALL)}), SharingPattern.PER_GROUP, process_group_name="pp"
    )
    return [PreparedComponent(component, group_ranks=members)]


DISAGREEMENTS = [
    pytest.param(
        lambda: model(2.0),
        lambda: model(2.0) + model(2.0, pattern=SharingPattern.PER_RANK, key="extra"),
        re.escape(
            "ranks disagree on the components of this checkpoint: rank 0 has ['model'], rank 1 has ['extra', 'model']"
        ),
        id="component keys",
    ),
    pytest.param(
        lambda: model(2.0, pattern=SharingPattern.GLOBAL),
        lambda: model(2.0, pattern=SharingPattern.REPLICATED),
        re.escape(
            "component 'model': rank 1 declares REPLICATED (group None, validate_replication=False) but rank 0 "
            "declares GLOBAL (group None, validate_replication=False)"
        ),
        id="patterns",
    ),
    pytest.param(
        lambda: grouped((0, 1)),
        lambda: grouped((1,)),
        r"component 'stage': rank \d says group 'pp' is \[[01, ]+\], but rank \d reports",
        id="group members",
    ),
]


@pytest.mark.parametrize("declared_by_rank0,declared_by_rank1,reason", DISAGREEMENTS)
def test_ranks_that_disagree_on_a_step_abort_it_on_every_rank(
    daemon_factory: Callable[..., Daemon],
    rank_of: Callable[..., CheckpointClient],
    declared_by_rank0: Callable[[], List[PreparedComponent]],
    declared_by_rank1: Callable[[], List[PreparedComponent]],
    reason: str,
) -> None:
    """Doc: `ranks disagree on the components of this checkpoint: ...`, `component '...': rank ... declares
    ... but rank ... declares ...` and `component '...': rank ... says group '...' is [...], but rank ...
    reports ...`: every rank's handle fails with the reason."""
    daemon = daemon_factory()
    rank0, rank1 = rank_of(daemon, 0, TWO_RANKS), rank_of(daemon, 1, TWO_RANKS)
    commit_step_one(rank0, rank1)
    first = rank0.save(2, declared_by_rank0())
    started = time.monotonic()
    second = rank1.save(2, declared_by_rank1())
    for handle in (first, second):
        with pytest.raises(CheckpointError, match="checkpoint of step 2 aborted: " + reason):
            handle.wait(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 2)


def test_a_failing_commit_rename_aborts_the_step_naming_the_os_error(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `committing step ... failed: ...`. A file appears at the step's final name after the save
    is accepted (the daemon refuses a step whose final name exists when its first part arrives), so
    the rename of the finished directory onto it fails."""
    daemon = daemon_factory()
    rank0, rank1 = rank_of(daemon, 0, TWO_RANKS), rank_of(daemon, 1, TWO_RANKS)
    commit_step_one(rank0, rank1)
    first = rank0.save(2, model(2.0))
    squatter = daemon.root / checkpoint_dir_name(2)
    squatter.write_text("not a checkpoint")
    started = time.monotonic()
    second = rank1.save(2, model(2.0))
    reason = rf"checkpoint of step 2 aborted: committing step 2 failed: \[Errno 20\] Not a directory: .*{squatter.name}"
    for handle in (first, second):
        with pytest.raises(CheckpointError, match=reason):
            handle.wait(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert squatter.read_text() == "not a checkpoint"
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 2)


def test_an_invalid_part_from_one_rank_aborts_the_other_ranks_saves(
    daemon_factory: Callable[..., Daemon], rank_of: Callable[..., CheckpointClient]
) -> None:
    """Doc: `checkpoint of step ... aborted: rank ... sent an invalid part: ...` (the other ranks' message)."""
    daemon = daemon_factory()
    rank0, rank1 = rank_of(daemon, 0, TWO_RANKS), rank_of(daemon, 1, TWO_RANKS)
    commit_step_one(rank0, rank1)
    confused = rank_of(daemon, 1, Topology.single_node(3))  # rank 1, but it believes the job has 3 ranks
    valid = rank0.save(2, model(2.0))
    mismatch = re.escape(
        "rank 1 reports world size 3 on 1 node(s) (ranks per node: 3), earlier ranks reported "
        "world size 2 on 1 node(s) (ranks per node: 2)"
    )
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"the daemon refused rank 1's part of step 2: {mismatch}"):
        confused.save(2, model(2.0))
    with pytest.raises(
        CheckpointError, match=rf"checkpoint of step 2 aborted: rank 1 sent an invalid part: {mismatch}"
    ):
        valid.wait(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert_previous_intact(daemon.root)
    assert_never_committed(daemon.root, 2)
