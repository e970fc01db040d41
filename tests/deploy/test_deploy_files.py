"""deploy/: the torchrun launcher wrapper run for real (2 ranks, its own daemon), the shell scripts
parsed, the systemd unit checked (and verified by systemd-analyze where it exists), the Kubernetes
manifests checked and their ckptd sidecar commands run for real."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml
from helpers import Daemon, start_daemon, wait_for, wait_until_serving

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
WRAPPER = DEPLOY / "ckptd-torchrun"
SBATCH_SCRIPT = DEPLOY / "slurm" / "ckptd-train.sbatch"
UNIT = DEPLOY / "systemd" / "ckptd@.service"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
WORKER = REPO / "tests" / "workers" / "train_job.py"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(root: Path) -> List[str]:
    """`ckptd serve` processes on this machine that serve `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = [w.decode(errors="replace") for w in (entry / "cmdline").read_bytes().split(b"\0") if w]
            except OSError:
                continue
            if "serve" in words and str(root) in words and any("ckptd" in w for w in words):
                found.append(f"{entry.name}: {' '.join(words)}")
    return found


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short XDG_RUNTIME_DIR: ipc socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ckw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wrapper_env(runtime: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "SLURM_"))}
    return {**env, "XDG_RUNTIME_DIR": str(runtime), "OMP_NUM_THREADS": "1", **extra}


def run_wrapper(*args: str, env: Dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(WRAPPER), *args], env=env, capture_output=True, text=True, timeout=timeout)


# --- shell scripts -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", [WRAPPER, SBATCH_SCRIPT, REPO / "dev", REPO / ".ci" / "run"], ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", "-S", "warning", str(WRAPPER), str(SBATCH_SCRIPT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_header_asks_for_one_task_per_node() -> None:
    header = [line for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    options = dict(line.split(None, 1)[1].partition("=")[::2] for line in header)
    assert options["--ntasks-per-node"] == "1" and int(options["--nodes"]) >= 1, header
    body = SBATCH_SCRIPT.read_text()
    assert "scontrol show hostnames" in body and "ckptd.service keygen" in body and "srun" in body


# --- the launcher wrapper ----------------------------------------------------------------------


def test_wrapper_runs_torchrun_with_its_own_daemon_and_stops_it(tmp_path: Path, runtime_dir: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    result = run_wrapper(
        "--root",
        str(root),
        "--python",
        PYTHON,
        "--",
        "--nproc-per-node",
        "2",
        str(WORKER),
        "save",
        "--root",
        str(root),
        "--out",
        str(out),
        env=wrapper_env(runtime_dir),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    started = re.search(
        r"started the ckptd daemon \(pid (\d+)\) for (\S+) as node 0 of 1 on (ipc://\S+) \(log (\S+)\)", result.stderr
    )
    assert started, result.stderr
    pid, endpoint, log = int(started.group(1)), started.group(3), Path(started.group(4))
    assert endpoint.startswith(f"ipc://{runtime_dir}/ckptd/"), endpoint
    assert "--standalone --nproc-per-node 2" in result.stderr  # one node, no rendezvous given: standalone

    for rank in (0, 1):  # the ranks found the daemon through CKPTD_ENDPOINT (train_job.py gets no --endpoint)
        saved = json.loads((out / f"save_rank{rank}.json").read_text())
        assert [os.path.basename(p) for p in saved["paths"]] == ["step_00000003", "step_00000004"], saved
    assert (root / "latest").read_text().strip() == "step_00000004"
    verify = subprocess.run([PYTHON, "-m", "ckptd.service", "verify", str(root)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    daemon_log = log.read_text()
    assert "committed step 4" in daemon_log and "ckptd stopped" in daemon_log, daemon_log
    assert "stopping the ckptd daemon" in result.stderr
    assert not Path(f"/proc/{pid}").exists() or pid_is_not_ckptd(pid), f"daemon {pid} still running"
    assert not serving(root), serving(root)
    assert not Path(endpoint[len("ipc://") :]).exists(), "the daemon removes its socket"
    assert os.stat(runtime_dir / "ckptd").st_mode & 0o777 == 0o700


def pid_is_not_ckptd(pid: int) -> bool:
    try:
        return b"ckptd" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def test_wrapper_uses_a_daemon_already_answering_and_returns_torchrun_status(tmp_path: Path, runtime_dir: Path) -> None:
    root = tmp_path / "ckpt"
    daemon = start_daemon(root, tmp_path / "daemon.log")
    try:
        result = run_wrapper(
            "--root",
            str(root),
            "--python",
            PYTHON,
            "--",
            "--nproc-per-node",
            "1",
            "--no-python",
            "false",
            env=wrapper_env(runtime_dir, CKPTD_ENDPOINT=daemon.endpoint),
        )
        assert result.returncode == 1, result.stderr[-4000:]
        assert (
            f"using the ckptd daemon (pid {daemon.process.pid}) already answering at {daemon.endpoint}" in result.stderr
        ), result.stderr
        assert "started the ckptd daemon" not in result.stderr and "stopping" not in result.stderr
        assert daemon.process.poll() is None, "the wrapper leaves a daemon it did not start running"
        wait_until_serving(daemon, timeout=5)
    finally:
        assert daemon.stop() == 0


def test_wrapper_stops_the_daemon_it_started_when_training_fails(tmp_path: Path, runtime_dir: Path) -> None:
    root = tmp_path / "ckpt"
    result = run_wrapper(
        "--root",
        str(root),
        "--python",
        PYTHON,
        "--",
        "--nproc-per-node",
        "1",
        "--no-python",
        "false",
        env=wrapper_env(runtime_dir),
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "torchrun exited with status 1" in result.stderr and "stopping the ckptd daemon" in result.stderr
    assert not serving(root), serving(root)


def test_wrapper_passes_sigterm_to_torchrun_then_stops_the_daemon(tmp_path: Path, runtime_dir: Path) -> None:
    """What Slurm does on scancel or at the time limit: SIGTERM to the job step's processes."""
    root = tmp_path / "ckpt"
    process = subprocess.Popen(
        [
            str(WRAPPER),
            "--root",
            str(root),
            "--python",
            PYTHON,
            "--",
            "--nproc-per-node",
            "1",
            "--no-python",
            "sleep",
            "300",
        ],
        env=wrapper_env(runtime_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_for(
            lambda: any(
                read_cmdline(p) == b"sleep\x00300\x00" and descends_from(int(p), process.pid)
                for p in os.listdir("/proc")
                if p.isdigit()
            ),
            timeout=60,
            interval=0.2,
        ), "training never started"
        process.terminate()  # the wrapper only: it forwards the signal to torchrun itself
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode != 0, output
    assert "torchrun exited with status" in output and "stopping the ckptd daemon" in output, output
    assert not serving(root), serving(root)


def descends_from(pid: int, ancestor: int) -> bool:
    """True if `ancestor` is `pid`'s parent, grandparent, ... (a `sleep 300` of another test is not ours)."""
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def read_cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_wrapper_fails_clearly_when_the_daemon_refuses_to_start(tmp_path: Path, runtime_dir: Path) -> None:
    secret = tmp_path / "cluster.secret"
    subprocess.run([PYTHON, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    secret.chmod(0o644)  # the daemon refuses a secret others can read
    result = run_wrapper(
        "--root",
        str(tmp_path / "ckpt"),
        "--python",
        PYTHON,
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--leader",
        f"127.0.0.1:{free_port()}",
        "--cluster-secret",
        str(secret),
        "--",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        "127.0.0.1:1",
        "--no-python",
        "true",
        env=wrapper_env(runtime_dir),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "the ckptd daemon exited with status 2 before it answered; its log ends with:" in result.stderr
    assert "chmod 600" in result.stderr, result.stderr  # the daemon's own reason, from its log
    assert "ckptd-torchrun: running" not in result.stderr, "torchrun must not start without a daemon"


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "--root DIR is required"),
        (("--root", "/tmp/x", "--", "--nnodes", "2", "train.py"), "give --nnodes to ckptd-torchrun"),
        (("--root", "/tmp/x", "--", "--node_rank=1", "train.py"), "give --node_rank to ckptd-torchrun"),
        (
            ("--root", "/tmp/x", "--nnodes", "2", "--node-rank", "2", "--", "train.py"),
            "node rank 2 is not in a job of 2",
        ),
        (("--root", "/tmp/x", "--nnodes", "2", "--", "train.py"), "needs --leader HOST:PORT"),
        (
            (
                "--root",
                "/tmp/x",
                "--nnodes",
                "2",
                "--leader",
                "h:1",
                "--cluster-secret",
                "/etc/hostname",
                "--",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:2",
                "train.py",
            ),
            "use the static rendezvous",
        ),
        (("--root", "/tmp/x"), "nothing to run"),
        (("--bogus",), "unknown option --bogus"),
    ],
)
def test_wrapper_refuses_bad_arguments(args: Tuple[str, ...], message: str, runtime_dir: Path) -> None:
    result = run_wrapper(*args, env=wrapper_env(runtime_dir), timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not list(runtime_dir.iterdir()), "nothing started"


def test_wrapper_takes_node_rank_and_count_from_slurm(runtime_dir: Path) -> None:
    """SLURM_NODEID and SLURM_NNODES are the defaults (seen here through the checks they feed)."""
    env = wrapper_env(runtime_dir, SLURM_NODEID="3", SLURM_NNODES="2")
    result = run_wrapper("--root", "/tmp/x", "--", "train.py", env=env, timeout=30)
    assert result.returncode == 2 and "node rank 3 is not in a job of 2 node(s)" in result.stderr, result.stderr
    env["CKPTD_NODE_RANK"] = "1"  # ckptd's own variable wins over Slurm's
    result = run_wrapper("--root", "/tmp/x", "--", "train.py", env=env, timeout=30)
    assert result.returncode == 2 and "a job of 2 nodes needs --leader" in result.stderr, result.stderr


# --- systemd unit ------------------------------------------------------------------------------


def read_unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        strict=False, delimiters=("=",), comment_prefixes=("#", ";"), empty_lines_in_values=False
    )
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_settings() -> None:
    unit = read_unit()
    service = unit["Service"]
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith("/ckptd") and exec_start[1] == "serve", exec_start
    assert exec_start[exec_start.index("--root") + 1] == "%f"  # the instance is the path-escaped root
    endpoint = exec_start[exec_start.index("--endpoint") + 1]
    assert endpoint == "ipc://%t/ckptd/%i/ckptd.sock" and service["RuntimeDirectory"] == "ckptd/%i"
    assert service["RuntimeDirectoryMode"] == "0700"
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 600
    assert service["Restart"] == "on-failure" and set(service["RestartPreventExitStatus"].split()) >= {"2", "3"}
    assert service["Nice"] == "10" and exec_start[exec_start.index("--nice") + 1] == "0"
    assert service["User"] not in ("", "root", "0") and service.get("DynamicUser", "no") == "no"
    # The daemon needs the host's /dev/shm, process table and uids.
    for hides in ("PrivateDevices", "PrivateIPC", "PrivateUsers", "PrivateTmp", "PrivateNetwork"):
        assert service.get(hides, "no") == "no", hides
    assert service.get("ProtectProc", "default") == "default"
    assert service["RemoveIPC"] == "no"
    assert "/dev" not in service.get("InaccessiblePaths", "") and "/dev" not in service.get("TemporaryFileSystem", "")
    assert "%f" in service["ReadWritePaths"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own parser: no unknown or invalid settings; %f and %t expand to the root and /run."""
    root = tmp_path / "ckpt"
    root.mkdir()
    escaped = subprocess.run(
        ["systemd-escape", "--path", str(root)], capture_output=True, text=True, check=True
    ).stdout.strip()
    ckptd = shutil.which("ckptd", path=str(Path(PYTHON).parent)) or shutil.which("ckptd")
    assert ckptd, "the ckptd console script"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={ckptd}", UNIT.read_text(), flags=re.M)
    instance = tmp_path / f"ckptd@{escaped}.service"
    instance.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"},
        cwd=tmp_path,
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        if re.search(r"Unknown (key|section)|[Ii]nvalid|Failed to|[Mm]issing|not executable|Ignoring", line)
        and str(instance.name) in line
    ]
    assert result.returncode == 0 and not problems, result.stdout[-3000:] + result.stderr[-3000:]
    command = re.search(r"Command Line: (.*)", result.stdout + result.stderr)
    if command:  # systemd's debug dump of the loaded unit shows ExecStart with the specifiers expanded
        shown = command.group(1).replace("\\\\", "\\").replace('"', "")  # systemd quotes and escapes it
        assert f"serve --root {root} --endpoint ipc:///run/ckptd/{escaped}/ckptd.sock --nice 0" in shown, shown


# --- Kubernetes --------------------------------------------------------------------------------


def load_manifests() -> Dict[str, List[Dict[str, Any]]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in MANIFESTS}


def pod_specs() -> List[Tuple[str, Dict[str, Any]]]:
    specs = []
    for name, documents in load_manifests().items():
        for doc in documents:
            if doc["kind"] == "Pod":
                specs.append((name, doc["spec"]))
            elif doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
                specs.append((name, doc["spec"]["template"]["spec"]))
    return specs


def split_containers(spec: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(ckptd sidecar, trainer) of a pod spec."""
    every = spec.get("initContainers", []) + spec["containers"]
    sidecars = [c for c in every if "serve" in " ".join(c["command"]) and "ckptd" in " ".join(c["command"])]
    trainers = [c for c in every if "torch.distributed.run" in " ".join(c["command"])]
    assert len(sidecars) == 1 and len(trainers) == 1, [c["name"] for c in every]
    return sidecars[0], trainers[0]


def env_of(container: Dict[str, Any]) -> Dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def mounts_of(container: Dict[str, Any]) -> Dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def test_kubernetes_manifests_parse() -> None:
    manifests = load_manifests()
    assert {"ckptd-train-job.yaml", "ckptd-train-multinode.yaml"} <= set(manifests)
    for name, documents in manifests.items():
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), (name, doc)
    assert len(pod_specs()) == 2


@pytest.mark.parametrize("name, spec", pod_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_pod_shares_what_the_daemon_needs(name: str, spec: Dict[str, Any]) -> None:
    sidecar, trainer = split_containers(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert spec.get("shareProcessNamespace") is True, "the daemon checks the trainers' pids"
    if sidecar in spec.get("initContainers", []):
        assert sidecar.get("restartPolicy") == "Always", "an init container sidecar must be a native sidecar"
    pod_user = spec.get("securityContext", {}).get("runAsUser")
    users = {c["name"]: c.get("securityContext", {}).get("runAsUser", pod_user) for c in (sidecar, trainer)}
    assert len(set(users.values())) == 1 and None not in users.values() and 0 not in users.values(), users
    assert spec.get("terminationGracePeriodSeconds", 30) >= 600, "time to commit the last saves"

    shm = {mounts_of(c).get("/dev/shm") for c in (sidecar, trainer)}
    assert len(shm) == 1 and None not in shm, shm
    assert volumes[shm.pop()]["emptyDir"]["medium"] == "Memory"

    sidecar_env, trainer_env = env_of(sidecar), env_of(trainer)
    endpoint = sidecar_env["CKPTD_ENDPOINT"]
    assert endpoint.startswith("ipc://") and trainer_env["CKPTD_ENDPOINT"] == endpoint
    socket_dir = os.path.dirname(endpoint[len("ipc://") :])
    assert mounts_of(sidecar).get(socket_dir) and mounts_of(sidecar)[socket_dir] == mounts_of(trainer).get(socket_dir)
    assert "emptyDir" in volumes[mounts_of(sidecar)[socket_dir]]

    root = sidecar_env["CKPTD_ROOT"]
    assert trainer_env["CKPTD_ROOT"] == root
    checkpoint_mounts = [
        (path, volume) for path, volume in mounts_of(sidecar).items() if "persistentVolumeClaim" in volumes[volume]
    ]
    assert len(checkpoint_mounts) == 1
    path, volume = checkpoint_mounts[0]
    assert root.startswith(path + "/") and mounts_of(trainer).get(path) == volume, "same checkpoint volume, same path"


def test_kubernetes_multinode_settings_agree() -> None:
    documents = load_manifests()["ckptd-train-multinode.yaml"]
    service = next(d for d in documents if d["kind"] == "Service")
    job = next(d for d in documents if d["kind"] == "Job")
    spec = job["spec"]["template"]["spec"]
    sidecar, trainer = split_containers(spec)
    env = env_of(sidecar)
    nodes = int(env["CKPTD_NUM_NODES"])
    assert (
        job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    )
    assert service["spec"]["clusterIP"] == "None" and spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = env["CKPTD_LEADER"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}", "pod 0 of the Indexed Job leads"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    trainer_command = " ".join(trainer["command"])
    assert f"--nnodes {nodes}" in trainer_command and '--node-rank "$JOB_COMPLETION_INDEX"' in trainer_command
    assert f"--rdzv-endpoint {host}:" in trainer_command
    assert '--node "$JOB_COMPLETION_INDEX"' in " ".join(sidecar["command"])
    secret_volume = next(v for v in spec["volumes"] if "secret" in v)
    assert secret_volume["secret"]["defaultMode"] in (0o400, 0o600)
    secret_mount = next(m for m in sidecar["volumeMounts"] if m["name"] == secret_volume["name"])
    assert secret_mount.get("readOnly") is True and env["CKPTD_SECRET_SOURCE"].startswith(
        secret_mount["mountPath"] + "/"
    )
    assert not any(m["name"] == secret_volume["name"] for m in trainer["volumeMounts"]), "only the daemon reads it"


def k8s_expand(text: str, env: Dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def fake_secret_volume(directory: Path, secret: bytes) -> None:
    """What the kubelet makes of a Secret volume: a symlink to a timestamped directory, mode 0440."""
    data = directory / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (data / "cluster.secret").write_bytes(secret)
    (data / "cluster.secret").chmod(0o440)
    (directory / "..data").symlink_to(data.name)
    (directory / "cluster.secret").symlink_to("..data/cluster.secret")


@pytest.mark.parametrize("name, spec", pod_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_sidecar_command_starts_ckptd(name: str, spec: Dict[str, Any], tmp_path: Path) -> None:
    """The sidecar's command run here, with its mount paths moved under a temporary directory
    (node 0 for the several-node manifest, leading on a local port): the daemon comes up and serves."""
    sidecar, _ = split_containers(spec)
    base = Path(tempfile.mkdtemp(prefix="ckk", dir="/tmp"))
    try:
        moved = {}
        for mount in sidecar["volumeMounts"]:
            if mount["mountPath"] != "/dev/shm":  # the staging regions stay in the real /dev/shm
                moved[mount["mountPath"]] = str(base / mount["name"])
                os.makedirs(moved[mount["mountPath"]], exist_ok=True)
        env = dict(env_of(sidecar))
        for key, value in env.items():
            for old, new in moved.items():
                value = value.replace(old, new)
            env[key] = value
        if "CKPTD_LEADER" in env:
            env["CKPTD_LEADER"] = f"127.0.0.1:{free_port()}"
        if "CKPTD_SECRET_SOURCE" in env:
            subprocess.run(
                [PYTHON, "-m", "ckptd.service", "keygen", str(tmp_path / "s")], check=True, capture_output=True
            )
            fake_secret_volume(Path(os.path.dirname(env["CKPTD_SECRET_SOURCE"])), (tmp_path / "s").read_bytes())
        env.update(JOB_COMPLETION_INDEX="0", PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
        command = [k8s_expand(word, env) for word in sidecar["command"]]
        log = tmp_path / "sidecar.log"
        with open(log, "wb") as f:
            process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        daemon = Daemon(Path(env["CKPTD_ROOT"]), env["CKPTD_ENDPOINT"], process, log)
        try:
            wait_until_serving(daemon, timeout=30)
            assert process.poll() is None
        finally:
            assert daemon.stop() == 0, daemon.log()
        assert "serving root" in daemon.log() and "Traceback" not in daemon.log(), daemon.log()
        if "CKPTD_SECRET_SOURCE" in env:
            copied = Path(env["CKPTD_CLUSTER_SECRET"])
            assert copied.stat().st_mode & 0o777 == 0o600 and not copied.is_symlink()
            # Why the copy: ckptd refuses the Secret volume's file itself (a symlink, group-readable).
            direct = subprocess.run(
                [
                    PYTHON,
                    "-m",
                    "ckptd.service",
                    "serve",
                    "--root",
                    str(base / "x"),
                    "--endpoint",
                    f"ipc://{base}/x.sock",
                    "--node",
                    "0",
                    "--num-nodes",
                    "2",
                    "--leader",
                    env["CKPTD_LEADER"],
                    "--cluster-secret",
                    env["CKPTD_SECRET_SOURCE"],
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert direct.returncode == 2 and "cluster secret" in direct.stderr, direct.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
