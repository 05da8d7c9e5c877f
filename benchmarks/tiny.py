"""Workload 3 (ps-lite's benchmark shape): many keys, tiny values. Push and pull of 10,000,000
distinct uint64 keys x 1 float32, stored (summed) on the server, 1 worker + 1 server.

The server sums: SGD with lr=1 applied to the negated values adds them exactly. The same keys
are sent every step, as ps-lite's benchmark does.

    python benchmarks/tiny.py            # 10,000,000 keys
    python benchmarks/tiny.py --quick    # 100,000 keys
"""

from __future__ import annotations

import numpy as np
from common import emit, median_time, parser

import paramserver as ps
from paramserver.config import Limits


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    n = 100_000 if args.quick else 10_000_000
    repeat = args.repeat or (3 if args.quick else 7)
    rng = np.random.default_rng(0)
    keys = rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.uint64)
    vals = rng.integers(1, 4, size=(n, 1)).astype(np.float32)
    neg = -vals
    # one request carries every key, as ps-lite's benchmark sends them (the default limit refuses
    # more than 4M keys a request: a guard against a peer's oversized request)
    limits = Limits(request_keys=max(n, Limits().request_keys))
    with ps.LocalCluster(servers=1, workers=1, limits=limits) as cluster:
        client = cluster.connect()
        table = client.sparse_table("tiny", dim=1, optimizer=ps.optim.SGD(lr=1.0))
        pushes = [0]

        def push() -> None:
            table.push(keys, neg).result()
            pushes[0] += 1

        t_push = median_time(push, repeat, warmup=1)
        t_pull = median_time(lambda: table.pull(keys), repeat, warmup=1)
        got = table.pull(keys)
        assert np.array_equal(got, vals * pushes[0]), "server did not store the sums"
    emit("tiny", f"push {n} keys x 1 float32 (summed)", n / t_push / 1e6, "M keys/s", target=50.0)
    emit("tiny", f"pull {n} keys x 1 float32", n / t_pull / 1e6, "M keys/s", target=40.0)


if __name__ == "__main__":
    main()
