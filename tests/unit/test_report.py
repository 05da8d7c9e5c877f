"""A training run's report: JSON, CSV and PNG always; TensorBoard event files when a writer is
importable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the train extra is not installed")

from paramserver.models.program import Report


def test_report_writes_json_csv_png_and_scalars(tmp_path: Path) -> None:
    rep = Report("logreg", tmp_path, show=False)
    rep.epoch(1, train_loss=0.7, test_auc=0.61)
    rep.epoch(2, train_loss=0.5, test_auc=0.66)
    for step, loss in enumerate([0.9, 0.8, 0.6]):
        rep.scalar("batch/loss", loss, step * 100)
    js, png = rep.save()
    assert json.loads(js.read_text())["history"][1]["test_auc"] == 0.66
    assert png.stat().st_size > 0
    with (tmp_path / "logreg.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], float(r["train_loss"])) for r in rows] == [("1", 0.7), ("2", 0.5)]
    with (tmp_path / "logreg-scalars.csv").open() as f:
        scalars = list(csv.DictReader(f))
    assert [(r["tag"], int(r["step"]), float(r["value"])) for r in scalars][-1] == (
        "batch/loss",
        200,
        0.6,
    )


def test_report_writes_tensorboard_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = Report("mlp", tmp_path, show=False)
    rep.epoch(1, train_loss=0.7)
    rep.epoch(2, train_loss=0.4)
    rep.scalar("batch/loss", 0.9, 10)
    rep.save()
    assert rep.tensorboard is not None
    acc = EventAccumulator(str(rep.tensorboard))
    acc.Reload()
    got = [(e.step, round(e.value, 4)) for e in acc.Scalars("epoch/train_loss")]
    assert got == [(1, 0.7), (2, 0.4)]
    assert [e.step for e in acc.Scalars("batch/loss")] == [10]


def test_an_epochs_seconds_are_its_own_and_elapsed_is_the_runs(tmp_path: Path) -> None:
    rep = Report("logreg", tmp_path, show=False)
    rep.epoch(1, seconds=2.5, train_loss=0.7)
    rep.epoch(2, seconds=1.5, train_loss=0.6)
    rep.epoch(3, train_loss=0.5)  # timed since the previous record
    first, second, third = rep.history
    assert (first["seconds"], second["seconds"]) == (2.5, 1.5)
    assert second["elapsed"] >= first["elapsed"]
    assert third["seconds"] <= third["elapsed"]
