"""DeepFM for click prediction: field embeddings in a sparse table, the MLP in dense tables.

One :class:`~paramserver.torch.Embedding` of width ``dim + 1`` per hashed key holds the key's
first-order weight (column 0) and its factor vector; the FM term is the usual
``0.5 * ((sum v)^2 - sum v^2)``; the deep part is an MLP over the concatenated field vectors and
the dense inputs, kept on the servers by :class:`~paramserver.torch.DenseParameters`. The
servers run Adagrad for the embeddings and Adam for the MLP. Data as logreg's (built-in sets,
or ``--data criteo|libsvm|csv|parquet:PATH``); training stops after ``--patience`` epochs
without a better test AUC.

    paramserver train deepfm --data movielens --epochs 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.data.evaluate import auc, logloss
from paramserver.models.ctr import (
    CTRData,
    add_ctr_args,
    array_data,
    open_ctr_run,
    predict_blocks,
)
from paramserver.models.program import (
    Report,
    Stopping,
    entry,
    finish,
    fit,
    program_parser,
)

__all__ = ["DeepFM", "DeepFMTrainer", "main", "parser", "train", "train_on", "train_worker"]

# The program's rates: they do not overfit the synthetic data within the default 3 epochs (test
# AUC rising each epoch; 0.05 / 1e-3, still train_worker's defaults, peaked after one epoch and
# fell every epoch after).
LR_SPARSE, LR_DENSE = 0.003, 3e-4


def DeepFM(fields: int, dense: int, dim: int, hidden: tuple[int, ...]) -> Any:
    """The DeepFM head (everything but the embeddings) as a torch module."""
    import torch
    from torch import nn

    class _Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            width = fields * dim + dense
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, 1))
            self.mlp = nn.Sequential(*layers)

        def forward(self, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            first = e[..., 0].sum(dim=1)
            v = e[..., 1:]
            fm = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
            deep = self.mlp(torch.cat([v.reshape(len(v), -1), x], dim=1)).squeeze(1)
            out: torch.Tensor = first + fm + deep
            return out

    return _Head()


class DeepFMTrainer:
    """The model's own part of a step: embeddings pulled (the next batch's prefetched), the
    MLP pulled, forward and backward in torch, both pushed."""

    def __init__(
        self, client: ps.Client, test: Callable[[], Iterator[CTRBatch]], *, fields: int,
        dense_inputs: int, dim: int, hidden: tuple[int, ...], lr_sparse: float, lr_dense: float,
        consistency: str,
    ) -> None:  # fmt: skip
        import torch

        from paramserver.torch import DenseParameters, Embedding

        torch.manual_seed(0)
        self.emb = Embedding(
            client, "deepfm/emb", dim + 1, optimizer=ps.optim.Adagrad(lr=lr_sparse),
            init=ps.init.Normal(std=0.01), consistency=consistency,
        )  # fmt: skip
        self.head = DeepFM(fields, dense_inputs, dim, hidden)
        self.dense = DenseParameters(
            client, "deepfm/mlp", self.head, optimizer=ps.optim.Adam(lr=lr_dense),
            consistency=consistency,
        )  # fmt: skip
        self.test = test
        self.curve: list[dict[str, float]] = []

    def step(self, b: CTRBatch, nxt: CTRBatch | None) -> tuple[float, int]:
        import torch
        import torch.nn.functional as F

        if nxt is not None:
            self.emb.prefetch(nxt.keys)  # hashed uint64 keys go to the Embedding as they are
        self.dense.pull()
        logit = self.head(self.emb(b.keys), torch.from_numpy(b.dense))
        loss = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(b.y))
        loss.backward()  # type: ignore[no-untyped-call]
        self.dense.push()
        return loss.item() * len(b), len(b)

    def flush(self) -> None:
        self.emb.wait()
        self.dense.wait()

    def predict(self, b: CTRBatch) -> np.ndarray:
        import torch

        self.emb.create = False
        try:
            with torch.no_grad():
                z = self.head(self.emb(b.keys), torch.from_numpy(b.dense))
                p: np.ndarray = torch.sigmoid(z).numpy()
        finally:
            self.emb.create = True
        return p

    def evaluate(self) -> dict[str, float]:
        self.dense.pull()
        y, p = predict_blocks(self.test, self.predict)
        m = {"test_auc": auc(y, p), "test_logloss": logloss(y, p)}
        self.curve.append(m)
        return m


def train_worker(
    client: ps.Client,
    train: CTRBatch,
    test: CTRBatch,
    *,
    epochs: int = 3,
    batch: int = 512,
    dim: int = 8,
    hidden: tuple[int, ...] = (64, 32),
    lr_sparse: float = 0.05,
    lr_dense: float = 1e-3,
    consistency: str = "async",
    shard_rows: int = 8192,
    patience: int = 0,
    report: Report | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Train on leased shards; rank 0 evaluates after every epoch."""
    data = array_data("deepfm", train, test, rows=shard_rows, batch=batch)
    return train_on(
        client, data, epochs=epochs, dim=dim, hidden=hidden, lr_sparse=lr_sparse,
        lr_dense=lr_dense, consistency=consistency, patience=patience, report=report, show=show,
    )  # fmt: skip


def train_on(
    client: ps.Client, data: CTRData, *, epochs: int, consistency: str, patience: int,
    report: Report | None, show: bool, **settings: Any,
) -> dict[str, Any]:  # fmt: skip
    """Train on ``data`` with :func:`program.fit`; stop after ``patience`` epochs without a
    better test AUC (0: never)."""
    trainer = DeepFMTrainer(
        client, data.test, fields=data.fields, dense_inputs=data.dense, consistency=consistency,
        **settings,
    )  # fmt: skip
    fit(client, data.feed, trainer, name="deepfm", epochs=epochs, consistency=consistency,
        report=report, show=show, stopping=Stopping("test_auc", patience))  # fmt: skip
    return {"curve": trainer.curve}


def parser() -> argparse.ArgumentParser:
    p = program_parser("deepfm", __doc__)
    add_ctr_args(p)
    p.add_argument("--dim", type=int, default=8, help="embedding width")
    p.add_argument("--lr-sparse", type=float, default=LR_SPARSE,
                   help="Adagrad rate of the embeddings")  # fmt: skip
    p.add_argument("--lr-dense", type=float, default=LR_DENSE, help="Adam rate of the MLP")
    p.add_argument("--patience", type=int, default=1, help="stop after this many epochs "
                   "without a better test AUC (0: never)")  # fmt: skip
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: open the data, train, report (rank 0)."""
    data, report = open_ctr_run(client, args, "deepfm", "DeepFM")
    lead = client.rank == 0
    train_on(
        client, data, epochs=args.epochs, dim=args.dim, hidden=(64, 32),
        lr_sparse=args.lr_sparse, lr_dense=args.lr_dense, consistency=args.consistency,
        patience=args.patience, report=report, show=not args.no_progress,
    )  # fmt: skip
    return finish(report, lead)


main = entry("paramserver.models.deepfm", parser, train)


if __name__ == "__main__":
    sys.exit(main())
