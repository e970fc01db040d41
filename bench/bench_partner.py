"""What a partner copy costs (issue 16): one committed checkpoint of the bench's state (1.27 GB at
--scale 1), sent by `PartnerSender` to a `PartnerReceiver` over CURVE on loopback, as the next node's
daemon would receive it. Prints the time, the throughput and the CPU both sides used.

    .venv/bin/python bench/bench_partner.py [--scale 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Holder  # noqa: E402

from ckptd.client import CheckpointManager, SharingPattern, StateComponent
from ckptd.service.partners import PartnerReceiver, PartnerSender
from ckptd.service.store import CheckpointStore


class Provider:
    def __init__(self, nbytes: int) -> None:
        chunk = 64 << 20
        tensors = {f"t{i}": torch.full((chunk // 4,), float(i)) for i in range(max(1, nbytes // chunk))}
        self.model = Holder(tensors)

    def get_state_components(self) -> List[StateComponent]:
        return [StateComponent("model", self.model, SharingPattern.GLOBAL)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 1.27 GB")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ckpartner", dir=args.dir))
    endpoint = f"ipc://{base}/d.sock"
    source = base / "node0"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd.service", "serve", "--root", str(source), "--endpoint", endpoint],
        stderr=subprocess.DEVNULL,
    )
    try:
        provider = Provider(int(1.27e9 * args.scale))
        with CheckpointManager(provider, str(source), endpoint=endpoint, auto_start=False) as manager:
            manager.save_checkpoint(1).wait(600)
    finally:
        daemon.terminate()
        daemon.wait()
    secret = secrets.token_bytes(32)
    receiver = PartnerReceiver(str(base / "node1"), secret, None, "127.0.0.1")
    receiver.start()
    sender = PartnerSender(CheckpointStore(str(source)), 0, secret, lambda: receiver.endpoint)
    copy = base / "node1" / "partner" / "step_00000001" / "checkpoint_manifest.json"
    nbytes = sum(p.stat().st_size for p in (source / "step_00000001").rglob("*") if p.is_file())
    cpu, wall = time.process_time(), time.monotonic()
    sender.start()
    while not copy.exists():
        time.sleep(0.005)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    sender.close()
    receiver.close()
    print(f"partner copy of {nbytes / 1e9:.2f} GB: {wall:.2f} s, {nbytes / 1e9 / wall:.2f} GB/s, "
          f"CPU {cpu:.2f} s (sender and receiver, one process; files checked on arrival)")  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
