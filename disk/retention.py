"""The root's retention record (`retention.json`, rules in `ckptd.proto.retention`): the policy last
applied, why each kept step is kept, and which (step, job run) retention deleted."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from ckptd.disk.durable import write_atomic
from ckptd.proto.retention import DELETED_KEY, RETENTION_FILE, RetentionPolicy, deleted_checkpoints


def read_retention(root: str) -> Dict[str, Any]:
    """The root's retention record ({"policy": ..., "kept": {step: reasons}, "deleted": [...]}), or {}."""
    try:
        with open(os.path.join(root, RETENTION_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_retention(
    root: str, policy: RetentionPolicy, kept: Dict[int, List[str]], deleted: List[Tuple[int, str]]
) -> None:
    """Replace the root's retention record (atomically and durably)."""
    record = {
        "policy": policy.to_wire(),
        "kept": {str(step): reasons for step, reasons in sorted(kept.items())},
        DELETED_KEY: [list(entry) for entry in deleted],
    }
    write_atomic(os.path.join(root, RETENTION_FILE), json.dumps(record, indent=1).encode())


def saved_policy(root: str) -> Optional[RetentionPolicy]:
    """The retention policy last applied to `root`, if any."""
    raw = read_retention(root).get("policy")
    try:
        return None if raw is None else RetentionPolicy.from_wire(raw)
    except ValueError:
        return None


def deleted_after_commit(root: str, step: int, job: str) -> bool:
    """True if retention deleted checkpoint `step` of run `job` after it committed."""
    return (step, job) in deleted_checkpoints(read_retention(root))
