"""Sync, bounded staleness, async: what they cost and buy, measured.

Trains the FTRL logistic regression with 4 workers, one of them 3x slower than the others (it
sleeps twice its own step time after each step), under sync, ssp:1, ssp:4 and async, on
MovieLens-100K (or, offline, generated Criteo-format data, said so). Worker 0 evaluates the test
AUC every few steps; every worker records the staleness its pulls were served with. Writes one
JSON line per mode, ``consistency.json``, the plot ``consistency.png`` and the Markdown table
``consistency.md`` into ``--out`` (docs/ by default).

    python benchmarks/consistency.py [--quick] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import paramserver as ps

MODES = ["sync", "ssp:1", "ssp:4", "async"]


def _data(quick: bool) -> tuple[Any, Any, str]:
    from paramserver.data import SyntheticCriteo, load_movielens
    from paramserver.data.fetch import RegistryUnreachable

    try:
        tr, te = load_movielens("time")
        return tr, te, "MovieLens-100K (time split)"
    except RegistryUnreachable:
        tr, te = SyntheticCriteo(examples=30_000 if quick else 100_000).make()
        return tr, te, "SYNTHETIC Criteo-format data (the registry cannot be reached)"


def worker(args: argparse.Namespace) -> int:
    from paramserver.models.logreg import train_worker

    tr, te, _ = _data(args.quick)
    with ps.connect() as client:
        out = train_worker(
            client, tr, te, epochs=args.epochs, batch=256, consistency=args.mode,
            slow_rank=3, slow_factor=3.0, eval_every=args.eval_every if client.rank == 0 else 0,
            show=False,
        )  # fmt: skip
        rec = {"rank": client.rank, "staleness": out["staleness"], "steps": out["steps"],
               "curve": out["curve"]}  # fmt: skip
    (Path(args.tmp) / f"{args.mode.replace(':', '_')}.{rec['rank']}.json").write_text(
        json.dumps(rec)
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 epoch, fewer evaluations")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--eval-every", type=int, default=25, help="steps between worker 0's evaluations"
    )
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.epochs = 1
    import tempfile

    _, _, what = _data(args.quick)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            start = time.perf_counter()
            code = ps.launch.run_job(
                [__file__, "--worker", "--mode", mode, "--tmp", tmp, "--epochs", str(args.epochs),
                 "--eval-every", str(args.eval_every), *(["--quick"] if args.quick else [])],
                servers=2, workers=4, timeouts=ps.Timeouts(request=300.0),
            )  # fmt: skip
            if code:
                return code
            wall = time.perf_counter() - start
            recs = [json.loads((Path(tmp) / f"{mode.replace(':', '_')}.{r}.json").read_text())
                    for r in range(4)]  # fmt: skip
            hist: dict[int, int] = {}
            for r in recs:
                for k, v in r["staleness"].items():
                    hist[int(k)] = hist.get(int(k), 0) + v
            curve = recs[0]["curve"]
            results.append({"mode": mode, "wall_seconds": wall, "curve": curve,
                            "final_auc": curve[-1]["test_auc"],
                            "steps": {r["rank"]: r["steps"] for r in recs},
                            "staleness": dict(sorted(hist.items()))})  # fmt: skip
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    best = max(r["final_auc"] for r in results)
    target = round(best - 0.005, 3)
    for r in results:
        hit = [c["seconds"] for c in r["curve"] if c["test_auc"] >= target]
        r["time_to_target"] = hit[0] if hit else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "consistency.json").write_text(json.dumps({"data": what, "target_auc": target,
                                                           "results": results}, indent=1))  # fmt: skip
    _plot(results, args.out / "consistency.png", what, target)
    _table(results, args.out / "consistency_table.md", what, target)
    print((args.out / "consistency_table.md").read_text())
    return 0


def _plot(results: list[dict[str, Any]], path: Path, what: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in results:
        a.plot(
            [c["seconds"] for c in r["curve"]], [c["test_auc"] for c in r["curve"]], label=r["mode"]
        )
        ks = np.array(sorted(r["staleness"]))
        vs = np.array([r["staleness"][k] for k in ks], dtype=float)
        b.plot(ks, vs / vs.sum(), marker="o", label=r["mode"])
    a.axhline(target, color="grey", ls=":", lw=1)
    a.set(xlabel="wall-clock seconds (worker 0)", ylabel="test AUC", title="test AUC over time")
    b.set(xlabel="staleness of a pull (clocks)", ylabel="fraction of pulls", title="staleness",
          yscale="log")  # fmt: skip
    a.legend()
    b.legend()
    fig.suptitle(f"FTRL, 4 workers (one 3x slower), 2 servers: {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(results: list[dict[str, Any]], path: Path, what: str, target: float) -> None:
    lines = [f"Data: {what}. Target AUC {target} (best final AUC - 0.005).", "",
             "| mode | wall s (whole run) | time to target AUC (s) | final AUC | steps per worker | staleness: mean / max |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        ks = np.array([int(k) for k in r["staleness"]])
        vs = np.array(list(r["staleness"].values()), dtype=float)
        mean = float((ks * vs).sum() / vs.sum()) if len(vs) else 0.0
        ttt = "not reached" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}"
        steps = ", ".join(str(r["steps"][k]) for k in sorted(r["steps"]))
        lines.append(f"| {r['mode']} | {r['wall_seconds']:.1f} | {ttt} | {r['final_auc']:.4f} | "
                     f"{steps} | {mean:.2f} / {int(ks.max()) if len(ks) else 0} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
