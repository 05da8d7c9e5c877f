"""The ready programs as a user runs them, on the user's own files: ``paramserver run -w 4
paramserver/models/logreg.py --data KIND:PATH`` and ``paramserver train ...``.

Each file is generated here from a known logistic model, so the test knows its rows; the
programs' JSON says how many examples each worker read per epoch, which must add up to the
training file's rows once (every part read once, by one worker) with no worker reading all.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver
from paramserver.data import SyntheticCriteo

pytestmark = pytest.mark.timeout(300)

LOGREG = str(Path(paramserver.__file__).parent / "models" / "logreg.py")
N_TRAIN, N_TEST = 6000, 2000


def _paramserver() -> list[str]:
    script = Path(sys.executable).with_name("paramserver")
    return [str(script)] if script.exists() else [sys.executable, "-m", "paramserver"]


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    return subprocess.run(
        [*_paramserver(), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _constant_logloss(y: np.ndarray) -> float:
    p = float(np.mean(y))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _write_criteo(folder: Path) -> tuple[str, str, np.ndarray]:
    whole = SyntheticCriteo(examples=N_TRAIN + N_TEST, seed=5).write_tsv(folder / "all.tsv")
    lines = whole.read_text().splitlines(keepends=True)
    (folder / "train.tsv").write_text("".join(lines[:N_TRAIN]))
    (folder / "test.tsv").write_text("".join(lines[N_TRAIN:]))
    y = np.array([int(line.split("\t", 1)[0]) for line in lines[:N_TRAIN]])
    return "criteo:train.tsv", "test.tsv", y


def _labels(x: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(len(x)) < 1 / (1 + np.exp(-(x - 0.5)))).astype(np.int64)


def _write_libsvm(folder: Path) -> tuple[str, str, np.ndarray]:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.5, 200)
    feats = np.stack([rng.choice(200, 8, replace=False) for _ in range(N_TRAIN + N_TEST)])
    y = _labels(w[feats].sum(axis=1), w, rng)
    rows = [f"{y[i]} " + " ".join(f"{j}:1" for j in sorted(feats[i])) + "\n" for i in range(len(y))]
    (folder / "train.svm").write_text("".join(rows[:N_TRAIN]))
    (folder / "test.svm").write_text("".join(rows[N_TRAIN:]))
    return "libsvm:train.svm", "test.svm", y[:N_TRAIN]


def _frame(rng: np.random.Generator) -> Any:
    import pandas as pd

    n = N_TRAIN + N_TEST
    w = rng.normal(0, 1.5, 60)
    site = rng.integers(0, 60, n)
    ad = rng.integers(0, 60, n)
    price = rng.lognormal(0, 1, n)
    y = _labels(w[site] + w[ad][::-1] * 0 + w[ad] - 0.3 * np.log1p(price), w, rng)
    return pd.DataFrame({"click": y, "site": [f"s{v}" for v in site],
                         "ad": [f"a{v}" for v in ad], "price": price.round(3)})  # fmt: skip


def _write_csv(folder: Path) -> tuple[str, str, np.ndarray]:
    df = _frame(np.random.default_rng(2))
    df[:N_TRAIN].to_csv(folder / "train.csv", index=False)
    df[N_TRAIN:].to_csv(folder / "test.csv", index=False)
    return "csv:train.csv", "test.csv", df["click"].to_numpy()[:N_TRAIN]


def _write_parquet(folder: Path) -> tuple[str, str, np.ndarray]:
    df = _frame(np.random.default_rng(3))
    df[:N_TRAIN].to_parquet(folder / "train.parquet", row_group_size=400)
    df[N_TRAIN:].to_parquet(folder / "test.parquet")
    return "parquet:train.parquet", "test.parquet", df["click"].to_numpy()[:N_TRAIN]


WRITERS = {"criteo": _write_criteo, "libsvm": _write_libsvm, "csv": _write_csv,
           "parquet": _write_parquet}  # fmt: skip


def _check_history(summary: dict[str, Any], y_train: np.ndarray, workers: int) -> None:
    for rec in summary["history"]:
        got = rec["examples_by_worker"]
        assert len(got) == workers
        assert sum(got) == len(y_train), (rec["epoch"], got)  # every row once per epoch
        assert max(got) < len(y_train), got  # and no worker read the whole file
    last = summary["history"][-1]
    assert last["test_auc"] > 0.6, last
    assert last["test_logloss"] < _constant_logloss(y_train), last


@pytest.mark.parametrize("kind", list(WRITERS))
def test_logreg_trains_on_the_users_file_each_worker_reading_its_leases(
    tmp_path: Path, kind: str
) -> None:
    data, test, y = WRITERS[kind](tmp_path)
    extra = ["--label", "click"] if kind in ("csv", "parquet") else []
    r = _run(["run", "-s", "1", "-w", "4", LOGREG, "--data", data, "--test", test, *extra,
              "--epochs", "2", "--out", "out", "--no-progress"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "logreg.json").read_text())
    _check_history(summary, y, 4)


def test_train_under_sync_gives_each_worker_a_fixed_share_of_the_parts(tmp_path: Path) -> None:
    data, test, y = _write_criteo(tmp_path)
    r = _run(["train", "logreg", "-s", "1", "-w", "3", "--data", data, "--test", test,
              "--consistency", "sync", "--epochs", "1", "--out", "out"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "logreg.json").read_text())
    _check_history(summary, y, 3)
    assert min(summary["history"][0]["examples_by_worker"]) > 0
    # the per-epoch line says the epoch's own time, and the bar counts parts of a total
    assert re.search(r"logreg epoch 1: train_loss [0-9.]+ .*\([0-9.]+s\)", r.stdout), r.stdout
    assert re.search(r"\d+/\d+ \[", r.stdout + r.stderr), r.stdout[-2000:]


def test_held_out_tenth_and_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    SyntheticCriteo(examples=N_TRAIN, seed=5).write_tsv(tmp_path / "day.tsv")
    r = _run(["train", "logreg", "-s", "1", "--data", "criteo:day.tsv", "--epochs", "1",
              "--out", "out", "--no-progress"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / "out" / "logreg.json").read_text())["history"][0]
    assert 0.05 * N_TRAIN < N_TRAIN - sum(rec["examples_by_worker"]) < 0.2 * N_TRAIN

    (tmp_path / "bad.tsv").write_text("".join(f"{i},x,y\n" for i in range(3000)))
    for data, words in (("criteo:bad.tsv", "no valid line in bad.tsv; is it Criteo TSV"),
                        ("criteo:nowhere.tsv", "nowhere.tsv: no such data file")):  # fmt: skip
        r = _run(["run", "-s", "1", "-w", "2", LOGREG, "--data", data, "--no-progress"], tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        out = r.stdout + r.stderr
        assert words in out, out
        assert "Traceback" not in out and "CTRBatch.concat" not in out, out
        assert out.count("skipped") == 0, out


def test_malformed_lines_are_skipped_and_counted_over_all_workers(tmp_path: Path) -> None:
    data, test, _ = _write_criteo(tmp_path)
    lines = (tmp_path / "train.tsv").read_text().splitlines(keepends=True)
    for i in range(0, len(lines), 200):  # 30 lines lose their last field
        lines[i] = lines[i].rsplit("\t", 1)[0] + "\n"
    (tmp_path / "train.tsv").write_text("".join(lines))
    r = _run(["run", "-s", "1", "-w", "2", LOGREG, "--data", data, "--test", test, "--epochs",
              "1", "--out", "out", "--no-progress"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / "out" / "logreg.json").read_text())["history"][0]
    assert rec["malformed_lines"] == 30
    assert sum(rec["examples_by_worker"]) == N_TRAIN - 30


def test_mlp_trains_on_a_users_csv(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import pandas as pd

    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1500, 4))
    cls = np.argmax(x[:, :3] + 0.3 * rng.normal(0, 1, (1500, 3)), axis=1)
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    df["kind"] = np.array(["red", "green", "blue"])[cls]
    df.to_csv(tmp_path / "points.csv", index=False)
    r = _run(["train", "mlp", "-s", "1", "-w", "2", "--data", "csv:points.csv", "--label",
              "kind", "--epochs", "4", "--out", "out", "--no-progress"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    hist = json.loads((tmp_path / "out" / "mlp.json").read_text())["history"]
    majority = np.bincount(cls).max() / len(cls)
    assert hist[-1]["test_accuracy"] > majority + 0.2, hist
    assert sum(hist[0]["examples_by_worker"]) == 1200  # 4/5 of the rows train


def test_word2vec_on_a_folder_of_text(tmp_path: Path) -> None:
    from paramserver.models.word2vec import read_corpus

    corpus = tmp_path / "texts"
    (corpus / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(40)] + ["Don't", "stop"])
    (corpus / "a.txt").write_text(" ".join(rng.choice(words, 3000)) + "\n")
    (corpus / "more" / "b.txt").write_text("The cat, the DOG.\n" * 200)
    got = read_corpus(str(corpus))
    assert len(got) == 3000 + 800
    assert set(got[-4:].tolist()) == {b"the", b"cat", b"dog"}
    assert b"don't" in set(got.tolist())
    r = _run(["train", "word2vec", "-s", "1", "--corpus", "texts", "--min-count", "1",
              "--dim", "8", "--epochs", "1", "--out", "out", "--no-progress", "--batch", "1000"],
             tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "word2vec.json").read_text())
    assert summary["vocabulary"] == len(set(got.tolist()))
    assert summary["history"][0]["train_loss"] > 0
    assert "cache" not in summary and summary["traffic"]["rows_pulled"] > 0
    # the same with a worker-side cache of both tables: fewer rows pulled, its counts reported
    r = _run(["train", "word2vec", "-s", "1", "--corpus", "texts", "--min-count", "1",
              "--dim", "8", "--epochs", "1", "--out", "cached", "--no-progress", "--batch", "1000",
              "--cache-rows", "1024", "--cache-staleness", "1"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    cached = json.loads((tmp_path / "cached" / "word2vec.json").read_text())
    assert cached["cache"]["hits"] > 0 and set(cached["cache"]["staleness"]) <= {"0", "1"}
    assert cached["traffic"]["rows_pulled"] < summary["traffic"]["rows_pulled"]
    bad = _run(["train", "word2vec", "--corpus", "texts", "--cache-rows", "-5"], tmp_path)
    assert bad.returncode == 2 and "--cache-rows" in bad.stderr and "rows" in bad.stderr, bad.stderr


def test_train_help_lists_the_models_and_a_models_options(tmp_path: Path) -> None:
    r = _run(["train", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "logreg" in r.stdout and "MODEL --help" in r.stdout
    r = _run(["train", "deepfm", "--help"], tmp_path)
    assert r.returncode == 0 and "--patience" in r.stdout and "--data" in r.stdout, r.stderr


def _deepfm(tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / "out"
    r = _run(["train", "deepfm", "-s", "1", "--data", "synthetic", "--examples", "20000",
              "--out", str(out), "--no-progress", *flags], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    summary: dict[str, Any] = json.loads((out / "deepfm.json").read_text())
    return summary


def test_deepfm_defaults_do_not_overfit_and_a_falling_auc_stops_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    aucs = [h["test_auc"] for h in _deepfm(tmp_path)["history"]]
    assert len(aucs) == 3  # the default epochs
    # the test AUC does not fall over the default epochs (the old rates lost 0.02 an epoch)
    assert all(b >= a - 0.003 for a, b in itertools.pairwise(aucs)), aucs
    assert aucs[-1] > aucs[0], aucs
    # the old rates overfit after one epoch: training stops at the first fall of the AUC
    summary = _deepfm(tmp_path, "--lr-sparse", "0.05", "--lr-dense", "1e-3", "--epochs", "4")
    hist = summary["history"]
    assert len(hist) == 2 and hist[1]["test_auc"] < hist[0]["test_auc"], hist
    assert summary["best_epoch"] == 1
    assert summary["best_test_auc"] == hist[0]["test_auc"]
    assert any("stopped early" in n for n in summary["notes"])
    # the model left (and reported as final) is epoch 1's, not the last one's
    assert summary["kept_epoch"] == 1
    assert summary["final"]["test_auc"] == hist[0]["test_auc"]
