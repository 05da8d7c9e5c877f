"""Adding and removing servers while training: what a move of key ranges costs.

A sparse table of ROWS rows x 16 float32 (Adagrad, sync) on 2 servers, a dense table of
DENSE float32 (whole on server[0]) and a large one of ``--big`` float32 (cut over the servers),
one worker training on random batches and both dense tables whole; a third server joins (the
large table is cut anew over 3 servers), then server[0] is drained (``LocalCluster.add_server``
and ``remove_server``): its keys and the small dense table move, and the large table is cut
anew over the 2 servers left. Per move: its time (announced to switched, as the coordinator
measured), the rows and bytes the servers sent each other (of them, the dense tables'), and
how long training paused: the longest step during the move against the median step without
one (the baseline, same run).

    python benchmarks/scaling.py                 # 1,000,000 rows, a 4,194,304-element table
    python benchmarks/scaling.py --quick         # 20,000 rows, 262,144 elements
    python benchmarks/scaling.py --big 0         # without the large dense table
    python benchmarks/scaling.py --replication 2 # every key and dense table on 2 servers
                                                 # (dense tables whole, not cut: on 0 and 1,
                                                 # the drain of 0 copies them to 2)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from common import emit, parser

import paramserver as ps

DENSE = 200_000  # elements: under partition.DENSE_SPLIT_ELEMENTS, so held whole


BIG = 1 << 22  # elements of the large dense table (--big): cut over the servers


def steps(emb: Any, client: Any, rng: np.random.Generator, rows: int, n: int,
          big: int) -> list[float]:  # fmt: skip
    took = []
    small = DENSE if big >= 0 else 0  # big < 0: no dense tables at all
    dense = [client.dense_table(name, size, optimizer=ps.optim.Adagrad(lr=0.1),
                                consistency="sync")
             for name, size in (("mlp", small), ("big", big)) if size > 0]  # fmt: skip
    for _ in range(n):
        t0 = time.perf_counter()
        keys = rng.integers(0, rows, 4096).astype(np.uint64)
        g = emb.pull(keys) * np.float32(0.01)
        emb.push(keys, g).result(60)
        for d in dense:
            d.push(d.pull() * np.float32(0.01)).result(60)
        client.clock()
        took.append(time.perf_counter() - t0)
    return took


def moves(client: Any) -> list[dict[str, Any]]:
    """The moves the coordinator finished: kind, rank, seconds, rows, bytes."""
    ask = client.endpoint.request("coordinator", {"kind": "status"}, what="status")
    done: list[dict[str, Any]] = ask.result(10)["status"]["moves"]
    return done


def moving(client: Any, emb: Any, rng: np.random.Generator, rows: int, done: int,
           big: int) -> list[float]:  # fmt: skip
    """Train until the coordinator reports ``done`` moves finished; the step times."""
    took: list[float] = []
    while len(moves(client)) < done:
        took += steps(emb, client, rng, rows, 1, big)
    return took


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--big", type=int, default=-1, help="elements of the large dense table")
    p.add_argument("--replication", type=int, default=1, help="copies of every key range")
    args = p.parse_args()
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    big = args.big if args.big >= 0 else (1 << 18 if args.quick else BIG)
    with ps.LocalCluster(servers=2, workers=1, replication=args.replication) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.1),
                                  consistency="sync")  # fmt: skip
        for i in range(0, rows, 200_000):
            emb.pull(np.arange(i, min(rows, i + 200_000), dtype=np.uint64))
        rng = np.random.default_rng(0)
        base = statistics.median(steps(emb, client, rng, rows, 20, big))
        cluster.add_server()
        during = {"join": moving(client, emb, rng, rows, 1, big)}
        steps(emb, client, rng, rows, 5, big)
        cluster.remove_server(0)
        during["drain"] = moving(client, emb, rng, rows, 2, big)
        for move, took in zip(moves(client), during.values(), strict=True):
            case = (
                f"{move['kind']} server[{move['rank']}], {rows} rows x 16, dense {max(big, 0)}"
                + (f", replication {args.replication}" if args.replication > 1 else "")
            )
            emit("scaling", f"{case}: move", move["seconds"], "s", rows=move["rows"],
                 mib=round(move["bytes"] / 2**20, 2),
                 dense_mib=round(move.get("dense_bytes", 0) / 2**20, 2),
                 dense_tables=move.get("dense_tables", []))  # fmt: skip
            emit("scaling", f"{case}: longest step", max(took), "s", baseline=base,
                 higher_is_better=False, steps_during=len(took))  # fmt: skip


if __name__ == "__main__":
    main()
