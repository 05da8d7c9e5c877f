"""train.py of test_many_hosts' fault tests: async pushes of ones (SGD, lr 1) to a sparse table,
one leased part of the data set after another, a little slowly, so that a host can be taken
away mid-training. Joins as README.md's "Many hosts" section tells (PS_COORDINATOR,
PS_TOKEN_FILE). Prints ``LEASE p`` when it starts part p and ``DONE p`` when it finished it;
then meets the other live workers at a barrier and prints one RESULT line of JSON: the
table's rows as each server reports them and the values of every part's keys."""

import json
import socket
import time

import numpy as np

import paramserver as ps

PARTS, KEYS, STEPS, DIM = 24, 64, 6, 4

with ps.connect() as client:
    table = client.sparse_table(
        "faults/w", dim=DIM, optimizer=ps.optim.SGD(lr=1.0), init=ps.init.Constant(0.0),
        consistency="async",
    )  # fmt: skip
    for part in client.leases("faults/data", 1, PARTS):
        print("LEASE", part, flush=True)
        keys = np.arange(part * KEYS, (part + 1) * KEYS, dtype=np.uint64)
        for _ in range(STEPS):
            table.pull(keys)
            table.push(keys, np.ones((KEYS, DIM), np.float32)).result()
            client.clock()  # periodic checkpoints are taken at a clock
            time.sleep(0.05)
        print("DONE", part, flush=True)
    client.barrier("faults/end", timeout=60)
    result: dict[str, object] = {"rank": client.rank, "host": socket.gethostname()}
    rows = table.pull(np.arange(PARTS * KEYS, dtype=np.uint64))
    result["values"] = rows[:, 0].reshape(PARTS, KEYS).tolist()
    result["rows"] = {str(s["rank"]): s["tables"]["faults/w"]["rows"] for s in client.stats()}
print("RESULT", json.dumps(result), flush=True)
