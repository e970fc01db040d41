"""Smoke test of bench/bench_save.py: every row runs on a tiny state; the table and the JSON come out.

The numbers of such a run mean nothing (tiny state, rows run two at a time); this only checks that
the bench works end to end: the driver, one subprocess per row, ckptd's daemon, DCP's checkpoint process.
`run_smoke` is reused by test_bench_cuda.py for the same run with --device cuda.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench_save.py"


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("ckptd_bench_save", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(stdout: str) -> List[List[str]]:
    rows = []
    for line in stdout.splitlines():
        if line.startswith("|") and not line.startswith("|-"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_smoke(tmp_path: Path, *extra: str, timeout: float = 280) -> Tuple[Any, str, Dict[str, Any]]:
    """Run the whole bench tiny (with `extra` arguments), check its table and JSON; return
    (the bench module, its stdout, the JSON)."""
    bench = _bench_module()
    json_path = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCH),
        "--scale",
        "0.001",
        "--repeats",
        "1",
        "--training-repeats",
        "1",
        "--jobs",
        "2",
        "--settle",
        "0.2",
        "--pause",
        "0",
        "--dir",
        str(tmp_path),
        "--json",
        str(json_path),
        "--no-disk-probe",
        "--retries",
        "0",
        "--drop-caches",
        "never",  # fadvise only: a test must not drop the whole machine's page cache
        *extra,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    # The header lines and one table with every row of both states.
    assert "machine:" in out and "command:" in out and "torch" in out
    assert re.search(r"\nstaging memory: (4 KiB|2 MiB) pages.*; the limits' buffers on the same pages\n", out), out
    table = _table_rows(out)
    assert table and table[0][:2] == ["state", "row"], out
    lost_column = table[0].index("training s lost / ckpt (x floor)")
    # The training-lost floors' own lines (only that column filled), after state A's rows: the issue's
    # floor, then the one that checksums what it writes.
    floors = [cells for cells in table[1:] if cells[1].startswith("floor: memcpy + ")]
    assert [cells[0] for cells in floors] == ["A", "A"], out
    assert floors[1][1] == "floor: memcpy + checksummed O_DIRECT write in a thread", floors
    assert all(cells[lost_column] not in ("", "-") for cells in floors), floors
    # " !" marks a row disturbed by other load (rows run two at a time here, so expect it)
    printed = {(cells[0], cells[1].removesuffix(" !")): cells for cells in table[1:] if cells not in floors}
    expected_rows: Dict[str, List[str]] = {"A": list(bench.ROW_IDS), "B": list(bench.DEFAULT_ROWS_B)}
    for state, rows in expected_rows.items():
        for row in rows:
            cells = printed.get((state, bench.LABELS[row]))
            assert cells is not None, f"state {state} row {bench.LABELS[row]!r} missing from the table:\n{out}"
            assert not cells[2].startswith("error"), cells
    assert len(printed) == sum(len(rows) for rows in expected_rows.values())

    # The JSON: numeric values wherever a row applies, "n/a" only where this torch/ckptd lacks the API.
    data = json.loads(json_path.read_text())
    assert data["config"]["scale"] == 0.001 and data["machine"]["cores"]
    assert data["machine"]["staging_pages"].split(" (")[0] in ("4 KiB pages", "2 MiB pages")
    for state, rows in expected_rows.items():
        for row in rows:
            result = data["results"][state][row]
            missing_api = bench.row_unavailable(row)
            if row in ("write_direct", "write_direct_checksummed") and result["status"] == "n/a":
                assert "O_DIRECT" in result["reason"], result  # a filesystem without O_DIRECT (tmpfs)
                continue
            if missing_api is not None:
                assert result["status"] == "n/a", result
                assert printed[(state, bench.LABELS[row])][2] == "n/a"
                continue
            assert result["status"] == "ok", result
            where = f"{state}/{row}"
            for key in (
                "blocked_first_s",
                "blocked_warm_s",
                "trainer_peak_rss_mb",
                "trainer_base_rss_mb",
                "state_bytes",
            ):
                assert _is_number(result.get(key)), (where, key, result.get(key))
            assert result["state_bytes"] > 0
            if row != "memcpy":
                assert _is_number(result.get("durable_warm_s")), (where, result.get("durable_warm_s"))
                assert result["durable_warm_s"] >= result["blocked_warm_s"] * 0.999
            if row not in bench.BLOCKING_ROWS:
                for key in ("throughput_kept", "staged_warm_s", "baseline_steps_per_s"):
                    assert _is_number(result.get(key)), (where, key, result.get(key))
            if row in ("write", "write_direct", "write_direct_checksummed"):  # the I/O-alone references
                assert _is_number(result.get("throughput_kept")), where
            if row not in bench.BLOCKING_ROWS or row.startswith("write"):  # training s lost / ckpt
                assert _is_number(result.get("train_lost_s")), (where, result.get("train_lost_s"))
                assert len(result["train_lost_all_s"]) == 1 and all(map(_is_number, result["train_lost_all_s"]))
                assert printed[(state, bench.LABELS[row])][lost_column] != "-", where
            else:
                assert result.get("train_lost_s") is None, where
            if row in ("ckptd", "ckptd_overlap", "dcp_async_best"):
                assert result.get("writer_process"), where
                assert _is_number(result.get("writer_hwm_mb")) and _is_number(result.get("writer_peak_anon_mb")), where
            if row in bench.LOAD_ROWS:
                assert _is_number(result.get("load_cold_s")) and _is_number(result.get("load_warm_s")), where
                assert result.get("load_ok") is True, (where, "the load did not restore the saved values")
            if row != "memcpy":
                assert _is_number(result.get("blocked_warm_x_memcpy")), where
    # Ratios against the limits of the same state.
    ckptd = data["results"]["A"]["ckptd"]
    assert _is_number(ckptd.get("durable_warm_x_limit"))
    # The training-lost floor (memcpy + the O_DIRECT write in a thread, or the buffered write where
    # O_DIRECT is refused), and ckptd's first save right after construction.
    floor = data["train_lost_floor"]["A"]
    assert floor is not None and _is_number(floor["train_lost_s"]), floor
    assert floor["write_row"] == ("write_direct" if data["results"]["A"]["write_direct"]["status"] == "ok" else "write")
    assert floor["train_lost_s"] == floor["memcpy_blocked_warm_s"] + floor["write_train_lost_s"]
    assert _is_number(ckptd.get("train_lost_s"))
    if floor["train_lost_s"] > 0:
        assert _is_number(ckptd.get("train_lost_x_floor"))
    checksummed = data["train_lost_floor_checksummed"]["A"]
    if data["results"]["A"]["write_direct_checksummed"]["status"] == "ok":
        assert checksummed["write_row"] == "write_direct_checksummed", checksummed
        assert checksummed["train_lost_s"] == checksummed["memcpy_blocked_warm_s"] + checksummed["write_train_lost_s"]
        if checksummed["train_lost_s"] > 0:
            assert _is_number(ckptd.get("train_lost_x_checksummed_floor"))
            assert "checksums every byte it writes" in out
    _check_interleaved(bench, data, out)
    for key in ("blocked_first_now_s", "durable_first_now_s", "saver_ready_now_s"):
        assert _is_number(ckptd.get(key)), (key, ckptd.get(key))
    assert "first save right after construction:" in out
    assert data["targets"], "the issue's targets were not evaluated"
    names = {t["target"] for t in data["targets"]}
    for name in (
        "ckptd: warm blocked <= 1.1x memcpy",
        "ckptd: first save blocked <= 1.5x warm blocked",
        "ckptd: first save right after construction <= warm save + staging allocation",
        "ckptd: training s lost / ckpt <= 1.2x the floor",
        "ckptd: state B warm blocked <= 2x memcpy",
    ):
        assert name in names, (name, sorted(names))
    assert any(n.startswith("ckptd: training s lost / ckpt <= 0.5x dcp.") for n in names), sorted(names)
    return bench, out, data


def _check_interleaved(bench: Any, data: Dict[str, Any], out: str) -> None:
    """On the host, the ckptd rows took their saves again, each in turn with the floor's, and the
    targets read those ratios; on CUDA that phase says why it did not run."""
    for state, rows in data["results"].items():
        for row in ("ckptd", "ckptd_overlap"):
            result = rows.get(row)
            if result is None or result["status"] != "ok":
                continue
            if data["config"]["device"] == "cuda":
                assert "CUDA" in result["interleaved_skipped"], result
                continue
            where = f"{state}/{row}"
            for key in ("memcpy", "blocked", "floor_lost", "checksummed_floor_lost", "lost"):
                samples = result[f"interleaved_{key}_all_s"]
                assert len(samples) == 1 and all(map(_is_number, samples)), (where, key, samples)
            assert result["interleaved_blocked_x_memcpy"] == pytest.approx(
                result["interleaved_blocked_s"] / result["interleaved_memcpy_s"]
            )
            for floor in ("floor", "checksummed_floor"):
                if result[f"interleaved_{floor}_lost_s"] > 0:
                    assert result[f"interleaved_lost_x_{floor}"] == pytest.approx(
                        result["interleaved_lost_s"] / result[f"interleaved_{floor}_lost_s"]
                    )
            assert f"{bench.LABELS[row]}, state {state}, interleaved:" in out, where
    targets = {t["target"]: t for t in data["targets"]}
    blocked = targets["ckptd: warm blocked <= 1.1x memcpy"]
    if data["config"]["device"] != "cuda":
        assert blocked["value"] == data["results"]["A"]["ckptd"]["interleaved_blocked_x_memcpy"], blocked
        assert "interleaved in the row's process: 1 save, " in blocked["text"], blocked


def test_bench_runs_every_row_and_writes_json(tmp_path: Path) -> None:
    _, out, data = run_smoke(tmp_path)
    # The default device is the CPU, recorded in the header, the config and every row.
    assert "\ndevice: cpu\n" in out, out
    assert data["config"]["device"] == "cpu" and data["machine"]["device"] == "cpu"
    for rows in data["results"].values():
        for result in rows.values():
            if result["status"] == "ok":
                assert result["device"] == "cpu" and result["device_name"] is None, result


def test_the_tiers_bench_runs_end_to_end(tmp_path: Path) -> None:
    """bench/bench_tiers.py on a tiny state: both save configurations, the three resumes (each
    asserting the step and tier it loaded), the table and the JSON."""
    out = tmp_path / "tiers.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_tiers.py"),
            "--scale",
            "0.001",
            "--steps",
            "4",
            "--step-s",
            "0.1",
            "--dir",
            str(tmp_path),
            "--out",
            str(out),
            "--no-object-store",  # the object-store tier has tests of its own (test_tiers_s3.py)
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| root in /dev/shm + shared tier on disk |" in done.stdout
    assert "fast tier resumes >= 3x faster than the shared tier" in done.stdout
    report = json.loads(out.read_text())
    assert report["resume"]["shared_tier_cold"]["tier"] == "shared"
    assert all(_is_number(r["blocked_median_s"]) for r in report["save_every_step"].values())
    assert all(_is_number(r["training_lost_per_save_s"]) for r in report["save_every_step"].values())
    assert "costs the training loop no more than a save today" in done.stdout
