"""What every ready training program shares: where it runs, progress bars, its report.

A program is a function ``train(client, args, report)`` plus an argument parser. :func:`run`
starts it on a local cluster (``--servers``, ``--workers``; the workers are processes, each
running the program's module with ``--worker``), or, when started by ``paramserver run`` or any
launcher that sets ``PS_COORDINATOR``, joins that cluster as one worker. Rank 0 prints one line
per epoch and writes the JSON summary and the PNG plot of the curves.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paramserver as ps
from paramserver.config import from_env

__all__ = ["Report", "add_common_args", "progress", "run"]

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, total: int | None = None, show: bool = True
) -> Iterator[T]:
    """A tqdm progress bar on stderr (or the bare iterable when ``show`` is false)."""
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, mininterval=0.5)


class Report:
    """Per-epoch records of a run, printed as they come and written as JSON, CSV and PNG, and as
    TensorBoard event files when ``torch.utils.tensorboard`` (or ``tensorboardX``) can be
    imported (``tensorboard --logdir OUT/tensorboard``).

    ``scalar(tag, value, step)`` records finer-grained curves (e.g. the loss every 100 batches):
    into ``{model}-scalars.csv`` and the event files.

    Example:
        rep = Report("logreg", Path("out")); rep.epoch(1, train_loss=0.5, test_auc=0.7); rep.save()
    """

    def __init__(self, model: str, out: Path, *, show: bool = True, **info: Any) -> None:
        self.model = model
        self.out = out
        self.show = show
        self.info = dict(info)
        self.history: list[dict[str, Any]] = []
        self.scalars: list[tuple[str, float, int]] = []
        self.start = time.perf_counter()
        self.tensorboard: Path | None = None  # the event files' folder, once written

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record one point of the curve ``tag`` (written by :meth:`save`)."""
        self.scalars.append((tag, float(value), int(step)))

    def epoch(self, epoch: int, **metrics: Any) -> None:
        rec = {"epoch": epoch, "seconds": round(time.perf_counter() - self.start, 2), **metrics}
        self.history.append(rec)
        if self.show:
            parts = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
            base = self.info.get("baseline_auc")
            if base is not None and "test_auc" in metrics:
                parts += f"  (single-process baseline AUC {base:.4f})"
            print(f"{self.model} epoch {epoch}: {parts}  ({rec['seconds']:.1f}s)", flush=True)

    def save(self) -> tuple[Path, Path]:
        """Write ``{model}.json`` and ``{model}.png`` into the output folder; return both."""
        self.out.mkdir(parents=True, exist_ok=True)
        js, png = self.out / f"{self.model}.json", self.out / f"{self.model}.png"
        js.write_text(
            json.dumps({"model": self.model, **self.info, "history": self.history}, indent=1)
        )
        plot_curves({self.model: self.history}, png, title=self.info.get("title", self.model))
        self._write_csv()
        self.tensorboard = self._write_events()
        return js, png

    def _write_csv(self) -> None:
        cols = list(dict.fromkeys(k for r in self.history for k in r))
        with (self.out / f"{self.model}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols or ["epoch"])
            w.writeheader()
            w.writerows(self.history)
        if self.scalars:
            with (self.out / f"{self.model}-scalars.csv").open("w", newline="") as f:
                sw = csv.writer(f)
                sw.writerow(["tag", "step", "value"])
                sw.writerows((tag, step, value) for tag, value, step in self.scalars)

    def _write_events(self) -> Path | None:
        """TensorBoard event files, if a writer can be imported; else None (the CSV remains)."""
        for name in ("torch.utils.tensorboard", "tensorboardX"):
            try:
                module: Any = importlib.import_module(name)
                break
            except ImportError:  # torch.utils.tensorboard raises it without tensorboard
                continue
        else:
            return None
        folder = self.out / "tensorboard" / self.model
        writer = module.SummaryWriter(log_dir=str(folder))
        try:
            for rec in self.history:
                for k, v in rec.items():
                    if k != "epoch" and isinstance(v, int | float):
                        writer.add_scalar(f"epoch/{k}", v, rec["epoch"])
            for tag, value, step in self.scalars:
                writer.add_scalar(tag, value, step)
        finally:
            writer.close()
        return folder


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, *, title: str = "") -> Path:
    """One panel per metric (train loss, test metrics) over epochs, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in runs.values() for r in h for k, v in r.items()
                   if isinstance(v, float) and k not in ("seconds",)})  # fmt: skip
    if not keys:
        keys = ["seconds"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        for name, h in runs.items():
            pts = [(r["epoch"], r[k]) for r in h if k in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--servers", type=int, default=2, help="servers of the local cluster")
    p.add_argument("-w", "--workers", type=int, default=1, help="workers of the local cluster")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("paramserver-out"), help="JSON and PNG folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def run(
    module: str,
    parser: argparse.ArgumentParser,
    train: Callable[[ps.Client, argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse ``argv`` and run ``train`` as one worker of a cluster (see the module docstring)."""
    args = parser.parse_args(argv)
    if args.worker or from_env().coordinator:
        with ps.connect() as client:
            return train(client, args)
    if args.workers == 1:
        with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
            return train(cluster.connect(), args)
    rest = [a for a in (argv if argv is not None else sys.argv[1:])]
    return ps.launch.run_job(
        ["-m", module, *rest, "--worker"], servers=args.servers, workers=args.workers
    )


def add_ctr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="movielens",
        help="movielens (MovieLens-100K, fetched), synthetic (generated Criteo-format data), "
        "or criteo:PATH (a Criteo TSV file; the last 10%% of lines are the test set)",
    )
    p.add_argument("--split", default="time", choices=["time", "random"], help="MovieLens split")
    p.add_argument("--examples", type=int, default=100_000, help="synthetic examples")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--consistency", default="async", help="sync, ssp:N or async")
    p.add_argument("--baseline-auc", type=float, default=None, help=argparse.SUPPRESS)


def load_ctr(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(train, test, description) CTRBatches for ``--data``."""
    from paramserver.data import BadLines, CTRBatch, SyntheticCriteo, load_movielens, read_criteo

    if args.data == "movielens":
        train, test = load_movielens(args.split)
        return train, test, f"MovieLens-100K ({args.split} split, click = rating >= 4)"
    if args.data == "synthetic":
        train, test = SyntheticCriteo(examples=args.examples).make()
        return train, test, f"SYNTHETIC Criteo-format data ({args.examples} generated examples)"
    if args.data.startswith("criteo:"):
        path = args.data[len("criteo:") :]
        bad = BadLines("skip")
        data = CTRBatch.concat(list(read_criteo(path, bad=bad)))
        n_test = max(1, len(data) // 10)
        print(f"{path}: {len(data)} examples, {bad.report()}", flush=True)
        return (
            data.take(slice(0, len(data) - n_test)),
            data.take(slice(len(data) - n_test, None)),
            path,
        )
    raise ps.errors.ConfigError(
        f"--data must be movielens, synthetic or criteo:PATH, got {args.data!r}"
    )
