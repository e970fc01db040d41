"""How the commit path grows with the number of nodes (issue 17).

N simulated nodes, each a real daemon in a network namespace of its own (tests/netns_cluster.py,
needs root), all ranks played by one light process over the real protocol with a tiny state (a
GLOBAL and a PER_RANK component). For each N it measures, over timed saves one after another:

  commit latency   from the leader receiving the last node's report (every node durable) to the
                   last node's daemon told the outcome (median; every process's time.monotonic(),
                   one host); "leader commit" is the manifest, fsyncs and rename inside it, "announced"
                   the leader's last send of the outcome, "ranks told" runs on to the last rank told,
                   "accepted->told" from the last hand-over accepted to the last rank told
  floor            printed beside it, from the leader's first send of the outcome ("published":
                   the commit durable) to the last node told, against a bare broadcast of a frame
                   of the same size to the same namespaces (bench/scale_floor.py) with three kinds
                   of receiver: the least a Python daemon on 2 shared cores pays to tell every node
  leader CPU       the node-0 daemon's user+system CPU per commit, its idle CPU (heartbeats)
                   over the same time taken off
  follower CPU     a follower daemon's CPU per save (median over followers, heartbeats included)
  leader msgs      frames and bytes the leader received and sent per save (heartbeats excluded)
  manifest         bytes of checkpoint_manifest.json
  heartbeats       frames and bytes per second at the leader while idle, and the leader's idle CPU
  daemon memory    resident memory per daemon (median and max)

Prints a table and writes a PNG of latency and leader CPU against N (with matplotlib installed).

    sudo .venv/bin/python bench/bench_scale.py [--nodes 2,8,32,64,128,256] [--saves 20]
    sudo .venv/bin/python bench/bench_scale.py --nodes 8,16,32 --ranks-per-node 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import scale_floor  # noqa: E402
import zmq  # noqa: E402
from netns_cluster import LEADER_PORT, LightRanks, NetnsCluster, netns_available, node_address  # noqa: E402

from ckptd.proto import messages  # noqa: E402

HEARTBEAT_TYPES = ("heartbeat", "node_hello", "ok")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def totals(traffic: Dict[str, Any], heartbeats: bool) -> List[int]:
    """[frames, bytes] received + sent, of heartbeat types only or of every other type."""
    frames = nbytes = 0
    for direction in ("received", "sent"):
        for msg_type, (count, size) in traffic[direction].items():
            if (msg_type in HEARTBEAT_TYPES) == heartbeats:
                frames, nbytes = frames + count, nbytes + size
    return [frames, nbytes]


def median_ms(seconds: List[float]) -> Optional[float]:
    """The median of `seconds` in ms (None if empty)."""
    return round(statistics.median(seconds) * 1000, 2) if seconds else None


def median_span_ms(moments: Dict[int, Dict[str, float]], start: str, end: str) -> Optional[float]:
    """The median ms from moment `start` to moment `end` over the saves whose timeline has both."""
    return median_ms([m[end] - m[start] for m in moments.values() if start in m and end in m])


def measure(
    nodes: int, ranks_per_node: int, saves: int, secret: Path, idle_s: float, floor_rounds: int
) -> Dict[str, Any]:
    cluster = NetnsCluster(nodes, peer_timeout=30.0)
    with cluster:
        started = time.monotonic()
        cluster.start(secret)
        startup_s = time.monotonic() - started
        leader = cluster.pid(0)

        follower_cpu: List[float] = []
        outcome_frame_bytes: List[int] = []

        async def run() -> List[Any]:
            ranks = LightRanks(cluster, ranks_per_node)
            await ranks.connect()
            try:
                for step in range(1, 4):  # warm up: first connections, first plans
                    await ranks.save(step)
                time.sleep(idle_s / 2)
                before_idle = (
                    time.monotonic(),
                    cpu_seconds(leader),
                    totals(cluster.status(0)["cluster"]["traffic"], True),
                )
                time.sleep(idle_s)
                after_idle = (
                    time.monotonic(),
                    cpu_seconds(leader),
                    totals(cluster.status(0)["cluster"]["traffic"], True),
                )
                traffic_before = totals(cluster.status(0)["cluster"]["traffic"], False)
                followers = [cluster.pid(n) for n in range(1, nodes)]
                followers_before = [cpu_seconds(pid) for pid in followers]
                cpu_before, t_before = cpu_seconds(leader), time.monotonic()
                results = [await ranks.save(step) for step in range(4, 4 + saves)]
                cpu_after, t_after = cpu_seconds(leader), time.monotonic()
                follower_cpu.extend(cpu_seconds(pid) - before for pid, before in zip(followers, followers_before))
                status = cluster.status(0)["cluster"]
                count, nbytes = status["traffic"]["sent"].get(messages.COMMITTED, [1, 0])
                outcome_frame_bytes.append(nbytes // max(1, count))
                traffic_after = totals(status["traffic"], False)
                moments = {m["step"]: m for m in status["timeline"] if m["job"] == ranks.job}
                for node in range(1, nodes):  # when each follower got each outcome
                    for told in cluster.status(node)["cluster"]["told"]:
                        if told["job"] == ranks.job and told["step"] in moments:
                            moment = moments[told["step"]]
                            moment["nodes_told"] = max(moment.get("nodes_told", 0.0), told["at"])
                busy = [cpu_after - cpu_before, t_after - t_before]
                return [results, before_idle, after_idle, traffic_before, traffic_after, *busy, moments]
            finally:
                ranks.close()

        results, before_idle, after_idle, traffic_before, traffic_after, cpu_busy, busy_s, moments = asyncio.run(run())
        ranks_told = [
            r.told_at - moments[r.step]["last_report"] for r in results if "last_report" in moments.get(r.step, {})
        ]
        failed = [r for r in results if not r.committed]
        idle_s_measured = after_idle[0] - before_idle[0]
        idle_cpu_rate = (after_idle[1] - before_idle[1]) / idle_s_measured
        memory = [resident_mb(cluster.pid(n)) for n in range(nodes)]
        manifest = cluster.root / f"step_{3 + saves:08d}" / "checkpoint_manifest.json"
        row = {
            "nodes": nodes,
            "ranks": nodes * ranks_per_node,
            "startup_s": round(startup_s, 1),
            "failed": len(failed),
            "failures": sorted({reason for r in failed for reason in r.reasons})[:3],
            "commit_latency_ms": median_span_ms(moments, "last_report", "nodes_told"),
            "leader_commit_ms": median_span_ms(moments, "last_report", "committed"),
            "announced_ms": median_span_ms(moments, "last_report", "announced"),
            "told_after_publish_ms": median_span_ms(moments, "published", "nodes_told"),
            "ranks_told_ms": median_ms(ranks_told),
            "accepted_to_told_ms": round(statistics.median(r.commit_latency_s for r in results) * 1000, 2),
            "handover_ms": round(statistics.median(r.handed_over_s for r in results) * 1000, 2),
            "leader_cpu_ms": round(max(0.0, cpu_busy - idle_cpu_rate * busy_s) / saves * 1000, 2),
            "follower_cpu_ms": round(statistics.median(follower_cpu) / saves * 1000, 2) if follower_cpu else None,
            "leader_msgs": round((traffic_after[0] - traffic_before[0]) / saves, 1),
            "leader_kb": round((traffic_after[1] - traffic_before[1]) / saves / 1024, 1),
            "manifest_kb": round(manifest.stat().st_size / 1024, 1) if manifest.exists() else None,
            "leader_idle_cpu_pct": round(idle_cpu_rate * 100, 2),
            "heartbeat_per_s": round((after_idle[2][0] - before_idle[2][0]) / idle_s_measured, 1),
            "heartbeat_kb_per_s": round((after_idle[2][1] - before_idle[2][1]) / idle_s_measured / 1024, 2),
            "daemon_mb_median": round(statistics.median(memory), 1),
            "daemon_mb_max": round(max(memory), 1),
        }
        if floor_rounds and nodes > 1:
            cluster.stop()
            for kind in scale_floor.KINDS:
                row[f"floor_{kind}_ms"] = broadcast_floor(cluster, kind, floor_rounds, outcome_frame_bytes[0])
        return row


def broadcast_floor(cluster: NetnsCluster, kind: str, rounds: int, frame_bytes: int) -> Optional[float]:
    """scale_floor.py's broadcast to every other namespace of `cluster` (its daemons stopped), with
    receivers of `kind`: the median ms from the first send to the last arrival."""
    server_public, server_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    endpoint = f"tcp://{node_address(0)}:{LEADER_PORT + 1}"
    script = str(HERE / "scale_floor.py")

    def inside(node: int, *args: str) -> List[str]:
        return ["ip", "netns", "exec", cluster.namespace(node), sys.executable, script, *args]

    sender = subprocess.Popen(
        inside(0, "send", endpoint, str(cluster.nodes - 1), server_secret.decode(), str(rounds), str(frame_bytes)),
        stdout=subprocess.PIPE,
        text=True,
    )
    receivers = [
        subprocess.Popen(inside(node, "recv", kind, endpoint, server_public.decode(), public.decode(), secret.decode()))
        for node in range(1, cluster.nodes)
    ]
    try:
        out, _ = sender.communicate(timeout=120 + cluster.nodes)
        for receiver in receivers:
            receiver.wait(30)
    finally:
        for process in [sender, *receivers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    return json.loads(out)["every_receiver_ms"] if sender.returncode == 0 else None


COLUMNS = [
    ("nodes", "nodes"),
    ("ranks", "ranks"),
    ("commit_latency_ms", "commit ms"),
    ("leader_commit_ms", "leader commit ms"),
    ("announced_ms", "announced ms"),
    ("ranks_told_ms", "ranks told ms"),
    ("accepted_to_told_ms", "accepted->told ms"),
    ("leader_cpu_ms", "leader CPU ms/commit"),
    ("follower_cpu_ms", "follower CPU ms/save"),
    ("leader_msgs", "leader msgs/save"),
    ("leader_kb", "leader KB/save"),
    ("manifest_kb", "manifest KB"),
    ("heartbeat_per_s", "hb frames/s"),
    ("heartbeat_kb_per_s", "hb KB/s"),
    ("leader_idle_cpu_pct", "leader idle CPU %"),
    ("daemon_mb_median", "daemon MB (med)"),
    ("daemon_mb_max", "daemon MB (max)"),
    ("startup_s", "start s"),
    ("failed", "failed"),
]


FLOOR_COLUMNS = [
    ("nodes", "nodes"),
    ("told_after_publish_ms", "ckptd: published->every node told ms"),
    *((f"floor_{kind}_ms", f"bare broadcast, {kind} receivers ms") for kind in scale_floor.KINDS),
]


def table(rows: List[Dict[str, Any]], columns: List[Tuple[str, str]] = COLUMNS) -> str:
    """`rows` as a text table of `columns` ((key, title) pairs); a missing value prints as "-"."""
    widths = [max(len(title), *(len(str(row.get(key, "-"))) for row in rows)) for key, title in columns]
    lines = ["  ".join(title.rjust(w) for (_, title), w in zip(columns, widths))]
    lines += ["  ".join(str(row.get(key, "-")).rjust(w) for (key, _), w in zip(columns, widths)) for row in rows]
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    nodes = [row["nodes"] for row in rows]
    figure, latency = plt.subplots(figsize=(7, 4))
    latency.plot(nodes, [row["commit_latency_ms"] for row in rows], "o-", color="tab:blue", label="every node told")
    latency.plot(nodes, [row["announced_ms"] for row in rows], "^:", color="tab:cyan", label="leader done announcing")
    floors = [row for row in rows if row.get("floor_LoopSocket_ms") is not None]
    if floors:
        latency.plot(
            [row["nodes"] for row in floors],
            [row["told_after_publish_ms"] for row in floors],
            "o-",
            color="tab:purple",
            label="commit durable -> every node told",
        )
        for kind, style in (("LoopSocket", "x--"), ("blocking", "+--")):
            latency.plot(
                [row["nodes"] for row in floors],
                [row[f"floor_{kind}_ms"] for row in floors],
                style,
                color="tab:gray",
                label=f"floor: bare broadcast, {kind} receivers",
            )
    latency.legend(loc="upper left", fontsize="small")
    latency.set_xscale("log", base=2)
    latency.set_xlabel("nodes")
    latency.set_ylabel("commit latency, median (ms)", color="tab:blue")
    cpu = latency.twinx()
    cpu.plot(nodes, [row["leader_cpu_ms"] for row in rows], "s--", color="tab:red", label="leader CPU (ms/commit)")
    cpu.set_ylabel("leader CPU per commit (ms)", color="tab:red")
    figure.suptitle(f"ckptd commit path, {rows[0]['ranks'] // rows[0]['nodes']} rank(s) per node, 2 shared cores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2,8,32,64,128,256")
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--idle", type=float, default=4.0, help="seconds of idle heartbeats measured")
    parser.add_argument(
        "--floor-rounds", type=int, default=20, help="broadcasts per receiver kind for the floor (0: no floor)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--replot", type=Path, help="only draw the PNG (next to it) of a JSON this bench wrote")
    args = parser.parse_args()
    if args.replot:
        rows = json.loads(args.replot.read_text())
        print(table(rows))
        print(table(rows, FLOOR_COLUMNS))
        plot(rows, args.replot.with_suffix(".png"))
        return
    if not netns_available():
        sys.exit("bench_scale needs root and iproute2 (it creates network namespaces)")
    args.out.mkdir(parents=True, exist_ok=True)
    secret = args.out / "scale.secret"
    if not secret.exists():
        subprocess.run([sys.executable, "-m", "ckptd.service", "keygen", str(secret)], check=True, capture_output=True)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        row = measure(nodes, args.ranks_per_node, args.saves, secret, args.idle, args.floor_rounds)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if any("floor_blocking_ms" in row for row in rows):
        print("\nThe floor: telling every node, ckptd against a bare broadcast to the same namespaces")
        print(table(rows, FLOOR_COLUMNS))
    name = f"scale_{args.ranks_per_node}rpn"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    png = args.out / f"{name}.png"
    print(f"plot: {png}" if plot(rows, png) else "plot: skipped (pip install matplotlib for the PNG)")


if __name__ == "__main__":
    main()
