"""Workload 6: capacity. A sparse table of 20,000,000 rows x 16 float32 (SGD) spread over 1, 2
and 4 servers: rows and resident memory per server.

    python benchmarks/capacity.py                    # 20,000,000 rows; -s 1 2 4
    python benchmarks/capacity.py --quick            # 200,000 rows
    python benchmarks/capacity.py --rows 5000000 -s 8
"""

from __future__ import annotations

import time

import numpy as np
from common import emit, parser, rss_mib

import paramserver as ps


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("-s", "--servers", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    rows = args.rows or (200_000 if args.quick else 20_000_000)
    chunk = 1_000_000
    for servers in args.servers:
        with ps.LocalCluster(servers=servers, workers=1) as cluster:
            client = cluster.connect()
            emb = client.sparse_table("cap", dim=16, optimizer=ps.optim.SGD(lr=0.1))
            t0 = time.perf_counter()
            for i in range(0, rows, chunk):
                keys = np.arange(i, min(rows, i + chunk), dtype=np.uint64)
                emb.pull(keys * np.uint64(0x9E3779B97F4A7C15))
            fill = time.perf_counter() - t0
            stats = client.stats()
            per = [
                (
                    s["rank"],
                    s["tables"]["cap"]["rows"],
                    s["tables"]["cap"]["bytes"],
                    rss_mib(s["pid"]),
                )
                for s in stats
            ]
            assert sum(r for _, r, _, _ in per) == rows
            for rank, r, b, rss in per:
                emit(
                    "capacity",
                    f"{rows} rows x 16 on {servers} servers: server[{rank}]",
                    rss,
                    "MiB RSS",
                    rows=r,
                    table_mib=round(b / 2**20, 1),
                    bytes_per_row=round(rss * 2**20 / max(r, 1), 1),
                )
            emit(
                "capacity",
                f"{rows} rows x 16 on {servers} servers: fill rate",
                rows / fill / 1e6,
                "M rows/s",
            )


if __name__ == "__main__":
    main()
