"""SHARDED components (issue 14): FSDP2, HSDP and FSDP x TP state saved as the chunks its ranks hold,
each distinct chunk once, and loaded bitwise at another world size and parallelism; the saved
per-rank sample stream resharded by its component's own function. Real multi-rank jobs (gloo, CPU; ranks
started with torchrun's environment by tests/helpers.py torchrun) against real daemons; the full state
is gathered with full_state_dict=True on both sides."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import start_daemon, torchrun
from safetensors.torch import load_file
from test_multinode import start_cluster, torchrun_nodes, wait_all

from ckptd.client.loading import read_manifest
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto.formats import SAFETENSORS_DTYPES
from ckptd.proto.manifest import Manifest
from ckptd.proto.patterns import SharingPattern
from ckptd.proto.sharding import chunks_in_scopes, coverage_problem

WORKER = Path(__file__).parent / "workers" / "fsdp_job.py"
STEPS = 3


def save_job(base: Path, world: int, layout: str, *extra: str) -> Dict[str, Any]:
    """Train and save step STEPS with `layout` on `world` ranks through a real daemon."""
    root, out = base / "ckpt", base / "out"
    out.mkdir(parents=True)
    daemon = start_daemon(root, base / "daemon.log")
    try:
        torchrun(
            WORKER,
            world,
            "save",
            "--layout",
            layout,
            "--root",
            str(root),
            "--endpoint",
            daemon.endpoint,
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            *extra,
        )
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    return {"root": root, "out": out, "world": world}


def load_job(saved: Dict[str, Any], base: Path, world: int, layout: str, *extra: str) -> Dict[str, Any]:
    """Load `latest` of `saved` in fresh processes on `world` ranks with `layout`; the full state and
    each rank's next sample index."""
    out = base / f"load-{world}-{layout}"
    out.mkdir(parents=True)
    torchrun(WORKER, world, "load", "--layout", layout, "--root", str(saved["root"]), "--out", str(out), *extra)
    ranks = {r: json.loads((out / f"load_rank{r}.json").read_text()) for r in range(world)}
    return {"full": load_file(str(out / "full_loaded.safetensors")), "ranks": ranks}


def assert_bitwise(saved: Dict[str, Any], loaded: Dict[str, torch.Tensor]) -> None:
    expected = load_file(str(saved["out"] / "full_saved.safetensors"))
    assert set(loaded) == set(expected)
    differing = [k for k in expected if not torch.equal(expected[k], loaded[k])]
    assert not differing, differing
    assert any(k.startswith("optim/") for k in expected) and any(k.startswith("model/") for k in expected)


def next_indices(saved_world: int, world: int) -> List[int]:
    """Where each rank's sample stream goes on: right after the STEPS * saved_world samples drawn."""
    return [STEPS * saved_world + r for r in range(world)]


def sharded_manifest(saved: Dict[str, Any]) -> Manifest:
    return read_manifest(str(saved["root"] / f"step_{STEPS:08d}"))


def chunk_bytes(manifest: Manifest) -> int:
    """Bytes of every chunk the checkpoint's SHARDED component holds."""
    record = manifest.components["train"]
    return sum(
        math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]]
        for scope in record.scopes.values()
        for entry in scope.tensor_file.tensors.values()
    )


@pytest.fixture(scope="module")
def fsdp_on_two(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    return save_job(tmp_path_factory.mktemp("fsdp2"), 2, "fsdp")


@pytest.mark.parametrize(("world", "layout"), [(2, "fsdp"), (1, "plain"), (4, "fsdp"), (4, "hsdp")])
def test_fsdp_state_loads_bitwise_at_another_world_size(
    fsdp_on_two: Dict[str, Any], tmp_path: Path, world: int, layout: str
) -> None:
    loaded = load_job(fsdp_on_two, tmp_path, world, layout)
    assert_bitwise(fsdp_on_two, loaded["full"])
    assert [loaded["ranks"][r]["next_index"] for r in range(world)] == next_indices(2, world)


def test_chunks_tile_every_tensor_and_verify(fsdp_on_two: Dict[str, Any]) -> None:
    manifest = sharded_manifest(fsdp_on_two)
    record = manifest.components["train"]
    assert record.pattern is SharingPattern.SHARDED
    assert set(record.scopes) == {"rank-00000", "rank-00001"}
    chunks = chunks_in_scopes(record.scopes.values())
    embed = chunks["model/embed.weight"]
    assert sorted((c.box.offsets, c.box.sizes) for c in embed) == [((0, 0), (19, 10)), ((19, 0), (18, 10))]
    assert all(c.global_shape == (37, 10) for c in embed)
    for name, pieces in chunks.items():
        assert coverage_problem(name, pieces) is None
    assert not verify_checkpoint(str(fsdp_on_two["root"] / f"step_{STEPS:08d}"))
    report = subprocess.run(
        [sys.executable, "-m", "ckptd.service", "inspect", str(fsdp_on_two["root"] / f"step_{STEPS:08d}")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "component 'train': SHARDED" in report
    assert "model/embed.weight  F32 [37, 10]: 2 chunk(s): [0, 0]+[19, 10] in rank-00000.safetensors; " in report
    # one copy: the chunks hold as many bytes as the gathered full state
    full = load_file(str(fsdp_on_two["out"] / "full_saved.safetensors"))
    assert chunk_bytes(manifest) == sum(t.numel() * t.element_size() for t in full.values())


def test_hsdp_writes_one_copy_and_loads_into_fsdp(tmp_path: Path) -> None:
    saved = save_job(tmp_path / "save", 4, "hsdp")
    manifest = sharded_manifest(saved)
    full = load_file(str(saved["out"] / "full_saved.safetensors"))
    assert chunk_bytes(manifest) == sum(t.numel() * t.element_size() for t in full.values())
    written = {s: len(r.tensor_file.tensors) for s, r in manifest.components["train"].scopes.items()}
    assert all(count > 0 for count in written.values()), written  # owners are spread over the replicas
    loaded = load_job(saved, tmp_path, 2, "fsdp")
    assert_bitwise(saved, loaded["full"])
    assert [loaded["ranks"][r]["next_index"] for r in range(2)] == next_indices(4, 2)


@pytest.fixture(scope="module")
def fsdp_tp_on_four(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    return save_job(tmp_path_factory.mktemp("fsdp_tp"), 4, "fsdp-tp")


def test_fsdp_tp_loads_into_fsdp_on_fewer_ranks(fsdp_tp_on_four: Dict[str, Any], tmp_path: Path) -> None:
    loaded = load_job(fsdp_tp_on_four, tmp_path, 2, "fsdp")
    assert_bitwise(fsdp_tp_on_four, loaded["full"])


def test_resume_continues_with_the_same_losses(tmp_path: Path) -> None:
    """Module and optimizer as two SHARDED components, saved every step in overlap mode with keep_last 2:
    stopped after step 3 and resumed on the same world size, training gives the loss of every step that
    an uninterrupted run gives. Retention keeps two checkpoints, both verify, and with the newest one
    damaged a load falls back to the one before."""
    losses = {}
    common = ["--split", "--overlap", "--keep-last", "2"]
    for name, legs in (("straight", [6]), ("resumed", [3, 6])):
        root, out = tmp_path / name / "ckpt", tmp_path / name / "out"
        out.mkdir(parents=True)
        daemon = start_daemon(root, tmp_path / name / "daemon.log")
        try:
            for leg, steps in enumerate(legs):
                resume = ["--resume"] if leg else []
                torchrun(
                    WORKER,
                    2,
                    "train",
                    "--root",
                    str(root),
                    "--endpoint",
                    daemon.endpoint,
                    "--out",
                    str(out),
                    "--steps",
                    str(steps),
                    *common,
                    *resume,
                )
        finally:
            daemon.stop()
        assert "Traceback" not in daemon.log(), daemon.log()
        losses[name] = [json.loads(line) for line in (out / "losses_rank0.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses["resumed"]] == list(range(1, 7))
    assert losses["resumed"] == losses["straight"]
    for rank in range(2):  # every save after a run's first reused its plan: the checkpoint resumed from was planned
        planned = (tmp_path / "resumed" / "out" / f"planned_rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["planned"] for line in planned] == [False, True, True, False, True, True]

    root = tmp_path / "resumed" / "ckpt"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000005", "step_00000006"]
    for step in (5, 6):
        assert not verify_checkpoint(str(root / f"step_{step:08d}"))
    newest = root / "step_00000006"
    shard = newest / read_manifest(str(newest)).components["optim"].scopes["rank-00000"].tensor_file.path
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "fallback"
    out.mkdir()
    torchrun(WORKER, 2, "load", "--layout", "fsdp", "--split", "--root", str(root), "--out", str(out))
    assert {json.loads((out / f"load_rank{r}.json").read_text())["path"] for r in range(2)} == {
        str(root / "step_00000005")
    }


def test_two_nodes_save_sharded_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    nodes = start_cluster(tmp_path)
    try:
        processes = torchrun_nodes(
            "save", nodes.root, out, [d.endpoint for d in nodes.daemons], "--layout", "hsdp", "--spread", worker=WORKER
        )
        wait_all(processes, out, "save")
    finally:
        nodes.stop()
    saved = {"root": nodes.root, "out": out}
    manifest = sharded_manifest(saved)
    assert manifest.topology.num_nodes == 2
    assert set(manifest.components["train"].scopes) == {f"rank-{r:05d}" for r in range(4)}
    assert set(manifest.components["tables"].scopes) == {"share-00000", "share-00001"}  # a REPLICATED spread too
    loaded = load_job(saved, tmp_path, 2, "fsdp", "--spread")
    assert_bitwise(saved, loaded["full"])
    assert all(rank["tables_restored"] for rank in loaded["ranks"].values())


def test_a_dtensor_in_another_pattern_names_the_key_and_sharded(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    daemon = start_daemon(root, tmp_path / "daemon.log")
    try:
        torchrun(WORKER, 2, "dtensor-in-global", "--root", str(root), "--endpoint", daemon.endpoint, "--out", str(out))
    finally:
        daemon.stop()
    for rank in range(2):
        error = json.loads((out / f"error_rank{rank}.json").read_text())["error"]
        assert error.startswith("UnsupportedStateError"), error
        assert "'model'" in error and "embed.weight" in error and "SharingPattern.SHARDED" in error, error


def test_a_corrupted_chunk_is_named_and_the_load_refused(fsdp_on_two: Dict[str, Any], tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(fsdp_on_two["root"], root)
    checkpoint = root / f"step_{STEPS:08d}"
    manifest = read_manifest(str(checkpoint))
    shard = checkpoint / manifest.components["train"].scopes["rank-00001"].tensor_file.path
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last chunk's last byte
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AssertionError) as failed:
        torchrun(WORKER, 1, "load", "--layout", "plain", "--root", str(root), "--out", str(out))
    assert "rank-00001.safetensors: chunk" in str(failed.value) and "checksum" in str(failed.value)
    assert "no committed checkpoint" in str(failed.value)


def test_export_consolidates_chunks_into_a_plain_model(fsdp_tp_on_four: Dict[str, Any], tmp_path: Path) -> None:
    """`ckptd export --select model` of FSDP x TP state (row and column chunks, duplicated TP replicas)
    writes whole tensors, split into files by size; a plain model loaded from them computes what one
    loaded from the gathered full state computes."""
    sys.path.insert(0, str(WORKER.parent))
    from fsdp_job import VOCAB, TinyLM

    out = tmp_path / "export"
    checkpoint = fsdp_tp_on_four["root"] / f"step_{STEPS:08d}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd.service",
            "export",
            str(checkpoint),
            "--component",
            "train",
            "--select",
            "model",
            "--out",
            str(out),
            "--max-shard-gb",
            "0.000002",
        ],
        check=True,
        capture_output=True,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    exported: Dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        exported.update(load_file(str(out / name)))
    assert len(set(index["weight_map"].values())) > 1
    full = load_file(str(fsdp_tp_on_four["out"] / "full_saved.safetensors"))
    expected = {k[len("model/") :]: v for k, v in full.items() if k.startswith("model/")}
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    tokens = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    outputs = []
    for state in (exported, expected):
        model = TinyLM()
        model.load_state_dict(state)
        outputs.append(model(tokens))
    assert torch.equal(outputs[0], outputs[1])


def test_a_rank_verifies_the_blocks_it_reads_and_only_those(tmp_path: Path) -> None:
    """A chunk of two checksum blocks with a byte flipped in the first: reading only the second block's
    bytes verifies and succeeds; reading the first is refused, naming the chunk and the bytes."""
    from safetensors.torch import save_file

    from ckptd.client.errors import VerificationError
    from ckptd.client.sharded import ShardReader
    from ckptd.proto.formats import Checksum
    from ckptd.proto.manifest import FileRecord
    from ckptd.proto.sharding import CHECKSUM_BLOCK_BYTES, Box, ChunkRecord, checksum_blocks

    count = (CHECKSUM_BLOCK_BYTES + 4096) // 4
    values = torch.arange(count, dtype=torch.float32)
    shard = tmp_path / "train" / "rank-00000.safetensors"
    shard.parent.mkdir()
    save_file({"w": values}, str(shard))
    raw = values.numpy().tobytes()
    sums = []
    for start, length in checksum_blocks(len(raw)):
        block = Checksum()
        block.update(raw[start : start + length])
        sums.append(block.hexdigest())
    assert len(sums) == 2
    data = bytearray(shard.read_bytes())
    data[len(data) - len(raw) + 100] ^= 0xFF  # a byte of the first block
    shard.write_bytes(bytes(data))
    record = FileRecord("train/rank-00000.safetensors", len(data), "unused", {})
    chunk = ChunkRecord("w", record.path, "F32", (count,), Box((0,), (count,)), tuple(sums))

    reader = ShardReader(str(tmp_path), {record.path: record}, verify=True)
    try:
        second, _, _ = reader.chunk(chunk, (CHECKSUM_BLOCK_BYTES, len(raw)))
        assert torch.equal(second[CHECKSUM_BLOCK_BYTES // 4 :], values[CHECKSUM_BLOCK_BYTES // 4 :])
        del second
        with pytest.raises(VerificationError, match=rf"chunk 'w' at \[0\], bytes 0-{CHECKSUM_BLOCK_BYTES}: checksum"):
            reader.chunk(chunk, (0, 4))
    finally:
        reader.close()
