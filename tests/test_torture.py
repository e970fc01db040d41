"""Torture test (issue 11): trainers save every step with step-tagged state while faults hit at random moments.

A trainer (tests/workers/tagged_trainer.py, one plain process or two ranks under torchrun) saves every
step; every tensor of step N holds N. Each trial waits a random 0.3-2.5 s and then injects one fault:

  daemon-kill              the daemon is SIGKILLed and started again
  daemon-and-trainer-kill  both are SIGKILLed; the trainer restarts and resumes from `latest`
  trainer-kill             the trainer is SIGKILLed and restarted; it resumes from `latest`
  stall-short              the daemon is SIGSTOPped for less than the client's daemon_timeout, then SIGCONTed
  stall-long               the daemon is SIGSTOPped for longer than daemon_timeout, then SIGCONTed
  daemon-term              the daemon is restarted cleanly (SIGTERM, saves in flight), then started again

The invariants of tests/invariants.py (every final-named checkpoint verifies and holds exactly its own
step; `latest` names one of them and never moves backwards) are checked
  - on the frozen root, right after the daemon is SIGKILLed and while it is SIGSTOPped, before anything
    is restarted or repaired: what a crash leaves behind must be consistent already;
  - on every checkpoint that commits while the fault plays out (held against retention while checked),
    until a save staged after the fault has committed: a bad commit is otherwise deleted by retention
    (keep_last=3) before anyone looks;
  - on the whole root after each trial, with the trainer paused and the root settled.
The trainers' event logs must show only CheckpointError subclasses with a reason, every handle resolved
(and a failed one must never commit afterwards), and every resume loading content of exactly its step.
After the trials a clean phase must keep committing, the trainer must stop cleanly leaving no tmp
directory behind, a fresh process must load `latest`, and a restarted daemon must unlink the staging
memory of every trainer that is gone (the SIGKILLed ones too). Every problem of every trial is collected and reported at once, with the seed.

CI runs 18 trials: 6 at one rank and 6 at two ranks with the root on disk, and 6 at one rank with the
root in /dev/shm, where the daemon keeps the trainer's staging regions as the shard files (every fault
once per run, in a random order); --run-slow runs 450 (150 at one rank and 150 at two on disk, 150 at
two ranks in /dev/shm). CKPTD_TORTURE_SEED=N replays a seed's fault schedule (timings still
vary from run to run).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import Daemon, short_endpoint, start_daemon, wait_for
from invariants import check_root, content_problems

from ckptd.client.loading import hold_for_loading, read_manifest
from ckptd.disk.files import beside_regions
from ckptd.disk.verify import verify_checkpoint
from ckptd.proto import layout

TRAINER = Path(__file__).parent / "workers" / "tagged_trainer.py"
KINDS = ("daemon-kill", "daemon-and-trainer-kill", "trainer-kill", "stall-short", "stall-long", "daemon-term")
DAEMON_TIMEOUT_S = 3.0
"""The trainers' CheckpointManager(daemon_timeout=...): a stall-short stays under it, a stall-long exceeds it."""
SAVE_TIMEOUT_S = 20
"""`ckptd serve --save-timeout` and the manager's `timeout`, as in the original report."""
FAULT_DELAY_S = (0.3, 2.5)
SHORT_STALL_S = (0.5, 2.0)
LONG_STALL_S = (DAEMON_TIMEOUT_S + 1.0, DAEMON_TIMEOUT_S + 3.0)
COMMIT_WITHIN_S = 60.0
"""A save staged after a fault must commit within this long (progress)."""
START_WITHIN_S = 90.0
"""A new trainer incarnation imports torch, rendezvouses and loads `latest` within this long."""
PAUSE_WITHIN_S = 90.0
"""A pausing (or stopping) trainer first records the outcome of every save in flight (it waits up to 60 s
for each, then records it as unresolved)."""
SETTLE_WITHIN_S = SAVE_TIMEOUT_S + 10.0
"""With the trainer paused, every save the daemon still holds commits or aborts within its save timeout."""
MODEL_MB = {1: 32.0, 2: 8.0}
"""The GLOBAL model's size per world size (the original report: 32 MB at one rank)."""


@dataclass
class Trial:
    """One fault at a random moment."""

    number: int
    kind: str
    delay_s: float
    stall_s: float
    kill_daemon_first: bool


def schedule(rng: random.Random, trials: int) -> list[Trial]:
    """`trials` trials; every block of len(KINDS) trials holds each kind once, in random order, so even
    a short run covers every fault."""
    kinds: list[str] = []
    while len(kinds) < trials:
        block = list(KINDS)
        rng.shuffle(block)
        kinds += block
    plan = []
    for number, kind in enumerate(kinds[:trials], 1):
        stall = rng.uniform(*(LONG_STALL_S if kind == "stall-long" else SHORT_STALL_S))
        plan.append(Trial(number, kind, rng.uniform(*FAULT_DELAY_S), stall, rng.random() < 0.5))
    return plan


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is in the stopped state (T in /proc/<pid>/task/<tid>/stat)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread has exited
            continue
        states.append(stat[stat.rindex(")") + 2])
    return bool(states) and all(state in "Tt" for state in states)


def argv(pid: int) -> list[str]:
    """The command line of `pid` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TrainerJob:
    """One incarnation of the tagged trainer: a plain process (one rank) or torchrun (several ranks).
    Its ranks carry `--incarnation N --log-dir DIR` in their command lines, which names them uniquely."""

    def __init__(self, world: int, args: list[str], output: Path) -> None:
        self.world = world
        self.output = output
        self.args = args
        launcher = (
            [sys.executable]
            if world == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        )
        with open(output, "ab") as out:
            self.process = subprocess.Popen(
                [*launcher, str(TRAINER), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )

    def ranks(self) -> list[int]:
        """The pids of this job's rank processes that still run (torchrun itself excluded)."""
        if self.world == 1:
            return [self.process.pid] if running(self.process.pid) else []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.process.pid and running(int(entry)):
                command = argv(int(entry))
                if (
                    str(TRAINER) in command
                    and command[command.index(str(TRAINER)) + 1 :][: len(self.args)] == self.args
                ):
                    found.append(int(entry))
        return found

    def kill(self) -> None:
        """SIGKILL every rank (torchrun, still alive, reaps them and exits), then torchrun if it lingers."""
        for pid in self.ranks():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.ranks():  # a rank torchrun had not started when it was asked: an orphan now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self, chars: int = 1500) -> str:
        """The end of the trainer's output."""
        return self.output.read_text(errors="replace")[-chars:]


@dataclass
class Outcomes:
    """What the trainers' event logs showed, over the whole run."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, event: str) -> None:
        """Count one event."""
        self.counts[event] = self.counts.get(event, 0) + 1


class Torture:
    """A daemon, a trainer job, their control files, and every problem found so far."""

    def __init__(self, base: Path, world: int, seed: int, root: Path) -> None:
        self.base = base
        self.world = world
        self.seed = seed
        self.root = root
        self.logs = base / "logs"
        self.logs.mkdir()
        self.endpoint = short_endpoint()
        self.stop_file = base / "stop"
        self.pause_file = base / "pause"
        self.daemon: Daemon | None = None
        self.daemon_log_from = 0
        """Where the running daemon's part of daemon.log starts."""
        self.trainer: TrainerJob | None = None
        self.incarnations = 0
        self.problems: list[str] = []
        self.where = "setup"
        self.offsets: dict[Path, int] = {}
        self.outcomes = Outcomes()
        self.latest: int | None = None
        self.watching = False
        self.watch_limit: int | None = None
        self.watched: set[str] = set()
        self.committed_seen: set[int] = set()
        self.saved_by: dict[tuple[int, int], set[int]] = {}
        self.trainer_pids: set[int] = set()
        self.failed: list[tuple[str, dict[str, Any]]] = []

    # problems

    def problem(self, text: str) -> None:
        """Record a problem, tagged with the seed and where it happened."""
        self.problems.append(f"[seed {self.seed}, {self.world} rank(s), {self.where}] {text}")

    # the daemon

    def start_daemon(self) -> None:
        """Start `ckptd serve` on the private endpoint (its log accumulates in one file)."""
        log_path = self.base / "daemon.log"
        self.daemon_log_from = log_path.stat().st_size if log_path.exists() else 0
        self.daemon = start_daemon(
            self.root, self.base / "daemon.log", "--save-timeout", str(SAVE_TIMEOUT_S), endpoint=self.endpoint
        )

    def saves_in_flight(self) -> set[int]:
        """The steps the running daemon has started and neither committed nor aborted (from its log)."""
        with open(self.base / "daemon.log", "rb") as log:
            log.seek(self.daemon_log_from)
            text = log.read().decode(errors="replace")
        started = {int(m) for m in re.findall(r"event=save_started step=(\d+)", text)}
        ended = {int(m) for m in re.findall(r"(?:committed step|event=aborted step=)[= ]?(\d+)", text)}
        return started - ended

    def await_save_in_flight(self, within_s: float = 2.0) -> None:
        """Wait (briefly) until the daemon holds a save: a fault between two saves tests little."""
        wait_for(lambda: bool(self.saves_in_flight()), within_s, interval=0.002)

    def kill_daemon(self) -> None:
        """SIGKILL the daemon and reap it."""
        assert self.daemon is not None
        self.daemon.process.kill()
        self.daemon.process.wait()

    def term_daemon(self) -> None:
        """SIGTERM the daemon (a clean restart): it must exit 0 within the save timeout plus a margin."""
        assert self.daemon is not None
        self.daemon.process.terminate()
        try:
            status = self.daemon.process.wait(SAVE_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            self.problem(f"the daemon did not exit within {SAVE_TIMEOUT_S + 15} s of SIGTERM")
            self.kill_daemon()
            return
        if status != 0:
            self.problem(f"the daemon exited with status {status} after SIGTERM")

    def stall_daemon(self, seconds: float) -> None:
        """SIGSTOP the daemon for `seconds` (checking the root it froze meanwhile), then SIGCONT it."""
        assert self.daemon is not None
        stopped = time.monotonic()
        os.kill(self.daemon.process.pid, signal.SIGSTOP)
        try:
            # kill() returns before the signal reaches every thread: a thread inside a syscall (a
            # retention pass's rename) finishes it first, and would race the check
            if not wait_for(lambda: all_threads_stopped(self.daemon.process.pid), 5.0, interval=0.005):
                self.problem("the daemon's threads did not all stop within 5 s of SIGSTOP")
            self.frozen_check("stopped")
            time.sleep(max(0.0, seconds - (time.monotonic() - stopped)))
        finally:
            os.kill(self.daemon.process.pid, signal.SIGCONT)

    # the trainer

    def trainer_args(self, load_only: bool = False) -> list[str]:
        """The trainer's command line."""
        args = [
            "--root",
            str(self.root),
            "--endpoint",
            self.endpoint,
            "--log-dir",
            str(self.logs),
            "--model-mb",
            str(MODEL_MB[self.world]),
            "--timeout",
            str(SAVE_TIMEOUT_S),
            "--daemon-timeout",
            str(DAEMON_TIMEOUT_S),
            "--keep-last",
            "3",
        ]
        if load_only:
            return [*args, "--load-only"]
        return [*args, "--stop-file", str(self.stop_file), "--pause-file", str(self.pause_file)]

    def start_trainer(self) -> None:
        """Start a new incarnation of the trainer and wait until every rank has resumed from `latest`
        and is about to save."""
        self.incarnations += 1
        incarnation = self.incarnations
        self.trainer = TrainerJob(
            self.world,
            [*self.trainer_args(), "--incarnation", str(incarnation)],
            self.logs / f"trainer{incarnation}.out",
        )
        started: set[int] = set()

        def all_started(events: list[dict[str, Any]]) -> bool:
            started.update(e["rank"] for e in events if e["event"] == "start" and e.get("incarnation") == incarnation)
            return len(started) == self.world or self.trainer is None or self.trainer.process.poll() is not None

        if not self.wait_events(all_started, START_WITHIN_S) or len(started) < self.world:
            self.problem(
                f"trainer incarnation {incarnation} did not start within {START_WITHIN_S} s (ranks started: "
                f"{sorted(started)}, status {self.trainer.process.poll()}):\n{self.trainer.tail()}"
            )

    def kill_trainer(self) -> None:
        """SIGKILL every rank of the trainer."""
        assert self.trainer is not None
        self.trainer.kill()

    def trainer_alive(self) -> bool:
        """True while the trainer runs; a trainer that exited by itself is a problem (and is restarted)."""
        assert self.trainer is not None
        status = self.trainer.process.poll()
        if status is None:
            return True
        self.problem(f"the trainer exited with status {status}:\n{self.trainer.tail()}")
        return False

    # the event logs

    def new_events(self) -> Iterator[dict[str, Any]]:
        """Events appended to every rank's log since the last call."""
        for path in sorted(self.logs.glob("events-rank*.jsonl")):
            with open(path, "rb") as log:
                log.seek(self.offsets.get(path, 0))
                data = log.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.decode().splitlines():
                if line.strip():
                    yield json.loads(line)

    def check_events(self) -> list[dict[str, Any]]:
        """Count the new events and record a problem for each that breaks the contract; returns them."""
        events = list(self.new_events())
        for event in events:
            kind = event["event"]
            self.outcomes.add(kind)
            who = f"rank {event['rank']} (pid {event['pid']})"
            self.trainer_pids.add(event["pid"])
            if kind == "saved":
                self.saved_by.setdefault((event["rank"], event["step"]), set()).add(event["pid"])
            elif kind == "failed":
                self.failed.append((self.where, event))
            if kind == "fatal":
                self.problem(
                    f"{who} died of {event['type']}: {event['message']!r}\n{event.get('traceback', '')[-1500:]}"
                )
            elif kind in ("save_error", "failed", "load_error"):
                if not event["checkpoint_error"]:
                    self.problem(
                        f"{who} got {event['type']} (not a CheckpointError) at step {event.get('step')}: "
                        f"{event['message']!r}"
                    )
                if not str(event["message"]).strip():
                    self.problem(f"{who} got {event['type']} without a reason at step {event.get('step')}")
                if kind == "load_error":
                    self.problem(f"{who} could not resume from latest {event.get('latest')}: {event['message']}")
            elif kind == "unresolved":
                self.problem(f"{who}: the handle of step {event['step']} did not resolve within {event['waited_s']} s")
            elif kind == "loaded" and not event["content_ok"]:
                self.problem(
                    f"{who} loaded {event['path']} (step {event['step']}) holding other steps: {event['wrong']}"
                )
        return events

    def wait_events(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Poll the logs (checking every new event) until `predicate(events seen while waiting)`."""
        seen: list[dict[str, Any]] = []

        def ready() -> bool:
            self.watch()
            seen.extend(self.check_events())
            return predicate(seen)

        return wait_for(ready, timeout, interval=0.05)

    # the root

    def latest_step(self) -> int | None:
        """The step `latest` names now (None without one)."""
        try:
            return layout.parse_checkpoint_dir_name((self.root / layout.LATEST_NAME).read_text().strip())
        except OSError:
            return None

    def listing(self) -> tuple[tuple[str, ...], int | None]:
        """The names under the root and the step `latest` names: equal twice in a row means settled."""
        try:
            names = tuple(sorted(os.listdir(self.root)))
        except FileNotFoundError:
            names = ()
        return names, self.latest_step()

    def settle(self, quiet_s: float = 0.5) -> None:
        """Wait until nothing under the root (names, `latest`) changes for `quiet_s`: with the trainer
        paused and its handles resolved, no commit or retention pass races the checks. A tmp directory
        may stay (a save the daemon holds until its timeout); `leftovers()` checks those at the end."""
        state: dict[str, Any] = {"listing": None, "since": time.monotonic()}

        def settled() -> bool:
            now = self.listing()
            if now != state["listing"]:
                state["listing"], state["since"] = now, time.monotonic()
            return time.monotonic() - state["since"] >= quiet_s

        if not wait_for(settled, SETTLE_WITHIN_S, interval=0.1):
            self.problem(f"the root kept changing for {SETTLE_WITHIN_S} s with the trainer paused: {self.listing()}")

    def leftovers(self) -> None:
        """Once the trainer has stopped, every save has committed or aborted: no tmp directory may stay
        (an aborted save's is removed; DESIGN.md, Commit protocol)."""

        def tmp_dirs() -> list[str]:
            return sorted(n for n in os.listdir(self.root) if n.startswith(layout.TMP_PREFIX))

        if not wait_for(lambda: not tmp_dirs(), SETTLE_WITHIN_S, interval=0.2):
            self.problem(f"tmp directories left behind {SETTLE_WITHIN_S} s after the trainer stopped: {tmp_dirs()}")

    def check_root(self) -> None:
        """The invariants of tests/invariants.py, and `latest` never moving backwards across trials."""
        report = check_root(self.root, self.latest)
        self.committed_seen.update(report.committed)
        for text in report.problems:
            self.problem(text)
        if report.latest is not None:
            self.latest = max(report.latest, self.latest or 0)

    def frozen_check(self, what: str) -> None:
        """Check the root while the daemon is killed or stopped: what a crash leaves behind must keep
        every invariant already, before a restarted daemon repairs anything."""
        where = self.where
        self.where = f"{where} [daemon {what}]"
        try:
            self.check_root()
        finally:
            self.where = where

    def watch(self) -> None:
        """While a fault plays out, check every checkpoint that appears (up to `watch_limit`), holding
        it against retention: a bad commit would otherwise be deleted before the end of the trial."""
        if not self.watching:
            return
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            step = layout.parse_checkpoint_dir_name(name)
            if step is None or name in self.watched:
                continue
            self.committed_seen.add(step)
            if self.watch_limit is None or step <= self.watch_limit:
                self.watched.add(name)
                self.check_checkpoint(self.root / name, step)

    def check_checkpoint(self, directory: Path, step: int) -> None:
        """Verify one committed checkpoint and its content under a loader's hold; what retention
        deleted meanwhile is not judged."""
        with hold_for_loading(str(directory)):
            if not (directory / layout.MANIFEST_NAME).is_file():
                return
            try:
                found = [f"{p.path}: {p.reason}" for p in verify_checkpoint(str(directory))]
                found = found or content_problems(str(directory), step)
            except Exception as exc:
                found = [f"{directory} cannot be checked: {exc!r}"]
            still_there = directory.is_dir()
        for text in found if still_there else []:
            self.problem(f"{text} (seen while the fault played out)")

    def handles_told_the_truth(self) -> None:
        """A handle that failed must stay failed: its step may not commit later (unless another trainer
        incarnation saved the same step again after resuming)."""
        log = (self.base / "daemon.log").read_text(errors="replace")
        committed = self.committed_seen | {int(m) for m in re.findall(r"committed step[= ](\d+)", log)}
        for where, event in self.failed:
            key = (event["rank"], event["step"])
            if event["step"] in committed and len(self.saved_by.get(key, ())) == 1:
                self.where = where
                self.problem(
                    f"rank {event['rank']}'s handle of step {event['step']} failed "
                    f"({event['message']!r}), yet the daemon committed step {event['step']}"
                )

    # the trial loop

    def progress(self, since: float) -> None:
        """Wait until a save staged after `since` has committed (`latest` reaches it)."""
        first: list[int] = []

        def committed(events: list[dict[str, Any]]) -> bool:
            if not first:
                first.extend(e["step"] for e in events if e["event"] == "saved" and e["t"] >= since)
                self.watch_limit = min(first) + 2 if first else None
            latest = self.latest_step()
            return bool(first) and latest is not None and latest >= min(first)

        if not self.wait_events(committed, COMMIT_WITHIN_S):
            self.problem(
                f"no save staged after the fault committed within {COMMIT_WITHIN_S} s "
                f"(first staged: {first[:1]}, latest {self.latest_step()})"
            )

    def pause(self, token: str) -> bool:
        """Ask every rank to pause after resolving its saves; True once all have."""
        tmp = self.pause_file.with_suffix(".tmp")
        tmp.write_text(token)
        tmp.replace(self.pause_file)
        paused: set[int] = set()

        def all_paused(events: list[dict[str, Any]]) -> bool:
            paused.update(e["rank"] for e in events if e["event"] == "paused" and e["token"] == token)
            return len(paused) == self.world

        if self.wait_events(all_paused, PAUSE_WITHIN_S):
            return True
        self.problem(f"the trainer did not pause within {PAUSE_WITHIN_S} s (ranks paused: {sorted(paused)})")
        return False

    def resume(self) -> None:
        """Let the trainer save again."""
        self.pause_file.unlink(missing_ok=True)

    def inject(self, trial: Trial) -> None:
        """Apply the trial's fault and bring back whatever it took down; watch the commits meanwhile."""
        self.watching, self.watch_limit = True, None
        if trial.kind != "trainer-kill":
            self.await_save_in_flight()
        if trial.kind == "daemon-kill":
            self.kill_daemon()
            self.frozen_check("killed")
        elif trial.kind == "trainer-kill":
            self.kill_trainer()
        elif trial.kind == "daemon-and-trainer-kill":
            first, second = (
                (self.kill_daemon, self.kill_trainer)
                if trial.kill_daemon_first
                else (self.kill_trainer, self.kill_daemon)
            )
            first()
            second()
            self.frozen_check("killed")
        elif trial.kind in ("stall-short", "stall-long"):
            self.stall_daemon(trial.stall_s)
        elif trial.kind == "daemon-term":
            self.term_daemon()
        else:
            raise AssertionError(f"unknown fault {trial.kind}")
        if trial.kind in ("daemon-kill", "daemon-and-trainer-kill", "daemon-term"):
            self.start_daemon()
        if trial.kind in ("trainer-kill", "daemon-and-trainer-kill"):
            self.start_trainer()

    def run_trial(self, trial: Trial) -> None:
        """Let the trainer save for a random while, inject the fault, then check everything."""
        self.where = f"trial {trial.number} ({trial.kind}, after {trial.delay_s:.2f} s"
        self.where += f", stalled {trial.stall_s:.2f} s)" if trial.kind.startswith("stall") else ")"
        self.resume()
        time.sleep(trial.delay_s)
        if not self.trainer_alive():
            self.start_trainer()
        self.inject(trial)
        self.progress(since=time.time())
        if not self.trainer_alive():
            self.start_trainer()
        if not self.pause(f"trial-{trial.number}"):
            self.kill_trainer()
            self.start_trainer()
        self.watching = False
        self.settle()
        self.check_root()
        self.check_events()

    def clean_phase(self, seconds: float = 2.0) -> None:
        """No faults: commits keep coming, the trainer stops cleanly, and a fresh process loads `latest`."""
        self.where = "clean phase"
        self.resume()
        before = self.latest_step() or 0
        commits: set[int] = set()

        def enough(events: list[dict[str, Any]]) -> bool:
            commits.update(e["step"] for e in events if e["event"] == "committed" and e["rank"] == 0)
            return len(commits) >= 3 and (self.latest_step() or 0) > before

        started = time.monotonic()
        if not self.wait_events(enough, COMMIT_WITHIN_S):
            self.problem(
                f"only {len(commits)} steps committed in the clean phase within {COMMIT_WITHIN_S} s "
                f"(latest {before} -> {self.latest_step()})"
            )
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        if beside_regions(str(self.root)):
            self.regions_kept_as_shards()
        self.stop_trainer()
        self.settle()
        self.leftovers()
        self.check_root()
        self.check_events()
        self.fresh_load()
        self.staging_left()

    def regions_kept_as_shards(self) -> None:
        """In a root on /dev/shm, the model's shard of `latest` is the running trainer's staging region
        (a second link to it), so the faults above hit the kept-region path. (A component whose tensors
        are too small for a region of their own travels inline and is written.)"""
        step = self.latest_step()
        if step is None:
            self.problem("nothing committed to look at for kept regions")
            return
        directory = self.root / layout.checkpoint_dir_name(step)
        with hold_for_loading(str(directory)):
            (scope,) = read_manifest(str(directory)).components["model"].scopes.values()
            links = (directory / scope.tensor_file.path).stat().st_nlink
        if links < 2:
            self.problem(f"the model's shard of step {step} in a /dev/shm root is not a kept region: {links} link(s)")

    def staging_left(self) -> None:
        """Once the trainers are gone, a restarted daemon unlinks their staging regions (/dev/shm), also
        those of the SIGKILLed ones."""
        self.term_daemon()
        self.start_daemon()
        prefixes = tuple(f"{layout.REGION_PREFIX}{os.getuid()}-{pid}-" for pid in self.trainer_pids)

        def regions() -> list[str]:
            return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefixes))

        if not wait_for(lambda: not regions(), 10.0, interval=0.1):
            self.problem(f"staging regions of trainers that are gone stay in /dev/shm: {regions()}")

    def stop_trainer(self) -> None:
        """Create the stop file: every rank resolves its saves, closes its manager and exits 0."""
        assert self.trainer is not None
        self.stop_file.touch()
        try:
            status = self.trainer.process.wait(PAUSE_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.problem(f"the trainer did not stop within {PAUSE_WITHIN_S} s of the stop file")
            self.kill_trainer()
            return
        stopped = {e["rank"] for e in self.check_events() if e["event"] == "stopped"}
        if status != 0 or len(stopped) != self.world:
            self.problem(
                f"the trainer stopped with status {status}, ranks {sorted(stopped)} closed cleanly:\n"
                f"{self.trainer.tail()}"
            )

    def fresh_load(self) -> None:
        """`CheckpointManager(provider, root, connect=False).load_checkpoint()` in a fresh process gives
        exactly the step `latest` names."""
        job = TrainerJob(self.world, self.trainer_args(load_only=True), self.logs / "fresh-load.out")
        try:
            status = job.process.wait(120)
        except subprocess.TimeoutExpired:
            job.kill()
            self.problem("the fresh-process load did not finish within 120 s")
            return
        loaded = [e for e in self.check_events() if e["event"] == "loaded" and e.get("fresh")]
        steps = {e["step"] for e in loaded}
        if status != 0 or len(loaded) != self.world or steps != {self.latest_step()}:
            self.problem(
                f"the fresh-process load failed (status {status}, loaded steps {sorted(steps)}, "
                f"latest {self.latest_step()}):\n{job.tail()}"
            )

    def shutdown(self) -> None:
        """Stop and reap every process this run started (also when the test failed)."""
        if self.trainer is not None:
            self.trainer.kill()
        if self.daemon is not None:
            if self.daemon.process.poll() is None:
                os.kill(self.daemon.process.pid, signal.SIGCONT)
            self.daemon.stop()
        Path(self.endpoint[len("ipc://") :]).unlink(missing_ok=True)  # left behind by a SIGKILLed daemon

    def daemon_tracebacks(self) -> None:
        """A daemon that logged a traceback hit an unexpected error, whatever the trainers saw."""
        log = (self.base / "daemon.log").read_text(errors="replace")
        at = log.find("Traceback")
        if at >= 0:
            self.where = "daemon log"
            self.problem(f"the daemon logged a traceback:\n{log[at : at + 2000]}")


def torture_seed() -> int:
    """CKPTD_TORTURE_SEED, else a new seed each run (it is in every problem and in the failure message)."""
    value = os.environ.get("CKPTD_TORTURE_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


@pytest.fixture
def root_base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the checkpoint root lives: on disk (under tmp_path), or in /dev/shm, where the daemon keeps
    the trainers' staging regions as the shard files (a trainer writes a region again only once no
    checkpoint holds it, whatever was killed or stalled meanwhile)."""
    if request.param == "disk":
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="torture-", dir=layout.REGION_DIR))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    ("world", "trials", "root_base"),
    [
        pytest.param(1, 6, "disk", id="1rank-bounded"),
        pytest.param(2, 6, "disk", id="2ranks-bounded"),
        pytest.param(1, 6, "dev-shm", id="1rank-dev-shm-bounded"),
        pytest.param(1, 150, "disk", id="1rank-long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
        pytest.param(2, 150, "disk", id="2ranks-long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
        pytest.param(2, 150, "dev-shm", id="2ranks-dev-shm-long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
    ],
    indirect=["root_base"],
)
def test_torture(tmp_path: Path, root_base: Path, world: int, trials: int) -> None:
    seed = torture_seed()
    plan = schedule(random.Random(seed), trials)
    run = Torture(tmp_path, world, seed, root_base / "ckpt")
    try:
        run.start_daemon()
        run.start_trainer()
        for trial in plan:
            run.run_trial(trial)
        run.clean_phase()
    except Exception as exc:
        run.problem(f"the run stopped early: {exc!r}\n{traceback.format_exc()[-3000:]}")
    finally:
        run.shutdown()
    run.daemon_tracebacks()
    run.handles_told_the_truth()
    counts = run.outcomes.counts
    # a save in flight at a fault fails, or (daemon-term) is refused by the draining daemon and handed to
    # the restarted one, which commits it
    redirected = (run.base / "daemon.log").read_text(errors="replace").count("takes no new save")
    if counts.get("failed", 0) + counts.get("save_error", 0) + redirected == 0:
        run.where = "summary"
        run.problem(
            f"no save failed or was redirected in {trials} faults: the faults never hit a save in flight ({counts})"
        )
    summary = (
        f"seed {seed} (CKPTD_TORTURE_SEED={seed} replays the schedule), {world} rank(s), {trials} trials "
        f"({', '.join(t.kind for t in plan)}), trainer incarnations {run.incarnations}, events {counts}"
    )
    assert not run.problems, f"{len(run.problems)} problem(s); {summary}:\n" + "\n".join(run.problems)
