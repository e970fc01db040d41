"""An object-store tier, against a real S3-compatible server on loopback (moto, server mode) and
the real boto3 client: uploads with the manifest last and their own retention, an upload cut by
kill -9 of the daemon resumed at the next start, a load from the object store alone, and a missing
bucket or wrong credentials reported without touching the root."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import boto3
import pytest
from helpers import Daemon, running_s3_server, wait_for
from test_tiers import MIB, Trainer, ckptd, loaded_step, manager_for, tier_status

from ckptd.disk.objectstore import CHECKSUM_METADATA, ObjectStoreError, ObjectStoreRoot, fetch_checkpoint
from ckptd.disk.root import checkpoint_steps

BUCKET = "ckptd-test"


def objects(prefix: str) -> dict:
    listed = boto3.session.Session().client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}


def save_steps(daemon: Daemon, trainer: Trainer, steps: range, after: Callable[[int], None] = lambda _: None) -> None:
    with manager_for(daemon, trainer) as manager:
        for step in steps:
            trainer.at_step(step)
            manager.save_checkpoint(step).wait(60)
            after(step)


def test_steps_are_uploaded_manifest_last_with_their_own_retention_and_load_from_s3_alone(
    s3_server: str, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/jobs/run1"
    tier = f"s3={url}:every=2:keep_last=2"
    daemon = daemon_factory("--tier", tier)
    store = ObjectStoreRoot(url)

    def uploaded(step: int) -> None:  # each wanted step in turn (a tier that is behind skips steps)
        if step % 2 == 0:
            assert wait_for(lambda: store.latest_step() == step and tier_status(daemon, "s3")["copying"] is None, 60)

    save_steps(daemon, Trainer(), range(1, 7), uploaded)
    assert store.committed_steps() == [4, 6]
    keys = objects("jobs/run1/")
    assert "jobs/run1/latest" in keys and "jobs/run1/step_00000006/checkpoint_manifest.json" in keys
    assert not any("step_00000002" in key for key in keys), "retention left step 2 behind"
    head = (
        boto3.session.Session()
        .client("s3")
        .head_object(Bucket=BUCKET, Key="jobs/run1/step_00000006/model/global.safetensors")
    )
    assert head["Metadata"][CHECKSUM_METADATA].startswith("xxh3")
    assert tier_status(daemon, "s3")["last_error"] is None

    # the operator commands given the root cover the object store too
    listed = json.loads(ckptd("ls", str(daemon.root), "--json").stdout)
    assert [(t["name"], [c["step"] for c in t["checkpoints"]]) for t in listed["tiers"]] == [("s3", [4, 6])]
    verified = ckptd("verify", str(daemon.root)).stdout
    assert f"OK  {url}/step_00000004" in verified and f"OK  {url}/step_00000006" in verified, verified
    boto3.session.Session().client("s3").put_object(
        Bucket=BUCKET, Key="jobs/run1/step_00000004/trainer/global.msgpack", Body=b"x"
    )
    assert "BAD s3://ckptd-test/jobs/run1/step_00000004" in ckptd("verify", str(daemon.root), check=False).stdout
    assert "step 6" in ckptd("inspect", f"{url}/step_00000006").stdout
    cleaned = json.loads(ckptd("gc", str(daemon.root), "--json").stdout)
    assert cleaned["tiers"][0]["tier"] == "s3" and cleaned["tiers"][0]["deleted_steps"] == []

    # a node with nothing local: the newest step comes from the object store (ranged GETs, verified)
    daemon.stop()
    shutil.rmtree(daemon.root)
    loaded = loaded_step(daemon.root, (tier,))
    assert (loaded.step, loaded.tier, loaded) == (6, "s3", f"{url}/step_00000006")
    assert not [n for n in os.listdir(daemon.root) if n.startswith(".tmp-")], "the fetched copy was left behind"
    # a loader fetches only the files it reads
    only = tmp_path / "only-model"
    fetch_checkpoint(
        store, 6, str(only), lambda manifest: {f.path for f in manifest.files() if f.path.startswith("model/")}
    )
    assert sorted(str(p.relative_to(only)) for p in only.rglob("*") if p.is_file()) == [
        "checkpoint_manifest.json",
        "model/global.msgpack",
        "model/global.safetensors",
    ]


def test_an_upload_cut_by_kill_9_resumes_at_the_next_start(
    s3_server: str, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/resume"
    args = ("--tier", f"s3={url}", "--tier-copy-mbps", "2")
    daemon = daemon_factory(*args)
    trainer = Trainer(numel=2 * MIB // 4)  # model 2 MiB, then the small trainer state: several objects
    save_steps(daemon, trainer, range(3, 4))
    assert wait_for(lambda: tier_status(daemon, "s3")["bytes_copied"] >= 2 * MIB, timeout=30)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    store = ObjectStoreRoot(url)
    assert store.committed_steps() == [] and store.latest_step() is None, "committed without its manifest"

    restarted = daemon_factory(*args)
    assert wait_for(lambda: store.latest_step() == 3, timeout=60)
    resumed = re.search(r"step 3 resumed: (\d+) file\(s\) were already uploaded", restarted.log())
    assert resumed and 1 <= int(resumed.group(1)) < 4, restarted.log()  # the model's 2 MiB was not sent again
    restarted.stop()
    shutil.rmtree(restarted.root)
    assert loaded_step(restarted.root, (f"s3={url}",)).step == 3


def test_a_missing_bucket_is_a_clear_error_and_the_root_is_unaffected(
    s3_server: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory("--tier", "s3=s3://no-such-bucket/job")
    save_steps(daemon, Trainer(), range(1, 3))
    assert checkpoint_steps(str(daemon.root), with_manifest=True) == [1, 2]
    assert wait_for(lambda: tier_status(daemon, "s3")["last_error"] is not None, timeout=30)
    error = tier_status(daemon, "s3")["last_error"]
    assert "no-such-bucket" in error and "does not exist" in error, error
    assert loaded_step(daemon.root, ("s3=s3://no-such-bucket/job",)).step == 2


def test_wrong_or_missing_credentials_are_a_clear_error_and_the_root_is_unaffected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    with running_s3_server(monkeypatch, tmp_path / "moto.log", authenticate=True):
        with pytest.raises(ObjectStoreError, match="check the AWS credentials"):
            ObjectStoreRoot(f"s3://{BUCKET}/x").check()
        daemon = daemon_factory("--tier", f"s3=s3://{BUCKET}/x")
        save_steps(daemon, Trainer(), range(1, 3))
        assert checkpoint_steps(str(daemon.root), with_manifest=True) == [1, 2]
        assert wait_for(lambda: tier_status(daemon, "s3")["last_error"] is not None, timeout=30)
        assert "check the AWS credentials" in tier_status(daemon, "s3")["last_error"]

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(ObjectStoreError, match="no AWS credentials found"):
            ObjectStoreRoot(f"s3://{BUCKET}/x").check()


def test_a_stalled_object_store_never_holds_up_a_save_or_the_status(
    monkeypatch: pytest.MonkeyPatch, daemon_factory: Callable[..., Daemon]
) -> None:
    """The object store's endpoint accepts connections and never answers: saves still commit at
    once, `ckptd status` answers, and the daemon stops in time."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(64)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{stalled.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        daemon = daemon_factory("--tier", f"s3=s3://{BUCKET}/stalled")
        started = time.monotonic()
        save_steps(daemon, Trainer(), range(1, 4))
        assert time.monotonic() - started < 20, "saves waited on the object store"
        asked = time.monotonic()
        assert tier_status(daemon, "s3")["latest"] is None
        assert time.monotonic() - asked < 2, "status waited on the object store"
        assert checkpoint_steps(str(daemon.root), with_manifest=True) == [1, 2, 3]
        stopping = time.monotonic()
        assert daemon.stop(timeout=60) == 0
        assert time.monotonic() - stopping < 40  # gives up on the stalled copy after 5 s without progress
