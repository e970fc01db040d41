"""What the bench reads from and does to the operating system (no torch): /proc readers (memory,
CPU time), a sampler of peak RSS per kind, page-cache eviction and residency (mincore), and small
file and socket helpers.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import socket
import statistics
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


def proc_status(pid: Any = "self") -> Dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssShmem, ...); {} if gone."""
    fields: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0])
                elif name == "State" and parts:
                    fields["State_" + parts[0]] = 1
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return fields


def machine_cpu_seconds() -> Tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine so far, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    values += [0] * (8 - len(values))
    idle, steal = values[3] + values[4], values[7]
    return (sum(values) - idle - steal) / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: Any = "self") -> Optional[float]:
    """utime + stime of a whole process (all its threads) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap memory back to the OS, so a baseline RSS is not inflated by freed garbage."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mb(kb: Optional[int]) -> Optional[float]:
    """kB to MB (None stays None)."""
    return None if kb is None else kb / 1024.0


def median(values: Sequence[float]) -> Optional[float]:
    """The median of the values that are neither None nor NaN; None if there are none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def pid_gone(pid: int) -> bool:
    """Whether the process has exited (no /proc entry, or a zombie)."""
    status = proc_status(pid)
    return not status or "State_Z" in status or "State_X" in status


class RssSampler:
    """Polls /proc/<pid>/status of this process and of a background writer, keeping the peaks of
    RssAnon and RssShmem (VmHWM has no per-kind peak). 20 ms period: costs well under 1% of a core."""

    def __init__(self, writer_pid: Callable[[], Optional[int]], period: float = 0.02) -> None:
        self._writer_pid = writer_pid
        self._period = period
        self.peak: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sample()
        except OSError:
            pass

    def _bump(self, key: str, value: Optional[int]) -> None:
        if value is not None and value > self.peak.get(key, -1):
            self.peak[key] = value

    def sample(self) -> None:
        """Read both processes' status once and keep any new peaks."""
        me = proc_status()
        self._bump("self_anon", me.get("RssAnon"))
        self._bump("self_shmem", me.get("RssShmem"))
        pid = self._writer_pid()
        if pid:
            other = proc_status(pid)
            self._bump("writer_anon", other.get("RssAnon"))
            self._bump("writer_shmem", other.get("RssShmem"))
            self._bump("writer_rss", other.get("VmRSS"))
            self._bump("writer_hwm", other.get("VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.sample()
            except Exception:  # never let the sampler disturb the measurement
                pass


# ---- page cache: evict, and check residency with mincore --------------------------------------

_libc: Any = None


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = libc
    return _libc


def _resident_pages(libc: Any, path: str, size: int) -> Optional[Tuple[int, int]]:
    """(resident pages, pages) of one non-empty file, from mincore on a fresh read-only mapping; None on failure."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            raw = bytes(vec)
            return pages - raw.count(0), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Sequence[str]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (mincore on a fresh read-only mapping)."""
    try:
        libc = _get_libc()
    except OSError:
        return None
    total = resident = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        counted = _resident_pages(libc, path, size)
        if counted is None:
            return None
        resident += counted[0]
        total += counted[1]
    return resident / total if total else 0.0


def evict(paths: Sequence[str], drop_caches: str) -> Tuple[str, Optional[float]]:
    """Drop `paths` from the page cache. posix_fadvise(DONTNEED) per file first (the files are
    fsynced, so their pages are clean); /proc/sys/vm/drop_caches (system-wide; it also evicts
    torch's own libraries) only when asked to ("always"), or in "auto" mode when fadvise left
    more than 5% of the pages resident. Returns (method used, resident fraction after)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    method = "fadvise"
    resident = resident_fraction(paths)
    if drop_caches == "always" or (drop_caches == "auto" and (resident is None or resident > 0.05)):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
            method = "fadvise+drop_caches"
            resident = resident_fraction(paths)
        except OSError:
            method = "fadvise (drop_caches not permitted)"
    return method, resident


def files_under(path: str) -> List[str]:
    """The file itself, or every file under a directory (sorted)."""
    if os.path.isfile(path):
        return [path]
    found: List[str] = []
    for dirpath, _, names in os.walk(path):
        found.extend(os.path.join(dirpath, n) for n in names)
    return sorted(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
