"""Names on disk: safe names, checkpoint and tmp directories, files (the runtime paths of sockets and
locks are in `ckptd.disk.runtime`)."""

from __future__ import annotations

import hashlib
import re
from typing import Optional

MANIFEST_NAME = "checkpoint_manifest.json"
LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
CHECKPOINT_PREFIX = "step_"
TENSOR_SUFFIX = ".safetensors"
STATE_SUFFIX = ".msgpack"
REGION_PREFIX = "ckptd-"
REGION_DIR = "/dev/shm"
"""Where clients create their staging regions (named REGION_PREFIX<uid>-<pid>-<token>)."""
REGIONS_PER_COMPONENT = 6
"""Most staging regions a client keeps per component (and the daemon keeps mapped). In a root on
/dev/shm the daemon keeps a staged region as the shard file itself, so each checkpoint retention
keeps holds one region, one may be held for a tier copy, and the next save stages into another."""
PARTNER_DIR = "partner"
"""Under a node-local root: a checkpoint root of its own holding the previous node's files of each
checkpoint (`--replicate-to-partner`)."""
NODE_COPY_FILE = "node_copy.json"
"""In a node-local root (`--node-local-root`): which node's copy of the job's checkpoints it holds
(their manifests list the files of every node; the others' are on their nodes)."""
LOAD_TOKEN = "load"
"""In the tmp directory name where a load gathers the files its node lacks (`.tmp-step_N-load<hex>`)."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_CHECKPOINT_DIR = re.compile(r"^step_(\d{8,})$")


class UnsafeNameError(ValueError):
    """A key or name that could escape its directory or is not portable."""


def check_safe_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a safe file-name component, else raise UnsafeNameError.

    Safe: 1-128 characters of letters, digits, `_`, `.`, `-`, not starting with `.` or `-`,
    and never containing `..` (so no path separators, NUL, absolute paths or parent references).
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise UnsafeNameError(
            f"{what} {name!r} is not a safe name: use 1-128 letters, digits, '_', '.', '-', "
            "starting with a letter, digit or '_', without '..', path separators or NUL"
        )
    return name


def checkpoint_dir_name(step: int) -> str:
    """Final directory name of the checkpoint of `step`."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def parse_checkpoint_dir_name(name: str) -> Optional[int]:
    """The step of a final checkpoint directory name, or None if `name` is not one."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


def tmp_dir_name(step: int, token: str) -> str:
    """Name of the directory a checkpoint is written into before it commits."""
    return f"{TMP_PREFIX}{checkpoint_dir_name(step)}-{token}"


def job_token(job: str) -> str:
    """Short stable token of a job run id, for the tmp directory every node of the run shares."""
    return hashlib.sha256(job.encode()).hexdigest()[:12]


def shard_paths(component: str, scope: str) -> tuple[str, str]:
    """Relative paths of a component scope's tensor file and non-tensor state file."""
    return (f"{component}/{scope}{TENSOR_SUFFIX}", f"{component}/{scope}{STATE_SUFFIX}")
