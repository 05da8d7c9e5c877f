"""Adding and removing servers while training: what a move of key ranges costs.

A sparse table of ROWS rows x 16 float32 (Adagrad, sync) on 2 servers and a dense table of
DENSE float32 (whole on server[0]), one worker training on random batches and the whole dense
table; a third server joins, then server[0] is drained (``LocalCluster.add_server`` and
``remove_server``): its keys and the dense table move. Per move: its time (announced to
switched, as the coordinator measured), the rows and bytes the servers sent each other (of
them, the dense table's), and how long training paused: the longest step during the move
against the median step without one (the baseline, same run).

    python benchmarks/scaling.py                 # 1,000,000 rows
    python benchmarks/scaling.py --quick         # 20,000 rows
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from common import emit, parser

import paramserver as ps

DENSE = 200_000  # elements: under partition.DENSE_SPLIT_ELEMENTS, so held whole


def steps(emb: Any, client: Any, rng: np.random.Generator, rows: int, n: int) -> list[float]:
    took = []
    dense = client.dense_table("mlp", DENSE, optimizer=ps.optim.Adagrad(lr=0.1),
                               consistency="sync")  # fmt: skip
    for _ in range(n):
        t0 = time.perf_counter()
        keys = rng.integers(0, rows, 4096).astype(np.uint64)
        g = emb.pull(keys) * np.float32(0.01)
        emb.push(keys, g).result(60)
        dense.push(dense.pull() * np.float32(0.01)).result(60)
        client.clock()
        took.append(time.perf_counter() - t0)
    return took


def moves(client: Any) -> list[dict[str, Any]]:
    """The moves the coordinator finished: kind, rank, seconds, rows, bytes."""
    ask = client.endpoint.request("coordinator", {"kind": "status"}, what="status")
    done: list[dict[str, Any]] = ask.result(10)["status"]["moves"]
    return done


def moving(cluster: ps.LocalCluster, client: Any, emb: Any, rng: np.random.Generator,
           rows: int, done: int) -> list[float]:  # fmt: skip
    """Train until the coordinator reports ``done`` moves finished; the step times."""
    took: list[float] = []
    while len(moves(client)) < done:
        took += steps(emb, client, rng, rows, 1)
    return took


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=0)
    args = p.parse_args()
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.1),
                                  consistency="sync")  # fmt: skip
        for i in range(0, rows, 200_000):
            emb.pull(np.arange(i, min(rows, i + 200_000), dtype=np.uint64))
        rng = np.random.default_rng(0)
        base = statistics.median(steps(emb, client, rng, rows, 20))
        cluster.add_server()
        during = {"join": moving(cluster, client, emb, rng, rows, 1)}
        steps(emb, client, rng, rows, 5)
        cluster.remove_server(0)
        during["drain"] = moving(cluster, client, emb, rng, rows, 2)
        for move, took in zip(moves(client), during.values(), strict=True):
            case = f"{move['kind']} server[{move['rank']}], {rows} rows x 16"
            emit("scaling", f"{case}: move", move["seconds"], "s", rows=move["rows"],
                 mib=round(move["bytes"] / 2**20, 2),
                 dense_mib=round(move.get("dense_bytes", 0) / 2**20, 2),
                 dense_tables=move.get("dense_tables", []))  # fmt: skip
            emit("scaling", f"{case}: longest step", max(took), "s", baseline=base,
                 higher_is_better=False, steps_during=len(took))  # fmt: skip


if __name__ == "__main__":
    main()
