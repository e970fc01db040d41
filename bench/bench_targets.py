"""What the driver reads off the rows' results: each row's ratios against the limits of the same
state (x memcpy, x memcpy+write, x the training-lost floor), and the targets of issues 3 and 15
evaluated for ckptd (and ckptd overlap).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from bench_rows import LABELS

Result = Dict[str, Any]  # one row's result, as the row process reported it
StateResults = Dict[str, Result]  # row id -> result, for one state

# DCP's rows, each compared with ckptd's training seconds lost per checkpoint.
DCP_ROWS = ("dcp_save", "dcp_async_default", "dcp_async_best")


# How each write row writes, as the floor built on it is named.
FLOOR_WRITES = {"write_direct": "O_DIRECT", "write": "buffered", "write_direct_checksummed": "checksummed O_DIRECT"}


@dataclass
class LostFloor:
    """A floor for training seconds lost per checkpoint: the memcpy limit's warm blocked time plus
    the training seconds lost while a bare write of the state runs in a thread of the trainer
    (O_DIRECT, or the buffered write where the filesystem refuses O_DIRECT; or, for the floor of a
    saver whose files verify, the O_DIRECT write checksummed as it goes)."""

    seconds: float
    memcpy_s: float
    write_row: str  # a FLOOR_WRITES key
    write_lost_s: float

    @property
    def label(self) -> str:
        """The floor's line in the table."""
        return f"floor: memcpy + {FLOOR_WRITES[self.write_row]} write in a thread"

    def as_dict(self) -> Dict[str, Any]:
        """The JSON form."""
        return {
            "train_lost_s": self.seconds,
            "memcpy_blocked_warm_s": self.memcpy_s,
            "write_row": self.write_row,
            "write_train_lost_s": self.write_lost_s,
            "label": self.label,
        }


def _ok(r: Result) -> bool:
    return r.get("status") == "ok"


def lost_floor(results: StateResults, write_rows: Tuple[str, ...] = ("write_direct", "write")) -> Optional[LostFloor]:
    """The training-lost floor of one state on the first of `write_rows` that ran (by default the
    issue's floor: O_DIRECT, else buffered), or None when the memcpy row or every write row is missing."""
    memcpy = results.get("memcpy", {})
    if not _ok(memcpy) or memcpy.get("blocked_warm_s") is None:
        return None
    for row in write_rows:
        w = results.get(row, {})
        if _ok(w) and w.get("train_lost_s") is not None:
            m, lost = memcpy["blocked_warm_s"], w["train_lost_s"]
            return LostFloor(seconds=m + lost, memcpy_s=m, write_row=row, write_lost_s=lost)
    return None


def checksummed_floor(results: StateResults) -> Optional[LostFloor]:
    """The floor of a saver that checksums what it writes, as ckptd does (None where its row did not run)."""
    return lost_floor(results, ("write_direct_checksummed",))


def train_lost(row: str, r: Result) -> Optional[float]:
    """Training seconds one checkpoint costs: measured with the training loop running for the rows
    that write in the background; for dcp.save (blocking) its warm blocked time."""
    if not _ok(r):
        return None
    if r.get("train_lost_s") is not None:
        return r["train_lost_s"]
    return r.get("blocked_warm_s") if row == "dcp_save" else None


def _add_lost_ratios(results: StateResults) -> None:
    """Each row's training seconds lost / each floor, where both exist and the floor is positive."""
    for key, floor in (
        ("train_lost_x_floor", lost_floor(results)),
        ("train_lost_x_checksummed_floor", checksummed_floor(results)),
    ):
        if floor is None or floor.seconds <= 0:
            continue
        for r in results.values():
            if _ok(r) and r.get("train_lost_s") is not None:
                r[key] = r["train_lost_s"] / floor.seconds


def add_ratios(results: StateResults) -> None:
    """Ratios against the limits of the same state: warm blocked / memcpy, durable / (memcpy + write),
    training seconds lost / the floor."""
    _add_lost_ratios(results)
    memcpy = results.get("memcpy", {}).get("blocked_warm_s")
    write = results.get("write", {}).get("durable_warm_s")
    direct = results.get("write_direct", {}).get("durable_warm_s")
    limit = memcpy + write if memcpy is not None and write is not None else None
    limit_direct = memcpy + direct if memcpy is not None and direct is not None else None
    for r in results.values():
        if r.get("status") != "ok":
            continue
        if memcpy and r.get("blocked_warm_s") is not None:
            r["blocked_warm_x_memcpy"] = r["blocked_warm_s"] / memcpy
        if memcpy and r.get("staged_warm_s") is not None:
            r["staged_warm_x_memcpy"] = r["staged_warm_s"] / memcpy
        if limit and r.get("durable_warm_s") is not None:
            r["durable_warm_x_limit"] = r["durable_warm_s"] / limit
        if limit_direct and r.get("durable_warm_s") is not None:
            r["durable_warm_x_limit_direct"] = r["durable_warm_s"] / limit_direct
        if memcpy and r.get("durable_warm_s") is not None and r.get("disk_probe_s"):
            r["durable_warm_x_probe"] = r["durable_warm_s"] / (memcpy + statistics.mean(r["disk_probe_s"]))


def fmt_s(v: Optional[float]) -> str:
    """Seconds with 3 significant-ish digits ("-" for None)."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


@dataclass
class TargetCheck:
    """One target read off this run: the measured value, its limit, whether it passed (None: not
    decidable), and the text printed after it. Without an explicit `passed`, value <= limit."""

    target: str
    value: Optional[float]
    limit: Optional[float]
    text: str
    passed: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.passed is None and self.value is not None and self.limit is not None:
            self.passed = self.value <= self.limit

    def as_dict(self) -> Dict[str, Any]:
        """The JSON form (and what the report prints from)."""
        return {"target": self.target, "value": self.value, "limit": self.limit, "pass": self.passed, "text": self.text}


def _ratio(v: Optional[float], of: Optional[float]) -> Optional[float]:
    """v / of, where both exist and `of` is positive."""
    return v / of if v is not None and of is not None and of > 0 else None


def _interleaved_text(r: Result, key: str, what: str) -> str:
    """How many samples an interleaved ratio is the ratio of medians of."""
    samples = len(r.get(key) or [])
    return f"interleaved in the row's process: {samples} save{'' if samples == 1 else 's'}, each in turn with {what}"


def _blocked_check(
    tag: str, r: Result, target: str = "warm blocked <= 1.1x memcpy", limit: float = 1.1
) -> List[TargetCheck]:
    """Warm blocked / memcpy: the interleaved ratio where the row measured one, else the memcpy row's."""
    rows = r.get("blocked_warm_x_memcpy")
    rows_text = f"{rows:.2f}x against the memcpy row" if rows is not None else "no memcpy row"
    v = r.get("interleaved_blocked_x_memcpy")
    if v is None:
        return [TargetCheck(f"{tag}: {target}", rows, limit, rows_text)]
    text = (
        f"{v:.2f}x: {r['interleaved_blocked_s']:.3f} s vs memcpy {r['interleaved_memcpy_s']:.3f} s "
        f"({_interleaved_text(r, 'interleaved_blocked_all_s', 'a memcpy-limit copy')}); {rows_text}"
    )
    return [TargetCheck(f"{tag}: {target}", v, limit, text)]


def _overlap_blocked_check(tag: str, r: Result, a: StateResults) -> List[TargetCheck]:
    best = a.get("dcp_async_best", {})
    if not _ok(best):
        return []
    return [
        TargetCheck(
            f"{tag}: blocked <= dcp.async_save best's blocked",
            r["blocked_warm_s"],
            best["blocked_warm_s"],
            f"{r['blocked_warm_s']:.3f} s vs {best['blocked_warm_s']:.3f} s "
            f"(staged after {fmt_s(r.get('staged_warm_s'))} s vs {fmt_s(best.get('staged_warm_s'))} s)",
        )
    ]


def _settle(r: Result) -> str:
    """How long the row trained before its first save (--settle)."""
    return f"{r['settle_s']:g} s" if r.get("settle_s") is not None else "--settle s"


def _first_save_check(tag: str, r: Result) -> List[TargetCheck]:
    v = _ratio(r.get("blocked_first_s"), r.get("blocked_warm_s"))
    ready = f"; staging memory ready {r['saver_ready_s']:.2f} s after construction" if r.get("saver_ready_s") else ""
    return [
        TargetCheck(
            f"{tag}: first save blocked <= 1.5x warm blocked",
            v,
            1.5,
            f"{fmt_s(r.get('blocked_first_s'))} s vs {fmt_s(r.get('blocked_warm_s'))} s"
            + (f" = {v:.2f}x" if v is not None else "")
            + f" (first save after {_settle(r)} of training{ready})",
        )
    ]


def allocation_after_construction(r: Result) -> Optional[float]:
    """Seconds the staging allocation of the right-after-construction saver still ran after its
    constructor returned (it starts inside the constructor, once the daemon answers): what a save
    made at once may have to wait for."""
    ready, setup = r.get("saver_ready_now_s"), r.get("saver_setup_now_s")
    return None if ready is None or setup is None else max(0.0, ready - setup)


def _first_save_now_check(tag: str, r: Result) -> List[TargetCheck]:
    now, warm = r.get("blocked_first_now_s"), r.get("blocked_warm_s")
    alloc = allocation_after_construction(r)
    name = f"{tag}: first save right after construction <= warm save + staging allocation"
    if now is None:
        return [TargetCheck(name, None, None, f"not measured: {r.get('first_now_error', 'no figure')}")]
    limit = warm + alloc if warm is not None and alloc is not None else None
    return [
        TargetCheck(
            name,
            now,
            limit,
            f"{now:.3f} s vs {fmt_s(warm)} s + {fmt_s(alloc)} s = {fmt_s(limit)} s",
        )
    ]


def _lost_floor_check(tag: str, r: Result, floor: Optional[LostFloor]) -> List[TargetCheck]:
    """Training s lost / the floor: the interleaved ratio where the row measured one, else against the floor's rows."""
    rows = _lost_floor_rows_check(tag, r, floor)
    v = r.get("interleaved_lost_x_floor")
    if v is None:
        return [rows]
    checksummed = r.get("interleaved_lost_x_checksummed_floor")
    text = (
        f"{v:.2f}x: {r['interleaved_lost_s']:.3f} s vs the floor {r['interleaved_floor_lost_s']:.3f} s "
        f"({_interleaved_text(r, 'interleaved_lost_all_s', 'a floor sample: memcpy, then the O_DIRECT write in a thread')})"
        + (
            f"; {checksummed:.2f}x the checksummed floor's {r['interleaved_checksummed_floor_lost_s']:.3f} s"
            if checksummed is not None
            else ""
        )
        + f"; against the floor's rows: {rows.text}"
    )
    return [TargetCheck(rows.target, v, 1.2, text)]


def _lost_floor_rows_check(tag: str, r: Result, floor: Optional[LostFloor]) -> TargetCheck:
    """Training s lost / the floor made of the memcpy and write rows."""
    lost, v = r.get("train_lost_s"), r.get("train_lost_x_floor") if floor is not None else None
    if floor is None:
        text = "no floor: it needs the memcpy row and a write row's saves with the training loop running"
    else:
        text = (
            f"{fmt_s(lost)} s vs the floor {floor.seconds:.3f} s (memcpy {floor.memcpy_s:.3f} s + "
            f"{FLOOR_WRITES[floor.write_row]} write in a thread "
            f"{floor.write_lost_s:.3f} s)"
        )
        text = (f"{v:.2f}x: " if v is not None else "") + text
        if floor.seconds <= 0:
            text += "; a floor <= 0 is noise: no ratio"
    return TargetCheck(f"{tag}: training s lost / ckpt <= 1.2x the floor", v, 1.2, text)


def _lost_dcp_checks(tag: str, r: Result, a: StateResults) -> List[TargetCheck]:
    checks = []
    lost = r.get("train_lost_s")
    for row in DCP_ROWS:
        theirs = train_lost(row, a.get(row, {}))
        if theirs is None:
            continue
        v = _ratio(lost, theirs)
        how = " (blocking: its warm blocked time)" if row == "dcp_save" else ""
        checks.append(
            TargetCheck(
                f"{tag}: training s lost / ckpt <= 0.5x {LABELS[row]}'s",
                v,
                0.5,
                (f"{v:.2f}x: " if v is not None else "") + f"{fmt_s(lost)} s vs {theirs:.3f} s{how}",
            )
        )
    return checks


def _durable_check(tag: str, r: Result) -> List[TargetCheck]:
    v = r.get("durable_warm_x_limit")
    vd = r.get("durable_warm_x_limit_direct")
    vp = r.get("durable_warm_x_probe")
    extra = [f"{vd:.2f}x memcpy + O_DIRECT write"] if vd is not None else []
    if vp is not None:
        extra.append(f"{vp:.2f}x memcpy + this row's own disk probes")
    return [
        TargetCheck(
            f"{tag}: durable <= 1.2x (memcpy + write)",
            v,
            1.2,
            (f"{v:.2f}x" if v is not None else "-") + (f" ({'; '.join(extra)})" if extra else ""),
        )
    ]


def _throughput_check(tag: str, r: Result) -> List[TargetCheck]:
    v = r.get("throughput_kept")
    cpu = [
        f"{who} CPU {r[key]:.2f} s per warm save"
        for who, key in (("daemon", "writer_cpu_s_per_save"), ("trainer", "trainer_cpu_s_per_save"))
        if r.get(key) is not None
    ]
    return [
        TargetCheck(
            f"{tag}: throughput kept >= 90%",
            v,
            None,
            (f"{v * 100:.0f}%" if v is not None else "-") + (f" ({', '.join(cpu)})" if cpu else ""),
            None if v is None else v >= 0.9,
        )
    ]


def _memory_check(tag: str, r: Result) -> List[TargetCheck]:
    peak, base, nbytes = r.get("trainer_peak_rss_mb"), r.get("trainer_base_rss_mb"), r.get("state_bytes")
    if peak is None or base is None or not nbytes:
        return []
    extra = (peak - base) * 2**20
    return [
        TargetCheck(
            f"{tag}: trainer memory <= live state + 1.05x staged bytes",
            extra / nbytes,
            1.05,
            f"peak {peak:.0f} MB = base {base:.0f} MB (live state {nbytes / 2**20:.0f} MB) + "
            f"{extra / 2**20:.0f} MB = {extra / nbytes:.2f}x the staged bytes",
        )
    ]


def _daemon_growth_check(tag: str, r: Result, rb: Result) -> List[TargetCheck]:
    if r.get("writer_peak_anon_mb") is None or rb.get("writer_peak_anon_mb") is None:
        return []
    grow = r["writer_peak_anon_mb"] - rb["writer_peak_anon_mb"]
    span = (r["state_bytes"] - rb["state_bytes"]) / 2**20
    return [
        TargetCheck(
            f"{tag}: daemon RSS not growing with checkpoint size",
            grow / span if span > 0 else None,
            0.05,
            f"daemon anon peak {r['writer_peak_anon_mb']:.0f} MB (state A, {r['state_bytes'] / 2**20:.0f} MB) vs "
            f"{rb['writer_peak_anon_mb']:.0f} MB (state B, {rb['state_bytes'] / 2**20:.0f} MB): "
            f"{grow:+.0f} MB over {span:.0f} MB more state",
        )
    ]


def _state_b_check(tag: str, rb: Result) -> List[TargetCheck]:
    if not _ok(rb):
        return []
    return _blocked_check(tag, rb, "state B warm blocked <= 2x memcpy", 2.0)


def _load_checks(row: str, r: Result, a: StateResults) -> List[TargetCheck]:
    tl = a.get("torch_save", {})
    if row != "ckptd" or r.get("load_cold_s") is None or tl.get("load_cold_s") is None:
        return []
    return [
        TargetCheck(
            "ckptd: load <= torch.load (cold)",
            r["load_cold_s"],
            tl["load_cold_s"],
            f"{r['load_cold_s']:.2f} s vs {tl['load_cold_s']:.2f} s",
        ),
        TargetCheck(
            "ckptd: load <= torch.load (warm)",
            r["load_warm_s"],
            tl["load_warm_s"],
            f"{r['load_warm_s']:.2f} s vs {tl['load_warm_s']:.2f} s",
        ),
    ]


def _ckptd_checks(r: Result, a: StateResults, b: StateResults) -> List[TargetCheck]:
    """The targets only the plain ckptd row is read against (blocked, first saves, state B)."""
    tag = LABELS["ckptd"]
    return (
        _blocked_check(tag, r)
        + _first_save_check(tag, r)
        + _first_save_now_check(tag, r)
        + _state_b_check(tag, b.get("ckptd", {}))
    )


def _row_checks(row: str, a: StateResults, b: StateResults) -> List[TargetCheck]:
    """Every target for one ckptd row of state A (compared with state B where the target says so)."""
    r = a.get(row, {})
    if not _ok(r):
        return []
    tag = LABELS[row]
    first = _ckptd_checks(r, a, b) if row == "ckptd" else _overlap_blocked_check(tag, r, a)
    return (
        first
        + _durable_check(tag, r)
        + _throughput_check(tag, r)
        + _lost_floor_check(tag, r, lost_floor(a))
        + _lost_dcp_checks(tag, r, a)
        + _memory_check(tag, r)
        + _daemon_growth_check(tag, r, b.get(row, {}))
        + _load_checks(row, r, a)
    )


def evaluate_targets(all_results: Dict[str, StateResults]) -> List[Dict[str, Any]]:
    """The targets of issues 3 and 15, read off this run for ckptd (and ckptd overlap where it ran)."""
    a, b = all_results.get("A", {}), all_results.get("B", {})
    return [check.as_dict() for row in ("ckptd", "ckptd_overlap") for check in _row_checks(row, a, b)]
