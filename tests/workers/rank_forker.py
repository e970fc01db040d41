"""Forks the ranks of test jobs from one process that imported torch and ckptd once (tests/helpers.py,
RankForker): each rank is still a process of its own, with its own environment, argv and output file,
running its script from the top as `__main__`, and exiting as a script does (atexit handlers and all);
it only skips importing torch again, which is most of what starting a rank costs.

Protocol, one JSON line each way: a job {"ranks": [{"argv": [script, *args], "env": {...}, "log": path}]}
on stdin is answered with {"pids": [...]} once its ranks are forked and {"codes": [...]} (exit statuses,
-N for a signal) once every one of them has exited. EOF on stdin ends the forker.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from typing import Any, Dict, List, NoReturn

import torch  # noqa: F401  (what every rank imports: here once)
import torch.distributed  # noqa: F401

import ckptd.client  # noqa: F401


def run_rank(spec: Dict[str, Any]) -> NoReturn:
    """In the forked child: become the rank `spec` describes and run its script."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"codes": codes}), flush=True)


if __name__ == "__main__":
    main()
