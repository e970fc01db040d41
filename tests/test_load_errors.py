"""Loading errors of docs/troubleshooting.md ("## Loading") that had no test, provoked through the public
API on real checkpoints written by a real daemon, plus the tensor-subclass form of UnsupportedStateError
("## Saving").

Every load test damages a committed checkpoint (or loads it as a rank it does not fit), then checks that
`CheckpointManager.load_checkpoint(path)`:
- raises the documented exception type, with a message naming the cause;
- raises it within a few seconds (the call runs in a helper thread, so a hang fails the test instead of
  hanging the suite);
- restored nothing: the first component (a GLOBAL module read successfully before the bad one) still
  holds its pre-load values, because nothing is restored until every file has been read and checked;
- modified no file under the root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import torch
from helpers import Daemon, Holder

import ckptd.client.manager as manager_module
from ckptd.client import (
    CheckpointClient,
    CheckpointError,
    CheckpointManager,
    PreparedComponent,
    RankInfo,
    SharingPattern,
    StateComponent,
    Topology,
    UnsupportedStateError,
    VerificationError,
)
from ckptd.client.loading import read_manifest, verify_file
from ckptd.proto.formats import EXT_TENSOR_REF, Checksum

SINGLE = RankInfo(0, Topology.single_node(1))
LIMIT_S = 5.0
"""A load (or save) that fails must say so within this many seconds."""

Tree = dict[str, tuple[int, int, int, str]]


# --- helpers ---------------------------------------------------------------------------------------


class Provider:
    """A state provider over fixed components (and, for PER_GROUP, fixed process group handles)."""

    def __init__(self, components: list[StateComponent], groups: Mapping[str, Any] | None = None) -> None:
        self.components = components
        self.groups = dict(groups or {})

    def get_state_components(self) -> list[StateComponent]:
        return self.components

    def get_process_groups(self) -> dict[str, Any]:
        return self.groups


def linear(value: float) -> torch.nn.Linear:
    """A small module whose every parameter is `value` (saved with 1.0, loaded into -1.0)."""
    module = torch.nn.Linear(8, 4)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(value)
    return module


def two_components(value: float) -> Provider:
    """'model' (a module) then 'extra' (tensor and non-tensor state), both GLOBAL: model/global.* and
    extra/global.* in the checkpoint. The tests damage 'extra', so 'model' has been read before it fails."""
    return Provider(
        [
            StateComponent("model", linear(value), SharingPattern.GLOBAL),
            StateComponent(
                "extra", Holder({"t": torch.full((64,), value), "note": f"saved with {value}"}), SharingPattern.GLOBAL
            ),
        ]
    )


def save_one(daemon: Daemon) -> Path:
    """Commit step 1 of `two_components(1.0)` as a single-rank job; returns its directory."""
    with CheckpointManager(
        two_components(1.0), str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as saver:
        return Path(saver.save_checkpoint(1).wait(30))


def tree(root: Path) -> Tree:
    """Every entry under `root`: its type, size, mtime and (regular files) content digest. Never opens a
    non-regular file (opening a FIFO would block)."""
    entries: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest)
    return entries


def values_of(provider: Provider) -> dict[str, Any]:
    """Copies of every component's current state, to compare after a failed load."""
    return {c.key: _clone(c.stateful.state_dict()) for c in provider.components}


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clone(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def assert_nothing_restored(provider: Provider, before: dict[str, Any]) -> None:
    after = values_of(provider)
    for key, value in before.items():
        assert _same(after[key], value), f"component {key!r} was restored from a checkpoint that failed to load"


def run_bounded(call: Callable[[], object], unblock: Callable[[], None] | None = None) -> BaseException | None:
    """Run `call` in a thread and return what it raised (None if it returned). Fails the test if it is
    still running after LIMIT_S; `unblock` then lets a call stuck in the kernel finish before failing."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=target, name="bounded-call", daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(LIMIT_S)
    if worker.is_alive():
        if unblock is not None:
            unblock()
        worker.join(LIMIT_S)
        if worker.is_alive():
            ending = "and is still blocked"
        else:
            ending = f"and then ended with {outcome[0]!r}" if outcome else "and then returned"
        pytest.fail(
            f"the call was still running after {LIMIT_S} s (it blocked; the test unblocked it {ending})"
            if unblock is not None
            else f"the call was still running after {LIMIT_S} s"
        )
    assert time.monotonic() - started < LIMIT_S
    return outcome[0] if outcome else None


def expect_error(
    call: Callable[[], object], kind: type[BaseException], pattern: str, unblock: Callable[[], None] | None = None
) -> BaseException:
    """`call` raises exactly `kind` (not a subclass), with a message matching `pattern`, within LIMIT_S."""
    raised = run_bounded(call, unblock)
    with pytest.raises(kind, match=pattern) as caught:
        if raised is not None:
            raise raised
    assert type(caught.value) is kind, f"expected {kind.__name__}, got {type(caught.value).__name__}: {caught.value}"
    return caught.value


def rewrite_manifest(checkpoint: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = checkpoint / "checkpoint_manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def file_entry(manifest: dict[str, Any], key: str, scope: str, which: str) -> dict[str, Any]:
    entry: dict[str, Any] = manifest["components"][key]["scopes"][scope][which]
    return entry


def checksum_of(data: bytes, recorded: str) -> str:
    """The manifest checksum of `data`, with the algorithm `recorded` names."""
    checksum = Checksum()
    checksum.update(data)
    digest = checksum.hexdigest()
    assert digest.split(":")[0] == recorded.split(":")[0], f"the manifest records {recorded}, not {digest}"
    return digest


def load_fails(
    daemon: Daemon, checkpoint: Path, kind: type[BaseException], pattern: str, unblock: Callable[[], None] | None = None
) -> BaseException:
    """Load `checkpoint` by path into a fresh provider (values -1.0); the load must fail as expected,
    restore nothing and leave every file under the root as it was."""
    fresh = two_components(-1.0)
    before = values_of(fresh)
    files = tree(daemon.root)
    loader = CheckpointManager(fresh, str(daemon.root), rank_info=SINGLE, connect=False)
    error = expect_error(lambda: loader.load_checkpoint(str(checkpoint)), kind, pattern, unblock)
    assert_nothing_restored(fresh, before)
    assert tree(daemon.root) == files, "the failed load modified files under the root"
    return error


# --- "VerificationError: ... is not a regular file" -----------------------------------------------


@pytest.mark.parametrize("replacement", ["directory", "fifo"])
def test_a_listed_shard_that_is_not_a_regular_file_is_refused(daemon: Daemon, replacement: str) -> None:
    """A listed shard replaced by a directory or a FIFO of the same name: `... is not a regular file`.
    A FIFO must be refused like a directory, not block the loader waiting for a writer."""
    checkpoint = save_one(daemon)
    shard = checkpoint / "extra" / "global.safetensors"
    shard.unlink()
    if replacement == "directory":
        shard.mkdir()
    else:
        os.mkfifo(shard)

    def unblock() -> None:  # a reader blocked in open() on the FIFO returns once a writer opens it
        fd = os.open(shard, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    load_fails(
        daemon,
        checkpoint,
        VerificationError,
        re.escape("extra/global.safetensors is not a regular file"),
        unblock if replacement == "fifo" else None,
    )


# --- "VerificationError: ... is empty" -------------------------------------------------------------


@pytest.mark.parametrize("which", ["tensor_file", "state_file"])
def test_a_listed_file_that_is_empty_is_refused(daemon: Daemon, which: str) -> None:
    """A listed file truncated to 0 bytes: `... is empty`. The loader compares the size with the
    manifest's first, so a file the manifest lists as non-empty is reported as `holds 0 bytes, the
    manifest says N`; `is empty` needs the manifest to agree on 0 bytes (and on the empty checksum),
    which is what this test sets up."""
    checkpoint = save_one(daemon)
    rel = "extra/global.safetensors" if which == "tensor_file" else "extra/global.msgpack"
    (checkpoint / rel).write_bytes(b"")

    def empty(manifest: dict[str, Any]) -> None:
        entry = file_entry(manifest, "extra", "global", which)
        assert entry["path"] == rel and entry["size"] > 0
        entry.update(size=0, checksum=checksum_of(b"", entry["checksum"]))

    rewrite_manifest(checkpoint, empty)
    load_fails(daemon, checkpoint, VerificationError, re.escape(rel) + r" is empty$")


# --- "VerificationError: ... cannot be decoded: ..." (a .msgpack state file) -----------------------


def _not_msgpack(original: bytes) -> bytes:
    return b"\xc1" + original  # 0xc1 is never used by msgpack


def _truncated(original: bytes) -> bytes:
    return original[:-1]


def _dangling_tensor_reference(original: bytes) -> bytes:
    return msgpack.packb(
        {"t": msgpack.ExtType(EXT_TENSOR_REF, msgpack.packb("no-such-tensor")), "note": "x"}, use_bin_type=True
    )


@pytest.mark.parametrize(
    "replace, cause",
    [
        (_not_msgpack, r"\S"),
        (_truncated, r"\S"),
        (_dangling_tensor_reference, re.escape("skeleton references tensor 'no-such-tensor'")),
    ],
    ids=["not msgpack", "truncated msgpack", "unknown tensor"],
)
def test_a_state_file_that_cannot_be_decoded_is_refused(
    daemon: Daemon, replace: Callable[[bytes], bytes], cause: str
) -> None:
    """A component's .msgpack state file replaced by bytes that are not a valid state skeleton, with the
    manifest's size and checksum updated to match, so that only decoding can fail: `... cannot be
    decoded: <why>`, the reason after the colon not empty."""
    checkpoint = save_one(daemon)
    rel = "extra/global.msgpack"
    data = replace((checkpoint / rel).read_bytes())
    (checkpoint / rel).write_bytes(data)

    def record(manifest: dict[str, Any]) -> None:
        entry = file_entry(manifest, "extra", "global", "state_file")
        assert entry["path"] == rel
        entry.update(size=len(data), checksum=checksum_of(data, entry["checksum"]))

    rewrite_manifest(checkpoint, record)
    for listed in read_manifest(str(checkpoint)).files():  # every size and checksum matches
        verify_file(str(checkpoint), listed)
    load_fails(daemon, checkpoint, VerificationError, re.escape(f"{rel} cannot be decoded: ") + cause)


# --- PER_GROUP: "rank ... is not a member of ..." / "has no copy for rank ..." ----------------------


@dataclass(frozen=True)
class FakeGroup:
    """Stands in for a torch.distributed process group: these in-process ranks have none."""

    ranks: tuple[int, ...]


PAIRS = {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}
"""The 'stage' groups the 4-rank job saves with: {0, 1} and {2, 3}."""


@pytest.fixture
def per_group_checkpoint(daemon: Daemon, client_factory: Callable[..., CheckpointClient]) -> Path:
    """Step 1 of a 4-rank single-node job (in-process clients posing as ranks): 'model' GLOBAL, then
    'stage' PER_GROUP over process group 'stage' = {0, 1} and {2, 3}, so copies group-stage-00000 and
    group-stage-00002."""
    handles = []
    for rank in range(4):
        writer = min(PAIRS[rank])
        components = [
            PreparedComponent(StateComponent("model", linear(1.0), SharingPattern.GLOBAL)),
            PreparedComponent(
                StateComponent(
                    "stage",
                    Holder({"w": torch.full((16,), float(writer)), "writer": writer}),
                    SharingPattern.PER_GROUP,
                    process_group_name="stage",
                ),
                PAIRS[rank],
            ),
        ]
        handles.append(client_factory(rank, 4).save(1, components))
    paths = {handle.wait(60) for handle in handles}
    assert len(paths) == 1
    checkpoint = Path(paths.pop())
    assert sorted(read_manifest(str(checkpoint)).components["stage"].scopes) == [
        "group-stage-00000",
        "group-stage-00002",
    ]
    return checkpoint


def per_group_load_fails(
    daemon: Daemon, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, rank: int, group: Sequence[int], pattern: str
) -> None:
    """Load as `rank` of the saved 4-rank topology, declaring 'stage' over `group`. The manager resolves
    a group's ranks with torch.distributed, which in-process ranks do not have, so that one lookup is
    replaced (process_group_ranks reads a FakeGroup); the rest is CheckpointManager.load_checkpoint.
    The error is a plain CheckpointError (not a VerificationError), so load_checkpoint() without a path
    raises it too instead of skipping to an older checkpoint."""
    monkeypatch.setattr(manager_module, "process_group_ranks", lambda g: tuple(g.ranks))
    fresh = Provider(
        [
            StateComponent("model", linear(-1.0), SharingPattern.GLOBAL),
            StateComponent(
                "stage",
                Holder({"w": torch.full((16,), -1.0), "writer": -1}),
                SharingPattern.PER_GROUP,
                process_group_name="stage",
            ),
        ],
        groups={"stage": FakeGroup(tuple(group))},
    )
    before = values_of(fresh)
    files = tree(daemon.root)
    loader = CheckpointManager(
        fresh, str(daemon.root), rank_info=RankInfo(rank, Topology.single_node(4)), connect=False
    )
    expect_error(lambda: loader.load_checkpoint(str(checkpoint)), CheckpointError, pattern)
    expect_error(loader.load_checkpoint, CheckpointError, pattern)
    assert_nothing_restored(fresh, before)
    assert tree(daemon.root) == files, "the failed load modified files under the root"


def test_a_rank_outside_its_per_group_process_group_is_refused(
    daemon: Daemon, per_group_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 2 declares 'stage' with a process group that does not contain it ({0, 1}):
    `component 'stage': rank 2 is not a member of process group 'stage' (ranks [0, 1])`."""
    per_group_load_fails(
        daemon,
        per_group_checkpoint,
        monkeypatch,
        rank=2,
        group=(0, 1),
        pattern=re.escape("component 'stage': rank 2 is not a member of process group 'stage' (ranks [0, 1])"),
    )


def test_a_per_group_scope_the_checkpoint_has_no_copy_for_is_refused(
    daemon: Daemon, per_group_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 declares 'stage' over {1, 3} (same topology, other grouping), so it reads copy
    group-stage-00001, which was never saved: `component 'stage' has no copy for rank 1
    (group-stage-00001); saved copies: ['group-stage-00000', 'group-stage-00002']`."""
    per_group_load_fails(
        daemon,
        per_group_checkpoint,
        monkeypatch,
        rank=1,
        group=(1, 3),
        pattern=re.escape(
            "component 'stage' has no copy for rank 1 (group-stage-00001); saved "
            "copies: ['group-stage-00000', 'group-stage-00002']"
        ),
    )


# --- Saving: UnsupportedStateError, the tensor-subclass form ---------------------------------------


class MyTensor(torch.Tensor):
    """A tensor subclass ckptd cannot store as such."""


def test_a_tensor_subclass_is_refused_at_save_naming_its_path(daemon: Daemon) -> None:
    """A state dict holding a torch.Tensor subclass: save_checkpoint raises `UnsupportedStateError:
    component 'model': value at layers/0/w is a tensor subclass ...MyTensor; ...`, writes nothing to
    the root, and leaves nothing in flight: the same step saves once the value is a plain tensor."""
    state = Holder({"layers": [{"w": torch.ones(2).as_subclass(MyTensor)}], "step": 3})
    assert type(state.value["layers"][0]["w"]) is MyTensor
    provider = Provider([StateComponent("model", state, SharingPattern.GLOBAL)])
    with CheckpointManager(
        provider, str(daemon.root), endpoint=daemon.endpoint, auto_start=False, rank_info=SINGLE
    ) as saver:
        files = tree(daemon.root)
        error = expect_error(
            lambda: saver.save_checkpoint(1),
            UnsupportedStateError,
            r"component 'model': value at layers/0/w is a tensor subclass \S*MyTensor\b",
        )
        assert "plain torch.Tensor" in str(error)
        assert tree(daemon.root) == files, "a refused save wrote to the root"

        state.value["layers"][0]["w"] = torch.ones(2)
        committed = Path(saver.save_checkpoint(1).wait(30))
    assert committed.name == "step_00000001"
    assert sorted(p.name for p in daemon.root.iterdir() if p.name.startswith("step_")) == ["step_00000001"]
