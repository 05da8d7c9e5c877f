"""Shared by the benchmark scripts: argument parsing, timing, and the one-JSON-line output.

Every script prints one JSON object per result with at least the fields
``bench``, ``case``, ``value``, ``unit``; results with a same-run baseline add
``baseline`` and ``ratio`` (value / baseline), results with a target add ``target``
and ``met``. Medians over ``repeat`` runs; ``--quick`` shrinks sizes so CI only checks
that the scripts still work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

FIELDS = ("bench", "case", "value", "unit")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script works")
    p.add_argument("--repeat", type=int, default=0, help="timed repetitions (default per script)")
    return p


def run_times(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall times of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs, sorted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs."""
    return statistics.median(run_times(fn, repeat, warmup))


def _sig(x: float) -> float:
    return float(f"{x:.5g}")


def emit(
    bench: str,
    case: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    target: float | None = None,
    higher_is_better: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    # five significant digits, not four decimals: a value of 0.0123 s keeps its precision, so
    # the ratio printed is the ratio of the figures printed (to 1e-4)
    rec: dict[str, Any] = {"bench": bench, "case": case, "value": _sig(value), "unit": unit}
    if baseline is not None:
        rec["baseline"] = _sig(baseline)
        rec["ratio"] = round(value / baseline, 4) if baseline else None
    if target is not None:
        rec["target"] = target
        rec["met"] = bool(value >= target if higher_is_better else value <= target)
    rec.update(extra)
    print(json.dumps(rec), flush=True)
    return rec


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
