"""Soak: 4 workers pull and push for a while; errors (must be 0), throughput and server memory
over time, one JSON line per interval, then a summary.

Not part of the default CI run (``--quick``, about 20 s, is exercised by a test).

    python benchmarks/soak.py                        # 10 minutes, a line every 30 s
    python benchmarks/soak.py --seconds 3600 --interval 60
    python benchmarks/soak.py --quick                # 8 s, a line every 2 s
"""

from __future__ import annotations

import threading
import time

import numpy as np
from common import emit, parser, rss_mib

import paramserver as ps

WORKERS, SERVERS, VOCAB, BATCH, DIM = 4, 2, 50_000, 512, 16


def work(
    client: ps.Client, stop: threading.Event, ops: list[int], errors: list[str], rank: int
) -> None:
    try:
        emb = client.sparse_table("soak_emb", dim=DIM, optimizer=ps.optim.Adagrad(lr=0.05))
        dense = client.dense_table("soak_dense", shape=(10_000,), optimizer=ps.optim.SGD(lr=0.01))
        rng = np.random.default_rng(rank)
        # a pool of batches: repeated key lists exercise the servers' key caches too
        pool = [rng.integers(0, VOCAB, BATCH).astype(np.uint64) for _ in range(16)]
        step = 0
        while not stop.is_set():
            keys = pool[step % len(pool)] if step % 2 else rng.integers(0, VOCAB, BATCH)
            keys = np.asarray(keys, dtype=np.uint64)
            rows = emb.pull(keys)
            w = dense.pull()
            f1 = emb.push(keys, (0.01 * rows).astype(np.float32))
            f2 = dense.push((0.01 * w).astype(np.float32))
            f1.result()
            f2.result()
            client.clock()
            ops[rank] += 4
            step += 1
    except Exception as exc:  # counted and reported: a soak must end with 0
        errors.append(f"worker[{rank}]: {type(exc).__name__}: {exc}")


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=float, default=0.0, help="how long (default 600; quick 8)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between lines")
    args = p.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 600.0)
    interval = args.interval or (2.0 if args.quick else 30.0)
    timeouts = ps.Timeouts(heartbeat_interval=0.5, heartbeat_timeout=10.0, request=60.0)
    with ps.LocalCluster(servers=SERVERS, workers=WORKERS, timeouts=timeouts) as cluster:
        clients = [cluster.connect(rank=r) for r in range(WORKERS)]
        servers = {n: pid for n, pid in cluster.pids.items() if n.startswith("server")}
        stop = threading.Event()
        ops = [0] * WORKERS
        errors: list[str] = []
        threads = [
            threading.Thread(target=work, args=(c, stop, ops, errors, c.rank), daemon=True)
            for c in clients
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
        first: dict[str, float] = {}
        last_ops, last_t = 0, start
        while (now := time.monotonic()) - start < seconds:
            time.sleep(min(interval, max(0.0, seconds - (now - start))))
            now = time.monotonic()
            rss = {n: round(rss_mib(pid), 1) for n, pid in servers.items()}
            total = sum(ops)
            if not first and last_ops > 0:  # the baseline: warmed up, the key space filled
                first = rss
            emit(
                "soak",
                f"t={now - start:.0f}s",
                (total - last_ops) / max(now - last_t, 1e-9),
                "ops/s",
                errors=len(errors),
                server_rss_mib=rss,
                growth_mib=round(sum(rss.values()) - sum(first.values()), 1) if first else None,
            )
            last_ops, last_t = total, now
        stop.set()
        for t in threads:
            t.join(timeout=60)
        elapsed = time.monotonic() - start
        rss = {n: round(rss_mib(pid), 1) for n, pid in servers.items()}
        first = first or rss
        emit("soak", "errors", len(errors), "errors", first=errors[:3])
        emit(
            "soak",
            "server memory growth after warm-up",
            max(0.0, sum(rss.values()) - sum(first.values())),
            "MiB",
            first=first,
            last=rss,
        )
        emit("soak", "throughput", sum(ops) / elapsed, "ops/s", seconds=round(elapsed, 1))
        if errors:
            raise SystemExit(f"{len(errors)} errors: {errors[:3]}")


if __name__ == "__main__":
    main()
