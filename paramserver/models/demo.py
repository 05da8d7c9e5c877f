"""``paramserver demo``: FTRL logistic regression and DeepFM on MovieLens-100K, on a local
cluster of 2 servers and 2 workers, next to a single-process scikit-learn baseline.

This process is worker 0 (its progress bars and per-epoch lines are the ones shown); worker 1
is a second process started with the cluster's ``PS_*`` variables. Without registry access the
demo says so and trains on generated (synthetic) Criteo-format data instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paramserver as ps

__all__ = ["main"]


def _data(examples: int) -> tuple[list[str], str]:
    from paramserver.data.fetch import RegistryUnreachable, fetch

    try:
        fetch("movielens-100k")
        return ["--data", "movielens"], "MovieLens-100K"
    except RegistryUnreachable as exc:
        print(
            f"demo: MovieLens-100K cannot be fetched ({exc}); training on SYNTHETIC "
            "Criteo-format data instead",
            flush=True,
        )
        return ["--data", "synthetic", "--examples", str(examples)], "synthetic Criteo-format data"


def _run_model(model: str, args: list[str], servers: int, workers: int) -> int:
    """Start a cluster, worker 1.. as processes, and run worker 0 here."""
    import importlib

    mod = importlib.import_module(f"paramserver.models.{model}")
    timeouts = ps.Timeouts(request=120.0)
    with ps.LocalCluster(servers=servers, workers=workers, timeouts=timeouts) as cluster:
        env = {**os.environ, "PS_COORDINATOR": cluster.address, "PYTHONUNBUFFERED": "1"}
        others = [
            subprocess.Popen(
                [sys.executable, "-m", f"paramserver.models.{model}", *args, "--worker",
                 "--no-progress"],
                env={**env, "PS_RANK": str(r)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for r in range(1, workers)
        ]  # fmt: skip
        try:
            client = cluster.connect(rank=0)
            code = int(mod.train(client, mod.parser().parse_args(args)))
            for p in others:
                _, err = p.communicate(timeout=120)
                if p.returncode:
                    print(err.decode(errors="replace")[-2000:], file=sys.stderr)
                    code = code or p.returncode
            return code
        finally:
            for p in others:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main(
    servers: int = 2,
    workers: int = 2,
    epochs: int = 3,
    out: Path | None = None,
    examples: int = 100_000,
) -> int:
    """Run the demo; returns the exit code. ``examples``: how many the synthetic data has, when
    MovieLens-100K cannot be fetched."""
    from paramserver.models.baselines import sklearn_logreg
    from paramserver.models.ctr import load_ctr
    from paramserver.models.program import plot_curves

    if examples < 1000:
        raise ps.errors.ConfigError(
            f"--examples is {examples}: give at least 1000 (the synthetic data's "
            "examples, a fifth of them held out for testing)"
        )
    start = time.perf_counter()
    out = out or Path("paramserver-demo")
    data_args, what = _data(examples)
    print(
        f"paramserver demo: click prediction on {what}, {servers} servers and {workers} "
        "workers on this machine",
        flush=True,
    )
    ns = argparse.Namespace(data=data_args[1], split="time", examples=examples)
    train, test, desc = load_ctr(ns)
    base = sklearn_logreg(train, test)
    print(f"demo: {desc}: {len(train)} train / {len(test)} test examples", flush=True)
    print(
        f"demo: single-process baseline (scikit-learn logistic regression on the same hashed "
        f"features): test AUC {base['test_auc']:.4f}",
        flush=True,
    )
    common = [*data_args, "--epochs", str(epochs), "--out", str(out),
              "--baseline-auc", repr(base["test_auc"])]  # fmt: skip
    for model in ("logreg", "deepfm"):
        title = "FTRL-Proximal logistic regression" if model == "logreg" else "DeepFM"
        print(f"\n== {title} ==", flush=True)
        code = _run_model(model, common, servers, workers)
        if code:
            return code
    runs, final = {}, {}
    for model in ("logreg", "deepfm"):
        summary = json.loads((out / f"{model}.json").read_text())
        runs[model] = summary["history"]
        # the model the run kept: the best epoch's when it keeps that one (DeepFM)
        final[model] = summary.get("final", runs[model][-1])["test_auc"]
    png = plot_curves(runs, out / "demo.png", title=f"{what}: test AUC vs epoch "
                      f"(scikit-learn baseline {base['test_auc']:.4f})")  # fmt: skip
    (out / "demo.json").write_text(
        json.dumps(
            {
                "data": desc,
                "baseline": base,
                "final_auc": final,
                "seconds": time.perf_counter() - start,
            },
            indent=1,
        )
    )
    print(
        f"\ndemo: final test AUC: FTRL {final['logreg']:.4f}, DeepFM {final['deepfm']:.4f}, "
        f"single-process baseline {base['test_auc']:.4f}",
        flush=True,
    )
    print(f"demo: plot written to {png.resolve()} ({time.perf_counter() - start:.0f}s in all)")
    return 0
