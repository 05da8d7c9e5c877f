"""DeepFM for click prediction: field embeddings in a sparse table, the MLP in dense tables.

One :class:`~paramserver.torch.Embedding` of width ``dim + 1`` per hashed key holds the key's
first-order weight (column 0) and its factor vector; the FM term is the usual
``0.5 * ((sum v)^2 - sum v^2)``; the deep part is an MLP over the concatenated field vectors and
the dense inputs, kept on the servers by :class:`~paramserver.torch.DenseParameters`. The
servers run Adagrad for the embeddings and Adam for the MLP.

    paramserver train deepfm --data movielens --epochs 3
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.data.evaluate import auc, logloss
from paramserver.data.shards import ArrayShards
from paramserver.models.program import (
    Report,
    add_common_args,
    add_ctr_args,
    load_ctr,
    progress,
    run,
)

__all__ = ["DeepFM", "main", "parser", "train", "train_worker"]


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
    report: Report | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Train on leased shards; rank 0 evaluates after every epoch."""
    import torch
    import torch.nn.functional as F

    from paramserver.torch import DenseParameters, Embedding

    torch.manual_seed(0)
    emb = Embedding(
        client, "deepfm/emb", dim + 1, optimizer=ps.optim.Adagrad(lr=lr_sparse),
        init=ps.init.Normal(std=0.01), consistency=consistency,
    )  # fmt: skip
    head = DeepFM(train.fields, train.dense.shape[1], dim, hidden)
    dense = DenseParameters(
        client, "deepfm/mlp", head, optimizer=ps.optim.Adam(lr=lr_dense), consistency=consistency
    )
    shards = ArrayShards("deepfm/train", train, rows=shard_rows)
    lead = client.rank == 0

    def as_ids(keys: np.ndarray) -> np.ndarray:
        return keys  # hashed uint64 keys go to the Embedding as they are (torch has no uint64)

    def predict(data: CTRBatch) -> np.ndarray:
        out = []
        emb.create = False
        with torch.no_grad():
            for i in range(0, len(data), 8192):
                b = data.take(slice(i, i + 8192))
                out.append(
                    torch.sigmoid(head(emb(as_ids(b.keys)), torch.from_numpy(b.dense))).numpy()
                )
        emb.create = True
        return np.concatenate(out)

    curve = []
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0
        for part in progress(
            shards.parts(client, epoch, consistency),
            desc=f"deepfm epoch {epoch}",
            show=show and lead,
        ):
            for i in range(0, len(part), batch):
                b = part.take(slice(i, i + batch))
                if i + batch < len(part):
                    emb.prefetch(as_ids(part.keys[i + batch : i + 2 * batch]))
                dense.pull()
                logit = head(emb(as_ids(b.keys)), torch.from_numpy(b.dense))
                loss = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(b.y))
                loss.backward()  # type: ignore[no-untyped-call]
                dense.push()
                client.report(examples=len(b.y))  # examples/s in paramserver status
                client.clock()
                total += loss.item() * len(b)
                seen += len(b)
        emb.wait()
        dense.wait()
        client.barrier("deepfm/epoch")
        if lead:
            dense.pull()
            p = predict(test)
            m = {"test_auc": auc(test.y, p), "test_logloss": logloss(test.y, p)}
            curve.append(m)
            if report is not None:
                report.epoch(epoch, train_loss=total / max(seen, 1), **m)
    client.barrier("deepfm/done")
    return {"curve": curve}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paramserver train deepfm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    add_ctr_args(p)
    p.add_argument("--dim", type=int, default=8, help="embedding width")
    p.add_argument("--lr-sparse", type=float, default=0.05, help="Adagrad rate of the embeddings")
    p.add_argument("--lr-dense", type=float, default=1e-3, help="Adam rate of the MLP")
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: load the data, train, report (rank 0)."""
    tr, te, what = load_ctr(args)
    lead = client.rank == 0
    report = Report(
        "deepfm",
        args.out,
        show=lead,
        data=what,
        baseline_auc=args.baseline_auc,
        title=f"DeepFM, {what}",
    )
    if lead:
        print(
            f"deepfm: {what}: {len(tr)} train / {len(te)} test examples; "
            f"{client.num_servers} servers, {client.num_workers} workers",
            flush=True,
        )
    train_worker(
        client, tr, te, epochs=args.epochs, batch=args.batch, dim=args.dim,
        lr_sparse=args.lr_sparse, lr_dense=args.lr_dense, consistency=args.consistency,
        report=report, show=not args.no_progress,
    )  # fmt: skip
    if lead:
        js, png = report.save()
        print(f"deepfm: wrote {js} and {png}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paramserver train deepfm ...`` and ``python -m paramserver.models.deepfm ...``."""
    return run("paramserver.models.deepfm", parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
