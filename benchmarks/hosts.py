"""Throughput between emulated hosts (tests/hosts.py): dense and sparse push+pull with S server
hosts and W worker hosts on links shaped to a rate, with and without a cluster token, on the bulk
channel or in ZeroMQ frames; printed as a fraction of what the links can carry. Needs root.

Each worker pulls and pushes at once, step after step for ``--seconds`` (an async table: the
pull does not wait for the push beside it, as in a pipelined training step), so both directions
of every link can be full. The links' counters are read when every worker has passed the start
barrier and again when every one has finished its timed steps. ``link_fraction`` is the busiest
link's bytes (its busier direction, as its ``tc tbf`` queue counted them: every packet on the
wire, headers included, which is what tbf charges against the rate) over what the rate lets
through in that time: 1.0 is a full link; ``worker_links`` and ``server_links`` the same for
each side (``--server-rate`` gives the server hosts' links a rate of their own, for a layout
where they are the limit). ``tbf_drops`` are packets the shaper dropped (its queue holds 20 ms).
``training`` runs the ready FTRL logistic regression (sync, one epoch of synthetic CTR data)
and reports examples/s. ``cpu_wait`` is the cores' worth of the cluster's threads that were
ready to run but waited for a core (the kernel's schedstat): where it is high, the machine's
cores, not the link, were the limit (``cpu_bound``); ``cpu_s_per_gb`` the cluster's CPU seconds
per GB its workers moved (both ways together).

    sudo PYTHONPATH=. .venv/bin/python benchmarks/hosts.py   # 100mbit, 500mbit, 1gbit, 10gbit
    sudo PYTHONPATH=. .venv/bin/python benchmarks/hosts.py --quick    # one small case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests import hosts

WORKER = r"""
import json, sys, time
import numpy as np
import paramserver as ps
kind, transport, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rounds, seconds = int(sys.argv[4]), float(sys.argv[5])
with ps.connect(transport=transport) as client:
    if kind == "training":  # the ready FTRL logistic regression, sync, on synthetic CTR data
        from paramserver.data.ctr import SyntheticCriteo
        from paramserver.models.logreg import train_worker
        train, test = SyntheticCriteo(examples=n, seed=1).make()
        client.barrier("b/start", timeout=120)
        print("GO", flush=True)
        t0 = time.perf_counter()
        out = train_worker(client, train, test, epochs=rounds, consistency="sync", show=False)
        seconds = time.perf_counter() - t0
        print("DONE", flush=True)
        client.barrier("b/end", timeout=300)
        print("RESULT", json.dumps({"bytes": 0, "seconds": seconds,
                                    "examples": len(train.y) * rounds // client.num_workers,
                                    "auc": out["curve"][-1]["test_auc"] if out["curve"] else None}),
              flush=True)
        sys.exit(0)
    if kind == "dense":
        t = client.dense_table("b/d", shape=(n,), optimizer=ps.optim.SGD(lr=1e-9),
                               consistency="async")
        g = np.ones(n, np.float32)
        def step():  # the next weights travel while the gradient goes out (a pipelined step)
            f = t.pull_async(copy=False)
            t.push(g).result()
            f.result()
        nbytes = 4 * n
    else:
        dim = 16
        t = client.sparse_table("b/s", dim=dim, optimizer=ps.optim.SGD(lr=1e-9),
                                consistency="async")
        rng = np.random.default_rng(client.rank)
        keys = rng.integers(0, 1 << 40, n // dim, dtype=np.uint64)
        g = np.ones((len(keys), dim), np.float32)
        def step():
            f = t.pull_async(keys)
            t.push(keys, g).result()
            f.result()
        nbytes = 4 * n + 8 * len(keys)  # rows, plus the keys each way
    step()
    client.barrier("b/start", timeout=60)
    print("GO", flush=True)  # the parent reads the links' counters once every worker said so
    t0 = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - t0 < seconds:
        step()
        done += 1
    took = time.perf_counter() - t0
    print("DONE", flush=True)
    client.barrier("b/end", timeout=120)
print("RESULT", json.dumps({"bytes": nbytes * done, "seconds": took}), flush=True)
"""


CASE_TIMEOUT = 600.0  # seconds a case's workers may take, start-up included


def _sched(pids: list[int]) -> dict[str, tuple[int, int]]:
    """Per thread of ``pids``: nanoseconds it ran so far, and nanoseconds it was ready to run
    but waited for a core (the kernel's schedstat)."""
    out = {}
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
            except OSError:
                continue
            out[task] = (int(fields[0]), int(fields[1]))
    return out


def _cores(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], seconds: float
) -> tuple[float, float]:
    """Cores' worth of the threads' running, and of their waiting for a core, in between (a
    thread that ended in between is left out: its counters went with it)."""
    ran = sum(r - before.get(t, (0, 0))[0] for t, (r, _) in after.items())
    waited = sum(w - before.get(t, (0, 0))[1] for t, (_, w) in after.items())
    return ran / 1e9 / seconds, waited / 1e9 / seconds


def _tbf(host: hosts.Host) -> tuple[dict[str, int], dict[str, int]]:
    """The counters of ``host``'s two tbf queues: (what it sent, what it received). tbf counts
    a segmentation-offloaded packet as the packets it becomes on the wire (headers and all), as
    it charges them against its rate; an interface's counters see one header for 64 KiB."""

    def stats(argv: list[str]) -> dict[str, int]:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        q = next(q for q in json.loads(out) if q.get("kind") == "tbf")
        return {k: int(q[k]) for k in ("bytes", "packets", "drops", "overlimits")}

    sent = stats(["tc", "-n", host.netns, "-s", "-j", "qdisc", "show", "dev", "eth0"])
    return sent, stats(["tc", "-s", "-j", "qdisc", "show", "dev", host.veth])


def _marks(procs: list[subprocess.Popen[str]], mark: str) -> None:
    """Read each worker's output up to the line ``mark`` (or its end, if it failed first)."""
    for p in procs:
        assert p.stdout is not None
        while (line := p.stdout.readline()) and line.strip() != mark:
            pass


def _sample(links: list[hosts.Host]) -> tuple[float, list[tuple[dict[str, int], ...]]]:
    t0 = time.perf_counter()
    counts = [_tbf(h) for h in links]
    return (t0 + time.perf_counter()) / 2, counts


def run_case(bed: hosts.Bed, folder: Path, case: dict[str, Any]) -> dict[str, Any]:
    s, w = case["servers"], case["workers"]
    rate = hosts.parse_rate(case["rate"])  # the workers' links (and the others')
    server_rate = hosts.parse_rate(case.get("server_rate") or case["rate"])
    for i, h in enumerate(bed):
        h.shape(case.get("server_rate") or case["rate"] if 1 <= i <= s else case["rate"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    secure = ["--token-file", "token"] if case["token"] else ["--insecure"]
    wenv = {**env, "PS_COORDINATOR": f"{bed[0].name}:7070"}
    if case["token"]:
        wenv["PS_TOKEN_FILE"] = "token"
    ps_ = [sys.executable, "-m", "paramserver"]
    procs = [bed[0].popen([*ps_, "coordinator", "--bind", "0.0.0.0:7070", "-s", str(s), "-w",
                           str(w), *secure], cwd=folder, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]  # fmt: skip
    workers: list[subprocess.Popen[str]] = []
    timer: threading.Timer | None = None
    overdue = threading.Event()
    try:
        for i in range(s):
            procs.append(bed[1 + i].popen(
                ["sh", "-c", f"exec {' '.join(ps_)} server --coordinator {bed[0].name}:7070 "
                 f"--host 0.0.0.0 --advertise $(hostname) {' '.join(secure)}"],
                cwd=folder, env=env, stdout=subprocess.DEVNULL,
                stderr=open(folder / f"server{i}.log", "w")))  # fmt: skip  # noqa: SIM115
        argv = [case["kind"], case["transport"], str(case["n"]), str(case.get("rounds", 1)),
                str(case.get("seconds", 0))]  # fmt: skip
        for i in range(w):
            with open(folder / f"worker{i}.log", "w") as err:
                workers.append(bed[1 + s + i].popen(
                    [sys.executable, "-c", WORKER, *argv], cwd=folder, env=wenv,
                    stdout=subprocess.PIPE, stderr=err))  # fmt: skip
        pids = [p.pid for p in procs + workers]
        links = [bed[1 + i] for i in range(s + w)]  # every server's and worker's link

        # the reads below wait for the workers' lines: a worker that hangs is killed (EOF)
        def overrun() -> None:
            overdue.set()
            for p in workers:
                p.kill()

        timer = threading.Timer(CASE_TIMEOUT, overrun)
        timer.start()
        # the time and the bytes between the workers' first and last timed step
        _marks(workers, "GO")
        t0, before = _sample(links)
        cpu0 = _sched(pids)
        _marks(workers, "DONE")
        t1, after = _sample(links)
        cpu, wait = _cores(cpu0, _sched(pids), t1 - t0)
        outs = []
        for p in workers:  # (read, not communicate: it would miss what _marks buffered)
            assert p.stdout is not None
            outs.append(p.stdout.read())
            p.wait(10)
        if overdue.is_set():
            raise RuntimeError(f"{case}: the workers ran past {CASE_TIMEOUT}s and were killed")
    finally:
        if timer is not None:
            timer.cancel()
        for p in procs + workers:
            p.kill()
            p.wait(10)
    results = []
    for out, p, i in zip(outs, workers, range(w), strict=True):
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            logs = "".join(f.read_text()[-1500:] for f in sorted(folder.glob("server*.log")))
            err = (folder / f"worker{i}.log").read_text()[-2000:]
            raise RuntimeError(f"worker exited {p.returncode}: {err}\nservers: {logs}")
        results.append(json.loads(line.removeprefix("RESULT ")))
    window = t1 - t0
    where = f" ({case['server_rate']} server links)" if case.get("server_rate") else ""
    name = (f"{case['kind']} {case['rate']}{where} {s} server x {w} worker hosts, "
            f"{'token' if case['token'] else 'no token'}, {case['transport']}")  # fmt: skip
    out: dict[str, Any] = {"bench": "hosts", "case": name, **case}
    if case["kind"] == "training":
        seconds = max(r["seconds"] for r in results)
        out["examples_per_s"] = round(sum(r["examples"] for r in results) / seconds)
        out["test_auc"] = next((r["auc"] for r in results if r["auc"] is not None), None)
    else:
        out["MB_per_s_each_way"] = round(sum(r["bytes"] / r["seconds"] for r in results) / 1e6, 1)
    # each link's busier way: its tbf's bytes over what it lets through in the window
    fractions = []
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        cap = (server_rate if i < s else rate) / 8 * window
        fractions.append(max((b[d]["bytes"] - a[d]["bytes"]) / cap for d in (0, 1)))
    out["link_fraction"] = round(max(fractions), 3)
    out["server_links"] = round(max(fractions[:s]), 3)
    out["worker_links"] = round(max(fractions[s:]), 3)
    out["tbf_drops"] = sum(b[d]["drops"] - a[d]["drops"]
                           for a, b in zip(before, after, strict=True) for d in (0, 1))  # fmt: skip
    out["seconds"] = round(window, 2)
    out["value"], out["unit"] = out["link_fraction"], "fraction of the busiest link"
    # cores the cluster used, and cores' worth of its threads ready to run but not running
    out["cpu_cores"], out["cpu_wait"] = round(cpu, 2), round(wait, 2)
    if "MB_per_s_each_way" in out:  # the cluster's CPU time per GB moved (both ways together)
        out["cpu_s_per_gb"] = round(cpu / max(2e-3 * out["MB_per_s_each_way"], 1e-9), 2)
    out["cpu_bound"] = cpu > 1.6 or wait > 0.5
    return out


# elements a worker pulls and pushes per step, by the slowest link's rate (about 0.3 s a step)
SIZES = {"100mbit": 1 << 20, "500mbit": 1 << 21, "1gbit": 1 << 22, "10gbit": 1 << 23}


def cases(quick: bool, seconds: float, server_rate: str | None) -> list[dict[str, Any]]:
    """Every case: dense and sparse for ``seconds`` each (at least 2 steps), and training."""
    if quick:
        return [{"kind": "dense", "rate": "100mbit", "servers": 1, "workers": 1, "token": False,
                 "transport": "tcp", "n": 1 << 19, "rounds": 3, "seconds": 0}]  # fmt: skip
    out = []
    for rate in SIZES:
        slowest = min(rate, server_rate or rate, key=hosts.parse_rate)
        n = SIZES.get(slowest, 1 << 20)
        for s, w in ((1, 1), (2, 2), (1, 2), (2, 1), (1, 4), (2, 4), (4, 4), (4, 1)):
            for token in (False, True):
                for kind, paths in (("dense", ("tcp", "zmq")), ("sparse", ("tcp",))):
                    for transport in paths:
                        out.append({"kind": kind, "rate": rate, "server_rate": server_rate,
                                    "servers": s, "workers": w, "token": token,
                                    "transport": transport,
                                    "n": n if kind == "dense" else n // 4, "rounds": 2,
                                    "seconds": seconds})  # fmt: skip
            out.append({"kind": "training", "rate": rate, "server_rate": server_rate,
                        "servers": s, "workers": w, "token": True, "transport": "tcp",
                        "n": 40_000, "rounds": 1})  # fmt: skip
    return out


def seal_cost(mib: int = 64) -> dict[str, Any]:
    """One core's rate of sealing and opening a payload (paramserver.wire.seal), against a plain
    copy of the same bytes: the sealed channel's CPU cost, which the link does not see."""
    import numpy as np

    from paramserver.wire import seal

    if not seal.available():
        return {"bench": "hosts", "case": "seal: cryptography missing", "value": 0, "unit": "-"}
    key = seal.ticket_key(b"k" * 32, 1)
    src = np.ones(mib << 20, np.uint8)
    dst = np.empty_like(src)
    head = getattr(seal, "HEAD", 0)  # (a record's length field, since 2026-12-07)
    out, sealed_buf = memoryview(dst), bytearray(head + seal.RECORD + seal.TAG)
    np.copyto(dst, src)  # the destination's pages are touched before anything is timed
    t0 = time.perf_counter()
    np.copyto(dst, src)
    copy = time.perf_counter() - t0
    tx, rx = seal.Seal(key, 0), seal.Seal(key, 0)
    t0 = time.perf_counter()
    plain = memoryview(src)
    for a in range(0, src.nbytes, seal.RECORD):
        rx.open(tx.seal(plain[a : a + seal.RECORD], sealed_buf), out[a : a + seal.RECORD])
    sealed = time.perf_counter() - t0
    return {
        "bench": "hosts", "case": "seal + open on one core (AES-256-GCM)",
        "value": round(src.nbytes / sealed / 1e6), "unit": "MB/s",
        "baseline": round(src.nbytes / copy / 1e6), "ratio": round(copy / sealed, 3),
    }  # fmt: skip


def stream_cost(mib: int = 256, payload_mib: int = 8) -> list[dict[str, Any]]:
    """CPU seconds per GB through a bulk connection's two threads (streams.Writer and Reader,
    over a socketpair in one process), raw and sealed: everything the channel's ends do for a
    payload (sealing, reading, opening, copies), not just the cipher."""
    import socket

    import numpy as np

    from paramserver.wire import seal, streams

    rows = []
    for sealed in (False, True) if seal.available() else (False,):
        key = seal.ticket_key(b"k" * 32, 1)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)

        reader = streams.Reader(ours, "bench", seal.Seal(key, 0) if sealed else None)
        writer = streams.Writer(theirs, "bench", 30.0, seal.Seal(key, 0) if sealed else None)
        reader.start()
        writer.start()
        src = np.ones(payload_mib << 20, np.uint8)
        dst = np.empty_like(src)
        try:
            for _ in range(2):  # warm: pieces of read-ahead memory, pages of dst
                writer.send(memoryview(src), "warm")
                reader.read_into(memoryview(dst), 30.0, "warm")
            n = mib // payload_mib
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                writer.send(memoryview(src), "bench")
                reader.read_into(memoryview(dst), 30.0, "bench")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            writer.close()
            reader.close()
            writer.join(5)
            reader.join(5)
            ours.close()
            theirs.close()
        gb = n * src.nbytes / 1e9
        rows.append({
            "bench": "hosts", "case": f"bulk stream over a socketpair, {'sealed' if sealed else 'raw'}",
            "value": round(cpu / gb, 3), "unit": "CPU s/GB", "MB/s": round(gb * 1e3 / wall),
        })  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small case (CI)")
    p.add_argument("--rate", action="append", help="only these rates (e.g. 1gbit)")
    p.add_argument("--layout", action="append", help="only these SERVERS,WORKERS (e.g. 2,2)")
    p.add_argument("--kind", action="append", help="only dense, sparse or training")
    p.add_argument("--token", choices=("yes", "no"), help="only with (or without) a token")
    p.add_argument("--transport", choices=("tcp", "zmq"), help="only this dense path")
    p.add_argument("--server-rate", help="the server hosts' links at this rate (e.g. 100mbit)")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="timed steps per case (dense, sparse)"
    )
    p.add_argument("--repeat", type=int, default=1, help="run each case this many times")
    args = p.parse_args()
    if args.server_rate is not None:
        hosts.parse_rate(args.server_rate)
    print(json.dumps(seal_cost(8 if args.quick else 64)), flush=True)
    for row in stream_cost(32 if args.quick else 256):
        print(json.dumps(row), flush=True)
    reason = hosts.unavailable()
    if reason is not None:
        print(json.dumps({"bench": "hosts", "case": "skipped", "value": 0, "unit": "-",
                          "skipped": reason}))  # fmt: skip
        return 0
    todo = [
        c
        for c in cases(args.quick, args.seconds, args.server_rate)
        for _ in range(args.repeat)
        if (not args.rate or c["rate"] in args.rate)
        and (args.token is None or c["token"] == (args.token == "yes"))
        and (args.transport is None or c["transport"] == args.transport)
        and (not args.layout or f"{c['servers']},{c['workers']}" in args.layout)
        and (not args.kind or c["kind"] in args.kind)
    ]
    size = max(1 + c["servers"] + c["workers"] for c in todo)
    with hosts.up(size) as bed, TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)
        bed[0].run(["sh", "-c", "head -c 32 /dev/urandom | base64 > token"], cwd=folder,
                   timeout=10)  # fmt: skip
        for case in todo:
            print(json.dumps(run_case(bed, folder, case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
