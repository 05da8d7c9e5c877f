"""CPU time, not wall time, of a dense push+pull over TCP (bulk channel), 1 worker + 1 server.

On a loaded machine wall times move by 2x between runs; what each thread and process spends
on the CPU per operation moves far less, and says where a tree spends more than another. Per
plain push(array) + pull() of a 1 MiB table (``--mib`` sets it; ``--best-case`` times
push(push_buffer()) + pull(copy=False) instead): the worker's
threads (from /proc/self/task), the child processes (server, coordinator) from /proc, and with
``--profile`` the worker's main thread under cProfile, timed by its own CPU clock.

    python benchmarks/dense_cpu.py --repeat 2000               # per-thread and per-process CPU
    python benchmarks/dense_cpu.py --repeat 1000 --profile     # and where the main thread's goes
    python benchmarks/dense_cpu.py --best-case                 # the zero-copy API beside it
"""

from __future__ import annotations

import cProfile
import os
import pstats
import threading
import time

import numpy as np
from common import emit, parser

import paramserver as ps


def _cpu(stat: str) -> float:
    """Seconds of user + system time in a /proc .../stat file."""
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _comm(task: str) -> str:
    with open(f"/proc/self/task/{task}/comm") as f:
        return f.read().strip()


def _children() -> list[int]:
    out: list[int] = []
    for t in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--mib", type=int, default=1, help="table size in MiB")
    p.add_argument("--profile", action="store_true", help="cProfile the worker's main thread")
    p.add_argument("--best-case", action="store_true", help="push_buffer() + pull(copy=False)")
    args = p.parse_args()
    repeat = args.repeat or (50 if args.quick else 2000)
    n = (args.mib << 20) // 4
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect(transport="tcp")
        table = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        table.push_buffer()[:] = 1e-6
        grad = np.full(n, 1e-6, np.float32)

        def op() -> None:
            if args.best_case:
                table.push(table.push_buffer()).result()
                table.pull(copy=False)
            else:  # what a training step does: a gradient of its own, a result it keeps
                table.push(grad).result()
                table.pull()

        for _ in range(50):
            op()
        tasks = os.listdir("/proc/self/task")
        kids = _children()
        t0 = {t: _cpu(f"/proc/self/task/{t}/stat") for t in tasks}
        k0 = {k: _cpu(f"/proc/{k}/stat") for k in kids}
        prof = cProfile.Profile(time.thread_time) if args.profile else None
        wall = time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(repeat):
            op()
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - wall
        t1 = {t: _cpu(f"/proc/self/task/{t}/stat") for t in tasks}
        k1 = {k: _cpu(f"/proc/{k}/stat") for k in kids}
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        api = "best case, push_buffer() + pull(copy=False)" if args.best_case else "plain arrays"
        label = f"{args.mib} MiB push+pull over TCP, {api}"
        emit("dense_cpu", f"{label}: wall (mean)", wall / repeat * 1e6, "us")
        for t in tasks:
            name = names.get(t) or _comm(t)
            if t1[t] > t0[t]:
                emit(
                    "dense_cpu",
                    f"{label}: worker thread {name}",
                    (t1[t] - t0[t]) / repeat * 1e6,
                    "us",
                )
        for k in kids:
            with open(f"/proc/{k}/cmdline") as f:
                role = next((w for w in f.read().split("\0") if w in ("server", "coordinator")), k)
            emit("dense_cpu", f"{label}: process {role}", (k1[k] - k0[k]) / repeat * 1e6, "us")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
