"""Worker program of test_recovery_cli: trains, kills server 1 with SIGKILL halfway, trains on.

``paramserver run`` restarts the server; this worker's requests wait for it and are resent.
"""

import os
import signal

import numpy as np

import paramserver as ps

with ps.connect() as client:
    emb = client.sparse_table("emb", dim=4, consistency="sync")
    dense = client.dense_table("w", shape=(64,), consistency="sync")
    for step in range(40):
        if step == 10:
            os.kill(client.stats()[1]["pid"], signal.SIGKILL)
        keys = np.arange(step, step + 50, dtype=np.uint64)
        rows = emb.pull(keys)
        w = dense.pull()
        emb.push(keys, np.ones_like(rows)).result()
        dense.push(np.ones_like(w)).result()
        client.clock()
    print(f"done at clock {client.current_clock}", flush=True)
