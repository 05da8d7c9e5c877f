"""What a ready program shows and writes: progress bars, per-epoch lines, JSON, CSV, PNG and
TensorBoard files. Written by rank 0 only."""

from __future__ import annotations

import csv
import importlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Report", "plot_curves", "progress"]

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, total: int | None = None, show: bool = True
) -> Iterator[T]:
    """A tqdm progress bar on stderr (or the bare iterable when ``show`` is false)."""
    if not show:
        yield from items
        return
    from tqdm import tqdm

    # a total (of parts) gives the bar its percentage and ETA
    yield from tqdm(items, desc=desc, total=total, unit="part", leave=False, file=sys.stderr,
                    mininterval=0.5)  # fmt: skip


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
        self.start = self.last = time.perf_counter()
        self.notes: list[str] = []
        self.tensorboard: Path | None = None  # the event files' folder, once written

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record one point of the curve ``tag`` (written by :meth:`save`)."""
        self.scalars.append((tag, float(value), int(step)))

    def epoch(self, epoch: int, *, seconds: float | None = None, **metrics: Any) -> None:
        """Record and print one epoch: ``seconds`` is the epoch's own time (default: since the
        previous epoch's record), ``elapsed`` the run's so far."""
        now = time.perf_counter()
        took = now - self.last if seconds is None else seconds
        self.last = now
        rec = {"epoch": epoch, "seconds": round(took, 2),
               "elapsed": round(now - self.start, 2), **metrics}  # fmt: skip
        self.history.append(rec)
        if self.show:
            parts = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in metrics.items()
                if not isinstance(v, list)
            )
            base = self.info.get("baseline_auc")
            if base is not None and "test_auc" in metrics:
                parts += f"  (single-process baseline AUC {base:.4f})"
            print(f"{self.model} epoch {epoch}: {parts}  ({rec['seconds']:.1f}s)", flush=True)

    def note(self, text: str) -> None:
        """A line for the reader (printed, and kept in the JSON's ``notes``)."""
        self.notes.append(text)
        if self.show:
            print(f"{self.model}: {text}", flush=True)

    def save(self) -> tuple[Path, Path]:
        """Write ``{model}.json`` and ``{model}.png`` into the output folder; return both."""
        self.out.mkdir(parents=True, exist_ok=True)
        js, png = self.out / f"{self.model}.json", self.out / f"{self.model}.png"
        js.write_text(
            json.dumps(
                {"model": self.model, **self.info, "notes": self.notes, "history": self.history},
                indent=1,
            )
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
                    if k not in ("epoch", "elapsed") and isinstance(v, int | float):
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
                   if isinstance(v, float) and k not in ("seconds", "elapsed")})  # fmt: skip
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
