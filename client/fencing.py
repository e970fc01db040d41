"""Settling a save whose daemon can no longer be asked: committed, or never to commit.

When the daemon that took a save is restarted, stops answering, or does not answer the hand-over in
time, the client must reuse that save's staging memory and tell the trainer an outcome that stays
true. The daemon writes a save into its tmp directory and commits it by renaming that directory to
its final name, and it never re-creates the tmp directory of a save it has opened. So one rename
decides: if the client moves the tmp directory aside first, the save can never commit (whatever the
daemon does when it resumes); if the daemon renamed it first, it is committed. Retention may delete
a committed checkpoint before its trainer hears of the commit (the daemon killed right after a batch
of commits); the retention file records such deletions first, so they still count as committed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Optional

from ckptd.client.errors import CheckpointError
from ckptd.client.loading import read_manifest
from ckptd.proto import layout
from ckptd.proto.retention import RETENTION_FILE, deleted_checkpoints

log = logging.getLogger(__name__)

FENCED_SUFFIX = "-fenced-"


def fence_save(root: str, step: int, job: str) -> Optional[str]:
    """Settle checkpoint `step` of run `job` under `root`: its final directory if it committed, else
    None, and then it never will (its tmp directory, if any, is moved aside to a leftover name)."""
    tmp_dir = os.path.join(root, layout.tmp_dir_name(step, layout.job_token(job)))
    final = os.path.join(root, layout.checkpoint_dir_name(step))
    fenced = f"{tmp_dir}{FENCED_SUFFIX}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(tmp_dir, fenced)
        log.info("moved the tmp directory of step %d aside: that save can no longer commit", step)
        shutil.rmtree(fenced, ignore_errors=True)  # a daemon still writing it only has files of its own open
    except FileNotFoundError:
        pass  # never opened, already discarded, or renamed to its final name
    except OSError as exc:
        log.warning("could not move %s aside (%s); deciding from what is on disk", tmp_dir, exc)
    return final if committed_by(final, job) or deleted_after_commit(root, step, job) else None


def deleted_after_commit(root: str, step: int, job: str) -> bool:
    """True if retention deleted checkpoint `step` of run `job` after it committed (it may do so
    before the client hears of the commit, when several saves commit together)."""
    try:
        with open(os.path.join(root, RETENTION_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return (step, job) in deleted_checkpoints(record)


def committed_by(checkpoint_dir: str, job: str) -> bool:
    """True if `checkpoint_dir` is a committed checkpoint saved by run `job`."""
    try:
        return read_manifest(checkpoint_dir).job == job
    except (CheckpointError, OSError):  # unreadable (an I/O error): not known to be committed
        return False
