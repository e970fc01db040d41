"""Forks the ranks of test jobs from one process that imported torch and ckptd once (tests/helpers.py,
RankForker): each rank is still a process of its own, with its own environment, argv and output file,
running its script from the top as `__main__`, and exiting as a script does (atexit handlers and all);
it only skips importing torch again, which is most of what starting a rank costs.

Protocol, one JSON line each way: a job {"ranks": [{"argv": [script, *args], "env": {...}, "log": path}]}
on stdin (each rank's output is appended to its log) is answered with {"pids": [...]} once its ranks are forked and {"codes": [...]} (exit statuses,
-N for a signal) once every one of them has exited; as under torchrun, the first rank that fails has
the others terminated. EOF on stdin ends the forker.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
from typing import Any, Dict, List, NoReturn, Optional

import torch  # noqa: F401  (what every rank imports: here once)
import torch.distributed  # noqa: F401

import ckptd.client  # noqa: F401

TERM_GRACE_S = 10.0


def run_rank(spec: Dict[str, Any]) -> NoReturn:
    """In the forked child: become the rank `spec` describes and run its script."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # ranks may share one
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
    os.environ.clear()
    os.environ.update(spec["env"])
    script = os.path.abspath(spec["argv"][0])
    sys.argv = [script, *spec["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    status: Any = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        status = exc.code
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.exit(status)  # the interpreter's own exit: atexit handlers, flushed output


def main() -> None:
    for line in sys.stdin:
        ranks: List[Dict[str, Any]] = json.loads(line)["ranks"]
        pids = []
        for spec in ranks:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_rank(spec)
            pids.append(pid)
        print(json.dumps({"pids": pids}), flush=True)
        print(json.dumps({"codes": wait_for_ranks(pids)}), flush=True)


def wait_for_ranks(pids: List[int]) -> List[int]:
    """Every rank's exit status. As torchrun does, once a rank fails the others are sent SIGTERM (and
    SIGKILL if they outlive it by TERM_GRACE_S): a rank waiting in a collective for a dead peer ends."""
    codes: Dict[int, int] = {}
    terminated_at: Optional[float] = None
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        failed = any(code != 0 for code in codes.values())
        if failed and terminated_at is None:
            terminated_at = time.monotonic()
            signal_ranks(pids, codes, signal.SIGTERM)
        elif terminated_at is not None and time.monotonic() - terminated_at > TERM_GRACE_S:
            signal_ranks(pids, codes, signal.SIGKILL)
        time.sleep(0.01)
    return [codes[pid] for pid in pids]


def signal_ranks(pids: List[int], exited: Dict[int, int], signum: int) -> None:
    for pid in pids:
        if pid not in exited:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
