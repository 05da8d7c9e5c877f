"""train.py of test_hosts_replication and test_hosts_membership: two workers train a sparse and
a dense table while a server host is taken away, the coordinator is killed, servers join or
leave. Joins as README.md's "Many hosts" section tells (PS_COORDINATOR, PS_TOKEN_FILE); the same
program runs under ``paramserver run`` on loopback for the reference.

    python train.py sync|async SEED PAUSE_AT[,PAUSE_AT...]

Each worker prints ``CLOCK c`` after each clock, and logs (stderr) when it routes by another
ring of servers (``worker[r] routes by the ring of servers [...]``, in the step that ends with
the next ``CLOCK``); rank 0, after each clock PAUSE_AT (-1: never), prints ``PAUSED c`` and
waits for the file ``resume`` in its folder (then removes it), so that the test takes a host
away, or kills or adds a role, at that clock while the other worker goes on (its requests in
flight).

* ``sync``: the gradients depend on the values pulled (a lost or doubled update changes the end
  result); after the last clock each worker meets the other at a barrier (the coordinator's)
  and writes every row and the dense table it pulls to ``final{rank}.npz``.
* ``async``: SGD with lr 1 of all-ones gradients, two pushes in flight at a time; each worker
  counts the acknowledged pushes of each key (and of the dense table), meets the other at a
  barrier and writes ``final{rank}.npz`` with its counts and the values it pulls then.
"""

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import paramserver as ps

MODE, SEED, PAUSES = sys.argv[1], int(sys.argv[2]), {int(c) for c in sys.argv[3].split(",")}
WORKERS, STEPS, KEYS, DIM, DENSE = 2, 12, 600, 8, 3000
assert MODE in ("sync", "async"), MODE


def pause(client: ps.Client, clock: int) -> None:
    print("CLOCK", clock, flush=True)
    if client.rank == 0 and clock in PAUSES:
        print("PAUSED", clock, flush=True)
        deadline = time.monotonic() + 60
        while not Path("resume").exists():
            if time.monotonic() > deadline:
                raise SystemExit("no ./resume file 60 s after the pause: the test is gone")
            time.sleep(0.01)
        Path("resume").unlink()


def train_sync(client: ps.Client) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    batches = [[rng.integers(0, KEYS, 300).astype(np.uint64) for _ in range(WORKERS)]
               for _ in range(STEPS)]  # fmt: skip
    emb = client.sparse_table(
        "rep/emb", dim=DIM, optimizer=ps.optim.SGD(lr=0.1), consistency="sync",
        init=ps.init.Normal(0.0, 0.1),
    )  # fmt: skip
    w = client.dense_table("rep/w", shape=(DENSE,), optimizer=ps.optim.SGD(lr=0.1),
                           consistency="sync")  # fmt: skip
    r = client.rank
    for step in range(STEPS):
        keys = batches[step][r]
        rows, wv = emb.pull(keys), w.pull()
        f1 = emb.push(keys, (rows * np.float32(0.5) + np.float32(r + 1)).astype(np.float32))
        f2 = w.push((wv * np.float32(0.3) + np.float32(step)).astype(np.float32))
        f1.result()
        f2.result()
        client.clock()
        pause(client, step + 1)
    client.barrier("rep/end", timeout=60)
    # a pull after the last clock waits for every worker's last clock
    return {"emb": emb.pull(np.arange(KEYS, dtype=np.uint64)), "w": w.pull()}


def train_async(client: ps.Client) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + client.rank)
    emb = client.sparse_table(
        "rep/emb", dim=DIM, optimizer=ps.optim.SGD(lr=1.0), consistency="async",
        init=ps.init.Zeros(),
    )  # fmt: skip
    dense = client.dense_table("rep/w", shape=(DENSE,), optimizer=ps.optim.SGD(lr=1.0),
                               consistency="async")  # fmt: skip
    counts, dense_acks = np.zeros(KEYS, np.int64), 0
    pending: list[tuple[np.ndarray, Any, Any]] = []  # (keys, push futures)

    def settle() -> None:
        nonlocal dense_acks
        keys, f1, f2 = pending.pop(0)
        f1.result()  # raises unless every live copy acknowledged it
        counts[keys.astype(np.int64)] += 1
        f2.result()
        dense_acks += 1

    for step in range(STEPS):
        keys = rng.choice(KEYS, size=200, replace=False).astype(np.uint64)
        ones = np.ones((len(keys), DIM), np.float32)
        pending.append((keys, emb.push(keys, ones), dense.push(np.ones(DENSE, np.float32))))
        if len(pending) > 2:  # two in flight at once: the host dies with some unanswered
            settle()
        client.clock()
        pause(client, step + 1)
    while pending:
        settle()
    client.barrier("rep/end", timeout=60)  # every worker's pushes acknowledged
    return {
        "counts": counts, "dense_acks": np.array(dense_acks),
        "emb": emb.pull(np.arange(KEYS, dtype=np.uint64)), "w": dense.pull(),
    }  # fmt: skip


logging.basicConfig(format="%(message)s")
logging.getLogger("paramserver.client.ring").setLevel(logging.INFO)
with ps.connect() as client:
    final = train_sync(client) if MODE == "sync" else train_async(client)
    np.savez(f"final{client.rank}.npz", **final)
print("FINISHED", client.rank, flush=True)
