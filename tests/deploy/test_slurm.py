"""The Slurm batch script for real: a one-node Slurm cluster on this machine (Debian's slurm-wlm and
munge, slurmctld and slurmd as root), deploy/slurm/ckptd-train.sbatch submitted with sbatch, the
committed checkpoints checked. Plus the script's several-node path, with srun and scontrol stood in
for by scripts that start one task per simulated node on this machine.

Run with `./dev test-slurm` (as root): `pytest -m slurm --run-slurm tests/deploy/test_slurm.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "deploy" / "slurm" / "ckptd-train.sbatch"
EXAMPLE = REPO / "examples" / "ddp_train.py"
PYTHON = sys.executable
SLURM_PACKAGES = ["slurm-wlm", "munge"]
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    *command: str, env: Dict[str, str] | None = None, timeout: float = 60, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def ensure_slurm_installed() -> None:
    """Debian's Slurm and munge, installed once (apt-get update first only if the install fails)."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged") and shutil.which("sbatch"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]
    if run(*install, env=env, timeout=600, check=False).returncode != 0:
        run("apt-get", "update", env=env, timeout=600)
        run(*install, env=env, timeout=600)


def ckptd_daemons(root: Path) -> List[str]:
    """Command lines of the `ckptd serve` processes on this machine that serve `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if "serve" in words and any("ckptd" in w for w in words) and str(root) in words:
            found.append(f"pid {entry.name}: {' '.join(words)}")
    return found


@dataclass
class SlurmCluster:
    """slurmctld, slurmd and munged of a one-node cluster, all under `base`."""

    base: Path
    node: str
    env: Dict[str, str]
    processes: List[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, *command: str) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def logs(self) -> str:
        parts = []
        for path in sorted((self.base / "log").iterdir()):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def node_state(self) -> str:
        result = run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", env=self.env, check=False, timeout=20)
        return result.stdout.strip()

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...)."""
        out = run("scontrol", "show", "job", "-o", job_id, env=self.env, timeout=20).stdout
        return dict(word.split("=", 1) for word in out.split() if "=" in word)

    def wait_for_job(self, job_id: str, timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                run("scancel", job_id, env=self.env, check=False)
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:g} s\n{self.logs()}")
            time.sleep(1)

    def stop(self) -> None:
        run("scancel", "--user=root", env=self.env, check=False, timeout=20)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # let slurmd reap what it started before it goes
            queue = run("squeue", "-h", "-o", "%i", env=self.env, check=False, timeout=20)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def write_config(base: Path, node: str) -> Path:
    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as f:
        total_mb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) // 1024
    config = base / "slurm.conf"
    config.write_text(f"""\
ClusterName=ckptdtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(total_mb * 0.9)} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return config


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster on this machine, torn down (with its munged) at the end."""
    if os.geteuid() != 0:
        pytest.fail(
            "the Slurm test runs as root: it installs slurm-wlm and munge with apt-get and runs "
            "slurmctld and slurmd as root (./dev test-slurm as root)"
        )
    ensure_slurm_installed()
    # Not under pytest's 0700 tmp folders: munged wants every directory above its socket searchable.
    base = Path(tempfile.mkdtemp(prefix="ckptd-slurm-", dir="/tmp"))
    base.chmod(0o755)
    for sub in ("munge", "state", "spool", "log", "work"):
        (base / sub).mkdir(mode=0o755)
    node = socket.gethostname().split(".")[0]
    try:  # the batch script takes the rendezvous host from `scontrol show hostnames`: the node's name
        socket.gethostbyname(node)
    except OSError:
        pytest.fail(f"this machine's host name {node!r} does not resolve; add it to /etc/hosts")
    config = write_config(base, node)
    env = {**os.environ, "SLURM_CONF": str(config)}
    cluster = SlurmCluster(base, node, env)
    try:
        key = base / "munge" / "munge.key"
        run("mungekey", "--create", f"--keyfile={key}")
        key.chmod(0o600)
        cluster.start(
            "munged",
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={base}/munge/munge.sock",
            f"--pid-file={base}/munge/munged.pid",
            f"--log-file={base}/log/munged.log",
            f"--seed-file={base}/munge/munged.seed",
        )
        deadline = time.monotonic() + 20
        while not (base / "munge" / "munge.sock").exists():
            assert time.monotonic() < deadline and cluster.processes[0].poll() is None, cluster.logs()
            time.sleep(0.1)
        cluster.start("slurmctld", "slurmctld", "-D", "-i", "-f", str(config))
        cluster.start("slurmd", "slurmd", "-D", "-N", node, "-f", str(config))
        deadline = time.monotonic() + 90
        while cluster.node_state() != "idle":
            if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.processes):
                raise AssertionError(f"node {node} is {cluster.node_state()!r}, not idle\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(900)
def test_sbatch_job_commits_checkpoints_and_stops_its_daemon(slurm_cluster: SlurmCluster) -> None:
    work = slurm_cluster.base / "work"
    root = Path(tempfile.mkdtemp(prefix="ckptd-slurm-", dir="/dev/shm")) / "checkpoints"  # the fast tier
    shared = work / "shared"  # the README's Slurm example: a /dev/shm root, and a shared tier
    env = {
        **slurm_cluster.env,
        "CKPTD_ROOT": str(root),
        "CKPTD_SERVE_ARGS": f"--tier shared={shared}:every=5",
        "NPROC_PER_NODE": "2",
        "CKPTD_PYTHON": PYTHON,
        "CKPTD_LOG_DIR": str(work),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("CKPTD_ENDPOINT", None)
    submitted = run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        f"--output={work}/job-%j.out",
        str(SBATCH_SCRIPT),
        str(EXAMPLE),
        "--root",
        str(root),
        "--steps",
        "10",
        "--save-every",
        "5",
        env=env,
        cwd=REPO,
    )  # submitted from the checkout: the script finds deploy/ckptd-torchrun there
    job_id = submitted.stdout.strip().split(";")[0]
    info = slurm_cluster.wait_for_job(job_id, timeout=420)
    output = (work / f"job-{job_id}.out").read_text(errors="replace")
    daemon_log = work / f"ckptd-{job_id}-node0.log"
    details = f"job output:\n{output[-6000:]}\ndaemon log:\n{daemon_log.read_text(errors='replace') if daemon_log.exists() else '(none)'}"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{details}\n{slurm_cluster.logs()}"

    assert (root / "latest").read_text().strip() == "step_00000010", details
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000005", "step_00000010"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "no leftovers, no cluster secret on one node"
    assert (shared / "latest").read_text().strip() == "step_00000010", details  # copied before the daemon stopped
    verify = run(PYTHON, "-m", "ckptd.service", "verify", str(root), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("OK ") == 4, verify.stdout  # both steps in the root and in the shared tier
    shutil.rmtree(root.parent, ignore_errors=True)

    assert "[rank 0] step 10 committed" in output, details
    log = daemon_log.read_text(errors="replace")
    assert "committed step 10" in log and "ckptd stopped" in log, details
    assert not ckptd_daemons(root), ckptd_daemons(root)


# --- the several-node path of the batch script, with srun and scontrol stood in for -------------

FAKE_SRUN = """#!/bin/bash
# Stands in for srun on one machine: one task per simulated node, SLURM_NODEID set for each.
set -u
nodes="$SLURM_NNODES"
while [[ "$1" == -* ]]; do
    echo "srun option: $1" >>"$FAKE_SLURM_LOG"
    shift
done
pids=()
for ((n = 0; n < nodes; n++)); do
    SLURM_NODEID=$n SLURM_PROCID=$n "$@" >"$FAKE_SLURM_DIR/task$n.out" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""

FAKE_SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST`: every simulated node is this machine.
[[ "$1 $2" == "show hostnames" ]] || exit 1
for ((n = 0; n < SLURM_NNODES; n++)); do echo 127.0.0.1; done
"""


@pytest.mark.timeout(600)
def test_sbatch_script_on_two_simulated_nodes(tmp_path: Path) -> None:
    """The batch script's multi-node path: a cluster secret on the shared root, node 0's daemon leads,
    node 1's joins over CURVE-authenticated TCP, one commit for the whole job, the secret removed after."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    root = tmp_path / "checkpoints"
    job_id = str(4242 + os.getpid() % 1000)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "FAKE_SLURM_LOG": str(tmp_path / "srun.log"),
        "SLURM_JOB_ID": job_id,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_ON_NODE": "2",
        "CKPTD_ROOT": str(root),
        "NPROC_PER_NODE": "1",
        "CKPTD_PYTHON": PYTHON,
        "CKPTD_LOG_DIR": str(tmp_path),
        "MASTER_PORT": str(free_port()),
        "CKPTD_LEADER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("CKPTD_ENDPOINT", None)
    result = subprocess.run(
        ["bash", str(SBATCH_SCRIPT), str(EXAMPLE), "--root", str(root), "--steps", "6", "--save-every", "3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=500,
    )
    tasks = "\n".join(
        f"--- node {n}\n{(tmp_path / f'task{n}.out').read_text(errors='replace')[-4000:]}"
        for n in range(2)
        if (tmp_path / f"task{n}.out").exists()
    )
    logs = [tmp_path / f"ckptd-{job_id}-node{n}.log" for n in range(2)]
    details = (
        result.stdout
        + result.stderr
        + tasks
        + "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')}" for p in logs if p.exists())
    )
    assert result.returncode == 0, details

    assert (root / "latest").read_text().strip() == "step_00000006", details
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000003", "step_00000006"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "the job's secret is removed after it"
    verify = run(PYTHON, "-m", "ckptd.service", "verify", str(root), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    leader_log, follower_log = (p.read_text(errors="replace") for p in logs)
    assert "node 1's daemon joined" in leader_log and "committed step 6 at" in leader_log, details
    # only the leader commits; node 1 resolves its ranks from the leader's announcement
    assert "committed step 6 at" not in follower_log and "event=committed step=6" in follower_log, details
    assert "ckptd stopped" in follower_log, details
    srun_options = (tmp_path / "srun.log").read_text()
    assert "--ntasks-per-node=1" in srun_options and "--cpus-per-task=2" in srun_options, srun_options
    assert not ckptd_daemons(root), ckptd_daemons(root)
