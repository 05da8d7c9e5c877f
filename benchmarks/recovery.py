"""Recovery from a server killed with SIGKILL: seconds from the kill until a training step
completes again (detection, restart, restore from the newest checkpoint, resend).

    python benchmarks/recovery.py                    # default timeouts, 5 kills
    python benchmarks/recovery.py --quick            # 1 kill
    python benchmarks/recovery.py --heartbeat-timeout 2
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit, parser

import paramserver as ps


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--transport", default="auto", help="auto (dense over shared memory) or tcp")
    args = p.parse_args()
    kills = args.repeat or (1 if args.quick else 5)
    timeouts = ps.Timeouts(
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout
    )
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        with ps.LocalCluster(
            servers=2, workers=1, timeouts=timeouts, checkpoint_dir=ckpt, checkpoint_every=0.5
        ) as cluster:
            client = cluster.connect(transport=args.transport)
            emb = client.sparse_table("emb", dim=16, consistency="sync")
            dense = client.dense_table("w", shape=(100_000,), consistency="sync")
            step = 0

            def train() -> None:
                nonlocal step
                keys = np.arange(step, step + 1000, dtype=np.uint64)
                rows = emb.pull(keys)
                w = dense.pull()
                emb.push(keys, np.ones_like(rows)).result()
                dense.push(np.ones_like(w)).result()
                client.clock()
                step += 1

            for _ in range(kills):
                seen = (ckpt / "LATEST").stat().st_mtime if (ckpt / "LATEST").exists() else 0
                while not (ckpt / "LATEST").exists() or (ckpt / "LATEST").stat().st_mtime == seen:
                    train()  # until a fresh checkpoint exists
                pid = client.stats()[1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                train()
                times.append(time.monotonic() - killed)
                emit("recovery", "server SIGKILL to next completed step", times[-1], "s")
                for _ in range(5):
                    train()
    emit(
        "recovery",
        f"median over {kills} kills (heartbeat_timeout {args.heartbeat_timeout}s)",
        statistics.median(times),
        "s",
        target=5.0,
        higher_is_better=False,
    )


if __name__ == "__main__":
    main()
