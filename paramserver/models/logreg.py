"""Sparse logistic regression trained with FTRL-Proximal on the servers.

The worker program hashes each example's categorical features to uint64 keys, pulls their
weights (one row of width 1 per key), computes the logistic loss gradient and pushes it; the
servers apply FTRL with L1, so most weights stay exactly zero.

Run it as the demo (``paramserver demo``), or as the worker script of a cluster:
``paramserver run -s 2 -w 2 -m paramserver.models.logreg`` is not supported by ``run``; use
``paramserver run -s 2 -w 2 paramserver/models/logreg.py``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import paramserver as ps

__all__ = ["SyntheticCTR", "auc", "demo", "train"]


@dataclass(frozen=True)
class SyntheticCTR:
    """Generated click data (labelled synthetic): ``fields`` categorical fields per example,
    power-law value frequencies, labels drawn from a known logistic model.

    Example:
        x_train, y_train, x_test, y_test = SyntheticCTR().make()
    """

    examples: int = 200_000
    fields: int = 16
    vocab: int = 20_000
    test_fraction: float = 0.2
    seed: int = 0

    def make(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        # value ids with a Zipf-like law; key = (field, value) hashed into uint64
        values = np.minimum(rng.zipf(1.3, size=(self.examples, self.fields)), self.vocab) - 1
        field_ids = np.arange(self.fields, dtype=np.uint64)
        keys = (field_ids[None, :] << np.uint64(40)) | values.astype(np.uint64)
        true_w = rng.normal(0.0, 1.0, size=(self.fields, self.vocab)) * (
            rng.random((self.fields, self.vocab)) < 0.3
        )
        logits = true_w[np.arange(self.fields)[None, :], values].sum(axis=1) - 0.5
        y = (rng.random(self.examples) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        n_test = int(self.examples * self.test_fraction)
        return keys[n_test:], y[n_test:], keys[:n_test], y[:n_test]


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (rank formula, ties averaged).

    Example:
        auc(np.array([0, 1]), np.array([0.1, 0.9]))  # 1.0
    """
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _predict(table: ps.SparseTable, bias: ps.DenseTable, x: np.ndarray, create: bool) -> np.ndarray:
    w = table.pull(x, create=create)[..., 0]  # (batch, fields)
    z = w.sum(axis=1) + bias.pull()[0]
    p: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return p


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train(
    client: ps.Client,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    epochs: int = 3,
    batch: int = 1024,
    consistency: str = "async",
    log: Any = print,
) -> dict[str, Any]:
    """Train on this worker's share of the data (rows rank::num_workers); returns metrics."""
    x_train, y_train, x_test, y_test = data
    table = client.sparse_table(
        "logreg/w",
        dim=1,
        optimizer=ps.optim.FTRL(alpha=0.1, beta=1.0, l1=1.0),
        consistency=consistency,
    )
    bias = client.dense_table(
        "logreg/b", shape=(1,), optimizer=ps.optim.SGD(lr=0.05), consistency=consistency
    )
    mine = slice(client.rank, None, client.num_workers)
    x, y = x_train[mine], y_train[mine]
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        losses = []
        pending: list[ps.Future[None]] = []
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            p = _predict(table, bias, xb, create=True)
            losses.append(_logloss(yb, p))
            g = (p - yb).astype(np.float32)  # d loss / d logit, summed per key by the client
            grads = np.repeat(g[:, None], xb.shape[1], axis=1)[..., None]
            for f in pending:
                f.result()
            pending = [table.push(xb, grads), bias.push(np.array([g.mean()], dtype=np.float32))]
            client.clock()
        for f in pending:
            f.result()
        client.barrier("epoch")
        p_test = np.concatenate(
            [
                _predict(table, bias, x_test[i : i + 8192], create=False)
                for i in range(0, len(x_test), 8192)
            ]
        )
        nonzero = sum(int(t["tables"]["logreg/w"]["rows"]) for t in client.stats())
        rec = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "test_loss": _logloss(y_test, p_test),
            "test_auc": auc(y_test, p_test),
            "rows": nonzero,
            "seconds": time.perf_counter() - start,
        }
        history.append(rec)
        log(
            f"worker[{client.rank}] epoch {epoch}: train loss {rec['train_loss']:.4f}  "
            f"test loss {rec['test_loss']:.4f}  test AUC {rec['test_auc']:.4f}  "
            f"({rec['seconds']:.1f}s)"
        )
    return {"history": history}


def demo(servers: int = 2, workers: int = 1, epochs: int = 3) -> int:
    """The main job until the full demo exists: FTRL logistic regression on generated data."""
    print(
        f"paramserver demo: sparse logistic regression (FTRL, L1) on synthetic CTR data, "
        f"{servers} servers, {workers} worker(s)"
    )
    if workers > 1:
        return ps.launch.run_job(
            [__file__, "--epochs", str(epochs)], servers=servers, workers=workers
        )
    data = SyntheticCTR().make()
    with ps.LocalCluster(servers=servers, workers=1) as cluster:
        client = cluster.connect()
        result = train(client, data, epochs=epochs)
    losses = [h["train_loss"] for h in result["history"]]
    print("train loss by epoch:", " -> ".join(f"{v:.4f}" for v in losses))
    return 0 if losses[-1] < losses[0] else 1


def main(argv: list[str] | None = None) -> int:
    """Worker entry under ``paramserver run``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--consistency", default="async")
    args = p.parse_args(argv)
    data = SyntheticCTR().make()
    with ps.connect() as client:
        train(client, data, epochs=args.epochs, consistency=args.consistency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
