"""bench/bench_save.py --device cuda (and bench/run_cuda.sh).

Without CUDA: the option fails at once with a one-line message and a non-zero exit, before any row
runs. With CUDA: the same tiny end-to-end run as test_bench_smoke.py, with the state on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH = REPO / "bench" / "bench_save.py"
RUN_CUDA = REPO / "bench" / "run_cuda.sh"

needs_no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is available: the no-CUDA error cannot happen"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _smoke_module() -> Any:
    """tests/test_bench_smoke.py, by path (tests run with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("ckptd_test_bench_smoke", HERE / "test_bench_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_clear_cuda_error(proc: "subprocess.CompletedProcess[str]") -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "--device cuda" in lines[0] and "CUDA is not available" in lines[0], output


@needs_no_cuda
def test_device_cuda_without_cuda_fails_at_once(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--device",
            "cuda",
            "--scale",
            "0.001",
            "--repeats",
            "1",
            "--dir",
            str(work),
            "--json",
            str(json_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    _assert_clear_cuda_error(proc)
    assert not json_path.exists()
    assert not any(work.iterdir()), "rows ran (or a work directory was made) before the device was checked"


@needs_no_cuda
def test_row_process_with_device_cuda_without_cuda_reports_an_error(tmp_path: Path) -> None:
    bench = _smoke_module()._bench_module()
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--row",
            "memcpy",
            "--state",
            "A",
            "--device",
            "cuda",
            "--scale",
            "0.001",
            "--repeats",
            "1",
            "--dir",
            str(tmp_path / "row"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    results = [
        json.loads(line[len(bench.RESULT_MARK) :])
        for line in proc.stdout.splitlines()
        if line.startswith(bench.RESULT_MARK)
    ]
    assert len(results) == 1, proc.stdout + proc.stderr
    assert results[0]["status"] == "error" and "CUDA is not available" in results[0]["reason"], results


@needs_no_cuda
def test_run_cuda_script_without_cuda_fails_at_once(tmp_path: Path) -> None:
    assert os.access(RUN_CUDA, os.X_OK), f"{RUN_CUDA} is not executable"
    json_path = tmp_path / "cuda.json"
    # From another directory: the script finds the repository itself; --json overrides its default.
    proc = subprocess.run(
        [str(RUN_CUDA), "--json", str(json_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    _assert_clear_cuda_error(proc)
    assert not json_path.exists()


@needs_cuda
def test_bench_runs_every_row_on_cuda(tmp_path: Path) -> None:
    _, out, data = _smoke_module().run_smoke(tmp_path, "--device", "cuda")
    name = torch.cuda.get_device_name(0)
    assert f"\ndevice: cuda ({name}" in out, out
    assert data["config"]["device"] == "cuda"
    assert data["machine"]["device"] == "cuda" and data["machine"]["gpu"] == name
    assert any("Device cuda" in note for note in data["notes"]), data["notes"]
    for rows in data["results"].values():
        for result in rows.values():
            if result["status"] == "ok":
                assert result["device"] == "cuda" and result["device_name"] == name, result
    assert data["results"]["A"]["memcpy"]["status"] == "ok"
