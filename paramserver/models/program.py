"""The skeleton every ready program shares: flags, where it runs, the epochs, the report.

A model brings a parser of its own flags and a ``train(client, args)`` that builds a
:class:`Feed` (its data, as parts) and a :class:`Trainer` (a step per batch, a flush, an
evaluation) and hands both to :func:`fit`, which runs the epochs: this worker's parts (leases
under async, a fixed share under sync / ssp), a step and a clock per batch, the progress bar,
the job's train loss (every worker's, through :class:`JobStats`), rank 0's evaluation and
report line, early stopping. :func:`run` starts the program on a local cluster (``--servers``,
``--workers``; the workers are processes, each running the program's module with ``--worker``),
or, when started by ``paramserver run`` or any launcher that sets ``PS_COORDINATOR``, joins that
cluster as one worker.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import paramserver as ps
from paramserver.config import from_env
from paramserver.data.shards import ArrayShards
from paramserver.errors import PSError
from paramserver.models.report import Report, plot_curves, progress

log = logging.getLogger(__name__)

__all__ = [
    "ArrayFeed",
    "BestModel",
    "Feed",
    "JobStats",
    "Main",
    "PushesInFlight",
    "Report",
    "Trainer",
    "add_common_args",
    "entry",
    "finish",
    "fit",
    "plot_curves",
    "program_parser",
    "progress",
    "run",
]


class Trainer(Protocol):
    """What a model does with its batches (the skeleton does the rest)."""

    def step(self, batch: Any, nxt: Any | None) -> tuple[float, int]:
        """Train on ``batch`` (``nxt``, the part's next batch or None, may be prefetched);
        return the batch's summed loss and its number of examples."""
        ...

    def flush(self) -> None:
        """Wait for this worker's updates in flight (end of an epoch)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Test metrics (rank 0, after every epoch)."""
        ...


class PushesInFlight:
    """A trainer's pushes not yet waited for (``pending``); ``flush`` waits for them all, as
    :class:`Trainer` asks at the end of an epoch.

    Example:
        class MyTrainer(PushesInFlight):
            def step(self, batch, nxt):
                self.pending = [self.table.push(batch.keys, grads)]
                ...
    """

    pending: list[Any]

    def flush(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []


class Feed(Protocol):
    """A data set cut into parts, as an epoch reads them."""

    name: str

    def epoch(self, client: Any, epoch: int, consistency: str) -> Iterator[Iterator[Any]]:
        """This worker's parts of ``epoch``, each as its batches."""
        ...

    def total(self, client: Any, consistency: str) -> int:
        """About how many parts this worker reads in an epoch (the progress bar's total)."""
        ...

    def steps(self, client: Any, consistency: str) -> int:
        """Under sync / ssp: the batches every worker must clock per epoch (the largest share;
        a worker with fewer clocks the rest empty). 0: no padding needed."""
        ...

    def malformed(self) -> int:
        """Malformed lines this worker has skipped so far."""
        ...


class ArrayFeed:
    """An in-memory data set as a :class:`Feed`: :class:`~paramserver.data.shards.ArrayShards`
    of ``rows`` rows, each part cut into ``batch``-row batches (``split`` may cut otherwise)."""

    def __init__(
        self,
        name: str,
        data: Any,
        *,
        rows: int,
        batch: int,
        split: Callable[[Any], Iterator[Any]] | None = None,
    ) -> None:
        self.name = name
        self.shards = ArrayShards(name, data, rows=rows)
        self.batch = batch
        self.split = split or self._cut

    def _cut(self, part: Any) -> Iterator[Any]:
        for i in range(0, len(part), self.batch):
            yield part.take(slice(i, i + self.batch))

    def epoch(self, client: Any, epoch: int, consistency: str) -> Iterator[Iterator[Any]]:
        for part in self.shards.parts(client, epoch, consistency):
            yield self.split(part)

    def total(self, client: Any, consistency: str) -> int:
        n, workers = len(self.shards.data), max(int(client.num_workers), 1)
        rows = self.shards.bounds[0][1] if self.shards.bounds else 1
        return max(1, math.ceil(n / workers / rows))

    def steps(self, client: Any, consistency: str) -> int:
        return 0  # the fixed shares are equal (ArrayShards.share)

    def malformed(self) -> int:
        return 0


class JobStats:
    """Every worker's epoch figures (summed loss, examples, parts, batches) in one small dense
    table, so that rank 0 reports the whole job's train loss and who read what; and rank 0's
    stop decision back to every worker. Built from a table because the coordinator offers no
    aggregate of workers' scalars.

    Example:
        stats = JobStats(client, "logreg", epochs=3)
        stats.publish(1, loss=41.5, examples=100, parts=2, steps=1)  # then a barrier
    """

    FIGURES = ("loss", "examples", "parts", "steps", "malformed", "clock")

    def __init__(self, client: Any, name: str, epochs: int) -> None:
        self.client = client
        self.workers = max(int(client.num_workers), 1)  # the same shape in every worker
        self.table = client.dense_table(
            f"{name}/job-stats",
            (epochs, self.workers + 1, len(self.FIGURES)),
            dtype="float64",
            optimizer=ps.optim.SGD(lr=1.0),
            consistency="async",
        )

    def _add(self, epoch: int, row: int, values: list[float]) -> None:
        g = np.zeros(self.table.shape, np.float64)
        g[epoch - 1, row, : len(values)] = values
        self.table.push(-g).result()  # SGD with rate 1 adds what it is handed, negated

    def publish(self, epoch: int, **figures: float) -> None:
        if self.client.rank < self.workers:  # a worker that joined later is not counted
            self._add(epoch, self.client.rank, [float(figures[f]) for f in self.FIGURES])

    def collect(self, epoch: int) -> dict[str, np.ndarray]:
        """Each figure of ``epoch``, one value per worker."""
        got = self.table.pull()[epoch - 1, : self.workers]
        return {f: got[:, j] for j, f in enumerate(self.FIGURES)}

    def decide(self, epoch: int, stop: bool) -> None:
        if stop:
            self._add(epoch, self.workers, [1.0])

    def stopped(self, epoch: int) -> bool:
        return bool(self.table.pull()[epoch - 1, self.workers, 0] > 0)


def _lookahead(batches: Iterator[Any]) -> Iterator[tuple[Any, Any | None]]:
    cur = next(batches, None)
    while cur is not None:
        nxt = next(batches, None)
        yield cur, nxt
        cur = nxt


@dataclass
class Stopping:
    """Stop when ``monitor`` (higher is better) has not improved for ``patience`` epochs.

    With a ``monitor`` and ``keep_best``, the model left in the cluster at the end is the best
    epoch's: :class:`BestModel` saves a checkpoint whenever the monitor improves and puts it
    back (``client.restore``) when training ends on a worse epoch. ``directory``: where that
    checkpoint is kept, on storage every server reaches (default: a temporary directory on the
    lead worker's host, removed at the end).
    """

    monitor: str = ""
    patience: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    keep_best: bool = True
    directory: str | None = None

    def update(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    @property
    def keeps(self) -> bool:
        """Whether the best epoch's model is kept (see :class:`BestModel`)."""
        return bool(self.monitor) and self.keep_best


class BestModel:
    """The best epoch's model, kept as a checkpoint of every table by the lead worker and put
    back into the running cluster at the end (``client.restore``).

    A checkpoint is taken at the lead's clock once every worker reached it: every worker first
    clocks up to the job's highest clock (:meth:`catch_up`; under async the workers' shares
    differ), so that none waits at a barrier for a clock that another would never reach.

    Example:
        best = BestModel(client, stopping); ...; best.save(epoch); ...; best.restore(last)
    """

    def __init__(self, client: Any, stopping: Stopping) -> None:
        self.client = client
        self.stopping = stopping
        self.path: str | None = None  # the checkpoint of the best epoch so far
        self.why_not = ""  # why no checkpoint could be kept
        self._made: str | None = None  # the temporary directory made here

    def catch_up(self, stats: JobStats, epoch: int) -> None:
        """Clock up to the highest clock any worker published for ``epoch``."""
        top = int(stats.collect(epoch)["clock"].max())
        for _ in range(top - self.client.current_clock):
            self.client.clock()

    def save(self, epoch: int) -> None:
        """The lead, after ``epoch`` improved the monitor: checkpoint every table."""
        if self.why_not:
            return
        root = self.stopping.directory
        if root is None:
            root = self._made = self._made or tempfile.mkdtemp(prefix="paramserver-best-")
        try:
            path = self.client.save(root)
        except (PSError, OSError) as exc:
            self.why_not = f"the checkpoint of epoch {epoch} failed: {exc}"
            log.warning("the best epoch's model cannot be kept: %s", self.why_not)
            return
        if self.path is not None and self.path != path:
            shutil.rmtree(self.path, ignore_errors=True)  # the previous best
        self.path = path

    def restore(self, last: int) -> str:
        """The lead, training over at epoch ``last``: the best epoch's model back into the
        cluster if it was an earlier one; returns a note for the report ("" if none)."""
        best = self.stopping.best_epoch
        if not best or best == last:
            return ""
        if self.path is None:
            return f"the model of epoch {last} is kept, not the best one ({self.why_not})"
        self.client.restore(self.path)
        return f"the model of epoch {best}, the best {self.stopping.monitor}, is kept"

    def close(self) -> None:
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)


def fit(
    client: Any,
    feed: Feed,
    trainer: Trainer,
    *,
    name: str,
    epochs: int,
    consistency: str,
    report: Report | None = None,
    show: bool = True,
    stopping: Stopping | None = None,
) -> list[dict[str, Any]]:
    """Run the epochs (see the module docstring); rank 0 returns the per-epoch records."""
    lead = client.rank == 0
    stats = JobStats(client, name, epochs)
    stop_rule = stopping or Stopping()
    keeper = BestModel(client, stop_rule) if stop_rule.keeps else None
    try:
        history = _epochs(client, feed, trainer, name, epochs, consistency, report, show,
                          stats, stop_rule, keeper)  # fmt: skip
    finally:
        if keeper is not None and lead:
            keeper.close()
    return history


def _epochs(
    client: Any, feed: Feed, trainer: Trainer, name: str, epochs: int, consistency: str,
    report: Report | None, show: bool, stats: JobStats, stop_rule: Stopping,
    keeper: BestModel | None,
) -> list[dict[str, Any]]:  # fmt: skip
    lead = client.rank == 0
    client.barrier(f"{name}/start")  # every worker present before the first lease goes out
    history: list[dict[str, Any]] = []
    skipped = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss, examples, parts, steps = 0.0, 0, 0, 0
        for batches in progress(
            feed.epoch(client, epoch, consistency),
            desc=f"{name} epoch {epoch}",
            total=feed.total(client, consistency),
            show=show and lead,
        ):
            parts += 1
            for batch, nxt in _lookahead(batches):
                batch_loss, n = trainer.step(batch, nxt)
                loss += batch_loss
                examples += n
                steps += 1
                client.report(examples=n)  # examples/s in paramserver status
                client.clock()
        for _ in range(feed.steps(client, consistency) - steps):
            client.clock()  # a short share under sync: the others wait for these clocks
        trainer.flush()
        bad, skipped = feed.malformed() - skipped, feed.malformed()
        stats.publish(epoch, loss=loss, examples=examples, parts=parts, steps=steps,
                      malformed=bad, clock=client.current_clock)  # fmt: skip
        client.barrier(f"{name}/epoch")
        if keeper is not None:
            keeper.catch_up(stats, epoch)
        stop = False
        if lead:
            job = stats.collect(epoch)
            metrics = trainer.evaluate()
            rec: dict[str, Any] = {
                "train_loss": float(job["loss"].sum() / max(job["examples"].sum(), 1)),
                **metrics,
            }
            stop = stop_rule.update(epoch, rec) and epoch < epochs
            if keeper is not None and stop_rule.best_epoch == epoch:
                keeper.save(epoch)
            rec["examples_by_worker"] = [int(v) for v in job["examples"]]
            rec["parts_by_worker"] = [int(v) for v in job["parts"]]
            if job["malformed"].sum():
                rec["malformed_lines"] = int(job["malformed"].sum())  # skipped, all workers
            history.append({"epoch": epoch, **rec})
            if report is not None:
                report.epoch(epoch, seconds=time.perf_counter() - t0, **rec)
            if stop_rule.patience:
                stats.decide(epoch, stop)
        if stop_rule.patience or keeper is not None:
            client.barrier(f"{name}/decided")  # nobody trains on while the lead saves
        if stop_rule.patience:
            stop = stats.stopped(epoch)
        if stop:
            if lead and report is not None:
                report.note(
                    f"stopped early: {stop_rule.monitor} has not improved for "
                    f"{stop_rule.patience} epoch(s) since epoch {stop_rule.best_epoch}"
                )
            break
    if lead and keeper is not None:
        note = keeper.restore(epoch)
        if note and report is not None:
            report.note(note)
    if lead and report is not None and stop_rule.monitor and stop_rule.best_epoch:
        report.info["best_epoch"] = stop_rule.best_epoch
        report.info[f"best_{stop_rule.monitor}"] = stop_rule.best
        kept = stop_rule.best_epoch if keeper is not None and keeper.path else epoch
        report.info["kept_epoch"] = kept
        report.info["final"] = {k: v for k, v in history[kept - 1].items()
                                if not k.endswith("_by_worker")}  # fmt: skip
    client.barrier(f"{name}/done")
    return history


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--servers", type=int, default=2, help="servers of the local cluster")
    p.add_argument("-w", "--workers", type=int, default=1, help="workers of the local cluster")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("paramserver-out"), help="JSON and PNG folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def program_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``paramserver train NAME``, described by the program's docstring, with the
    flags every program takes (:func:`add_common_args`).

    Example:
        p = program_parser("logreg", __doc__)
    """
    p = argparse.ArgumentParser(
        prog=f"paramserver train {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    return p


def add_file_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``--data KIND:PATH`` (see :mod:`paramserver.data.sources`)."""
    g = p.add_argument_group("your own data file (--data criteo|libsvm|csv|parquet:PATH)")
    g.add_argument("--test", default=None, help="a test file of the same kind (default: the "
                   "last tenth of the parts of --data is held out)")  # fmt: skip
    g.add_argument("--label", default="label", help="CSV / Parquet: the label column (0 or 1)")
    g.add_argument("--categorical", default=None, help="CSV / Parquet: categorical columns, "
                   "comma-separated (default: the columns that are not numbers)")  # fmt: skip
    g.add_argument("--numeric", default=None, help="CSV / Parquet: numeric columns, "
                   "comma-separated (default: the columns that are numbers)")  # fmt: skip
    g.add_argument("--fields", type=int, default=0, help="libsvm: keys per example (default: "
                   "the most features of a row of the file's first block)")  # fmt: skip
    g.add_argument("--part-bytes", type=int, default=0, help="bytes per part of a line file "
                   "(default: about 8 parts per worker, 4 KiB to 64 MiB)")  # fmt: skip


def _columns(value: str | None) -> list[str] | None:
    return None if value is None else [c for c in value.split(",") if c]


def open_file_data(args: argparse.Namespace, workers: int) -> Any:
    """The :class:`~paramserver.data.sources.FileData` of ``--data KIND:PATH``, probed."""
    from paramserver.data.sources import FileData

    src = FileData(
        args.data, test=args.test, label=args.label, categorical=_columns(args.categorical),
        numeric=_columns(args.numeric), fields=args.fields, part_bytes=args.part_bytes,
        workers=workers,
    )  # fmt: skip
    src.probe()
    return src


def _check_files(args: argparse.Namespace) -> None:
    """A data file that is not there fails here, in one line, before any process starts."""
    from paramserver.data.sources import KINDS, parse_data

    data = getattr(args, "data", None)
    if isinstance(data, str) and data.split(":", 1)[0] in KINDS:
        _, path = parse_data(data)
        if not path.is_file():
            raise ps.errors.DataError(f"{path}: no such data file (--data {data})")
    test = getattr(args, "test", None)
    if test is not None and not Path(test).is_file():
        raise ps.errors.DataError(f"{test}: no such test file (--test)")


def run(
    module: str,
    parser: argparse.ArgumentParser,
    train: Callable[[ps.Client, argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse ``argv`` and run ``train`` as one worker of a cluster (see the module docstring).
    A bad setting or data file ends in one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        _check_files(args)
        if args.worker or from_env().coordinator:
            with ps.connect() as client:
                return train(client, args)
        if args.workers == 1:
            with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
                return train(cluster.connect(), args)
    except PSError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr, flush=True)
        return 2
    rest = list(argv if argv is not None else sys.argv[1:])
    return ps.launch.run_job(
        ["-m", module, *rest, "--worker"], servers=args.servers, workers=args.workers
    )


class Main(Protocol):
    """A program's ``main``: its command line (``sys.argv[1:]`` when None) to an exit code."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


def finish(report: Report, lead: bool) -> int:
    """The end of a model's ``train``: the lead worker writes the report and says where."""
    if lead:
        js, png = report.save()
        print(f"{report.model}: wrote {js} and {png}", flush=True)
    return 0


def entry(
    module: str,
    parser: Callable[[], argparse.ArgumentParser],
    train: Callable[[ps.Client, argparse.Namespace], int],
) -> Main:
    """A model module's ``main(argv)``: :func:`run` with the module's parser and ``train``.

    Example:
        main = entry("paramserver.models.mlp", parser, train)
    """

    def main(argv: list[str] | None = None) -> int:
        return run(module, parser(), train, argv)

    name = module.rsplit(".", 1)[-1]
    main.__doc__ = f"``paramserver train {name} ...`` and ``python -m {module} ...``."
    return main
