"""The soak benchmark runs (``--quick``) and ends with no errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(120)
def test_soak_quick_has_no_errors() -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    by_case = {r["case"]: r for r in recs}
    assert by_case["errors"]["value"] == 0
    assert by_case["throughput"]["value"] > 0
    assert all(r["errors"] == 0 for r in recs if r["case"].startswith("t="))
    assert "server memory growth after warm-up" in by_case
