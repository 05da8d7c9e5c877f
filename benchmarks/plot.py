"""Plot the JSON lines of a benchmark run (``run.py --json``) as PNG charts, one per workload.

    python benchmarks/run.py --json results.jsonl
    python benchmarks/plot.py results.jsonl --out docs/img      # dense.png, sparse.png, ...

Each chart shows a workload's results next to the same-run baselines and the targets (dashed).
Lines of other workloads, or a workload that did not run, are skipped. Needs matplotlib (the
``data`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

Rec = dict[str, Any]


def _short(case: str) -> str:
    """A bar label from a case name: its first words, sizes dropped."""
    case = re.sub(r"\s*\(\d+ rows\)|\s*\d+ keys x \d+|\s*64 MiB|\s*1 MiB", "", case)
    return case.replace("push+pull", "").replace(", ", "\n").strip()


def _targets(ax: Any, i: float, r: Rec) -> None:
    """Dashed lines over bar ``i``: the absolute target (red) and the ratio target (orange)."""
    if "target" in r:
        ax.hlines(r["target"], i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed")
    if "target_ratio" in r and "baseline" in r:
        level = r["target_ratio"] * r["baseline"]
        ax.hlines(level, i - 0.4, i + 0.4, colors="tab:orange", linestyles="dashed")


def _bars(ax: Any, recs: list[Rec], title: str, ours: Any = lambda r: True) -> None:
    labels = [_short(r["case"]) for r in recs]
    values = [r["value"] for r in recs]
    colors = ["tab:blue" if ours(r) else "tab:gray" for r in recs]
    ax.bar(range(len(recs)), values, color=colors)
    for i, r in enumerate(recs):
        _targets(ax, i, r)
        ax.text(i, r["value"], f"{r['value']:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(recs)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(recs[0]["unit"])
    ax.set_title(title, fontsize=10)


def _save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dense(recs: list[Rec], path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        recs,
        "dense 1 worker + 1 server (grey: same-run baselines; dashed: target, orange: 0.85 x raw)",
        ours=lambda r: "push+pull" in r["case"],
    )
    _save(fig, path)


def plot_sparse(recs: list[Rec], path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ours = [r for r in recs if "baseline" in r]
    x = range(len(ours))
    ax.bar([i - 0.2 for i in x], [r["value"] for r in ours], 0.4, label="paramserver")
    ax.bar(
        [i + 0.2 for i in x],
        [r["baseline"] for r in ours],
        0.4,
        color="tab:gray",
        label="same kernels in-process",
    )
    for i, r in enumerate(ours):
        _targets(ax, i, r)
    ax.set_xticks(list(x), [_short(r["case"]) for r in ours], fontsize=8)
    ax.set_ylabel(ours[0]["unit"] if ours else "")
    ax.set_title("sparse, 1 worker + 1 server (dashed: target, orange: 0.7 x in-process)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_training(recs: list[Rec], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    single = next((r["value"] for r in recs if "single-process" in r["case"]), None)
    by_servers: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in recs:
        if "workers" in r:
            by_servers[int(r["servers"])].append((int(r["workers"]), r["value"]))
    for s, pts in sorted(by_servers.items()):
        pts.sort()
        ax.plot([w for w, _ in pts], [v for _, v in pts], "o-", label=f"{s} server(s)")
    if single is not None:
        ax.axhline(single, color="tab:gray", linestyle=":", label="single-process NumPy")
        ax.axhline(0.7 * single, color="tab:red", linestyle="dashed", label="target: 0.7 x")
    ax.set_xticks(sorted({w for pts in by_servers.values() for w, _ in pts}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("examples/s")
    ax.set_title("FTRL logistic regression training")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_capacity(recs: list[Rec], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    per: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for r in recs:
        m = re.search(r"on (\d+) servers: server\[", r["case"])
        if m:
            per[int(m.group(1))].append((r["value"], int(r["rows"])))
    servers = sorted(per)
    ax.bar(
        [str(s) for s in servers],
        [max(v for v, _ in per[s]) for s in servers],
        label="largest server RSS (MiB)",
    )
    ax2 = ax.twinx()
    ax2.plot(
        [str(s) for s in servers],
        [max(n for _, n in per[s]) / 1e6 for s in servers],
        "o-",
        color="tab:orange",
        label="rows per server (M)",
    )
    ax2.set_ylim(bottom=0)
    ax.set_xlabel("servers")
    ax.set_ylabel("MiB")
    ax2.set_ylabel("M rows")
    ax.set_title("capacity: each server holds 1/S of the table")
    fig.legend(fontsize=8, loc="upper right", bbox_to_anchor=(0.85, 0.85))
    _save(fig, path)


def plot_simple(recs: list[Rec], path: str, title: str) -> None:
    units = sorted({r["unit"] for r in recs})
    fig, axes = plt.subplots(1, len(units), figsize=(4 * len(units), 4.5), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        _bars(ax, [r for r in recs if r["unit"] == unit], title)
    _save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", help="a JSON-lines file written by run.py --json")
    p.add_argument("--out", default=".", help="directory for the PNG files")
    args = p.parse_args()
    by_bench: dict[str, list[Rec]] = defaultdict(list)
    with open(args.results) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "rerun" not in rec:
                    by_bench[rec["bench"]].append(rec)
    os.makedirs(args.out, exist_ok=True)
    plots = {
        "traffic": lambda r, p: plot_simple(r, p, "training-shaped sparse traffic"),
        "dense": plot_dense,
        "sparse": plot_sparse,
        "training": plot_training,
        "capacity": plot_capacity,
        "tiny": lambda r, p: plot_simple(r, p, "10M keys x 1 float32"),
        "startup": lambda r, p: plot_simple(r, p, "start-up and memory"),
    }
    for bench, fn in plots.items():
        if by_bench.get(bench):
            path = os.path.join(args.out, f"{bench}.png")
            fn(by_bench[bench], path)
            print(path)


if __name__ == "__main__":
    main()
