#!/usr/bin/env python3
"""Benchmark: ckptd against its peers (torch.save, torch.distributed.checkpoint) on one machine.

One command, one table:

    .venv/bin/python bench/bench_save.py                      # full size: ~1.27 GB state, 5 repeats
    .venv/bin/python bench/bench_save.py --scale 0.05 --repeats 2   # a quick run
    .venv/bin/python bench/bench_save.py --device cuda              # the state on the GPU (bench/run_cuda.sh)

The driver (this script without --row) runs every row in a fresh subprocess
(`bench_save.py --row NAME --state A|B ...`), so each row's trainer peak RSS is its own, then
prints one table and writes JSON (--json, default bench/results/latest.json).
See bench/README.md for what each row and column means and the targets they are read against.
"""

# The entry point only: command line, then the driver (bench_driver.py) or one row process
# (bench_measure.py). The rows are named in bench_rows.py; the savers live in bench_limits.py,
# bench_peers.py and bench_ckptd.py; the table, footnotes and JSON in bench_report.py.

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # run as a script it is there already; loaded by path (the tests) it is not
    sys.path.insert(0, HERE)

from bench_driver import driver_main  # noqa: E402
from bench_measure import row_main  # noqa: E402
from bench_rows import (  # noqa: E402
    BLOCKING_ROWS,
    DEFAULT_ROWS_B,
    LABELS,
    LOAD_ROWS,
    RESULT_MARK,
    ROW_IDS,
    ROWS,
    row_unavailable,
)

__all__ = [
    "BLOCKING_ROWS",
    "DEFAULT_JSON",
    "DEFAULT_ROWS_B",
    "LABELS",
    "LOAD_ROWS",
    "RESULT_MARK",
    "ROWS",
    "ROW_IDS",
    "main",
    "parse_args",
    "row_unavailable",
]

DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """What to run, where, and how big."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the state (model, optimizer state, state B's tensors) and the throughput MLP live "
        "(default cpu). cuda: memcpy limit = device-to-host copy into pinned buffers; the other "
        "rows save the GPU state as they are",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the state's size (1: ~1.27 GB LM + AdamW; 0.05 for a quick run)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="warm saves per row (medians reported; default 5)")
    parser.add_argument(
        "--training-repeats",
        type=int,
        default=5,
        help="saves with the training loop running, per row that writes in the background (medians "
        "reported; default 5: the training-lost figures, the floor's above all, vary more than the "
        "blocked times)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="target directory; the bench works in a fresh temporary directory under it "
        "(default: under /tmp) and removes it afterwards",
    )
    parser.add_argument(
        "--json", default=DEFAULT_JSON, help="where to write the JSON results (default bench/results/latest.json)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch/OpenMP threads in each row process (default: all cores)",
    )
    parser.add_argument("--states", default="A,B", help="states to run: A, B or A,B (default)")
    parser.add_argument(
        "--rows",
        default="all",
        help=f"rows for state A, comma-separated from {ROW_IDS} (default all); with a ckptd row, "
        "memcpy, write and write_direct run too (the training-lost floor)",
    )
    parser.add_argument(
        "--rows-b",
        default=",".join(DEFAULT_ROWS_B),
        help=f"rows for state B (default {','.join(DEFAULT_ROWS_B)}; 'all' for every row)",
    )


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """How the rows are measured, and the row process's own (hidden) options."""
    parser.add_argument(
        "--drop-caches",
        choices=("auto", "always", "never"),
        default="auto",
        help="cold loads: posix_fadvise(DONTNEED) always; /proc/sys/vm/drop_caches too when "
        "'always', or when fadvise left pages resident ('auto', default)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of the training loop between building a saver and its first save (default 5)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds every row waits before each timed save (default 1): copies run slower right after "
        "this kind of VM idles (1.2 GB: 0.047 s back to back, 0.07-0.09 s after 1-2 s idle), and a "
        "background writer leaves the trainer idle while it writes, so without the same pause the "
        "memcpy limit, timed back to back, reads faster than it is. The first save right after "
        "construction never waits",
    )
    parser.add_argument("--no-throughput", action="store_true", help="skip the training-throughput saves")
    parser.add_argument(
        "--no-disk-probe",
        action="store_true",
        help="skip the write+fsync of the state before and after each row's saves (disk drift)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="rows run at once (default 1). More only for smoke tests: concurrent rows disturb "
        "each other's timings, memory and throughput",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run a row again, up to this many times, when other processes took more than 10%% of the "
        "machine during it; the quietest attempt is kept (default 2)",
    )
    parser.add_argument("--row-timeout", type=float, default=1800, help="seconds one row may take (default 1800)")
    parser.add_argument("--row", choices=ROW_IDS, help=argparse.SUPPRESS)
    parser.add_argument("--state", choices=("A", "B"), help=argparse.SUPPRESS)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The bench's command line (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(parser)
    _add_method_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.training_repeats < 1:
        parser.error("--training-repeats must be at least 1")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the driver, or one row process (--row, with --state and --dir)."""
    args = parse_args(argv)
    if args.row:
        if not args.state or not args.dir:
            raise SystemExit("--row needs --state and --dir")
        return row_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
