"""Worker program for the recovery tests: trains one epoch of a data set shard by shard, taking
shards as leases, and appends each completed shard id to ``<out>/done-<rank>-<pid>.txt``.

Usage: lease_worker.py COORDINATOR RANK OUT SHARDS [SECONDS_PER_SHARD]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import paramserver as ps
from tests.timing import FAST


def main() -> None:
    coordinator, rank, out, shards = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.05
    timeouts = FAST
    client = ps.connect(coordinator, rank=rank, timeouts=timeouts, transport="tcp")
    print(f"start_clock {client.current_clock}", flush=True)
    emb = client.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr=0.1), consistency="sync")
    path = os.path.join(out, f"done-{rank}-{os.getpid()}.txt")
    for shard in client.leases("toy", 1, shards):
        keys = np.arange(shard * 10, shard * 10 + 10, dtype=np.uint64)
        rows = emb.pull(keys)
        emb.push(keys, np.ones_like(rows)).result()
        client.clock()
        time.sleep(pause)
        # recorded only once trained: a shard leased but not recorded is trained again elsewhere
        with open(path, "a") as f:
            f.write(f"{shard}\n")
    print(f"end_clock {client.current_clock}", flush=True)
    client.close()


if __name__ == "__main__":
    main()
