"""The invariants every committed checkpoint keeps, checked on what is on disk (DESIGN.md, Commit protocol).

Used by the crash, torture and power-cut tests. Their trainers tag their state with the step: every
tensor element of the checkpoint of step N equals N, and every non-tensor value under a key named
"step" equals N. A checkpoint that mixes two steps verifies against its checksums; only this content
check catches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch

from ckptd.client.errors import CheckpointError
from ckptd.client.loading import committed_checkpoints, read_manifest, read_scopes
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto import layout


@dataclass
class RootReport:
    """What a check of one root found."""

    problems: List[str] = field(default_factory=list)
    committed: List[int] = field(default_factory=list)
    """Steps with a final directory, oldest first."""
    latest: Optional[int] = None
    """The step `latest` names (None when there is no `latest`)."""


def tagged_values(state: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    """(key path, value) of every tensor and of every value stored under a key named "step"."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for key, value in state.items():
            if key == "step" and not isinstance(value, (dict, list, tuple, torch.Tensor)):
                yield f"{path}/step", value
            else:
                yield from tagged_values(value, f"{path}/{key}")
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from tagged_values(value, f"{path}/{index}")


def content_problems(checkpoint_dir: str, step: int) -> List[str]:
    """Where the checkpoint of `step` holds anything but `step` (every component, every copy)."""
    problems = []
    manifest = read_manifest(checkpoint_dir)
    if manifest.step != step:
        problems.append(f"{checkpoint_dir}: the manifest says step {manifest.step}")
    for key, record in manifest.components.items():
        for scope_name, scope in record.scopes.items():
            try:
                state = read_scopes(checkpoint_dir, [scope], verify=False)
            except CheckpointError as exc:
                problems.append(f"{checkpoint_dir}: {key}/{scope_name} cannot be read: {exc}")
                continue
            for where, value in tagged_values(state):
                if isinstance(value, torch.Tensor):
                    wrong = value.numel() and not bool(torch.all(value == step))
                    if wrong:
                        found = sorted({int(v) for v in value.flatten()[:: max(1, value.numel() // 64)].tolist()})
                        problems.append(
                            f"{checkpoint_dir}: {key}/{scope_name}{where} holds steps {found[:6]}, not {step}"
                        )
                elif value != step:
                    problems.append(f"{checkpoint_dir}: {key}/{scope_name}{where} = {value!r}, not {step}")
    return problems


def check_root(root: Path, previous_latest: Optional[int] = None, content: bool = True) -> RootReport:
    """Every final-named checkpoint verifies and (with `content`) holds exactly its own step; `latest`
    names one of them and never moves back from `previous_latest`."""
    report = RootReport()
    if not root.is_dir():
        report.problems.append(f"{root} is gone")
        return report
    for directory in reversed(committed_checkpoints(str(root))):
        step = layout.parse_checkpoint_dir_name(os.path.basename(directory))
        assert step is not None
        report.committed.append(step)
        bad = verify_checkpoint(directory)
        if bad:
            report.problems.extend(f"{p.path}: {p.reason}" for p in bad)
            continue
        if content:
            report.problems.extend(content_problems(directory, step))
    latest_file = root / layout.LATEST_NAME
    if latest_file.exists():
        name = latest_file.read_text().strip()
        report.latest = layout.parse_checkpoint_dir_name(name)
        if report.latest is None or report.latest not in report.committed:
            report.problems.append(f"latest names {name!r}, which is not a committed checkpoint")
    elif report.committed:
        report.problems.append(f"no latest, though steps {report.committed[-3:]} are committed")
    if previous_latest is not None and (report.latest is None or report.latest < previous_latest):
        report.problems.append(f"latest moved backwards: {previous_latest} -> {report.latest}")
    return report
