"""Checking committed checkpoints against their manifests (for `ckptd verify`), without torch."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable, List, Optional

from ckptd.proto import layout
from ckptd.proto.formats import Checksum
from ckptd.proto.manifest import FileRecord, Manifest, ManifestError

READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    """One file of a checkpoint that does not match its manifest."""

    path: str
    reason: str


def checkpoint_dirs(path: str) -> List[str]:
    """`path` itself if it is a checkpoint directory, else the final checkpoint directories under it."""
    if os.path.exists(os.path.join(path, layout.MANIFEST_NAME)) or layout.parse_checkpoint_dir_name(
        os.path.basename(os.path.normpath(path))
    ) is not None:
        return [path]
    names = sorted(n for n in os.listdir(path) if layout.parse_checkpoint_dir_name(n) is not None)
    return [os.path.join(path, n) for n in names]


Progress = Callable[[int], None]
"""Called with the number of bytes just checked."""


def verify_checkpoint(checkpoint_dir: str, progress: Optional[Progress] = None) -> List[Problem]:
    """Every problem with one checkpoint: its manifest, and each listed file's type, size and checksum."""
    manifest_path = os.path.join(checkpoint_dir, layout.MANIFEST_NAME)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = Manifest.from_json(f.read())
    except FileNotFoundError:
        return [Problem(manifest_path, "missing")]
    except (ManifestError, UnicodeDecodeError, ValueError) as exc:
        return [Problem(manifest_path, str(exc))]
    problems = []
    for record in manifest.files():
        reason = check_file(os.path.join(checkpoint_dir, record.path), record, progress)
        if reason:
            problems.append(Problem(os.path.join(checkpoint_dir, record.path), reason))
    return problems


def check_file(path: str, record: FileRecord, progress: Optional[Progress] = None) -> str:
    """Why a listed file does not match its record (missing, not regular, size, checksum), or ""."""
    try:
        # O_NONBLOCK: opening a FIFO planted under a listed name must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return "listed in the manifest but missing"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror}); symlinks are refused"
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size != record.size:
            return f"holds {info.st_size} bytes, the manifest says {record.size}"
        checksum = Checksum()
        while chunk := f.read(READ_CHUNK):
            checksum.update(chunk)
            if progress is not None:
                progress(len(chunk))
    if checksum.hexdigest() != record.checksum:
        return f"checksum {checksum.hexdigest()} does not match the manifest's {record.checksum}"
    return ""
