"""The root's record of its slower tiers (`tiers.json`, written by the daemon that fills them), so
that the operator commands given a root find every tier of it."""

from __future__ import annotations

import json
import os
from typing import Sequence, Tuple

from ckptd.disk.durable import write_atomic
from ckptd.proto.tiers import TIERS_FILE, TierSpec, TierSpecError, parse_tiers


def write_tiers_record(root: str, tiers: Sequence[TierSpec]) -> None:
    """Record `tiers` (nearest first) in `root`; an empty list removes the record."""
    path = os.path.join(root, TIERS_FILE)
    if not tiers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    write_atomic(path, json.dumps({"tiers": [tier.to_arg() for tier in tiers]}, indent=1).encode())


def read_tiers_record(root: str) -> Tuple[TierSpec, ...]:
    """The tiers `root`'s daemon last recorded (none if there is no record or it cannot be read)."""
    try:
        with open(os.path.join(root, TIERS_FILE), encoding="utf-8") as f:
            raw = json.load(f).get("tiers", [])
        return parse_tiers([str(text) for text in raw])
    except (OSError, ValueError, AttributeError, TierSpecError):
        return ()
