"""Which committed checkpoints a retention policy keeps (a pure rule: the daemon applies it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

RETENTION_FILE = "retention.json"
"""Written into the root after each retention pass: the policy and why each kept step is kept."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest `keep_last`, every step divisible by `keep_every`, and the `keep_best` best by
    `best_metric` (`best_mode` "min" or "max"); everything else is deleted after a commit. The newest
    checkpoint is always kept. All None: keep everything."""

    keep_last: Optional[int] = None
    keep_every: Optional[int] = None
    keep_best: Optional[int] = None
    best_metric: Optional[str] = None
    best_mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
        if (self.keep_best is None) != (self.best_metric is None):
            raise ValueError("keep_best and best_metric go together: keep the N best by which metric?")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")

    @property
    def keeps_everything(self) -> bool:
        """True when no rule deletes anything."""
        return self.keep_last is None and self.keep_every is None and self.keep_best is None

    def to_wire(self) -> Dict[str, Any]:
        """Plain form for a save request and the retention file."""
        return {
            "keep_last": self.keep_last,
            "keep_every": self.keep_every,
            "keep_best": self.keep_best,
            "best_metric": self.best_metric,
            "best_mode": self.best_mode,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> "RetentionPolicy":
        """Checked inverse of `to_wire`; raises ValueError naming the problem."""
        if not isinstance(raw, dict):
            raise ValueError("retention must be a map")
        metric = raw.get("best_metric")
        if metric is not None and (not isinstance(metric, str) or not 0 < len(metric) <= 128):
            raise ValueError("best_metric must be a metric name")
        return cls(
            **{k: raw.get(k) for k in ("keep_last", "keep_every", "keep_best")},
            best_metric=metric,
            best_mode=raw.get("best_mode") or "min",
        )


def kept_steps(checkpoints: Sequence[Tuple[int, Mapping[str, float]]], policy: RetentionPolicy) -> Dict[int, List[str]]:
    """Step -> the reasons it is kept, for committed `checkpoints` given as (step, metrics). Steps
    missing from the result are to be deleted."""
    steps = sorted(step for step, _ in checkpoints)
    if policy.keeps_everything:
        return {step: ["no retention policy"] for step in steps}
    kept: Dict[int, List[str]] = {}

    def keep(step: int, reason: str) -> None:
        kept.setdefault(step, []).append(reason)

    if steps:
        keep(steps[-1], "newest")
    if policy.keep_last is not None:
        for step in steps[-policy.keep_last :]:
            keep(step, f"last {policy.keep_last}")
    if policy.keep_every is not None:
        for step in steps:
            if step % policy.keep_every == 0:
                keep(step, f"every {policy.keep_every}")
    if policy.keep_best is not None and policy.best_metric is not None:
        scored = [
            (metrics[policy.best_metric], step)
            for step, metrics in checkpoints
            if isinstance(metrics.get(policy.best_metric), (int, float)) and math.isfinite(metrics[policy.best_metric])
        ]
        scored.sort(key=lambda item: (item[0] if policy.best_mode == "min" else -item[0], -item[1]))
        for _, step in scored[: policy.keep_best]:
            keep(step, f"best {policy.keep_best} by {policy.best_metric} ({policy.best_mode})")
    return {step: kept[step] for step in sorted(kept)}


DELETED_KEY = "deleted"
"""Key of the retention file's list of [step, job run id] that retention deleted, newest last, written
before they are deleted: a client settling a save it was never told about finds it committed there."""
DELETED_REMEMBERED = 1024
"""How many deleted checkpoints the retention file remembers."""


def deleted_checkpoints(record: Any) -> List[Tuple[int, str]]:
    """The (step, job) pairs a parsed retention file lists as deleted after they committed."""
    entries = record.get(DELETED_KEY, []) if isinstance(record, dict) else []
    return [
        (e[0], e[1])
        for e in entries
        if isinstance(e, list) and len(e) == 2 and type(e[0]) is int and isinstance(e[1], str)
    ]
