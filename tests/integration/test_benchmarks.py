"""Every benchmark script runs with --quick and prints JSON lines with the expected fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {
    "traffic.py": [],
    "dense.py": [],
    "sparse.py": [],
    "tiny.py": [],
    "startup.py": [],
    # one job of worker processes: "-w 1 2" ran the same run_job path twice (~5 CPU-s more)
    "training.py": ["-w", "2"],
    "capacity.py": ["-s", "1", "2"],
}
# peers.py: the PyTorch peer only (the others need the bench extra; skipped where missing)
PEERS = ["--only", "torch"]


@pytest.mark.timeout(150)
def test_every_benchmark_runs_quick(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "benchmarks", name), "--quick", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, args in SCRIPTS.items()
    }
    results = tmp_path / "results.jsonl"
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=110)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines, f"{name} printed nothing"
        for line in lines:
            rec = json.loads(line)
            for field in ("bench", "case", "value", "unit"):
                assert field in rec, f"{name}: {field!r} missing in {line}"
            assert isinstance(rec["value"], int | float) and rec["value"] >= 0
            if "baseline" in rec:
                assert "ratio" in rec
        with results.open("a") as f:
            f.write("\n".join(lines) + "\n")
    # and the charts of docs/performance.md are drawn from such a run
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), str(results), "--out",
         str(tmp_path / "img")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in SCRIPTS:
        png = tmp_path / "img" / name.replace(".py", ".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no chart {png.name}"


@pytest.mark.timeout(150)
def test_peers_runs_quick_or_says_what_is_missing() -> None:
    """benchmarks/peers.py: every stdout line is a result with its peer's figure and the ratio;
    a peer that is not installed is named on stderr instead."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "--quick", *PEERS],
        capture_output=True, text=True, env=env, timeout=140, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        assert "skipped" in proc.stderr and "not installed" in proc.stderr, proc.stderr[-3000:]
    for line in lines:
        rec = json.loads(line)
        assert rec["bench"] == "peers" and rec["value"] > 0 and "peer" in rec
        assert rec["ratio"] == pytest.approx(rec["value"] / rec["baseline"], rel=1e-3)
