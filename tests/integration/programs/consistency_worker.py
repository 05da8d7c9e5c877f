"""Worker program for the consistency tests; started once per worker with PS_* set.

Scenarios:
  train      a deterministic algorithm whose gradients depend on the pulled values; rank 0 saves
             the final parameters as .npy files in --out
  staleness  many pulls per clock, one worker --slow-factor times slower; writes its staleness
             histogram and the clocks it saw as JSON in --out
  nowait     the fast ranks run --steps clocks while the slow rank stays at clock 0 until they
             are done; writes the staleness histogram
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import paramserver as ps

SPARSE = {
    "s_sgd": ps.optim.SGD(lr=0.1),
    "s_adagrad": ps.optim.Adagrad(lr=0.1),
    "s_adam": ps.optim.Adam(lr=0.01),
}
DENSE = {"d_sgd": ps.optim.SGD(lr=0.1), "d_adam": ps.optim.Adam(lr=0.01)}
DIM, DENSE_SIZE, VOCAB, BATCH = 4, 6, 20, 8


def train(client: ps.Client, args: argparse.Namespace) -> None:
    sparse = {
        n: client.sparse_table(
            n, dim=DIM, init=ps.init.Constant(0.5), optimizer=o, consistency="sync"
        )
        for n, o in SPARSE.items()
    }
    dense = {
        n: client.dense_table(
            n, shape=(DENSE_SIZE,), init=ps.init.Constant(0.5), optimizer=o, consistency="sync"
        )
        for n, o in DENSE.items()
    }
    for step in range(args.steps):
        rng = np.random.default_rng([client.rank, step])
        keys = rng.integers(0, VOCAB, size=BATCH).astype(np.uint64)
        futures = []
        for t in sparse.values():
            w = t.pull(keys)
            noise = rng.standard_normal((BATCH, DIM)).astype(np.float32)
            futures.append(t.push(keys, (np.float32(0.1) * w + noise).astype(np.float32)))
        for d in dense.values():
            w = d.pull()
            noise = rng.standard_normal(DENSE_SIZE).astype(np.float32)
            futures.append(d.push((np.float32(0.1) * w + noise).astype(np.float32)))
        for f in futures:
            f.result()
        if client.rank == args.slow_rank:
            time.sleep(0.01 * (1 + step % 3))
        client.clock()
    client.barrier("done")
    if client.rank == 0:
        all_keys = np.arange(VOCAB, dtype=np.uint64)
        for n, t in sparse.items():
            np.save(os.path.join(args.out, f"{n}.npy"), t.pull(all_keys))
        for n, d in dense.items():
            np.save(os.path.join(args.out, f"{n}.npy"), d.pull())
    client.barrier("saved")


def staleness(client: ps.Client, args: argparse.Namespace) -> None:
    emb = client.sparse_table("st_emb", dim=2, consistency=args.consistency)
    dense = client.dense_table("st_dense", shape=(4,), consistency=args.consistency)
    client.barrier("start")
    slow = client.rank == args.slow_rank
    for step in range(args.steps):
        for i in range(args.pulls):
            emb.pull(np.array([i, step], dtype=np.uint64))
        dense.pull()
        emb.push(np.array([step], dtype=np.uint64), np.ones((1, 2), np.float32))
        time.sleep(0.002 * (args.slow_factor if slow else 1))
        client.clock()
    hist: dict[int, int] = {}
    for t in (emb, dense):
        for s, n in t.staleness().items():
            hist[s] = hist.get(s, 0) + n
    with open(os.path.join(args.out, f"staleness_{client.rank}.json"), "w") as f:
        json.dump({"rank": client.rank, "hist": hist}, f)
    client.barrier("end")


def nowait(client: ps.Client, args: argparse.Namespace) -> None:
    emb = client.sparse_table("nw_emb", dim=2, consistency="async")
    client.barrier("start")
    flag = os.path.join(args.out, "fast_done")
    if client.rank == args.slow_rank:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)  # stays at clock 0 the whole time
        client.clock()
    else:
        for step in range(args.steps):
            emb.pull(np.array([step], dtype=np.uint64))
            emb.push(np.array([step], dtype=np.uint64), np.ones((1, 2), np.float32)).result()
            client.clock()
        with open(os.path.join(args.out, f"staleness_{client.rank}.json"), "w") as f:
            json.dump({"rank": client.rank, "hist": emb.staleness()}, f)
        open(flag, "w").close()
    client.barrier("end")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["train", "staleness", "nowait"])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pulls", type=int, default=5)
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-factor", type=float, default=5.0)
    p.add_argument("--consistency", default="sync")
    args = p.parse_args()
    with ps.connect() as client:
        {"train": train, "staleness": staleness, "nowait": nowait}[args.scenario](client, args)


if __name__ == "__main__":
    main()
