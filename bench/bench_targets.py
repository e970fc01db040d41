"""What the driver reads off the rows' results: each row's ratios against the limits of the same
state (x memcpy, x memcpy+write), and issue 3's targets evaluated for ckptd (and ckptd overlap).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from bench_rows import LABELS

Result = Dict[str, Any]  # one row's result, as the row process reported it
StateResults = Dict[str, Result]  # row id -> result, for one state


def add_ratios(results: StateResults) -> None:
    """Ratios against the limits of the same state: warm blocked / memcpy, durable / (memcpy + write)."""
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


def _blocked_check(tag: str, r: Result) -> List[TargetCheck]:
    v = r.get("blocked_warm_x_memcpy")
    return [TargetCheck(f"{tag}: warm blocked <= 1.25x memcpy", v, 1.25, f"{v:.2f}x" if v is not None else "-")]


def _first_save_check(tag: str, r: Result, a: StateResults) -> List[TargetCheck]:
    dcp_default = a.get("dcp_async_default", {})
    if dcp_default.get("status") != "ok":
        return []
    ready = f" (staging memory ready {r['saver_ready_s']:.2f} s after construction)" if r.get("saver_ready_s") else ""
    return [
        TargetCheck(
            f"{tag}: first save blocked < dcp.async_save default",
            r["blocked_first_s"],
            None,
            f"{r['blocked_first_s']:.3f} s vs {dcp_default['blocked_first_s']:.3f} s" + ready,
            r["blocked_first_s"] < dcp_default["blocked_first_s"],
        )
    ]


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


def _state_b_check(tag: str, rb: Result, b: StateResults) -> List[TargetCheck]:
    dcp_b = b.get("dcp_async_best", {})
    if rb.get("status") != "ok" or dcp_b.get("status") != "ok":
        return []
    return [
        TargetCheck(
            f"{tag}: state B warm blocked <= dcp.async_save best",
            rb["blocked_warm_s"],
            dcp_b["blocked_warm_s"],
            f"{rb['blocked_warm_s']:.3f} s vs {dcp_b['blocked_warm_s']:.3f} s "
            f"(dcp best staged after {fmt_s(dcp_b.get('staged_warm_s'))} s)",
        )
    ]


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


def _row_checks(row: str, a: StateResults, b: StateResults) -> List[TargetCheck]:
    """Every target for one ckptd row of state A (compared with state B where the target says so)."""
    r = a.get(row, {})
    if r.get("status") != "ok":
        return []
    tag = LABELS[row]
    rb = b.get(row, {})
    return (
        _blocked_check(tag, r)
        + _first_save_check(tag, r, a)
        + _durable_check(tag, r)
        + _throughput_check(tag, r)
        + _memory_check(tag, r)
        + _daemon_growth_check(tag, r, rb)
        + _state_b_check(tag, rb, b)
        + _load_checks(row, r, a)
    )


def evaluate_targets(all_results: Dict[str, StateResults]) -> List[Dict[str, Any]]:
    """The issue's targets, read off this run for ckptd (and ckptd overlap where it ran)."""
    a, b = all_results.get("A", {}), all_results.get("B", {})
    return [check.as_dict() for row in ("ckptd", "ckptd_overlap") for check in _row_checks(row, a, b)]
