"""An MLP image classifier whose parameters live on the servers (dense tables only).

Data: 5,000 MNIST digits (``--data mnist``, fetched; shuffled because the file is sorted by
label), scikit-learn's bundled 8x8 digits (``--data digits``, offline), or your own
``csv:PATH`` / ``parquet:PATH`` / ``libsvm:PATH`` with a label column. The servers run Adam;
``--reference`` also trains the same MLP (same initial values, same batches, torch.optim.Adam)
in this one process and reports its accuracy next to the distributed one.

    paramserver train mlp --data mnist --epochs 10 --reference
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.models.program import ArrayFeed, Report, entry, finish, fit, program_parser

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


def load(
    name: str, *, label: str = "label", test: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of ``--data``: a built-in set, or ``csv:PATH``,
    ``parquet:PATH`` (a ``label`` column, every other column a number) or ``libsvm:PATH``;
    labels are any values (class ``i`` is the i-th smallest), features are standardized with
    the training set's mean and deviation; without ``test`` a fifth of the rows (shuffled) is
    the test set.

    Example:
        x, y, xt, yt = load("csv:iris.csv", label="species")
    """
    from paramserver.data.datasets import load_digits, load_mnist5k

    if name == "mnist":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    from paramserver.data.sources import KINDS, parse_data

    kind, path = parse_data(name)
    if kind == "criteo":
        raise ps.errors.ConfigError(f"mlp: --data takes mnist, digits or {KINDS[1:]}:PATH")
    x, y = _read_table(kind, path, label)
    if test is None:
        order = np.random.default_rng(0).permutation(len(y))
        n_test = max(1, len(y) // 5)
        xt, yt, x, y = x[order[:n_test]], y[order[:n_test]], x[order[n_test:]], y[order[n_test:]]
    else:
        xt, yt = _read_table(kind, Path(test), label, features=x.shape[1])
    _, codes = np.unique(np.concatenate([y, yt]), return_inverse=True)
    codes = codes.astype(np.int64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    x, xt = (x - mean) / std, (xt - mean) / std
    return x.astype(np.float32), codes[: len(y)], xt.astype(np.float32), codes[len(y) :]


def _read_table(
    kind: str, path: Path, label: str, features: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if not path.is_file():
        raise ps.errors.DataError(f"{path}: no such data file")
    if kind == "libsvm":
        from sklearn.datasets import load_svmlight_file

        try:
            xs, y = load_svmlight_file(str(path), n_features=features)
        except ValueError as exc:
            raise ps.errors.DataError(f"{path}: not libsvm ({exc})") from None
        return np.asarray(xs.toarray(), np.float64), np.asarray(y)
    df = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    if label not in df.columns:
        raise ps.errors.DataError(f"{path}: no label column {label!r} (--label); it has "
                                  f"{list(df.columns)}")  # fmt: skip
    feats = df.drop(columns=[label])
    wrong = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
    if wrong:
        raise ps.errors.DataError(f"{path}: column(s) {wrong} are not numbers (mlp takes "
                                  "numeric features)")  # fmt: skip
    if len(df) == 0:
        raise ps.errors.DataError(f"{path}: no rows")
    return feats.to_numpy(np.float64), df[label].to_numpy()


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
    x, y = data[0], data[1]
    trainer = _Trainer(client, data, hidden=hidden, lr=lr, consistency=consistency,
                       reference=reference and client.rank == 0, codec=codec)  # fmt: skip
    feed = ArrayFeed("mlp/train", _Images(x, y), rows=1024, batch=batch)
    fit(client, feed, trainer, name="mlp", epochs=epochs, consistency=consistency,
        report=report, show=show)  # fmt: skip
    return {"curve": trainer.curve}


class _Trainer:
    def __init__(
        self, client: ps.Client, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], *,
        hidden: int, lr: float, consistency: str, reference: bool, codec: str = "none",
    ) -> None:  # fmt: skip
        import torch

        from paramserver.torch import DenseParameters

        x, y, self.xt, self.yt = data
        classes = int(max(y.max(initial=0), self.yt.max(initial=0))) + 1
        self.model = make_mlp(x.shape[1], hidden, classes)
        self.dense = DenseParameters(
            client,
            "mlp",
            self.model,
            optimizer=ps.optim.Adam(lr=lr),
            consistency=consistency,
            codec=codec,
        )
        self.ref: Any = None
        self.ref_opt: Any = None
        if reference:
            self.dense.pull()
            self.ref = make_mlp(x.shape[1], hidden, classes)
            self.ref.load_state_dict(self.model.state_dict())
            self.ref_opt = torch.optim.Adam(self.ref.parameters(), lr=lr)
        self.curve: list[dict[str, float]] = []

    def step(self, part: _Images, nxt: Any) -> tuple[float, int]:
        import torch
        import torch.nn.functional as F

        xb, yb = torch.from_numpy(part.x), torch.from_numpy(part.y)
        self.dense.pull()
        loss = F.cross_entropy(self.model(xb), yb)
        loss.backward()  # type: ignore[no-untyped-call]
        self.dense.push()
        if self.ref is not None:
            self.ref_opt.zero_grad()
            F.cross_entropy(self.ref(xb), yb).backward()  # type: ignore[no-untyped-call]
            self.ref_opt.step()
        return loss.item() * len(yb), len(yb)

    def flush(self) -> None:
        self.dense.wait()

    def evaluate(self) -> dict[str, float]:
        self.dense.pull()
        m = {"test_accuracy": accuracy(self.model, self.xt, self.yt)}
        if self.ref is not None:
            m["reference_accuracy"] = accuracy(self.ref, self.xt, self.yt)
        self.curve.append(m)
        return m


def parser() -> argparse.ArgumentParser:
    p = program_parser("mlp", __doc__)
    p.set_defaults(epochs=10)
    p.add_argument("--data", default="mnist", help="mnist (5,000 MNIST digits, fetched), "
                   "digits (scikit-learn's 8x8 digits) or your own csv:PATH, parquet:PATH, "
                   "libsvm:PATH (a label column, numeric features)")  # fmt: skip
    p.add_argument("--label", default="label", help="CSV / Parquet: the label column")
    p.add_argument("--test", default=None, help="a test file (default: a fifth of --data)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the servers' Adam rate")
    p.add_argument("--consistency", default="sync", help="sync, ssp:N or async")
    p.add_argument("--reference", action="store_true", help="also train it in this one process")
    p.add_argument("--codec", default="none", help="how values travel: float16, bfloat16, int8")
    return p


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: load the data, train, report (rank 0)."""
    data = load(args.data, label=args.label, test=args.test)
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
    return finish(report, lead)


main = entry("paramserver.models.mlp", parser, train)


if __name__ == "__main__":
    sys.exit(main())
