"""examples/fsdp2_train.py as real torchrun jobs (gloo) with the daemon it auto-starts: killed half way
and resumed on the same world size it ends bitwise where an uninterrupted run ends, with the same loss
at every step; resumed on twice the ranks it trains on exactly the samples that come next."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers import wait_for
from test_examples_ddp_resume import EXAMPLES, assert_bitwise_equal, crashed, records, start_job, succeeded

FSDP2_TRAIN = EXAMPLES / "fsdp2_train.py"
STEPS, SAVE_EVERY, CRASH_AT, SAMPLES_PER_STEP = 8, 2, 4, 4


def test_fsdp2_example_resumes_bitwise_and_at_another_world_size(tmp_path: Path) -> None:
    common = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY)]
    # the uninterrupted job and the one that crashes are independent: they run side by side
    straight_job = start_job(
        tmp_path,
        "straight",
        FSDP2_TRAIN,
        2,
        *common,
        "--root",
        str(tmp_path / "a"),
        "--record",
        str(tmp_path / "straight"),
    )
    crash_job = start_job(
        tmp_path,
        "crash",
        FSDP2_TRAIN,
        2,
        *common,
        "--root",
        str(tmp_path / "b"),
        "--crash-at",
        str(CRASH_AT),
        "--record",
        str(tmp_path / "crashed"),
    )
    try:
        crashed(crash_job)
        straight = succeeded(straight_job)
    finally:
        for job in (straight_job, crash_job):
            job.kill()
    assert f"step {STEPS} committed" in straight
    # the save of CRASH_AT was handed over before the SIGKILL: the daemon commits it on its own
    latest = tmp_path / "b" / "latest"
    assert wait_for(lambda: latest.is_file() and latest.read_text().strip() == f"step_{CRASH_AT:08d}", timeout=60)
    shutil.copytree(tmp_path / "b", tmp_path / "c", ignore=shutil.ignore_patterns(".ckptd-*"))
    # so are the resume on the same world size (root b) and the one on twice the ranks (its copy c)
    resume_job = start_job(
        tmp_path,
        "resume",
        FSDP2_TRAIN,
        2,
        *common,
        "--root",
        str(tmp_path / "b"),
        "--resume",
        "--record",
        str(tmp_path / "resumed"),
    )
    wider_job = start_job(
        tmp_path,
        "resume4",
        FSDP2_TRAIN,
        4,
        *common,
        "--root",
        str(tmp_path / "c"),
        "--resume",
        "--record",
        str(tmp_path / "wider"),
    )
    try:
        resumed = succeeded(resume_job)
        wider = succeeded(wider_job)
    finally:
        for job in (resume_job, wider_job):
            job.kill()
    assert f"resumed at step {CRASH_AT}" in resumed

    before, after, whole = (
        records(tmp_path / "crashed", 2),
        records(tmp_path / "resumed", 2),
        records(tmp_path / "straight", 2),
    )
    assert after[0]["start_step"] == CRASH_AT
    assert before[0]["steps"] + after[0]["steps"] == whole[0]["steps"]  # (step, loss) pairs, ==
    assert_bitwise_equal(after[0]["full_model"], whole[0]["full_model"])
    assert_bitwise_equal(after[0]["full_optimizer"], whole[0]["full_optimizer"])

    assert f"resumed at step {CRASH_AT} " in wider and "saved by 2 ranks, now 4" in wider
    trained = [ids for r in before for step, ids in r["batches"]]
    trained += [ids for r in records(tmp_path / "wider", 4) for step, ids in r["batches"]]
    flat = sorted(i for ids in trained for i in ids)
    assert flat == list(range(2 * CRASH_AT * SAMPLES_PER_STEP + 4 * (STEPS - CRASH_AT) * SAMPLES_PER_STEP))
    assert torch.tensor(flat).unique().numel() == len(flat)
