"""powerfs: a FUSE passthrough filesystem that can cut the power (the power-loss tests' disk).

    python tests/powerfs.py BACKING MOUNTPOINT --control DIR [--seed N] [--trace FILE]
        [--cut-after-ops K] [--cut-before REGEX] [--cut-after REGEX] [--nth N] [--survivor-mode MODE]

Every operation passes through to BACKING, so readers see everything written, as on a machine whose
page cache holds it; beside that, a `DurabilityModel` (tests/powerfs_model.py) tracks what was fsynced.
Cutting the power writes the survivor tree, what a reboot could find, and from then on every
operation fails with EIO: the machine is off.

Operations are numbered from 1 in the order they reach the filesystem; only those that change state or
durability count (create, mkdir, symlink, link, unlink, rmdir, rename, write, truncate, fsync,
fsyncdir). Each is described by one line, `OP PATH` or `rename OLD -> NEW` (paths as seen under the
mount point, starting with `/`); `--trace FILE` appends `NUMBER<TAB>LINE<TAB>DETAIL` for each.

The power is cut by a trigger: after the K-th operation (`--cut-after-ops K`), before or after the
`--nth` operation whose line matches a regular expression (`re.search`), or on demand. An operation
cut before fails with EIO and changes nothing; one cut after has taken effect, though its caller may
still see EIO (libfuse looks a created entry up within the same request, and the power is off by
then). The control directory DIR carries the rest:

- `ready`: written once the mount serves;
- `command.json`: written (atomically) by a test; read, applied and removed by powerfs. One of
  `{"cut": true}`, `{"arm": {"after_ops": K}}` (K operations from now), `{"arm": {"before": REGEX,
  "nth": N}}`, `{"arm": {"after": REGEX, "nth": N}}`;
- `survivor/`: the survivor tree, complete once `cut.json` exists;
- `cut.json`: written last at a cut: `{"op": NUMBER, "line": LINE, "when": "before"|"after"|"command"}`.

`--survivor-mode` "random" (the default, seeded by `--seed`), "drop" (keep only what was fsynced) or
"keep" (keep every operation, as a clean shutdown would). `PowerMount` drives it from a test.

Passing through: reads (and mmap: no direct_io, so the page cache serves them), O_DIRECT writes (taken
by FUSE, written buffered to BACKING), flock (no flock handler: the kernel keeps those locks locally).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from powerfs_model import SURVIVOR_MODES, DurabilityModel, Trigger, write_tree

log = logging.getLogger("powerfs")


# ----------------------------------------------------------------------------------------------------
# The FUSE adapter.
# ----------------------------------------------------------------------------------------------------

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # libfuse3, even where libfuse2 is installed too
try:
    import mfusepy
except (ImportError, OSError) as _exc:  # the model works without FUSE; mounting needs it
    mfusepy = None
    _FUSE_IMPORT_ERROR: BaseException | None = _exc
else:
    _FUSE_IMPORT_ERROR = None


def fuse_problem() -> str | None:
    """Why powerfs cannot mount here (None when it can): what is missing and how to install it."""
    if _FUSE_IMPORT_ERROR is not None:
        return (
            f"powerfs cannot load mfusepy on libfuse3 ({_FUSE_IMPORT_ERROR}): pip install mfusepy "
            "(the project's test extra) and, as root, apt-get install fuse3 (./dev test does both)"
        )
    if shutil.which("fusermount3") is None:
        return "powerfs needs fusermount3: as root, apt-get install fuse3 (./dev test installs it)"
    if not os.path.exists("/dev/fuse"):
        return "powerfs needs /dev/fuse, which this machine (or container) does not have"
    return None


def _power_off() -> OSError:
    return OSError(errno.EIO, "powerfs: the power is off")


@dataclass
class OpenFile:
    """An open file: the backing descriptor and the model's inode."""

    fd: int
    ino: int


class PowerFS(mfusepy.Operations if mfusepy is not None else object):
    """Pass-through to a backing directory; feeds every change to a DurabilityModel; cuts the power
    when a trigger fires or the control directory asks."""

    use_ns = True

    def __init__(
        self, backing: str, control: str, seed: int, survivor_mode: str, triggers: list[Trigger], trace: str | None
    ) -> None:
        self.backing = os.path.realpath(backing)
        self.control = control
        self.survivor_mode = survivor_mode
        self.model = DurabilityModel.scan(self.backing)
        self._rng = random.Random(seed)
        self._triggers = triggers
        self._trace = open(trace, "a", buffering=1) if trace else None
        self._lock = threading.Lock()
        self._ops = 0
        self._off = False
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, int] = {}
        self._handles = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------------

    def init(self, path: str) -> None:
        """Mounted: start watching the control directory and say so."""
        threading.Thread(target=self._watch_control, name="powerfs-control", daemon=True).start()
        _write_atomic(os.path.join(self.control, "ready"), str(os.getpid()))
        log.info("serving %s", self.backing)

    def destroy(self, path: str) -> None:
        """Unmounted."""
        if self._trace is not None:
            self._trace.close()

    def _watch_control(self) -> None:
        command_path = os.path.join(self.control, "command.json")
        while True:
            try:
                with open(command_path) as f:
                    command = json.load(f)
            except (FileNotFoundError, ValueError):
                time.sleep(0.002)
                continue
            try:
                with self._lock:
                    if command.get("cut") and not self._off:
                        self._cut("command", self._ops, "")
                    elif "arm" in command:
                        self._triggers.append(Trigger.from_command(command["arm"]))
                        log.info("armed %s", command["arm"])
            except Exception:  # a bad command must not stop the control loop: log it, drop it
                log.exception("cannot apply %s", command)
            os.unlink(command_path)

    @contextlib.contextmanager
    def _change(self, op: str, path: str | None, new: str | None = None, detail: str = "") -> Iterator[None]:
        """Run one counted operation: refused once the power is off; traced; cut before or after it
        when a trigger fires."""
        with self._lock:
            self._check_power()
            self._ops += 1
            line = f"{op} {path}" + (f" -> {new}" if new is not None else "")
            if self._trace is not None:
                self._trace.write(f"{self._ops}\t{line}\t{detail}\n")
            if self._fires("before", line):
                self._cut("before", self._ops, line)
                raise _power_off()
            yield
            if self._fires("after", line):
                self._cut("after", self._ops, line)

    def _fires(self, when: str, line: str) -> bool:
        fired = [t for t in self._triggers if t.when == when and t.counts(line)]
        for trigger in fired:
            self._triggers.remove(trigger)
        return bool(fired)

    def _check_power(self) -> None:
        if self._off:
            raise _power_off()

    def _cut(self, when: str, op: int, line: str) -> None:
        """Power off: write the survivor tree, then cut.json; every later operation fails with EIO."""
        self._off = True
        tree = self.model.crash(self._rng, self.survivor_mode)
        survivor = os.path.join(self.control, "survivor")
        partial = survivor + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_tree(tree, partial)
        os.rename(partial, survivor)
        _write_atomic(os.path.join(self.control, "cut.json"), json.dumps({"op": op, "line": line, "when": when}))
        log.warning("power cut %s operation %d (%s)", when, op, line or "on command")

    def _real(self, path: str) -> str:
        return self.backing + path

    # -- namespace -----------------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        with self._change("mkdir", path):
            os.mkdir(self._real(path), mode)
            self.model.create(path, "dir")
        return 0

    def rmdir(self, path: str) -> int:
        with self._change("rmdir", path):
            os.rmdir(self._real(path))
            self.model.remove(path)
        return 0

    def unlink(self, path: str) -> int:
        with self._change("unlink", path):
            os.unlink(self._real(path))
            self.model.remove(path)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._change("rename", old, new):
            os.rename(self._real(old), self._real(new))
            self.model.rename(old, new)
        return 0

    def link(self, target: str, source: str) -> int:
        """Hard link `target` (the new name) to `source`."""
        with self._change("link", source, target):
            os.link(self._real(source), self._real(target))
            self.model.link(source, target)
        return 0

    def symlink(self, target: str, source: str) -> int:
        """Symlink `target` (the new name) pointing at `source`."""
        with self._change("symlink", target, detail=source):
            os.symlink(source, self._real(target))
            self.model.create(target, "symlink", source)
        return 0

    def readlink(self, path: str) -> str:
        self._check_power()
        return os.readlink(self._real(path))

    # -- files ---------------------------------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int) -> int:
        with self._change("create", path):
            fd = os.open(self._real(path), _backing_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))
            ino = self.model.create(path, "file")
            return self._opened(fd, ino)

    def open(self, path: str, flags: int) -> int:
        if flags & os.O_TRUNC:
            with self._change("truncate", path, detail="O_TRUNC"):
                fd = os.open(self._real(path), _backing_flags(flags))
                ino = self.model.lookup(path)
                self.model.truncate(ino, 0)
                return self._opened(fd, ino)
        with self._lock:
            self._check_power()
            fd = os.open(self._real(path), _backing_flags(flags))
            return self._opened(fd, self.model.lookup(path))

    def _opened(self, fd: int, ino: int) -> int:
        handle = next(self._handles)
        self._files[handle] = OpenFile(fd, ino)
        return handle

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._check_power()
        return os.pread(self._files[fh].fd, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._change("write", path, detail=f"{offset}+{len(data)}"):
            opened = self._files[fh]
            written = os.pwrite(opened.fd, data, offset)
            self.model.write(opened.ino, offset, data[:written])
        return written

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._change("truncate", path, detail=str(length)):
            if fh is not None and fh in self._files:
                opened = self._files[fh]
                os.ftruncate(opened.fd, length)
                ino = opened.ino
            else:
                os.truncate(self._real(path), length)
                ino = self.model.lookup(path)
            self.model.truncate(ino, length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._change("fsync", path, detail="data" if datasync else ""):
            self.model.fsync(self._files[fh].ino)
        return 0

    def flush(self, path: str, fh: int) -> int:
        self._check_power()
        return 0

    def release(self, path: str, fh: int) -> int:
        opened = self._files.pop(fh, None)
        if opened is not None:
            os.close(opened.fd)
        return 0

    # -- directories ---------------------------------------------------------------------------------

    def opendir(self, path: str) -> int:
        with self._lock:
            self._check_power()
            handle = next(self._handles)
            self._dirs[handle] = self.model.lookup(path)
            return handle

    def readdir(self, path: str, fh: int) -> list[str]:
        self._check_power()
        return [".", "..", *os.listdir(self._real(path))]

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._change("fsyncdir", path):
            self.model.fsync(self._dirs[fh])
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        self._dirs.pop(fh, None)
        return 0

    # -- attributes ----------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._check_power()
        if fh is not None and fh in self._files:
            info = os.fstat(self._files[fh].fd)
        else:
            info = os.lstat(self._real(path))
        attrs = {
            key: getattr(info, key)
            for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize", "st_rdev")
        }
        attrs.update(st_atime=info.st_atime_ns, st_mtime=info.st_mtime_ns, st_ctime=info.st_ctime_ns)
        return attrs

    def chmod(self, path: str, mode: int) -> int:
        self._check_power()
        os.chmod(self._real(path), stat.S_IMODE(mode))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._check_power()
        os.chown(self._real(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._check_power()
        os.utime(self._real(path), ns=times, follow_symlinks=False)
        return 0

    def access(self, path: str, amode: int) -> int:
        self._check_power()
        if not os.access(self._real(path), amode, follow_symlinks=False):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        self._check_power()
        info = os.statvfs(self.backing)
        return {
            key: getattr(info, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_flag",
                "f_namemax",
            )
        }


def _backing_flags(flags: int) -> int:
    """The flags to open the backing file with: the caller's, less O_DIRECT (the backing file's own
    durability does not matter, and its alignment rules are not the caller's) and O_APPEND (the kernel
    already turned appends into writes at the end; pwrite must honour their offsets)."""
    return flags & ~(getattr(os, "O_DIRECT", 0) | os.O_APPEND)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.rename(path + ".partial", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="FUSE passthrough that can cut the power")
    parser.add_argument("backing", help="directory whose tree the mount shows")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="control directory (ready, command.json, cut.json, survivor/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the survivor's random choices")
    parser.add_argument("--survivor-mode", choices=SURVIVOR_MODES, default="random")
    parser.add_argument("--trace", help="append every counted operation to this file")
    parser.add_argument("--cut-after-ops", type=int, metavar="K", help="cut after the K-th operation")
    parser.add_argument("--cut-before", metavar="REGEX", help="cut before the --nth operation matching REGEX")
    parser.add_argument("--cut-after", metavar="REGEX", help="cut after the --nth operation matching REGEX")
    parser.add_argument("--nth", type=int, default=1, help="which match of --cut-before/--cut-after (default 1)")
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Mount, serve in the foreground until unmounted."""
    args = parse_args(argv)
    problem = fuse_problem()
    if problem:
        raise SystemExit(problem)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="powerfs %(levelname)s %(message)s")
    triggers = []
    if args.cut_after_ops is not None:
        triggers.append(Trigger("after", None, args.cut_after_ops))
    if args.cut_before:
        triggers.append(Trigger("before", re.compile(args.cut_before), args.nth))
    if args.cut_after:
        triggers.append(Trigger("after", re.compile(args.cut_after), args.nth))
    os.makedirs(args.control, exist_ok=True)
    filesystem = PowerFS(args.backing, args.control, args.seed, args.survivor_mode, triggers, args.trace)
    # hard_remove: an unlinked open file stays nameless (no .fuse_hidden renames in the trace); no
    # direct_io, so the page cache serves mmap and reads.
    mfusepy.FUSE(filesystem, args.mountpoint, foreground=True, debug=args.debug, fsname="powerfs", hard_remove=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# Driving powerfs from a test.
# ----------------------------------------------------------------------------------------------------


class PowerMount:
    """A powerfs process serving `backing` at `mountpoint`: start it, arm triggers, cut the power,
    read what survived, unmount."""

    def __init__(self, backing: str, mountpoint: str, control: str, *options: str) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = control
        self.options = options
        self.log_path = os.path.join(control, "powerfs.log")
        self.process: subprocess.Popen | None = None

    @property
    def survivor(self) -> str:
        """Where the survivor tree is once the power is cut."""
        return os.path.join(self.control, "survivor")

    def start(self, timeout: float = 30.0) -> PowerMount:
        """Mount and wait until it serves; raises RuntimeError with powerfs's log if it does not."""
        os.makedirs(self.mountpoint, exist_ok=True)
        os.makedirs(self.control, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    self.backing,
                    self.mountpoint,
                    "--control",
                    self.control,
                    *self.options,
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not (os.path.exists(os.path.join(self.control, "ready")) and is_mounted(self.mountpoint)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"powerfs did not mount {self.mountpoint}; its log:\n{self.log()}")
            time.sleep(0.01)
        return self

    def log(self) -> str:
        """What powerfs logged."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def command(self, command: dict[str, Any], timeout: float = 10.0) -> None:
        """Hand powerfs a control command and wait until it took it."""
        path = os.path.join(self.control, "command.json")
        _write_atomic(path, json.dumps(command))
        deadline = time.monotonic() + timeout
        while os.path.exists(path):
            if time.monotonic() > deadline or (self.process is not None and self.process.poll() is not None):
                raise RuntimeError(f"powerfs did not take {command}; its log:\n{self.log()}")
            time.sleep(0.002)

    def arm(self, **spec: Any) -> None:
        """Arm a trigger: after_ops=K, or before=REGEX / after=REGEX with nth=N."""
        self.command({"arm": spec})

    def cut_info(self) -> dict[str, Any] | None:
        """cut.json once the power is cut (the survivor tree is complete then), else None."""
        try:
            with open(os.path.join(self.control, "cut.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def cut(self) -> dict[str, Any]:
        """Cut the power now (unless a trigger already did); returns cut.json."""
        if self.cut_info() is None:
            self.command({"cut": True})
        info = self.cut_info()
        assert info is not None
        return info

    def unmount(self, timeout: float = 20.0) -> None:
        """Unmount (lazily if the mount is busy) and wait for powerfs to exit."""
        if is_mounted(self.mountpoint):
            done = subprocess.run(["fusermount3", "-u", self.mountpoint], check=False, capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("fusermount3 -u %s failed (%s); unmounting lazily", self.mountpoint, done.stderr.strip())
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False, capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def is_mounted(path: str) -> bool:
    """True if `path` is a mount point now (read from /proc: stat fails on a mount whose power is off)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].encode().decode("unicode_escape") == target for line in f)


if __name__ == "__main__":
    sys.exit(main())
