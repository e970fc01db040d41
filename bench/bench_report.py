"""What a finished run prints and writes: the header (machine, device, command, states), the table
of every state and row, the footnotes saying how the run was made, the evaluated targets, and the
JSON results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench_rows import BLOCKING_ROWS, DISTURBED, LABELS, LOAD_ROWS, is_disturbed
from bench_targets import (
    LostFloor,
    Result,
    StateResults,
    allocation_after_construction,
    checksummed_floor,
    evaluate_targets,
    fmt_s,
    lost_floor,
)

AllResults = Dict[str, StateResults]  # state -> row id -> result

HEADER = [
    "state",
    "row",
    "blocked first (s, buffers ready)",
    "blocked warm (s, x memcpy)",
    "staged warm (s, x memcpy)",
    "durable (s, x memcpy+write)",
    "throughput kept",
    "training s lost / ckpt (x floor)",
    "trainer peak RSS MB (+over base)",
    "writer MB: HWM / anon",
    "load cold (s)",
    "load warm (s)",
]
LOST_COLUMN = HEADER.index("training s lost / ckpt (x floor)")


@dataclass
class RunPlan:
    """What one run of the driver measures and where: made before any row runs, described by the
    report's header and JSON."""

    states: List[str]
    rows_a: List[str]
    rows_b: List[str]
    work: str  # the run's temporary directory under --dir
    command: str
    machine: Dict[str, Any]

    def rows_for(self, state: str) -> List[str]:
        """The rows run for `state` (A: --rows, B: --rows-b)."""
        return self.rows_a if state == "A" else self.rows_b

    def jobs(self) -> List[Tuple[str, str]]:
        """(state, row) for every row to run, in table order."""
        return [(state, row) for state in self.states for row in self.rows_for(state)]


def fmt_x(v: Optional[float]) -> str:
    """A ratio in brackets after a time ("" for None)."""
    return "" if v is None else f" ({v:.2f}x)"


def fmt_lost(r: Result) -> str:
    """Training seconds lost per checkpoint, and / the floor in brackets ("-" where not measured)."""
    lost = r.get("train_lost_s")
    if lost is None:
        return "-"
    ratio = r.get("train_lost_x_floor")
    return fmt_s(lost) + ("" if ratio is None else f" ({ratio:.2f}x floor)")


def fmt_mb(v: Optional[float]) -> str:
    """MB without decimals ("-" for None)."""
    return "-" if v is None else f"{v:.0f}"


def device_label(machine: Dict[str, Any]) -> str:
    """cpu, or cuda with the GPU's name and CUDA version."""
    if machine.get("device") != "cuda":
        return "cpu"
    return f"cuda ({machine.get('gpu')}, CUDA {machine.get('cuda')})"


def _ok_row_cells(row: str, r: Result) -> List[str]:
    """The table's cells after state and label, for a row that ran."""
    trainer = fmt_mb(r.get("trainer_peak_rss_mb"))
    if r.get("trainer_peak_rss_mb") is not None and r.get("trainer_base_rss_mb") is not None:
        trainer += f" (+{r['trainer_peak_rss_mb'] - r['trainer_base_rss_mb']:.0f})"
    writer = "-"
    if r.get("writer_hwm_mb") is not None:
        writer = f"{fmt_mb(r['writer_hwm_mb'])} / {fmt_mb(r.get('writer_peak_anon_mb'))}"
    kept = r.get("throughput_kept")
    async_row = row not in BLOCKING_ROWS
    loads = row in LOAD_ROWS and r.get("load_cold_s") is not None
    return [
        fmt_s(r.get("blocked_first_s")) + (f" (ready {fmt_s(r['saver_ready_s'])})" if r.get("saver_ready_s") else ""),
        fmt_s(r.get("blocked_warm_s")) + fmt_x(r.get("blocked_warm_x_memcpy")),
        (fmt_s(r.get("staged_warm_s")) + fmt_x(r.get("staged_warm_x_memcpy"))) if async_row else "-",
        fmt_s(r.get("durable_warm_s")) + fmt_x(r.get("durable_warm_x_limit")),
        f"{kept * 100:.0f}%" if kept is not None else "-",
        fmt_lost(r),
        trainer,
        writer,
        fmt_s(r.get("load_cold_s")) if loads else "-",
        fmt_s(r.get("load_warm_s")) if loads else "-",
    ]


def floor_row(state: str, floor: LostFloor) -> List[str]:
    """The floor's own line: only the training-lost column filled."""
    cells = [state, floor.label] + [""] * (len(HEADER) - 2)
    cells[LOST_COLUMN] = fmt_s(floor.seconds)
    return cells


def table_rows(state: str, results: StateResults, state_rows: Sequence[str]) -> List[List[str]]:
    """The table's lines for one state, in `state_rows` order ("n/a" and errors in the first cell),
    then the training-lost floor's line where it could be computed."""
    out = []
    blank = [""] * (len(HEADER) - 3)
    for row in state_rows:
        r = results.get(row, {"status": "error", "reason": "not run"})
        label = LABELS[row]
        if is_disturbed(r):
            label += " !"
        if r.get("status") == "n/a":
            out.append([state, label, "n/a"] + blank)
        elif r.get("status") != "ok":
            out.append([state, label, "error: " + str(r.get("reason", ""))[:60]] + blank)
        else:
            out.append([state, label] + _ok_row_cells(row, r))
    for floor in (lost_floor(results), checksummed_floor(results)):
        if floor is not None:
            out.append(floor_row(state, floor))
    return out


def render_table(rows: List[List[str]]) -> str:
    """The table as Markdown, columns padded to their widest cell."""
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), sep] + [line(r) for r in rows])


def state_line(state: str, results: StateResults) -> str:
    """What a state holds (from any row that ran it)."""
    any_ok = next((r for r in results.values() if r.get("status") == "ok"), None)
    if any_ok is None:
        return f"state {state}: no row ran"
    nbytes, dims = any_ok["state_bytes"], any_ok.get("dims", {})
    if state == "A":
        what = (
            f"LM {any_ok['params'] / 1e6:.1f}M params fp32 (vocab {dims.get('vocab')}, d_model {dims.get('d_model')}, "
            f"{dims.get('layers')} layers) + AdamW state after one step + LinearLR"
        )
    else:
        what = f"{dims.get('tensors')} tensors of {dims.get('elements_each')} fp32 elements in one state dict"
    return f"state {state}: {what}: {nbytes / 1e9:.3f} GB in {any_ok['state_tensors']} tensors"


def _how_run_notes(args: argparse.Namespace, machine: Dict[str, Any]) -> List[str]:
    """How the rows were run and what the columns mean."""
    notes = []
    if args.jobs > 1:
        notes.append(
            f"WARNING: --jobs {args.jobs}: rows ran concurrently, so these timings, memory and throughput "
            "figures disturb each other; use them to check the bench runs, not to compare."
        )
    if args.device == "cuda":
        notes.append(
            f"Device cuda ({machine.get('gpu')}): the state (model and AdamW state; state B's tensors) and the "
            "throughput MLP live on the GPU. memcpy limit: device-to-host copy into preallocated pinned host buffers "
            "(non_blocking, then torch.cuda.synchronize()), so x memcpy reads against the D2H limit. write limits: "
            "the same bytes from a host buffer filled once at setup (the disk alone). torch.save, DCP and ckptd save "
            "the GPU tensors as they are (their own device-to-host copies) and load back into the GPU model; the "
            "device is synchronized before every timed save and load and at the end of every timed load. "
            "throughput: GPU training steps, each waiting for its own stream (as loss.item() would), not for the "
            "copies a saver runs on a side stream."
        )
    notes += [
        f"Each row runs in a fresh process: 1 first save + {args.repeats} warm saves (medians of the warm ones), then, "
        f"for rows that write in the background, {args.training_repeats} more saves with the MLP training loop running.",
        f"Threads: OMP_NUM_THREADS={args.threads} and torch.set_num_threads({args.threads}) in every row process "
        f"(default: all {machine.get('cores')} cores, as a trainer would use them); background writers get no cores of their own.",
        f"blocked first: the first save, after {args.settle:g} s of the training loop (--settle) since the saver was built; "
        "buffers ready: seconds from building the saver until the staging memory it allocates in the background "
        "(ckptd: allocated and prefaulted at construction) was ready. "
        "blocked: until the save call returns. staged: until the live tensors may change again (dcp best: its "
        "staging future; ckptd overlap: handle.wait_staged()). durable: until the checkpoint is on disk (fsync/commit).",
        "x memcpy: warm time / memcpy limit's warm time; x memcpy+write: durable / (memcpy limit + write+fsync limit), same "
        "state (the buffered write; the O_DIRECT row, the way ckptd's daemon writes, is shown for reference).",
        "throughput kept: MLP steps/s while the save is in flight (after it returns, until durable) / steps/s in windows just "
        "before and after, median; for the two write limits, while the same write runs in a background thread (what the "
        "I/O alone costs).",
        "training s lost / ckpt: per save made with the training loop running, the seconds its call blocked + the seconds it "
        "was in flight x (1 - steps/s in flight / steps/s around it), median (not clamped: a negative value is noise). For "
        "the write limits the call is the start of the write's thread. torch.save and dcp.save block training for the whole "
        "save: their loss is their warm blocked time (the targets read dcp.save so).",
        "trainer peak RSS: VmHWM of the row process over the saves (reset after building the state); +over base: above "
        "its RSS with the state built. writer: the background process (ckptd daemon, DCP's checkpoint process): "
        "VmHWM / peak RssAnon (its mapping of the trainer's staging memory counts as RssShmem, not anon).",
    ]
    return notes


def _disk_drift_notes(all_results: AllResults) -> List[str]:
    """The range of the disk probes per state."""
    notes = []
    for state, results in all_results.items():
        probes = [p for r in results.values() for p in (r.get("disk_probe_s") or [])]
        if probes:
            notes.append(
                f"disk drift, state {state}: each writing row wrote the state once with write+fsync before and after its saves "
                f"(disk probe): {min(probes):.2f} to {max(probes):.2f} s over the run (median {statistics.median(probes):.2f} s). "
                "durable_warm_x_probe in the JSON reads each row against its own probes."
            )
    return notes


def _floor_notes(all_results: AllResults) -> List[str]:
    """How each state's training-lost floor was made (and when it fell back to the buffered write)."""
    notes = []
    for state, results in all_results.items():
        floor = lost_floor(results)
        if floor is None:
            continue
        note = (
            f"{floor.label}, state {state}: {floor.seconds:.3f} s = memcpy limit's warm blocked {floor.memcpy_s:.3f} s + "
            f"{LABELS[floor.write_row]}'s training s lost {floor.write_lost_s:.3f} s (the bare write in a thread of the "
            "trainer, its blocked part the thread start); x floor: a row's training s lost / this."
        )
        if floor.write_row == "write":
            note += " The O_DIRECT write did not run (n/a here), so the floor uses the buffered write+fsync limit."
        notes.append(note)
        notes += _checksummed_floor_note(state, results)
    return notes


def _checksummed_floor_note(state: str, results: StateResults) -> List[str]:
    """The floor with checksums, and ckptd's rows read against it (the issue's targets read the floor above)."""
    floor = checksummed_floor(results)
    if floor is None:
        return []
    against = [
        f"{LABELS[row]} {results[row]['train_lost_s']:.3f} s = {results[row]['train_lost_x_checksummed_floor']:.2f}x"
        for row in ("ckptd", "ckptd_overlap")
        if results.get(row, {}).get("train_lost_x_checksummed_floor") is not None
    ]
    return [
        f"{floor.label}, state {state}: {floor.seconds:.3f} s = memcpy {floor.memcpy_s:.3f} s + "
        f"{LABELS[floor.write_row]}'s training s lost {floor.write_lost_s:.3f} s: the least a saver pays that "
        "checksums every byte it writes, as ckptd's daemon does (the floor above does not)"
        + (f"; against it: {', '.join(against)}." if against else ".")
    ]


def _interleaved_notes(all_results: AllResults) -> List[str]:
    """The ckptd rows' saves taken in turn with the floor's in their own process (what the targets read)."""
    notes = []
    for state, results in all_results.items():
        for row in ("ckptd", "ckptd_overlap"):
            r = results.get(row, {})
            if r.get("status") != "ok" or r.get("interleaved_blocked_x_memcpy") is None:
                continue
            lost = ""
            if r.get("interleaved_lost_x_floor") is not None:
                lost = (
                    f"; with the training loop running, training s lost {fmt_s(r['interleaved_lost_s'])} s vs the floor "
                    f"{fmt_s(r['interleaved_floor_lost_s'])} s = {r['interleaved_lost_x_floor']:.2f}x"
                )
            if r.get("interleaved_lost_x_checksummed_floor") is not None:
                lost += (
                    f" and vs the checksummed floor {fmt_s(r['interleaved_checksummed_floor_lost_s'])} s = "
                    f"{r['interleaved_lost_x_checksummed_floor']:.2f}x"
                )
            notes.append(
                f"{LABELS[row]}, state {state}, interleaved: after the row's own saves, the same saves again in its process, "
                f"each in turn with the floor's (a memcpy-limit copy into a buffer; for saves under training, that copy "
                f"then the O_DIRECT write of the buffer in a thread, bare and checksummed), who goes first rotating: warm blocked "
                f"{fmt_s(r['interleaved_blocked_s'])} s vs memcpy {fmt_s(r['interleaved_memcpy_s'])} s = "
                f"{r['interleaved_blocked_x_memcpy']:.2f}x{lost} (medians; other processes took "
                f"{r.get('interleaved_other_load', 0) * 100:.0f}% of the machine meanwhile). The targets read these ratios: "
                "separate row processes meet the machine at other moments."
            )
    return notes


def _first_save_now_notes(all_results: AllResults) -> List[str]:
    """ckptd's first save made right after constructing its CheckpointManager (no training before it)."""
    notes = []
    for state, results in all_results.items():
        r = results.get("ckptd", {})
        if r.get("status") != "ok" or r.get("blocked_first_now_s") is None:
            continue
        notes.append(
            f"{LABELS['ckptd']}, state {state}: first save right after construction: {fmt_s(r['blocked_first_now_s'])} s "
            f"(staging allocation still running after construction {fmt_s(allocation_after_construction(r))} s; "
            f"warm save {fmt_s(r.get('blocked_warm_s'))} s). A second CheckpointManager on a fresh root, with its own "
            f"daemon, saved at once; its construction took {fmt_s(r.get('saver_setup_now_s'))} s (the daemon's start "
            f"included) and its staging memory was ready {fmt_s(r.get('saver_ready_now_s'))} s after construction began."
        )
    return notes


def _load_notes(all_results: AllResults) -> List[str]:
    """How cold loads emptied the page cache, and what each load row loads."""
    methods = sorted({r.get("cold_method") for s in all_results.values() for r in s.values() if r.get("cold_method")})
    resident = [
        r.get("cold_resident_fraction")
        for s in all_results.values()
        for r in s.values()
        if r.get("cold_resident_fraction") is not None
    ]
    if not methods:
        return []
    labels = ", ".join(f"{LABELS[k]} -> {v}" for k, v in LOAD_ROWS.items())
    return [
        f"load cold: page cache dropped for the checkpoint's files with {', '.join(methods)}; pages still resident "
        f"after (mincore): at most {max(resident) * 100:.1f}%."
        if resident
        else f"load cold: page cache dropped for the checkpoint's files with {', '.join(methods)}.",
        f"load: {labels}, each into the existing model/optimizer/scheduler; ckptd verifies checksums "
        "(its default). warm: the same load again at once.",
    ]


def _disturbance_notes(all_results: AllResults) -> List[str]:
    """Rows rerun, rows disturbed by other load (marked !), or the most other load any row saw."""
    notes = []
    disturbed = [
        f"{state} {r['label']} (other processes {r.get('other_load', 0) * 100:.0f}%, steal {r.get('steal', 0) * 100:.0f}%)"
        for state, results in all_results.items()
        for r in results.values()
        if is_disturbed(r)
    ]
    rerun = [
        f"{state} {r['label']} ({r['attempts']} attempts)"
        for state, results in all_results.items()
        for r in results.values()
        if (r.get("attempts") or 1) > 1
    ]
    if rerun:
        notes.append(f"Rerun because other load disturbed them (the quietest attempt is shown): {'; '.join(rerun)}.")
    if disturbed:
        notes.append(
            f"! disturbed: other processes (or the hypervisor, as steal) took more than {DISTURBED * 100:.0f}% of "
            f"the machine's CPU during these rows' saves, so their times and throughput are not comparable; "
            f"rerun when the machine is quiet: {'; '.join(disturbed)}."
        )
    else:
        loads = [
            r.get("other_load") for rs in all_results.values() for r in rs.values() if r.get("other_load") is not None
        ]
        if loads:
            notes.append(
                f"Other processes took at most {max(loads) * 100:.0f}% of the machine's CPU during any row's saves "
                f"(rows above {DISTURBED * 100:.0f}% would be marked !)."
            )
    return notes


def _failure_notes(all_results: AllResults) -> List[str]:
    """Loads that did not restore the saved values, and every row that was n/a or failed."""
    notes = []
    bad_loads = [f"{s}/{r['row']}" for s, rs in all_results.items() for r in rs.values() if r.get("load_ok") is False]
    if bad_loads:
        notes.append(f"WARNING: a load did not restore the saved values: {', '.join(bad_loads)}")
    for state, results in all_results.items():
        for r in results.values():
            if r.get("status") in ("n/a", "error"):
                notes.append(f"{state} {r['label']}: {r['status']}: {r.get('reason')}")
    return notes


def footnotes(args: argparse.Namespace, all_results: AllResults, machine: Dict[str, Any]) -> List[str]:
    """The footnote block: how the run was made, the training-lost floor, ckptd's first save right after
    construction, disk drift, loads, disturbances, failures."""
    return (
        _how_run_notes(args, machine)
        + _floor_notes(all_results)
        + _interleaved_notes(all_results)
        + _first_save_now_notes(all_results)
        + _disk_drift_notes(all_results)
        + _load_notes(all_results)
        + _disturbance_notes(all_results)
        + _failure_notes(all_results)
    )


def _print_header(plan: RunPlan, all_results: AllResults) -> None:
    machine = plan.machine
    print()
    print(f"ckptd save benchmark, {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(
        f"machine: {machine.get('cores')} cores ({machine.get('cpu', 'unknown CPU')}), {machine.get('mem_total_gb')} GB RAM, "
        f"torch {machine.get('torch')}, Python {machine.get('python')}, target {machine['target_fs']}, "
        f"ckptd at {machine.get('ckptd_commit') or 'unknown commit'}"
    )
    pages = machine.get("staging_pages", "unknown pages")
    print(f"staging memory: {pages}; the limits' buffers on the same pages")
    print(
        f"device: {device_label(machine)}"
        + (": the state and the throughput MLP live on the GPU" if machine["device"] == "cuda" else "")
    )
    print(f"command: {plan.command}")
    for state in plan.states:
        print(state_line(state, all_results[state]))


def _print_targets(states: List[str], all_results: AllResults, targets: List[Dict[str, Any]]) -> None:
    print()
    flagged = [
        LABELS[r]
        for r in (
            "memcpy",
            "write",
            "write_direct",
            "ckptd",
            "ckptd_overlap",
            "dcp_save",
            "dcp_async_default",
            "dcp_async_best",
            "torch_save",
        )
        for st in states
        if is_disturbed(all_results[st].get(r))
    ]
    print(
        "targets (issues 3 and 15), this run"
        + (f" (disturbed rows involved: {', '.join(flagged)}; see !):" if flagged else ":")
    )
    for t in targets:
        mark = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"  [{mark}] {t['target']}: {t['text']}")


def _floor_json(floor: Optional[LostFloor]) -> Optional[Dict[str, Any]]:
    """A training-lost floor for the JSON (None where it could not be computed)."""
    return None if floor is None else floor.as_dict()


def _write_json(
    args: argparse.Namespace,
    plan: RunPlan,
    all_results: AllResults,
    table: List[List[str]],
    targets: List[Dict[str, Any]],
    notes: List[str],
    total_s: float,
) -> str:
    """Write everything behind the table to --json; return its absolute path."""
    payload = {
        "command": plan.command,
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": plan.machine,
        "config": {
            "device": args.device,
            "scale": args.scale,
            "repeats": args.repeats,
            "training_repeats": args.training_repeats,
            "threads": args.threads,
            "states": plan.states,
            "rows_a": plan.rows_a,
            "rows_b": plan.rows_b,
            "drop_caches": args.drop_caches,
            "throughput": not args.no_throughput,
            "disk_probe": not args.no_disk_probe,
            "jobs": args.jobs,
            "retries": args.retries,
        },
        "results": all_results,
        "train_lost_floor": {state: _floor_json(lost_floor(all_results[state])) for state in plan.states},
        "train_lost_floor_checksummed": {
            state: _floor_json(checksummed_floor(all_results[state])) for state in plan.states
        },
        "targets": targets,
        "notes": notes,
        "table": render_table(table),
        "total_s": round(total_s, 1),
    }
    json_path = os.path.abspath(args.json)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return json_path


def report_run(args: argparse.Namespace, plan: RunPlan, all_results: AllResults, total_s: float) -> None:
    """Print the header, the table, the footnotes and the targets; write the JSON and print its path."""
    table: List[List[str]] = []
    for state in plan.states:
        table += table_rows(state, all_results[state], plan.rows_for(state))
    targets = evaluate_targets(all_results)
    notes = footnotes(args, all_results, plan.machine)
    _print_header(plan, all_results)
    print()
    print(render_table(table))
    print()
    for note in notes:
        print(note)
    if targets:
        _print_targets(plan.states, all_results, targets)
    print(f"\n(total {total_s:.0f} s)")
    json_path = _write_json(args, plan, all_results, table, targets, notes, total_s)
    print(f"JSON: {json_path}")
