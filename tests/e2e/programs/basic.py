"""Worker program of test_e2e: joins with ``ps.connect()`` (PS_* variables), creates a sparse
table, pushes, clocks, meets the others at a barrier and prints what it saw."""

import os
import sys

import numpy as np

import paramserver as ps

env = {k: os.environ.get(k, "") for k in ("PS_RANK", "PS_NUM_WORKERS", "PS_COORDINATOR")}
print("env", " ".join(f"{k}={v}" for k, v in env.items()))
with ps.connect() as client:
    emb = client.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr=1.0))
    keys = np.array([1, 2, 100 + client.rank], dtype=np.uint64)
    emb.push(keys, np.ones((3, 4), dtype=np.float32)).result(30)
    client.clock()
    client.barrier()
    rows = emb.pull(keys)
    print(f"rank {client.rank} of {client.num_workers} consistency {emb.spec.consistency}")
    print(f"rows {[round(float(v), 4) for v in rows[:, 0]]}")
    print("two lines\non stderr", file=sys.stderr)
