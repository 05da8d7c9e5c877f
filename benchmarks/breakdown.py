"""Where the time of a sparse step goes, per process: CPU time per step of the worker and of the
server, and (``--profile``) a cProfile by thread CPU time of each, heaviest first.

Two workloads, as ``sparse.py`` and ``traffic.py`` run them, 1 worker + 1 server:

    python benchmarks/breakdown.py sparse              # 100k fresh distinct keys x 16, 1M rows
    python benchmarks/breakdown.py traffic --dim 64    # fresh Zipf batches, pull + push, Adagrad
    python benchmarks/breakdown.py traffic --profile   # and both processes' profiles
    python benchmarks/breakdown.py sparse --keys 1 --repeat 2000   # a request's fixed cost

CPU time is what to compare on a loaded machine (wall time there is mostly waiting for a core),
and the minor page faults per step count fresh memory mapped (the server's: its new rows);
the server's profile covers the timed steps only (SIGUSR2 starts it, SIGUSR1 writes it).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import runpy
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

AS_SERVER = "--as-server"


def serve_profiled() -> None:
    """This script as the server: the server's command line, under a profile switched by
    signals."""
    prof = cProfile.Profile(time.thread_time)
    out = os.environ["PS_BENCH_PROFILE"]
    signal.signal(signal.SIGUSR2, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR1, lambda *_: (prof.disable(), prof.dump_stats(out)))
    sys.argv = ["paramserver.cli", *sys.argv[2:]]
    runpy.run_module("paramserver.cli", run_name="__main__", alter_sys=True)


def loaded() -> None:
    """Wait until the worker's kernels are loaded (paramserver.loading: NumPy paths until then,
    and the loader's thread CPU would count in the timed steps' worker CPU)."""
    try:
        from paramserver import loading
    except ImportError:  # a tree from before it (kernels loaded inside the first request)
        return
    if not loading.use_kernels():  # (starts the loads if no request did)
        loading.loaded(timeout=60.0)


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def main() -> None:
    from common import emit, parser

    import paramserver as ps
    from paramserver.launch import local

    p = parser(__doc__ or "")
    p.add_argument("workload", choices=["sparse", "traffic"])
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="print both processes' profiles")
    p.add_argument("--keys", type=int, default=0, help="sparse: keys per pull (default 100k)")
    args = p.parse_args()
    out = os.path.join(tempfile.mkdtemp(prefix="ps-profile-"), "server.prof")

    class Cluster(local.LocalCluster):
        def _role_cmd(self, *role: str) -> list[str]:
            cmd = super()._role_cmd(*role)
            if role[0] == "server" and args.profile:
                os.environ["PS_BENCH_PROFILE"] = out
                return [cmd[0], os.path.abspath(__file__), AS_SERVER, *cmd[3:]]
            return cmd

    rng = np.random.default_rng(0)
    with Cluster(servers=1, workers=1) as cluster:
        client = cluster.connect()
        server = cluster.pids["server 0"]
        if args.workload == "sparse":
            rows, n = (50_000, 5_000) if args.quick else (1_000_000, 100_000)
            n = args.keys or n
            steps = args.repeat or 30
            every = rng.choice(np.iinfo(np.int64).max, size=rows, replace=False).astype(np.uint64)
            table = client.sparse_table(
                "t", dim=16, init=ps.init.Normal(std=0.01), optimizer=ps.optim.SGD(lr=0.01)
            )
            for i in range(0, rows, 100_000):
                table.pull(every[i : i + 100_000])
            sets = [rng.choice(every, size=n, replace=False) for _ in range(steps + 10)]

            def step(i: int) -> Any:
                return table.pull(sets[i])

        else:
            n = 8_192 if args.quick else 65_536
            steps = args.repeat or 20
            table = client.sparse_table(
                "t", dim=args.dim, init=ps.init.Normal(std=0.01),
                optimizer=ps.optim.Adagrad(lr=0.05),
            )  # fmt: skip
            grad = rng.normal(0, 1e-3, (n, args.dim)).astype(np.float32)
            zipf = np.random.default_rng(7)
            sets = [
                ((zipf.zipf(1.1, size=n) - 1) % 2_000_000).astype(np.uint64)
                for _ in range(steps + 5)
            ]

            def step(i: int) -> Any:
                table.pull(sets[i])
                return table.push(sets[i], grad).result()

        warm = len(sets) - steps
        for i in range(warm):
            step(i)
        loaded()
        prof = cProfile.Profile(time.thread_time) if args.profile else None
        if args.profile:
            os.kill(server, signal.SIGUSR2)
            time.sleep(0.2)
            assert prof is not None
            prof.enable()
        f0, (s0, g0) = proc_stat(os.getpid())[1], proc_stat(server)
        w0, times = time.process_time(), []
        for i in range(warm, len(sets)):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        w1 = time.process_time()
        f1, (s1, g1) = proc_stat(os.getpid())[1], proc_stat(server)
        if prof is not None:
            prof.disable()
            os.kill(server, signal.SIGUSR1)
            time.sleep(1.0)
        dim = 16 if args.workload == "sparse" else args.dim
        what = f"{args.workload} x {dim}, 1 worker + 1 server"
        if args.workload == "sparse" and args.keys:
            what = f"sparse {n} keys x {dim}, 1 worker + 1 server"
        load = round(os.getloadavg()[0], 1)
        emit("breakdown", f"{what}: wall per step (median)", statistics.median(times) * 1e3,
             "ms", higher_is_better=False, load=load)  # fmt: skip
        emit("breakdown", f"{what}: worker CPU per step", (w1 - w0) / steps * 1e3, "ms",
             higher_is_better=False, load=load)  # fmt: skip
        emit("breakdown", f"{what}: server CPU per step", (s1 - s0) / steps * 1e3, "ms",
             higher_is_better=False, load=load)  # fmt: skip
        # pages mapped per step: fresh memory each step costs a fault per 4 KiB page
        emit("breakdown", f"{what}: worker minor page faults per step", (f1 - f0) / steps,
             "faults", higher_is_better=False, load=load)  # fmt: skip
        emit("breakdown", f"{what}: server minor page faults per step", (g1 - g0) / steps,
             "faults", higher_is_better=False, load=load)  # fmt: skip
        if prof is not None:
            print("# server, thread CPU time:")
            pstats.Stats(out).sort_stats("tottime").print_stats(15)
            print("# worker, thread CPU time:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == AS_SERVER:
        serve_profiled()
    else:
        main()
