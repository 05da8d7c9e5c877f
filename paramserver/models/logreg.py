"""Sparse logistic regression trained with FTRL-Proximal (L1) on the servers.

Each example's hashed (field, value) keys, plus one bias key, index one weight each (a sparse
table of width 1). A worker pulls the weights of a batch's distinct keys, computes the logistic
loss gradient per example and pushes it per key (repeated keys summed by the client); the
servers apply FTRL-Proximal, whose L1 term keeps most weights exactly zero. Training data is
handed out by the coordinator as leases (shards of rows); rank 0 evaluates after every epoch.

    paramserver train logreg --data movielens --epochs 3
    paramserver run -s 2 -w 4 paramserver/models/logreg.py --data synthetic   (a process per worker)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.data.evaluate import auc, logloss
from paramserver.data.hashing import hash_field
from paramserver.data.shards import ArrayShards
from paramserver.models.program import (
    Report,
    add_common_args,
    add_ctr_args,
    load_ctr,
    progress,
    run,
)

__all__ = ["evaluate", "main", "parser", "train", "train_worker"]

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
    p = np.concatenate(
        [predict(table, test.keys[i : i + 16384]) for i in range(0, len(test), 16384)]
    )
    w = table.pull(train_keys, create=False)[:, 0]
    return {
        "test_auc": auc(test.y, p),
        "test_logloss": logloss(test.y, p),
        "nonzero_weights": int(np.count_nonzero(w)),
    }


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
    table = client.sparse_table(
        "logreg/w",
        dim=1,
        optimizer=ps.optim.FTRL(alpha=alpha, beta=beta, l1=l1, l2=l2),
        consistency=consistency,
    )
    shards = ArrayShards("logreg/train", train, rows=shard_rows)
    train_keys = np.unique(_with_bias(train.keys))
    # under sync or ssp a pull must wait for the clocks, so it cannot go out a step early
    prefetch = table.spec.mode[0] == "async"
    lead = client.rank == 0
    curve: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(1, epochs + 1):
        losses: list[float] = []
        seen = 0
        parts = progress(
            shards.parts(client, epoch, consistency),
            desc=f"logreg epoch {epoch}",
            show=show and lead,
        )
        pending: list[ps.Future[None]] = []
        for part in parts:
            nxt: tuple[np.ndarray, ps.Future[np.ndarray]] | None = None
            for i in range(0, len(part), batch):
                tick = time.perf_counter()
                yb = part.y[i : i + batch]
                if nxt is None:
                    keys = _with_bias(part.keys[i : i + batch])
                    rows = table.pull_async(keys)
                else:
                    keys, rows = nxt
                w = rows.result()[..., 0]
                nxt = None
                if prefetch and i + batch < len(part):
                    # the next batch's weights travel while this batch is computed; they miss
                    # this batch's update (one step more staleness, what async allows anyway)
                    k2 = _with_bias(part.keys[i + batch : i + 2 * batch])
                    nxt = (k2, table.pull_async(k2))
                p = 1.0 / (1.0 + np.exp(-w.sum(axis=1, dtype=np.float64)))
                losses.append(logloss(yb, p) * len(yb))
                seen += len(yb)
                g = (p - yb).astype(np.float32)
                grads = np.broadcast_to(g[:, None, None], (*keys.shape, 1))
                for f in pending:
                    f.result()
                pending = [table.push(keys, np.ascontiguousarray(grads))]
                client.report(examples=len(yb))  # examples/s in paramserver status
                client.clock()
                steps += 1
                if client.rank == slow_rank and slow_factor > 1:
                    time.sleep((slow_factor - 1) * (time.perf_counter() - tick))
                if lead and eval_every and steps % eval_every == 0:
                    m = evaluate(table, test, train_keys)
                    curve.append({"seconds": time.perf_counter() - t0, "step": steps, **m})
        for f in pending:
            f.result()
        client.barrier("logreg/epoch")
        if lead:
            m = evaluate(table, test, train_keys)
            curve.append({"seconds": time.perf_counter() - t0, "step": steps, **m})
            if report is not None:
                # the loss of this worker's batches, before each update (progressive validation)
                report.epoch(epoch, train_loss=float(np.sum(losses) / max(1, seen)), **m)
    client.barrier("logreg/done")
    return {"curve": curve, "staleness": table.staleness(), "steps": steps}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paramserver train logreg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    add_ctr_args(p)
    p.add_argument("--alpha", type=float, default=0.2, help="FTRL learning rate alpha")
    p.add_argument("--beta", type=float, default=1.0, help="FTRL beta")
    p.add_argument("--l1", type=float, default=0.1, help="FTRL L1 strength")
    p.add_argument("--l2", type=float, default=1.0, help="FTRL L2 strength")
    p.add_argument(
        "--baseline", action="store_true", help="also fit scikit-learn's logistic regression"
    )
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: load the data, train, report (rank 0)."""
    tr, te, what = load_ctr(args)
    lead = client.rank == 0
    report = Report(
        "logreg",
        args.out,
        show=lead,
        data=what,
        baseline_auc=args.baseline_auc,
        title=f"FTRL logistic regression, {what}",
    )
    if lead:
        print(
            f"logreg: {what}: {len(tr)} train / {len(te)} test examples, {tr.fields} fields; "
            f"{client.num_servers} servers, {client.num_workers} workers",
            flush=True,
        )
        if args.baseline:
            from paramserver.models.baselines import sklearn_logreg

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
    out = train_worker(
        client, tr, te, epochs=args.epochs, batch=args.batch, consistency=args.consistency,
        alpha=args.alpha, beta=args.beta, l1=args.l1, l2=args.l2, report=report,
        show=not args.no_progress,
    )  # fmt: skip
    if lead:
        report.info["staleness"] = {str(k): v for k, v in out["staleness"].items()}
        js, png = report.save()
        print(f"logreg: wrote {js} and {png}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paramserver train logreg ...`` and ``python -m paramserver.models.logreg ...``."""
    return run("paramserver.models.logreg", parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
