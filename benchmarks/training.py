"""Workload 5: training throughput (examples/s) of the FTRL logistic-regression program
(``paramserver.models.logreg.train_worker`` on synthetic Criteo-format data) with 1 worker +
1 server, against a single-process NumPy implementation of the same model on the same data in
the same run; then with every combination of the ``-w`` worker counts and ``-s`` server counts.

    python benchmarks/training.py                     # 1 epoch of 200,000 examples; -w 1 2 4 -s 1
    python benchmarks/training.py -w 1 8 32 -s 1 4    # a larger machine
    python benchmarks/training.py --quick
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
from common import emit, parser

import paramserver as ps
from paramserver.data.ctr import CTRBatch, SyntheticCriteo
from paramserver.models.logreg import BIAS_KEY, train_worker

BATCH = 512
ALPHA, BETA, L1, L2 = 0.2, 1.0, 0.1, 1.0  # train_worker's defaults


def numpy_train(train: CTRBatch, test: CTRBatch, epochs: int) -> float:
    """The same model in one process: each example's keys plus the bias key index one weight;
    per batch the distinct keys are gathered, the logistic gradient summed per key and
    FTRL-Proximal (alpha, beta, l1, l2 as train_worker) applied to them. Weights live in flat
    arrays indexed by a sorted key vocabulary. Returns seconds for ``epochs`` epochs including
    the test evaluation after each, as ``train_worker`` does."""
    alpha, beta = np.float32(ALPHA), np.float32(BETA)
    l1, l2 = np.float32(L1), np.float32(L2)
    t0 = time.perf_counter()
    bias = np.full((1,), BIAS_KEY, np.uint64)
    vocab = np.unique(np.concatenate([train.keys.reshape(-1), test.keys.reshape(-1), bias]))
    z = np.zeros(len(vocab), np.float32)
    n = np.zeros(len(vocab), np.float32)
    w = np.zeros(len(vocab), np.float32)

    def with_bias(keys: np.ndarray) -> np.ndarray:
        return np.concatenate([keys, np.full((len(keys), 1), BIAS_KEY, np.uint64)], axis=1)

    for _ in range(epochs):
        for i in range(0, len(train), BATCH):
            xb, yb = with_bias(train.keys[i : i + BATCH]), train.y[i : i + BATCH]
            uniq, inv = np.unique(xb, return_inverse=True)
            slots = np.searchsorted(vocab, uniq)
            wb = w[slots][inv.reshape(xb.shape)]
            p = 1.0 / (1.0 + np.exp(-wb.sum(axis=1, dtype=np.float64)))
            g = (p - yb).astype(np.float32)
            gk = np.bincount(
                inv.reshape(-1), weights=np.repeat(g, xb.shape[1]), minlength=len(uniq)
            ).astype(np.float32)
            n_new = n[slots] + gk * gk
            sigma = (np.sqrt(n_new) - np.sqrt(n[slots])) / alpha
            zk = z[slots] + gk - sigma * w[slots]
            z[slots], n[slots] = zk, n_new
            w[slots] = np.where(
                np.abs(zk) <= l1,
                np.float32(0),
                -(zk - np.sign(zk) * l1) / ((beta + np.sqrt(n_new)) / alpha + l2),
            )
        xt = with_bias(test.keys)
        pt = 1.0 / (1.0 + np.exp(-w[np.searchsorted(vocab, xt)].sum(axis=1)))
        assert pt.shape == test.y.shape
    return time.perf_counter() - t0


def worker_main(epochs: int, examples: int) -> None:
    train, test = SyntheticCriteo(examples=examples).make()
    with ps.connect() as client:
        t0 = time.perf_counter()
        res = train_worker(client, train, test, epochs=epochs, batch=BATCH, show=False)
        seconds = time.perf_counter() - t0
        auc = res["curve"][-1]["test_auc"] if res["curve"] else None
        print(json.dumps({"rank": client.rank, "seconds": seconds, "auc": auc}), flush=True)


def cluster_run(workers: int, servers: int, epochs: int, examples: int) -> tuple[float, float]:
    out = io.StringIO()
    code = ps.launch.run_job(
        [
            os.path.abspath(__file__),
            "--worker",
            "--epochs",
            str(epochs),
            "--examples",
            str(examples),
        ],
        servers=servers,
        workers=workers,
        out=out,
    )
    if code != 0:
        sys.stderr.write(out.getvalue())
        raise SystemExit(f"training job with {workers} workers failed ({code})")
    recs = []
    for line in out.getvalue().splitlines():
        _, _, body = line.partition("] ")
        if body.startswith("{"):
            recs.append(json.loads(body))
    assert len(recs) == workers, out.getvalue()
    train, _ = SyntheticCriteo(examples=examples).make()
    total = len(train) * epochs  # every example once per epoch, over all workers (leases)
    auc = next(r["auc"] for r in recs if r["rank"] == 0)
    return total / max(r["seconds"] for r in recs), auc


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("-w", "--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("-s", "--servers", type=int, nargs="+", default=[1])
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--examples", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    epochs = args.epochs or 1
    examples = args.examples or (20_000 if args.quick else 200_000)
    if args.worker:
        worker_main(epochs, examples)
        return
    train, test = SyntheticCriteo(examples=examples).make()
    n_train = len(train) * epochs
    t_np = min(numpy_train(train, test, epochs) for _ in range(1 if args.quick else 3))
    base = n_train / t_np
    emit("training", "single-process NumPy FTRL trainer", base, "examples/s")
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect()
        t0 = time.perf_counter()
        train_worker(client, train, test, epochs=epochs, batch=BATCH, show=False)
        t_ps = time.perf_counter() - t0
    emit(
        "training",
        "PS 1 worker + 1 server (in this process)",
        n_train / t_ps,
        "examples/s",
        baseline=base,
        target_ratio=0.7,
        met=bool(n_train / t_ps >= 0.7 * base),
    )
    for s in args.servers:
        for w in args.workers:
            rate, auc = cluster_run(w, s, epochs, examples)
            emit(
                "training",
                f"PS {w} workers + {s} servers (processes)",
                rate,
                "examples/s",
                baseline=base,
                workers=w,
                servers=s,
                test_auc=round(auc, 4),
            )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
