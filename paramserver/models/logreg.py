"""Sparse logistic regression trained with FTRL-Proximal (L1) on the servers.

Each example's hashed (field, value) keys, plus one bias key, index one weight each (a sparse
table of width 1). A worker pulls the weights of a batch's distinct keys, computes the logistic
loss gradient per example and pushes it per key (repeated keys summed by the client); the
servers apply FTRL-Proximal, whose L1 term keeps most weights exactly zero. Training data is
handed out by the coordinator as leases (parts of the data); rank 0 evaluates after every epoch.
Data: the built-in sets, or your own file (``--data criteo|libsvm|csv|parquet:PATH``), streamed
part by part.

    paramserver train logreg --data movielens --epochs 3
    paramserver train logreg -w 4 --data libsvm:train.svm --test test.svm
    paramserver run -s 2 -w 4 paramserver/models/logreg.py --data synthetic   (a process per worker)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.data.evaluate import auc, logloss
from paramserver.data.hashing import hash_field
from paramserver.models.ctr import (
    CTRData,
    add_ctr_args,
    array_data,
    open_ctr_run,
    predict_blocks,
    test_blocks,
)
from paramserver.models.program import PushesInFlight, Report, entry, finish, fit, program_parser

__all__ = ["LogregTrainer", "evaluate", "main", "parser", "train", "train_on", "train_worker"]

BIAS_KEY = np.uint64(hash_field(1 << 20, np.zeros(1, np.uint64))[0])


def _with_bias(keys: np.ndarray) -> np.ndarray:
    out = np.empty((len(keys), keys.shape[1] + 1), dtype=np.uint64)
    out[:, :-1] = keys
    out[:, -1] = BIAS_KEY
    return out


def predict(table: ps.SparseTable, keys: np.ndarray, *, create: bool = False) -> np.ndarray:
    """Click probabilities of examples with hashed ``keys`` (examples x fields)."""
    w = table.pull(_with_bias(keys), create=create)[..., 0]
    p: np.ndarray = 1.0 / (1.0 + np.exp(-w.sum(axis=1, dtype=np.float64)))
    return p


def evaluate(table: ps.SparseTable, test: CTRBatch, train_keys: np.ndarray) -> dict[str, Any]:
    """Test AUC and log-loss, and how many weights of the training keys are nonzero."""
    _, p = predict_blocks(test_blocks(test), lambda b: predict(table, b.keys))
    w = table.pull(train_keys, create=False)[:, 0]
    return {
        "test_auc": auc(test.y, p),
        "test_logloss": logloss(test.y, p),
        "nonzero_weights": int(np.count_nonzero(w)),
    }


class LogregTrainer(PushesInFlight):
    """The model's own part of a step: pull the weights of a batch's keys (the next batch's
    prefetched under async), push the logistic loss gradient per key."""

    def __init__(
        self, client: ps.Client, test: Callable[[], Iterator[CTRBatch]], *,
        consistency: str, alpha: float, beta: float, l1: float, l2: float,
        train_keys: np.ndarray | None = None, slow_rank: int = -1, slow_factor: float = 1.0,
        eval_every: int = 0,
    ) -> None:  # fmt: skip
        self.client = client
        self.table = client.sparse_table(
            "logreg/w", dim=1, optimizer=ps.optim.FTRL(alpha=alpha, beta=beta, l1=l1, l2=l2),
            consistency=consistency,
        )  # fmt: skip
        self.test = test
        self.train_keys = train_keys
        # under sync or ssp a pull must wait for the clocks, so it cannot go out a step early
        self.prefetch = self.table.spec.mode[0] == "async"
        self.pending: list[ps.Future[None]] = []
        self.nxt: tuple[np.ndarray, ps.Future[np.ndarray]] | None = None
        self.slow_rank, self.slow_factor, self.eval_every = slow_rank, slow_factor, eval_every
        self.steps = 0
        self.t0 = time.perf_counter()
        self.curve: list[dict[str, Any]] = []

    def step(self, batch: CTRBatch, nxt: CTRBatch | None) -> tuple[float, int]:
        tick = time.perf_counter()
        if self.nxt is None:
            keys = _with_bias(batch.keys)
            rows = self.table.pull_async(keys)
        else:
            keys, rows = self.nxt
        w = rows.result()[..., 0]
        self.nxt = None
        if self.prefetch and nxt is not None:
            # the next batch's weights travel while this batch is computed; they miss this
            # batch's update (one step more staleness, what async allows anyway)
            k2 = _with_bias(nxt.keys)
            self.nxt = (k2, self.table.pull_async(k2))
        p = 1.0 / (1.0 + np.exp(-w.sum(axis=1, dtype=np.float64)))
        loss = logloss(batch.y, p) * len(batch)
        g = (p - batch.y).astype(np.float32)
        grads = np.broadcast_to(g[:, None, None], (*keys.shape, 1))
        self.flush()
        self.pending = [self.table.push(keys, np.ascontiguousarray(grads))]
        self.steps += 1
        if self.client.rank == self.slow_rank and self.slow_factor > 1:
            time.sleep((self.slow_factor - 1) * (time.perf_counter() - tick))
        if self.client.rank == 0 and self.eval_every and self.steps % self.eval_every == 0:
            self.evaluate()
        return loss, len(batch)

    def evaluate(self) -> dict[str, float]:
        y, p = predict_blocks(self.test, lambda b: predict(self.table, b.keys))
        m: dict[str, Any] = {"test_auc": auc(y, p), "test_logloss": logloss(y, p)}
        if self.train_keys is not None:
            w = self.table.pull(self.train_keys, create=False)[:, 0]
            m["nonzero_weights"] = int(np.count_nonzero(w))
        self.curve.append({"seconds": time.perf_counter() - self.t0, "step": self.steps, **m})
        return m


def train_worker(
    client: ps.Client,
    train: CTRBatch,
    test: CTRBatch,
    *,
    epochs: int = 3,
    batch: int = 512,
    consistency: str = "async",
    alpha: float = 0.2,
    beta: float = 1.0,
    l1: float = 0.1,
    l2: float = 1.0,
    shard_rows: int = 8192,
    slow_rank: int = -1,
    slow_factor: float = 1.0,
    eval_every: int = 0,
    report: Report | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Train on the leased shards of ``train``; rank 0 evaluates on ``test`` (after every epoch,
    and every ``eval_every`` steps if set). Returns the curve and the staleness histogram."""
    data = array_data("logreg", train, test, rows=shard_rows, batch=batch)
    return train_on(
        client, data, epochs=epochs, consistency=consistency, alpha=alpha, beta=beta, l1=l1,
        l2=l2, slow_rank=slow_rank, slow_factor=slow_factor, eval_every=eval_every,
        report=report, show=show,
    )  # fmt: skip


def train_on(
    client: ps.Client, data: CTRData, *, epochs: int, consistency: str, report: Report | None,
    show: bool, **settings: Any,
) -> dict[str, Any]:  # fmt: skip
    """Train on ``data`` (a feed of batches and a test set) with :func:`program.fit`."""
    train_keys = None if data.train is None else np.unique(_with_bias(data.train.keys))
    trainer = LogregTrainer(
        client, data.test, consistency=consistency, train_keys=train_keys, **settings
    )
    fit(client, data.feed, trainer, name="logreg", epochs=epochs, consistency=consistency,
        report=report, show=show)  # fmt: skip
    return {"curve": trainer.curve, "staleness": trainer.table.staleness(), "steps": trainer.steps}


def parser() -> argparse.ArgumentParser:
    p = program_parser("logreg", __doc__)
    add_ctr_args(p)
    p.add_argument("--alpha", type=float, default=0.2, help="FTRL learning rate alpha")
    p.add_argument("--beta", type=float, default=1.0, help="FTRL beta")
    p.add_argument("--l1", type=float, default=0.1, help="FTRL L1 strength")
    p.add_argument("--l2", type=float, default=1.0, help="FTRL L2 strength")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also fit scikit-learn's logistic regression (rank 0 reads the data into memory)",
    )
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: open the data, train, report (rank 0)."""
    data, report = open_ctr_run(client, args, "logreg", "FTRL logistic regression")
    lead = client.rank == 0
    if lead and args.baseline:
        from paramserver.models.baselines import sklearn_logreg
        from paramserver.models.ctr import load_ctr

        tr, te, _ = load_ctr(args)
        base = sklearn_logreg(tr, te)
        report.info["baseline"] = {
            "name": "scikit-learn LogisticRegression, one process",
            **base,
        }
        report.info["baseline_auc"] = base["test_auc"]
        print(
            f"logreg: single-process scikit-learn baseline: test AUC {base['test_auc']:.4f}",
            flush=True,
        )
    out = train_on(
        client, data, epochs=args.epochs, consistency=args.consistency, alpha=args.alpha,
        beta=args.beta, l1=args.l1, l2=args.l2, report=report, show=not args.no_progress,
    )  # fmt: skip
    if lead:
        report.info["staleness"] = {str(k): v for k, v in out["staleness"].items()}
    return finish(report, lead)


main = entry("paramserver.models.logreg", parser, train)


if __name__ == "__main__":
    sys.exit(main())
