"""Checking a whole checkpoint against its manifest (`ckptd verify`, the tests' invariants)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from ckptd.disk.files import FileProblem, Progress, check_listed_file
from ckptd.disk.manifests import ManifestProblem, read_manifest


@dataclass(frozen=True)
class Problem:
    """One file of a checkpoint that does not match its manifest; `reason` completes "<path> ..."."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


def verify_checkpoint(
    checkpoint_dir: str, progress: Optional[Progress] = None, held_only: bool = False
) -> List[Problem]:
    """Every problem with one checkpoint: its manifest, and each listed file's type, size and checksum.
    `held_only`: one node's copy (a node-local root), whose absent files are other nodes' to hold."""
    try:
        manifest = read_manifest(checkpoint_dir)
    except ManifestProblem as exc:
        return [Problem(exc.path, exc.reason)]
    problems = []
    for record in manifest.files():
        if held_only and not os.path.lexists(os.path.join(checkpoint_dir, record.path)):
            continue
        try:
            check_listed_file(os.path.join(checkpoint_dir, record.path), record, progress)
        except FileProblem as problem:
            problems.append(Problem(problem.path, problem.reason))
    return problems
