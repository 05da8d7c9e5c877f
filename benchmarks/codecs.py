"""Time to quality with and without value codecs where the network is the limit.

A ready program (``paramserver train mlp``: an MLP on the bundled 8x8 digits, its weights in
dense tables on the servers, sync SGD with Adam on the servers) runs on emulated hosts
(tests/hosts.py: network namespaces, links shaped with ``tc``): the coordinator and one server
on h0, one worker on each of h1..hW, every link at ``--rate``, a cluster token as README.md's
"Many hosts" section sets it up. The same run goes once per codec (``--codec`` of the program:
pulled values and pushed gradients travel in it, pushes with error feedback). Printed per codec:
the wall time (the program's own clock, from its start) until rank 0's test accuracy after an
epoch first reaches ``--target``, the ratio to the run without a codec, and the median time of
an epoch after the first (the first also pays the start-up: imports, compilation, joining).

Needs root (network namespaces); uses only the bed's addresses.

    sudo .venv/bin/python benchmarks/codecs.py --rate 100mbit
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from common import emit, machine, parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hosts  # noqa: E402

PORT = 7070


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # a worker per core at most: no thread oversubscription
    return env


def run_once(bed: hosts.Bed, codec: str, args: Any, folder: Path) -> dict[str, Any]:
    """One training run with ``codec``; the lead's per-epoch records and the wall time."""
    folder.mkdir()
    (folder / "token").write_text(os.urandom(32).hex() + "\n")
    env = _env()
    py = sys.executable
    logs: list[IO[str]] = []
    procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(name: str, host: hosts.Host, argv: list[str], extra: dict[str, str]) -> None:
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115
        logs.append(log)
        proc = host.popen(
            argv, cwd=folder, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append((name, proc))

    coord = f"{bed[0].name}:{PORT}"
    try:
        start("coordinator", bed[0], [py, "-m", "paramserver", "coordinator", "--bind",
              f"0.0.0.0:{PORT}", "-s", "1", "-w", str(args.workers), "--token-file", "token"],
              {})  # fmt: skip
        start("server", bed[0], [py, "-m", "paramserver", "server", "--coordinator", coord,
              "--host", "0.0.0.0", "--advertise", bed[0].name, "--token-file", "token"],
              {})  # fmt: skip
        t0 = time.perf_counter()
        for i in range(args.workers):
            start(f"worker{i}", bed[1 + i], [py, "-m", "paramserver.models.mlp", "--data",
                  "digits", "--hidden", str(args.hidden), "--epochs", str(args.epochs),
                  "--codec", codec, "--out", "out", "--no-progress"],
                  {"PS_COORDINATOR": coord, "PS_TOKEN_FILE": "token"})  # fmt: skip
        for name, proc in procs[2:]:
            try:
                rc = proc.wait(args.timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{name} ({codec}) still runs after {args.timeout}s") from None
            if rc != 0:
                log = (folder / f"{name}.log").read_text()
                raise RuntimeError(f"{name} ({codec}) exited {rc}:\n{log[-3000:]}")
        wall = time.perf_counter() - t0
        for _, proc in procs[:2]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for log in logs:
            log.close()
    history: list[dict[str, Any]] = json.loads((folder / "out" / "mlp.json").read_text())["history"]
    return {"history": history, "wall": wall}


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--rate", default="100mbit", help="every host's link rate")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096, help="hidden units: the tables' size")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--target", type=float, default=0.96, help="test accuracy to reach")
    p.add_argument("--codecs", default="none,bfloat16,int8")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.epochs, args.target = 256, 2, 0.5
    reason = hosts.unavailable()
    if reason is not None:
        print(f"codecs: no emulated hosts: {reason}", file=sys.stderr)
        return 2
    codecs = args.codecs.split(",")
    params = 64 * args.hidden + args.hidden + args.hidden * 10 + 10
    tmp = Path(tempfile.mkdtemp(prefix="ps-codecs-"))
    results: dict[str, float | None] = {}
    try:
        with hosts.up(1 + args.workers, rate=args.rate) as bed:
            for codec in codecs:
                run = run_once(bed, codec, args, tmp / codec)
                reached = [r for r in run["history"] if r.get("test_accuracy", 0) >= args.target]
                # "elapsed": the run's time so far; "seconds": that epoch's own (models/report.py)
                ttq = float(reached[0]["elapsed"]) if reached else None
                secs = [float(r["seconds"]) for r in run["history"]]
                results[codec] = ttq
                base = results.get("none")
                emit(
                    "codecs",
                    f"mlp digits hidden={args.hidden} {args.workers} workers {args.rate} {codec}",
                    ttq if ttq is not None else float("nan"),
                    f"s to test accuracy >= {args.target:g}",
                    baseline=base if codec != "none" and base else None,
                    higher_is_better=False,
                    final_accuracy=run["history"][-1].get("test_accuracy"),
                    epochs=[round(r["seconds"], 2) for r in run["history"]],
                    accuracy=[round(r.get("test_accuracy", 0), 4) for r in run["history"]],
                    wall=round(run["wall"], 2),
                    # an epoch after the first (which also pays the start-up): the network's share
                    epoch_s=round(statistics.median(secs[1:]), 2) if len(secs) > 1 else None,
                    params=params,
                    **machine(),
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
