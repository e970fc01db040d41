"""Power loss: a kill -9 never loses what the kernel holds; a power cut loses everything not yet fsynced.

The disk is powerfs (tests/powerfs.py): a FUSE passthrough that tracks what was fsynced and, at a cut,
writes the tree a reboot could find. The first tests check the model and the mount themselves; the
power-cut test runs a real daemon on the mount, cuts the power at random points of a save and at the
commit protocol's named points (DESIGN.md, Commit protocol), and checks what survived: every
final-named checkpoint verifies and holds exactly its step, `latest` names one and never moves back
from the newest save reported committed before the cut, and a daemon started on the survivor recovers
and commits the next save. CI runs 14 cuts (every named point, and 4 random ones); `--run-slow` runs 110.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import mmap
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import Daemon, Holder, start_daemon, wait_until_serving
from invariants import check_root
from powerfs import PowerMount, fuse_problem
from powerfs_model import ROOT_INO, DurabilityModel, Symlink, Trigger

from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    PreparedComponent,
    RetentionPolicy,
    SharingPattern,
    StateComponent,
)
from ckptd.client.topology import RankInfo
from ckptd.proto.topology import Topology

log = logging.getLogger(__name__)

MountFactory = Callable[..., PowerMount]


# ----------------------------------------------------------------------------------------------------
# The durability model, without FUSE.
# ----------------------------------------------------------------------------------------------------


def crashes(model: DurabilityModel, seeds: int = 60) -> list[dict]:
    """The survivor trees of `seeds` random cuts of one model state."""
    return [model.crash(random.Random(seed)) for seed in range(seeds)]


def test_model_keeps_fsynced_data_and_drops_unsynced_writes() -> None:
    model = DurabilityModel()
    ino = model.create("/f", "file")
    model.fsync(ROOT_INO)
    model.write(ino, 0, b"durable")
    model.fsync(ino)
    model.write(ino, 0, b"DURABLE plus more")
    assert model.crash(random.Random(0), "drop") == {"f": b"durable"}
    assert model.crash(random.Random(0), "keep") == {"f": b"DURABLE plus more"}
    outcomes = {tree["f"] for tree in crashes(model)}
    assert b"durable" in outcomes and b"DURABLE plus more" in outcomes, outcomes
    assert all(len(content) in (7, 17) for content in outcomes), outcomes


def test_model_splits_writes_into_pages_that_survive_independently() -> None:
    model = DurabilityModel()
    ino = model.create("/f", "file")
    model.fsync(ROOT_INO)
    model.write(ino, 100, b"x" * 9000)  # touches pages 0, 1 and 2
    assert [(op.offset, len(op.data or b"")) for op in model.inodes[ino].pending_data] == [
        (100, 3996),
        (4096, 4096),
        (8192, 908),
    ]
    torn = [tree["f"] for tree in crashes(model, 200)]
    assert any(0 < content.count(b"x") < 9000 for content in torn), "no cut tore the write"
    assert b"" in torn


def test_model_truncate_and_rewrite_survive_in_order() -> None:
    model = DurabilityModel()
    ino = model.create("/f", "file")
    model.fsync(ROOT_INO)
    model.write(ino, 0, b"0123456789")
    model.fsync(ino)
    model.truncate(ino, 4)
    model.write(ino, 6, b"ab")
    assert model.crash(random.Random(0), "keep") == {"f": b"0123\0\0ab"}
    assert {tree["f"] for tree in crashes(model)} <= {b"0123456789", b"0123", b"012345ab89", b"0123\0\0ab"}


def test_model_create_needs_the_directory_fsynced() -> None:
    model = DurabilityModel()
    ino = model.create("/f", "file")
    model.write(ino, 0, b"data")
    model.fsync(ino)
    assert model.crash(random.Random(0), "drop") == {}, "create + fsync(file) without fsync(dir) lost the entry"
    model.fsync(ROOT_INO)
    assert model.crash(random.Random(0), "drop") == {"f": b"data"}


def test_model_entry_without_data_comes_back_with_its_last_fsynced_content() -> None:
    model = DurabilityModel()
    ino = model.create("/new", "file")
    model.fsync(ROOT_INO)
    model.write(ino, 0, b"never synced")
    assert model.crash(random.Random(0), "drop") == {"new": b""}


def test_model_rename_inside_a_directory_is_atomic() -> None:
    model = DurabilityModel()
    ino = model.create("/old", "file")
    model.write(ino, 0, b"x")
    model.fsync(ino)
    model.create("/new", "file")  # replaced by the rename
    model.fsync(ROOT_INO)
    model.rename("/old", "/new")
    trees = crashes(model)
    assert {tuple(sorted(tree)) for tree in trees} == {("new", "old"), ("new",)}, "a rename was torn"
    assert all(tree["new"] == b"x" for tree in trees if "old" not in tree)
    model.fsync(ROOT_INO)
    assert model.crash(random.Random(0), "drop") == {"new": b"x"}


def test_model_rename_between_directories_keeps_both_halves_or_neither() -> None:
    model = DurabilityModel()
    model.create("/a", "dir")
    model.create("/b", "dir")
    ino = model.create("/a/f", "file")
    model.write(ino, 0, b"x")
    model.fsync(ino)
    for directory in ("/a", "/b", "/"):
        model.fsync(model.lookup(directory))
    model.create("/a/noise", "file")
    model.rename("/a/f", "/b/f")
    model.create("/b/more", "file")
    placements = {("f" in tree["a"], "f" in tree["b"]) for tree in crashes(model, 200)}
    assert placements == {(True, False), (False, True)}, placements
    model.fsync(model.lookup("/b"))  # the journal commits the other half with it
    assert model.crash(random.Random(0), "drop") == {"a": {"noise": b""}, "b": {"f": b"x", "more": b""}}


def test_model_directory_subtree_hangs_on_its_entry() -> None:
    model = DurabilityModel()
    model.create("/d", "dir")
    ino = model.create("/d/f", "file")
    model.fsync(ino)
    model.fsync(model.lookup("/d"))
    model.create("/d/link", "symlink", "f")
    assert model.crash(random.Random(0), "drop") == {}, "a directory whose entry was never fsynced vanishes"
    model.fsync(ROOT_INO)
    assert model.crash(random.Random(0), "drop") == {"d": {"f": b""}}
    assert model.crash(random.Random(0), "keep") == {"d": {"f": b"", "link": Symlink("f")}}


def test_model_of_an_existing_tree_is_durable(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"old")
    (tmp_path / "l").symlink_to("d/f")
    model = DurabilityModel.scan(str(tmp_path))
    model.remove("/d/f")
    model.remove("/l")
    assert model.crash(random.Random(0), "drop") == {"d": {"f": b"old"}, "l": Symlink("d/f")}
    assert model.crash(random.Random(0), "keep") == {"d": {}}


def test_trigger_fires_at_the_nth_match() -> None:
    trigger = Trigger.from_command({"before": r"^rename .* -> /x$", "nth": 2})
    assert [trigger.counts(line) for line in ("rename /a -> /x", "write /x", "rename /b -> /x")] == [False, False, True]
    counter = Trigger.from_command({"after_ops": 3})
    assert [counter.counts("anything") for _ in range(3)] == [False, False, True]


# ----------------------------------------------------------------------------------------------------
# The real mount.
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[MountFactory]:
    """Start powerfs mounts (fails, never skips, where FUSE is missing); all unmounted at teardown."""
    problem = fuse_problem()
    if problem:
        pytest.fail(problem)
    started: list[PowerMount] = []

    def mount(backing: Path, *options: str) -> PowerMount:
        index = len(started)
        backing.mkdir(parents=True, exist_ok=True)
        powerfs = PowerMount(str(backing), str(tmp_path / f"mnt{index}"), str(tmp_path / f"control{index}"), *options)
        started.append(powerfs)
        return powerfs.start()

    yield mount
    gc.collect()
    for powerfs in started:
        powerfs.unmount()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` with `data` and fsync the file (not its directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_mount_loses_unsynced_writes_and_keeps_fsynced_ones(mounts: MountFactory, tmp_path: Path) -> None:
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "drop")
    root = Path(powerfs.mountpoint)
    write_synced(root / "synced", b"first")
    (root / "unsynced").write_bytes(b"written, never fsynced")
    fsync_path(root)
    with open(root / "synced", "r+b") as f:
        f.write(b"FIRST and more")
    assert (root / "synced").read_bytes() == b"FIRST and more", "reads see what was written"
    powerfs.cut()
    survivor = Path(powerfs.survivor)
    assert (survivor / "synced").read_bytes() == b"first"
    assert (survivor / "unsynced").read_bytes() == b"", "the entry was fsynced, the data was not"


def test_mount_rename_without_directory_fsync_is_lost(mounts: MountFactory, tmp_path: Path) -> None:
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "drop")
    root = Path(powerfs.mountpoint)
    write_synced(root / "old", b"content")
    fsync_path(root)
    os.rename(root / "old", root / "new")
    powerfs.cut()
    assert sorted(os.listdir(powerfs.survivor)) == ["old"]


def test_mount_create_and_fsync_without_directory_fsync_loses_the_entry(mounts: MountFactory, tmp_path: Path) -> None:
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "drop")
    root = Path(powerfs.mountpoint)
    (root / "d").mkdir()
    fsync_path(root)
    write_synced(root / "d" / "lost", b"fsynced file, unsynced directory")
    powerfs.cut()
    assert os.listdir(Path(powerfs.survivor) / "d") == []


def test_mount_fails_every_operation_with_eio_after_a_cut(mounts: MountFactory, tmp_path: Path) -> None:
    powerfs = mounts(tmp_path / "backing")
    root = Path(powerfs.mountpoint)
    fd = os.open(root / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert powerfs.cut()["when"] == "command"
        for name, operation in [
            ("write", lambda: os.write(fd, b"x")),
            ("fsync", lambda: os.fsync(fd)),
            ("stat", lambda: os.stat(root / "never-looked-up")),
            ("open", lambda: os.open(root / "open", os.O_RDONLY)),
            ("mkdir", lambda: os.mkdir(root / "d")),
            ("listdir", lambda: os.listdir(root)),
        ]:
            with pytest.raises(OSError) as caught:
                operation()
            assert caught.value.errno == errno.EIO, f"{name} after the cut: {caught.value!r}"
    finally:
        with contextlib.suppress(OSError):  # close flushes, and that fails with EIO too
            os.close(fd)


@pytest.mark.parametrize("when", ["before", "after"])
def test_mount_cuts_before_or_after_a_matching_operation(mounts: MountFactory, tmp_path: Path, when: str) -> None:
    powerfs = mounts(
        tmp_path / "backing",
        "--survivor-mode",
        "keep",
        f"--cut-{when}",
        r"^rename .* -> /b$",
        "--trace",
        str(tmp_path / "trace"),
    )
    root = Path(powerfs.mountpoint)
    write_synced(root / "a", b"x")
    if when == "before":
        with pytest.raises(OSError) as caught:
            os.rename(root / "a", root / "b")
        assert caught.value.errno == errno.EIO
    else:
        os.rename(root / "a", root / "b")
        with pytest.raises(OSError):
            (root / "c").write_bytes(b"the power is off")
    info = powerfs.cut_info()
    assert info == {"op": 4, "line": "rename /a -> /b", "when": when}, info
    assert sorted(os.listdir(powerfs.survivor)) == (["a"] if when == "before" else ["b"])
    trace = [line.split("\t")[1] for line in (tmp_path / "trace").read_text().splitlines()]
    assert trace == ["create /a", "write /a", "fsync /a", "rename /a -> /b"]


def test_mount_cuts_after_k_operations_armed_through_the_control_directory(
    mounts: MountFactory, tmp_path: Path
) -> None:
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "keep")
    root = Path(powerfs.mountpoint)
    (root / "before-arming").mkdir()
    powerfs.arm(after_ops=2)
    (root / "one").mkdir()
    with contextlib.suppress(OSError):  # it takes effect; libfuse's lookup of the new entry may see the power off
        (root / "two").mkdir()
    with pytest.raises(OSError):
        (root / "three").mkdir()
    assert powerfs.cut_info() == {"op": 3, "line": "mkdir /two", "when": "after"}
    assert sorted(os.listdir(powerfs.survivor)) == ["before-arming", "one", "two"]


def test_mount_serves_o_direct_writes_mmap_and_flock(mounts: MountFactory, tmp_path: Path) -> None:
    """What ckptd does on its root: O_DIRECT shard writes (FUSE takes them: no EINVAL fallback), fsync,
    flock, and loading through mmap (the mount does not use direct_io, so the page cache serves it)."""
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "drop")
    path = Path(powerfs.mountpoint) / "shard"
    buffer = mmap.mmap(-1, 3 * 4096)
    buffer[:] = bytes(range(256)) * 48
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        assert os.pwrite(fd, buffer, 0) == len(buffer)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:] == buffer[:]
    powerfs.cut()
    assert (Path(powerfs.survivor) / "shard").read_bytes() == buffer[:]


# ----------------------------------------------------------------------------------------------------
# The daemon through power cuts.
# ----------------------------------------------------------------------------------------------------

ROOT = "ckpt"
"""The checkpoint root inside each mount (it exists, durably, before the first daemon starts)."""

TMP_DIR = r"/\.tmp-step_\d+-[^/]+"
MANIFEST_TMP = TMP_DIR + r"/checkpoint_manifest\.json(\.[^/]*)?\.tmp"
NAMED_POINTS: list[tuple[str, dict[str, Any]]] = [
    ("tmp directory created", {"after": r"^mkdir .*" + TMP_DIR + "$"}),
    ("shard written, not fsynced", {"before": r"^fsync .*\.safetensors$"}),
    ("component directory fsync", {"before": r"^fsyncdir .*" + TMP_DIR + "/[^/]+$"}),
    (
        "manifest written, before its rename",
        {"before": r"^rename .*" + MANIFEST_TMP + r" -> .*/checkpoint_manifest\.json$"},
    ),
    ("manifest renamed, before the tmp directory's fsync", {"after": r"^rename .*" + MANIFEST_TMP + " -> "}),
    ("directory renamed, before the parent's fsync", {"after": r"^rename .*" + TMP_DIR + r" -> .*/step_\d+$"}),
    ("latest written, before its rename", {"before": r"^rename .*/latest(\.[^/]*)?\.tmp -> .*/latest$"}),
    ("latest renamed, before the root's fsync", {"after": r"^rename .*/latest(\.[^/]*)?\.tmp -> .*/latest$"}),
    ("retention moved a checkpoint aside", {"after": r"^rename .*/step_\d+ -> .*/\.tmp-step_\d+-deleted"}),
    ("retention removing files", {"after": r"^unlink .*/\.tmp-step_\d+-deleted[^/]*/"}),
]


def components(step: int) -> list[PreparedComponent]:
    """State tagged with its step: every tensor element and every "step" value equals `step`."""
    return [
        PreparedComponent(
            StateComponent(
                "model", Holder({"w": torch.full((65_536,), float(step)), "step": step}), SharingPattern.GLOBAL
            )
        ),
        PreparedComponent(
            StateComponent(
                "optim", Holder({"m": torch.full((4_096,), float(step)), "step": step}), SharingPattern.PER_RANK
            )
        ),
    ]


@dataclass
class Chain:
    """What one cut hands to the next: the survivor to mount, and what must have survived."""

    backing: Path
    step: int = 0
    acknowledged: int | None = None
    """The newest step reported committed while the power was still on."""
    refused: set[int] = field(default_factory=set)
    """Steps reported failed while the power was still on: they must never appear committed."""


@dataclass
class Trial:
    """One power cut: where it was aimed, where it landed, and what was wrong."""

    point: str
    landed: str = ""
    problems: list[str] = field(default_factory=list)


class Cluster:
    """One mount, the daemon on it and one client posing as rank 0 (torn down in that order's reverse)."""

    def __init__(self, powerfs: PowerMount, log_path: Path) -> None:
        self.powerfs = powerfs
        self.root = Path(powerfs.mountpoint) / ROOT
        self.daemon: Daemon = start_daemon(self.root, log_path, wait=False)
        try:
            wait_until_serving(self.daemon)
            self.client = CheckpointClient(
                str(self.root),
                RankInfo(0, Topology.single_node(1)),
                endpoint=self.daemon.endpoint,
                auto_start=False,
                timeout=30,
                daemon_timeout=1.0,
                retention=RetentionPolicy(keep_last=2),
            )
        except BaseException:
            self.daemon.process.kill()
            self.daemon.process.wait()
            raise

    def power_off(self) -> None:
        """The machine is off: SIGKILL the daemon and unmount; then let the client settle what it held
        (it would have died too: settled after the unmount, it finds an empty directory, not a disk
        that answers EIO)."""
        if self.daemon.process.poll() is None:
            os.kill(self.daemon.process.pid, signal.SIGKILL)
            self.daemon.process.wait()
        gc.collect()  # checkpoints loaded by check_root hold their shards open until collected: the mount is busy
        self.powerfs.unmount()
        # in the background: its goodbye to the dead daemon waits out daemon_timeout (1 s), while the
        # next mount (another mountpoint) comes up; `settled_clients` joins it and fails on its errors
        CLOSING.append(Closing(self.client))


class Closing:
    """A client's close(timeout=5) in a thread of its own; the error it raised, if any."""

    def __init__(self, client: CheckpointClient) -> None:
        self.client = client
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._close, daemon=True)
        self.thread.start()

    def _close(self) -> None:
        try:
            self.client.close(timeout=5)
        except BaseException as exc:  # reported by settled_clients
            self.error = exc


CLOSING: list[Closing] = []


@pytest.fixture(autouse=True)
def settled_clients() -> Iterator[None]:
    """Every client a power-off closed in the background has closed, without an error, by the end of the test."""
    yield
    closing, CLOSING[:] = list(CLOSING), []
    for each in closing:
        each.thread.join(60)
    assert all(not each.thread.is_alive() for each in closing), "a client's close did not finish within 60 s"
    errors = [repr(each.error) for each in closing if each.error is not None]
    assert not errors, errors


def save_until_cut(cluster: Cluster, chain: Chain, timeout: float = 30.0) -> dict[str, Any]:
    """Save the next step; record its outcome if it arrives while the power is on; cut on command if
    no trigger did by then. Returns cut.json."""
    chain.step += 1
    try:
        handle = cluster.client.save(chain.step, components(chain.step))
    except CheckpointError:  # refused at hand-over: the daemon could not create the tmp directory
        if cluster.powerfs.cut_info() is None:
            chain.refused.add(chain.step)
        return cluster.powerfs.cut()
    deadline = time.monotonic() + timeout
    while cluster.powerfs.cut_info() is None and not handle.done():
        assert time.monotonic() < deadline, f"step {chain.step}: neither committed nor cut in {timeout} s"
        time.sleep(0.005)
    if cluster.powerfs.cut_info() is None:  # the outcome came while the power was on: it must stay true
        try:
            handle.wait(0)
            chain.acknowledged = chain.step
        except CheckpointError:
            chain.refused.add(chain.step)
    return cluster.powerfs.cut()


def survivor_problems(root: Path, chain: Chain) -> list[str]:
    """DESIGN.md's invariants on what survived a cut, against what was reported before it."""
    report = check_root(root, previous_latest=chain.acknowledged)
    problems = list(report.problems)
    if chain.acknowledged is not None and chain.acknowledged not in report.committed:
        problems.append(f"step {chain.acknowledged} was reported committed before the cut but did not survive")
    problems += [
        f"step {step} was reported failed but is committed" for step in sorted(chain.refused & set(report.committed))
    ]
    return problems


def recovery_problems(cluster: Cluster, chain: Chain) -> list[str]:
    """A daemon started on a survivor removes the leftovers and points `latest` at the newest committed
    checkpoint; the next save commits with the right content."""
    leftovers = sorted(n for n in os.listdir(cluster.root) if n.startswith(".tmp-") or n.endswith(".tmp"))
    problems = [f"leftovers after the daemon started: {leftovers}"] if leftovers else []
    report = check_root(cluster.root, previous_latest=chain.acknowledged)
    problems += report.problems
    if report.committed and report.latest != report.committed[-1]:
        problems.append(f"latest names step {report.latest}, the newest committed is {report.committed[-1]}")
    chain.step += 1
    try:
        path = cluster.client.save(chain.step, components(chain.step)).wait(30)
    except CheckpointError as exc:
        return [*problems, f"the first save after recovery (step {chain.step}) failed: {exc}"]
    chain.acknowledged = chain.step
    assert path.endswith(f"step_{chain.step:08d}"), path
    report = check_root(cluster.root, previous_latest=chain.acknowledged)
    return problems + [f"after the first save: {p}" for p in report.problems]


def fresh_backing(tmp_path: Path, name: str) -> Path:
    """A backing tree holding an empty checkpoint root (durable: it exists before the mount)."""
    (tmp_path / name / ROOT).mkdir(parents=True)
    return tmp_path / name


def traced_save_ops(mounts: MountFactory, tmp_path: Path) -> tuple[Chain, int]:
    """Three saves through a traced mount (the third one's retention deletes the first); returns the
    chain after an idle cut and how many operations that third save made."""
    chain = Chain(fresh_backing(tmp_path, "backing-traced"))
    trace = tmp_path / "traced-save.tsv"
    powerfs = mounts(chain.backing, "--trace", str(trace), "--seed", "0")
    cluster = Cluster(powerfs, tmp_path / "daemon-traced.log")
    try:
        for _ in range(2):
            chain.step += 1
            cluster.client.save(chain.step, components(chain.step)).wait(30)
        before = len(trace.read_text().splitlines())
        chain.step += 1
        cluster.client.save(chain.step, components(chain.step)).wait(30)
        chain.acknowledged = chain.step
        ops = len(trace.read_text().splitlines()) - before
        powerfs.cut()
    finally:
        cluster.power_off()
    problems = survivor_problems(Path(powerfs.survivor) / ROOT, chain)
    assert not problems, f"an idle cut after three committed saves: {problems}"
    chain.backing = Path(powerfs.survivor)
    return chain, ops


def cut_points(rng: random.Random, count: int, save_ops: int) -> list[tuple[str, dict[str, Any]]]:
    """The named points (every one at least once), then random operation counts inside one save."""
    points = [NAMED_POINTS[i % len(NAMED_POINTS)] for i in range(max(len(NAMED_POINTS), count // 4))]
    while len(points) < count:
        k = rng.randint(1, save_ops)
        points.append((f"after operation {k} of {save_ops}", {"after_ops": k}))
    return points


def run_trial(
    mounts: MountFactory, tmp_path: Path, chain: Chain, index: int, point: tuple[str, dict[str, Any]], seed: int
) -> Trial:
    """Mount the last survivor, recover, commit a save, arm the cut, save until the power goes, check."""
    trial = Trial(point[0])
    powerfs = mounts(chain.backing, "--seed", str(seed))
    try:
        cluster = Cluster(powerfs, tmp_path / f"daemon{index}.log")
    except AssertionError as exc:  # the daemon did not come up on the survivor
        powerfs.unmount()
        trial.problems.append(f"no daemon on the survivor: {exc}")
        return trial
    try:
        trial.problems += recovery_problems(cluster, chain)
        powerfs.arm(**point[1])
        info = save_until_cut(cluster, chain)
        trial.landed = f"{info['when']} op {info['op']} {info['line']}".strip()
    finally:
        cluster.power_off()
    trial.problems += survivor_problems(Path(powerfs.survivor) / ROOT, chain)
    chain.backing = Path(powerfs.survivor)
    return trial


@pytest.mark.parametrize(
    "cuts",
    [pytest.param(14, id="bounded"), pytest.param(110, id="long", marks=[pytest.mark.slow, pytest.mark.timeout(1800)])],
)
def test_power_cut_at_random_points_never_breaks_a_committed_checkpoint(
    mounts: MountFactory, tmp_path: Path, cuts: int
) -> None:
    rng = random.Random(4321)
    chain, save_ops = traced_save_ops(mounts, tmp_path)
    assert save_ops > 20, f"the traced save made only {save_ops} operations"
    trials = []
    for index, point in enumerate(cut_points(rng, cuts, save_ops)):
        trial = run_trial(mounts, tmp_path, chain, index, point, seed=rng.randrange(1 << 30))
        log.info("cut %d aimed at %s, landed %s: %s", index, trial.point, trial.landed, trial.problems or "ok")
        trials.append(trial)
        if trial.problems:  # start over from a clean root, so one violation is not reported again and again
            chain = Chain(fresh_backing(tmp_path, f"backing{index}"), step=chain.step)
    final = Cluster(mounts(chain.backing), tmp_path / "daemon-final.log")
    try:
        last = recovery_problems(final, chain)
    finally:
        final.power_off()
    failed = [
        f"cut {i} aimed at {t.point!r}, landed {t.landed!r}: {t.problems}" for i, t in enumerate(trials) if t.problems
    ]
    assert not failed and not last, "\n".join(failed + [f"after the last cut: {last}"])
    missed = [t.point for t in trials if t.landed.startswith("command") and not t.point.startswith("after operation")]
    assert not missed, f"named points the saves never reached: {missed}"


def test_root_created_by_the_daemon_survives_a_power_cut_after_a_committed_save(
    mounts: MountFactory, tmp_path: Path
) -> None:
    """The daemon creates a missing root; once a save in it is reported committed, a power cut must not
    take the root (and the checkpoint) away: the root's own directory entry must be durable too."""
    powerfs = mounts(tmp_path / "backing", "--survivor-mode", "drop")
    chain = Chain(tmp_path / "backing")
    cluster = Cluster(powerfs, tmp_path / "daemon.log")
    try:
        chain.step = 1
        cluster.client.save(1, components(1)).wait(30)
        chain.acknowledged = 1
        powerfs.cut()
    finally:
        cluster.power_off()
    problems = survivor_problems(Path(powerfs.survivor) / ROOT, chain)
    assert not problems, problems
