"""An MLP image classifier whose parameters live on the servers (dense tables only).

Data: 5,000 MNIST digits (``--data mnist``, fetched; shuffled because the file is sorted by
label) or scikit-learn's bundled 8x8 digits (``--data digits``, offline). The servers run Adam;
``--reference`` also trains the same MLP (same initial values, same batches, torch.optim.Adam)
in this one process and reports its accuracy next to the distributed one.

    paramserver train mlp --data mnist --epochs 10 --reference
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.shards import ArrayShards
from paramserver.models.program import Report, add_common_args, progress, run

__all__ = ["main", "parser", "train", "train_worker"]


class _Images:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: slice) -> _Images:
        return _Images(self.x[idx], self.y[idx])


def make_mlp(inputs: int, hidden: int, classes: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from paramserver.data.datasets import load_digits, load_mnist5k

    if name == "mnist":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    raise ps.errors.ConfigError(f"--data must be mnist or digits, got {name!r}")


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def train_worker(
    client: ps.Client,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    epochs: int = 10,
    batch: int = 64,
    hidden: int = 128,
    lr: float = 1e-3,
    consistency: str = "sync",
    reference: bool = False,
    report: Report | None = None,
    show: bool = True,
    codec: str = "none",
) -> dict[str, Any]:
    """Train on leased shards; rank 0 evaluates after each epoch (and trains the one-process
    reference alongside, if asked: same initial values, same batches)."""
    import torch
    import torch.nn.functional as F

    from paramserver.torch import DenseParameters

    x, y, xt, yt = data
    model = make_mlp(x.shape[1], hidden, int(y.max()) + 1)
    dense = DenseParameters(
        client, "mlp", model, optimizer=ps.optim.Adam(lr=lr), consistency=consistency, codec=codec
    )
    lead = client.rank == 0
    ref = ref_opt = None
    if reference and lead:
        dense.pull()
        ref = make_mlp(x.shape[1], hidden, int(y.max()) + 1)
        ref.load_state_dict(model.state_dict())
        ref_opt = torch.optim.Adam(ref.parameters(), lr=lr)
    shards = ArrayShards("mlp/train", _Images(x, y), rows=1024)
    curve = []
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0
        for part in progress(
            shards.parts(client, epoch, consistency), desc=f"mlp epoch {epoch}", show=show and lead
        ):
            for i in range(0, len(part), batch):
                xb = torch.from_numpy(part.x[i : i + batch])
                yb = torch.from_numpy(part.y[i : i + batch])
                dense.pull()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()  # type: ignore[no-untyped-call]
                dense.push()
                client.report(examples=len(yb))  # examples/s in paramserver status
                client.clock()
                total += loss.item() * len(yb)
                seen += len(yb)
                if ref is not None and ref_opt is not None:
                    ref_opt.zero_grad()
                    F.cross_entropy(ref(xb), yb).backward()  # type: ignore[no-untyped-call]
                    ref_opt.step()
        dense.wait()
        client.barrier("mlp/epoch")
        if lead:
            dense.pull()
            m = {"test_accuracy": accuracy(model, xt, yt)}
            if ref is not None:
                m["reference_accuracy"] = accuracy(ref, xt, yt)
            curve.append(m)
            if report is not None:
                report.epoch(epoch, train_loss=total / max(seen, 1), **m)
    client.barrier("mlp/done")
    return {"curve": curve}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paramserver train mlp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_common_args(p)
    p.set_defaults(epochs=10)
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the servers' Adam rate")
    p.add_argument("--consistency", default="sync", help="sync, ssp:N or async")
    p.add_argument("--reference", action="store_true", help="also train it in this one process")
    p.add_argument("--codec", default="none", help="how values travel: float16, bfloat16, int8")
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: load the data, train, report (rank 0)."""
    data = load(args.data)
    lead = client.rank == 0
    report = Report("mlp", args.out, show=lead, data=args.data, title=f"MLP on {args.data}")
    if lead:
        print(f"mlp: {args.data}: {len(data[1])} train / {len(data[3])} test images; "
              f"{client.num_servers} servers, {client.num_workers} workers", flush=True)  # fmt: skip
    train_worker(
        client, data, epochs=args.epochs, batch=args.batch, hidden=args.hidden, lr=args.lr,
        consistency=args.consistency, reference=args.reference and client.num_workers == 1,
        report=report, show=not args.no_progress, codec=args.codec,
    )  # fmt: skip
    if lead:
        js, png = report.save()
        print(f"mlp: wrote {js} and {png}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paramserver train mlp ...`` and ``python -m paramserver.models.mlp ...``."""
    return run("paramserver.models.mlp", parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
