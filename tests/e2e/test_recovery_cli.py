"""``paramserver run`` restarts a server killed with SIGKILL, and the job completes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).parent / "programs"


@pytest.mark.timeout(120)
def test_run_restarts_a_killed_server_and_the_job_completes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PYTHONUNBUFFERED"] = "1"
    script = Path(sys.executable).with_name("paramserver")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "paramserver"]
    done = subprocess.run(
        [*cmd, "run", "-s", "2", "-w", "1", "--heartbeat-interval", "0.2",
         "--heartbeat-timeout", "2", str(PROGRAMS / "kill_server.py")],
        env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "server 1 exited with signal SIGKILL; restarting it" in out
    assert "done at clock 40" in out
