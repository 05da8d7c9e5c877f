"""The click data of the CTR programs (logreg, deepfm): built-in sets in memory, or a user's
file streamed part by part (``--data criteo|libsvm|csv|parquet:PATH``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.data.sources import KINDS, FileData, part_steps
from paramserver.models.program import ArrayFeed, Feed, Report, add_file_args, open_file_data

__all__ = [
    "CTRData",
    "FileFeed",
    "add_ctr_args",
    "array_data",
    "ctr_data",
    "load_ctr",
    "open_ctr_run",
    "predict_blocks",
    "test_blocks",
]


def add_ctr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="movielens",
        help="movielens (MovieLens-100K, fetched), synthetic (generated Criteo-format data), or "
        "your own file: criteo:PATH (Criteo TSV), libsvm:PATH, csv:PATH, parquet:PATH; a file "
        "is streamed, each worker reading only the parts it is leased",
    )
    p.add_argument("--split", default="time", choices=["time", "random"], help="MovieLens split")
    p.add_argument("--examples", type=int, default=100_000, help="synthetic examples")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--consistency", default="async", help="sync, ssp:N or async")
    p.add_argument("--baseline-auc", type=float, default=None, help=argparse.SUPPRESS)
    add_file_args(p)


def _is_file(spec: str) -> bool:
    return spec.split(":", 1)[0] in KINDS


class FileFeed:
    """A :class:`~paramserver.data.sources.FileData`'s training parts as a Feed: leased parts
    under async, parts ``rank::workers`` under sync / ssp (padded to the largest share)."""

    def __init__(self, src: FileData, batch: int) -> None:
        self.src = src
        self.name = src.name
        self.batch = batch

    def _mine(self, client: Any) -> range:
        return range(client.rank, len(self.src), max(client.num_workers, 1))

    def epoch(self, client: Any, epoch: int, consistency: str) -> Iterator[Iterator[Any]]:
        parts = client.leases(self.name, epoch, len(self.src)) if consistency == "async" else (
            iter(self._mine(client))
        )  # fmt: skip
        for i in parts:
            yield self.src.batches(self.src.train[i], self.batch)

    def total(self, client: Any, consistency: str) -> int:
        if consistency == "async":
            return max(1, math.ceil(len(self.src) / max(int(client.num_workers), 1)))
        return len(self._mine(client))

    def steps(self, client: Any, consistency: str) -> int:
        if consistency == "async":
            return 0
        w = max(client.num_workers, 1)
        return max(part_steps(self.src.train[r::w], self.batch) for r in range(w))

    def malformed(self) -> int:
        return self.src.bad.count


@dataclass
class CTRData:
    """What a CTR program trains on and tests with."""

    feed: Feed
    test: Callable[[], Iterator[CTRBatch]]  # the test set, in blocks
    what: str
    train_rows: int
    test_rows: int
    fields: int
    dense: int
    train: CTRBatch | None = None  # in memory (built-in sets), else None
    info: dict[str, Any] = field(default_factory=dict)


def test_blocks(data: CTRBatch, rows: int = 16384) -> Callable[[], Iterator[CTRBatch]]:
    return lambda: (data.take(slice(i, i + rows)) for i in range(0, len(data), rows))


def ctr_data(args: argparse.Namespace, workers: int, name: str, shard_rows: int = 8192) -> CTRData:
    """The data of ``--data``: a feed of ``args.batch``-example batches and the test set."""
    if _is_file(args.data):
        src = open_file_data(args, workers)
        fields, dense = src.shape
        return CTRData(
            FileFeed(src, args.batch), src.test_batches, src.describe(), src.train_rows,
            src.test_rows, fields, dense,
        )  # fmt: skip
    train, test, what = load_ctr(args)
    return array_data(name, train, test, what, rows=shard_rows, batch=args.batch)


def array_data(
    name: str, train: CTRBatch, test: CTRBatch, what: str = "", *, rows: int, batch: int
) -> CTRData:
    """The data of in-memory ``train`` and ``test`` sets: ``train`` leased in parts of ``rows``
    examples (named ``NAME/train``), fed in batches of ``batch``.

    Example:
        data = array_data("logreg", train, test, rows=8192, batch=512)
    """
    feed = ArrayFeed(f"{name}/train", train, rows=rows, batch=batch)
    return CTRData(feed, test_blocks(test), what, len(train), len(test), train.fields,
                   int(train.dense.shape[1]), train)  # fmt: skip


def open_ctr_run(
    client: ps.Client, args: argparse.Namespace, name: str, title: str
) -> tuple[CTRData, Report]:
    """A CTR program's start: its data, its report (shown by rank 0), and rank 0's line
    naming the data and the cluster."""
    data = ctr_data(args, client.num_workers, name)
    lead = client.rank == 0
    report = Report(
        name, args.out, show=lead, data=data.what, baseline_auc=args.baseline_auc,
        title=f"{title}, {data.what}",
    )  # fmt: skip
    if lead:
        print(
            f"{name}: {data.what}: {data.train_rows} train / {data.test_rows} test examples, "
            f"{data.fields} fields; {client.num_servers} servers, {client.num_workers} workers",
            flush=True,
        )
    return data, report


def load_ctr(args: argparse.Namespace) -> tuple[CTRBatch, CTRBatch, str]:
    """(train, test, description) CTRBatches for ``--data``, all in memory."""
    from paramserver.data import SyntheticCriteo, load_movielens

    if args.data == "movielens":
        train, test = load_movielens(args.split)
        return train, test, f"MovieLens-100K ({args.split} split, click = rating >= 4)"
    if args.data == "synthetic":
        train, test = SyntheticCriteo(examples=args.examples).make()
        return train, test, f"SYNTHETIC Criteo-format data ({args.examples} generated examples)"
    if _is_file(args.data):
        ns = argparse.Namespace(**{**_FILE_DEFAULTS, **vars(args)})
        src = open_file_data(ns, 1)
        train = CTRBatch.concat([b for p in src.train for b in src.read(p)])
        test = CTRBatch.concat(list(src.test_batches()))
        print(f"{src.path}: {len(train) + len(test)} examples, {src.bad.report()}", flush=True)
        return train, test, str(src.path)
    raise ps.errors.ConfigError(
        f"--data must be movielens, synthetic or KIND:PATH (KIND one of {', '.join(KINDS)}), "
        f"got {args.data!r}"
    )


_FILE_DEFAULTS: dict[str, Any] = {
    "test": None, "label": "label", "categorical": None, "numeric": None, "fields": 0,
    "part_bytes": 0,
}  # fmt: skip


def predict_blocks(
    test: Callable[[], Iterator[CTRBatch]], predict: Callable[[CTRBatch], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) over the test set's blocks."""
    ys, ps_ = [], []
    for b in test():
        ys.append(b.y)
        ps_.append(predict(b))
    if not ys:
        return np.zeros(0, np.float32), np.zeros(0)
    return np.concatenate(ys), np.concatenate(ps_)
