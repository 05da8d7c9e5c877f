"""Workload 4: start and memory. ``LocalCluster(servers=2)`` until the first pull is answered;
shutdown time; resident memory of a server holding 1,000,000 x 16 float32 rows with Adagrad.

    python benchmarks/startup.py            # 5 starts, 1,000,000 rows
    python benchmarks/startup.py --quick    # 1 start, 50,000 rows
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from common import emit, parser, rss_mib

import paramserver as ps


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    starts = args.repeat or (1 if args.quick else 5)
    rows = 50_000 if args.quick else 1_000_000
    ready, down = [], []
    for _ in range(starts):
        t0 = time.perf_counter()
        cluster = ps.LocalCluster(servers=2, workers=1)
        cluster.start()
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=16)
        emb.pull(np.arange(8, dtype=np.uint64))
        ready.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        cluster.close()
        down.append(time.perf_counter() - t1)
    emit(
        "startup",
        "LocalCluster(servers=2) ready, first pull answered",
        statistics.median(ready),
        "s",
        target=1.0,
        higher_is_better=False,
        runs=starts,
    )
    emit(
        "startup",
        "LocalCluster(servers=2) shutdown",
        statistics.median(down),
        "s",
        target=0.5,
        higher_is_better=False,
        runs=starts,
    )
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect()
        pid = cluster.pids["server 0"]
        idle = rss_mib(pid)
        emb = client.sparse_table(
            "emb", dim=16, init=ps.init.Normal(std=0.01), optimizer=ps.optim.Adagrad(lr=0.05)
        )
        keys = np.arange(rows, dtype=np.uint64) * np.uint64(2654435761)
        for i in range(0, rows, 200_000):
            emb.push(
                keys[i : i + 200_000], np.ones((len(keys[i : i + 200_000]), 16), np.float32)
            ).result()
        stats = client.stats()[0]["tables"]["emb"]
        assert stats["rows"] == rows
        time.sleep(0.5)  # at rest: a server hands freed message buffers back when idle
        emit(
            "startup",
            f"server RSS, {rows} x 16 float32 rows + Adagrad",
            rss_mib(pid),
            "MiB",
            target=300.0,
            higher_is_better=False,
            idle_rss_mib=round(idle, 1),
            table_bytes=stats["bytes"],
        )


if __name__ == "__main__":
    main()
