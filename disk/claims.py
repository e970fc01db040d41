"""The root's owner claim (`.ckptd-owner.json`; record and liveness rule in `ckptd.proto.ownership`)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ckptd.disk.durable import write_atomic
from ckptd.proto.ownership import CLAIM_FILE, RootClaim

log = logging.getLogger(__name__)


def claim_path(root: str) -> str:
    """Where a root's owner claim lives."""
    return os.path.join(root, CLAIM_FILE)


def read_claim(root: str) -> Optional[RootClaim]:
    """The root's claim, or None when there is none, it cannot be read, or it is malformed (logged)."""
    path = claim_path(root)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read the root claim %s: %s", path, exc)
        return None
    claim = RootClaim.from_json(text)
    if claim is None:
        log.warning("ignored a malformed root claim %s", path)
    return claim


def write_claim(root: str, claim: RootClaim) -> None:
    """Replace the root's claim. Not fsynced: a claim is a lease, and a crash ends the run it names."""
    write_atomic(claim_path(root), claim.to_json().encode(), durable=False)


def remove_claim(root: str, job: str) -> None:
    """Remove the root's claim if it is still run `job`'s."""
    claim = read_claim(root)
    if claim is not None and claim.run.job == job:
        try:
            os.unlink(claim_path(root))
        except FileNotFoundError:
            pass
