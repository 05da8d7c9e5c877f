"""Workload 1: push then pull of a dense float32 table (64 MiB), 1 worker + 1 server, one host.

Cases, plain arrays first (``push(array)`` and ``pull()`` returning a new array, what a
training loop writes), the zero-copy path (``push_buffer()`` + ``pull(copy=False)``) beside as
the best case: the default path (shared memory between processes on one host), the same forced
over TCP (``transport="tcp"``, the path between hosts: large arrays on the raw-socket bulk channel),
over TCP in ZeroMQ frames only (``transport="zmq"``), and same-run baselines: a raw TCP socket
round trip receiving into a reused buffer, a pyzmq round trip receiving into fresh buffers,
and a NumPy memcpy. Throughput counts both directions: 2 x table bytes per push+pull.

    python benchmarks/dense.py            # 64 MiB, 9 repetitions
    python benchmarks/dense.py --quick    # 1 MiB
    python benchmarks/dense.py --quick --tcp --repeat 401   # 1 MiB over TCP only, push and pull apart
    python benchmarks/dense.py --shm      # 64 MiB same host only (and memcpy), push and pull apart
    python benchmarks/dense.py --stores   # the kernels alone: streaming stores vs plain, by size
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from common import emit, median_time, parser, run_times

import paramserver as ps

CHUNK = 1 << 20


def _raw_echo_server(port_out: list[int], nbytes: int, rounds: int, ready: threading.Event) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_out.append(srv.getsockname()[1])
    ready.set()
    conn, _ = srv.accept()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for _ in range(rounds):
        got = 0
        while got < nbytes:
            got += conn.recv_into(view[got:], nbytes - got)
        conn.sendall(view)
    conn.close()
    srv.close()


def raw_tcp(nbytes: int, repeat: int) -> float:
    """Seconds per round trip of ``nbytes`` each way over a plain TCP socket (reused buffers).

    The echo side runs in a child process (as a server would), receiving into one reused buffer.
    """
    code = f"""
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
n = {nbytes}; buf = bytearray(n); view = memoryview(buf)
while True:
    got = 0
    while got < n:
        r = conn.recv_into(view[got:], n - got)
        if not r: sys.exit(0)
        got += r
    conn.sendall(view)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        s = socket.create_connection(("127.0.0.1", port))
        out = np.ones(nbytes, np.uint8)
        back = bytearray(nbytes)
        view = memoryview(back)

        def once() -> None:
            s.sendall(out)
            got = 0
            while got < nbytes:
                got += s.recv_into(view[got:], nbytes - got)

        t = median_time(once, repeat)
        s.close()
        return t
    finally:
        child.kill()
        child.wait()


def zmq_fresh(nbytes: int, repeat: int) -> float:
    """Seconds per round trip over pyzmq DEALER/ROUTER in 1 MiB frames, received into fresh
    buffers (what a plain pyzmq program does), echo side in a child process."""
    code = """
import zmq, sys
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0)
port = s.bind_to_random_port("tcp://127.0.0.1"); print(port, flush=True)
while True:
    parts = s.recv_multipart(copy=False)
    s.send_multipart(parts, copy=False)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(f"tcp://127.0.0.1:{port}")
        data = np.ones(nbytes, np.uint8)
        frames = [memoryview(data)[i : i + CHUNK] for i in range(0, nbytes, CHUNK)]

        def once() -> None:
            d.send_multipart(frames, copy=False)
            parts = d.recv_multipart(copy=False)
            out = np.empty(nbytes, np.uint8)  # a fresh buffer, as frames are assembled
            off = 0
            for p in parts:
                b = p.buffer
                out[off : off + len(b)] = np.frombuffer(b, np.uint8)
                off += len(b)

        t = median_time(once, repeat)
        d.close(0)
        ctx.term()
        return t
    finally:
        child.kill()
        child.wait()


def steady(table: ps.DenseTable, grad: np.ndarray) -> None:
    """One push started the worker's kernel loads (paramserver.loading; NumPy paths until
    they are done, seconds on a busy machine): timed steps begin once they are loaded."""
    table.push(grad).result()
    try:
        from paramserver import loading
    except ImportError:  # a tree from before it (kernels loaded inside the first request)
        return
    if not loading.use_kernels():  # (starts the loads if the push did not)
        loading.loaded(timeout=60.0)


def ps_dense(nbytes: int, repeat: int, transport: str) -> tuple[float, float]:
    """(seconds per push+pull through the public API with a reused buffer and read-only views,
    seconds per push+pull of plain arrays: the copy into the send buffer and a fresh pull)."""
    n = nbytes // 4
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect(transport=transport)
        table = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        grad = np.full(n, 1e-6, np.float32)

        table.push_buffer()[:] = grad
        steady(table, grad)

        def fast() -> None:
            # a worker computes its gradient into push_buffer() (the fill is its compute, not
            # timed) and reads the weights through a read-only view
            table.push(table.push_buffer()).result()
            w = table.pull(copy=False)
            assert w.shape == (n,)

        def plain() -> None:
            table.push(grad).result()
            table.pull()

        t_fast = median_time(fast, repeat, warmup=2)
        t_plain = median_time(plain, repeat, warmup=2)
        # correctness spot check: every element moved by the same amount
        w = table.pull()
        assert float(w.max() - w.min()) < 1e-3
        return t_fast, t_plain


def ps_apart(nbytes: int, repeat: int, plain: bool, transport: str) -> tuple[float, float]:
    """(median seconds of a push, of a pull), timed apart in one loop: plain arrays
    (``push(array)``, ``pull()`` returning a new array), or the best case (``push_buffer()``,
    ``pull(copy=False)``)."""
    n = nbytes // 4
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect(transport=transport)
        table = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        grad = np.full(n, 1e-6, np.float32)
        table.push_buffer()[:] = 1e-6
        steady(table, grad)
        pushes: list[float] = []
        pulls: list[float] = []
        for i in range(repeat + 5):  # the first 5 untimed
            t0 = time.perf_counter()
            table.push(grad if plain else table.push_buffer()).result()
            t1 = time.perf_counter()
            if plain:
                table.pull()
            else:
                table.pull(copy=False)
            if i >= 5:
                pushes.append(t1 - t0)
                pulls.append(time.perf_counter() - t1)
        return statistics.median(pushes), statistics.median(pulls)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ps_cpu(nbytes: int, repeat: int) -> list[tuple[str, float, float]]:
    """(case, worker CPU seconds per step, server CPU seconds per step) on one host, plain
    arrays and the best case alternated twice: steadier than wall time on a loaded machine."""
    n = nbytes // 4
    out: list[tuple[str, float, float]] = []
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect()
        table = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        grad = np.full(n, 1e-6, np.float32)
        table.push_buffer()[:] = grad
        steady(table, grad)
        server = int(client.stats()[0]["pid"])

        def plain() -> None:
            table.push(grad).result()
            table.pull()

        def fast() -> None:
            table.push(table.push_buffer()).result()
            table.pull(copy=False)

        for case, step in (("plain arrays", plain), ("best case", fast)) * 2:
            for _ in range(3):
                step()
            w0, s0 = time.process_time(), _cpu_seconds(server)
            for _ in range(repeat):
                step()
            w1, s1 = time.process_time(), _cpu_seconds(server)
            out.append((case, (w1 - w0) / repeat, (s1 - s0) / repeat))
    return out


def memcpy(nbytes: int, repeat: int) -> float:
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    return median_time(lambda: np.copyto(b, a), repeat)


def stores(mib: list[float], repeat: int) -> None:
    """The two writes of a plain step with streaming stores (``paramserver.nontemporal``) and
    with plain ones, one core, by size: the worker's copy of a gradient into shared memory,
    then the server's SGD reading that copy and writing a reply region (a quarter of the
    timings' spread: the fastest quartile, as other processes share the cores)."""
    import types

    import numba

    from paramserver import nontemporal
    from paramserver.server import kernels as k
    from paramserver.wire import shm

    def streaming_always(kernel: Any) -> Any:
        # the kernel compiled afresh with no size below which it stores plainly: what the
        # threshold (nontemporal.STREAM_BYTES) saves on small arrays
        start = nontemporal.stream_start.py_func
        start = types.FunctionType(start.__code__, {**start.__globals__, "STREAM_BYTES": 0})
        fn = kernel.py_func
        fn = types.FunctionType(
            fn.__code__,
            {**fn.__globals__, "stream_start": numba.njit(inline="always")(start)},
            fn.__name__,
        )
        options = {o: v for o, v in kernel.targetoptions.items() if o != "nopython"}
        return numba.njit(**options)(fn)

    copy_count, sgd_copy = nontemporal.copy_count, k.sgd_copy
    copy_always, sgd_always = streaming_always(copy_count), streaming_always(sgd_copy)

    @numba.njit(nogil=True)
    def copy_plain(src: np.ndarray, dst: np.ndarray, exponent: np.uint32) -> int:
        c = 0
        for i in range(src.shape[0]):
            b = src[i]
            dst[i] = b
            if b & exponent == exponent:
                c += 1
        return c

    @numba.njit(nogil=True, error_model="numpy")
    def sgd_plain(w: np.ndarray, g: np.ndarray, out: np.ndarray, lr: np.float32) -> None:
        for j in range(w.shape[0]):
            x = w[j] - lr * g[j]
            w[j] = x
            out[j] = x

    def quartile(fn: Callable[[], object], r: int) -> float:
        return run_times(fn, r)[r // 4]

    exp, lr = np.uint32(0x7F80_0000), np.float32(0.5)
    for size in mib:
        n = int(size * (1 << 20)) // 4
        seg = shm.create(n * 4, regions=2)
        assert seg is not None, "no room in /dev/shm"
        try:
            grad = seg.typed(0, np.dtype(np.float32), n)
            reply = seg.typed(1, np.dtype(np.float32), n)
            grad[:] = 0
            reply[:] = 0
            src = np.full(n, 1e-6, np.float32)
            w = np.zeros(n, np.float32)
            bits, gbits = src.view(np.uint32), grad.view(np.uint32)
            r = max(repeat, int(400 / size))

            def copy(
                count: Callable[..., int], b: np.ndarray = bits, g: np.ndarray = gbits
            ) -> None:
                count(b, g, exp)

            def sgd(
                update: Callable[..., None],
                w: np.ndarray = w,
                g: np.ndarray = grad,
                out: np.ndarray = reply,
            ) -> None:
                update(w, g, out, lr)

            for what, plain, streamed, always in (
                ("copy", lambda: copy(copy_plain), lambda: copy(copy_count),
                 lambda: copy(copy_always)),
                ("SGD into a reply region", lambda: sgd(sgd_plain), lambda: sgd(sgd_copy),
                 lambda: sgd(sgd_always)),
                ("copy, then SGD over the copy",
                 lambda: (copy(copy_plain), sgd(sgd_plain)),
                 lambda: (copy(copy_count), sgd(sgd_copy)),
                 lambda: (copy(copy_always), sgd(sgd_always))),
            ):  # fmt: skip
                t_plain = quartile(plain, r)
                t_stream = quartile(streamed, r)
                t_always = quartile(always, r)
                case = f"{what}, {size:g} MiB, one core"
                emit("dense", f"{case}: plain stores", t_plain * 1e3, "ms")
                emit("dense", f"{case}: streaming stores at any size", t_always * 1e3, "ms",
                     baseline=t_plain * 1e3, higher_is_better=False)  # fmt: skip
                emit("dense", f"{case}: streaming stores from STREAM_BYTES (the kernels)",
                     t_stream * 1e3, "ms", baseline=t_plain * 1e3, higher_is_better=False)  # fmt: skip
        finally:
            seg.close()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument(
        "--tcp", action="store_true", help="only over TCP (bulk channel), push and pull apart"
    )
    p.add_argument(
        "--shm", action="store_true", help="only on one host (shared memory), push and pull apart"
    )
    p.add_argument(
        "--stores", action="store_true", help="the kernels alone: streaming vs plain stores"
    )
    args = p.parse_args()
    if args.stores:
        stores([0.25, 1] if args.quick else [0.25, 1, 2, 4, 8, 16, 64], args.repeat or 5)
        return
    nbytes = (1 << 20) if args.quick else (64 << 20)
    repeat = args.repeat or (3 if args.quick else 9)
    gb = 2 * nbytes / 1e9  # both directions
    mib = nbytes >> 20
    if args.shm:
        t_mem = memcpy(nbytes, repeat)
        emit("dense", f"numpy memcpy {mib} MiB", nbytes / 1e9 / t_mem, "GB/s")
        t_shm, t_shm_plain = ps_dense(nbytes, repeat, "auto")
        emit("dense", f"push+pull {mib} MiB, same host, plain arrays", gb / t_shm_plain, "GB/s")
        emit("dense", f"best case: push+pull {mib} MiB, same host", gb / t_shm, "GB/s")
        for plain, label in ((True, "plain arrays"), (False, "best case")):
            t_push, t_pull = ps_apart(nbytes, repeat, plain, "auto")
            emit("dense", f"{label}, same host {mib} MiB: push (median)", t_push * 1e3, "ms")
            emit("dense", f"{label}, same host {mib} MiB: pull (median)", t_pull * 1e3, "ms")
        for case, worker, server in ps_cpu(nbytes, max(repeat, 20)):
            emit("dense", f"{case}, same host {mib} MiB: worker CPU per step", worker * 1e3, "ms")
            emit("dense", f"{case}, same host {mib} MiB: server CPU per step", server * 1e3, "ms")
        return
    if args.tcp:
        for plain, label in ((True, "plain arrays"), (False, "best case")):
            t_push, t_pull = ps_apart(nbytes, repeat, plain, "tcp")
            emit("dense", f"{label} over TCP {mib} MiB: push (median)", t_push * 1e3, "ms")
            emit("dense", f"{label} over TCP {mib} MiB: pull (median)", t_pull * 1e3, "ms")
        t_tcp, t_tcp_plain = ps_dense(nbytes, repeat, "tcp")
        emit("dense", f"push+pull {mib} MiB over TCP, plain arrays", gb / t_tcp_plain, "GB/s")
        emit("dense", f"best case: push+pull {mib} MiB over TCP", gb / t_tcp, "GB/s")
        return
    t_mem = memcpy(nbytes, repeat)
    emit("dense", f"numpy memcpy {mib} MiB", nbytes / 1e9 / t_mem, "GB/s")
    t_raw = raw_tcp(nbytes, repeat)
    emit("dense", f"raw TCP socket round trip {mib} MiB (reused buffer)", gb / t_raw, "GB/s")
    t_zmq = zmq_fresh(nbytes, repeat)
    emit(
        "dense",
        f"pyzmq round trip {mib} MiB (fresh buffers)",
        gb / t_zmq,
        "GB/s",
        baseline=gb / t_raw,
    )
    t_shm, t_shm_plain = ps_dense(nbytes, repeat, "auto")
    emit(
        "dense",
        f"push+pull {mib} MiB, same host, plain arrays: push(array), pull() (a new array)",
        gb / t_shm_plain,
        "GB/s",
        baseline=gb / t_raw,
        target=8.5,
    )
    emit(
        "dense",
        f"best case: push+pull {mib} MiB, same host, push_buffer() + pull(copy=False) (zero-copy)",
        gb / t_shm,
        "GB/s",
        baseline=gb / t_raw,
        target=12.0,
    )
    t_tcp, t_tcp_plain = ps_dense(nbytes, repeat, "tcp")
    emit(
        "dense",
        f"push+pull {mib} MiB over TCP, plain arrays",
        gb / t_tcp_plain,
        "GB/s",
        baseline=gb / t_raw,
        target_ratio=0.6,
        met=bool(t_raw / t_tcp_plain >= 0.6),
    )
    emit(
        "dense",
        f"best case: push+pull {mib} MiB over TCP, push_buffer() + pull(copy=False)",
        gb / t_tcp,
        "GB/s",
        baseline=gb / t_raw,
        target_ratio=0.85,
        met=bool(t_raw / t_tcp >= 0.85),
    )
    t_zmq_ps, _ = ps_dense(nbytes, repeat, "zmq")
    emit(
        "dense",
        f"push+pull {mib} MiB over TCP, ZeroMQ frames only (transport='zmq')",
        gb / t_zmq_ps,
        "GB/s",
        baseline=gb / t_raw,
    )


if __name__ == "__main__":
    main()
