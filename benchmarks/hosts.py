"""Throughput between emulated hosts (tests/hosts.py): dense and sparse push+pull with S server
hosts and W worker hosts on links shaped to a rate, with and without a cluster token, on the bulk
channel or in ZeroMQ frames; printed as a fraction of what the links can carry. Needs root.

Each worker pulls and pushes at once, round after round (an async table: the pull does not wait
for the push beside it, as in a pipelined training step), so both directions of every link can
be full. ``link_fraction`` is the busiest link's bytes (its busier direction, read from the
hosts' interface counters, headers and TCP included) over what it carries in the time measured:
1.0 is a full link. ``training`` runs the ready FTRL logistic regression (sync, one epoch of
synthetic CTR data) and reports examples/s. Where
it is low at a high rate, the two shared cores, not the link, are the limit: ``cpu_bound``
says so when the processes' CPU time was over 1.6 s per second.

    sudo PYTHONPATH=. .venv/bin/python benchmarks/hosts.py            # 100mbit, 1gbit, 10gbit
    sudo PYTHONPATH=. .venv/bin/python benchmarks/hosts.py --quick    # one small case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests import hosts

WORKER = r"""
import json, sys, time
import numpy as np
import paramserver as ps
kind, transport, n, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with ps.connect(transport=transport) as client:
    if kind == "training":  # the ready FTRL logistic regression, sync, on synthetic CTR data
        from paramserver.data.ctr import SyntheticCriteo
        from paramserver.models.logreg import train_worker
        train, test = SyntheticCriteo(examples=n, seed=1).make()
        client.barrier("b/start", timeout=120)
        t0 = time.perf_counter()
        out = train_worker(client, train, test, epochs=rounds, consistency="sync", show=False)
        seconds = time.perf_counter() - t0
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
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    seconds = time.perf_counter() - t0
    client.barrier("b/end", timeout=120)
print("RESULT", json.dumps({"bytes": nbytes * rounds, "seconds": seconds}), flush=True)
"""


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


def _link_bytes(host: hosts.Host) -> tuple[int, int]:
    """Bytes through ``host``'s link so far (received, sent), read at the bridge's end of it."""
    stats = Path("/sys/class/net") / host.veth / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def run_case(bed: hosts.Bed, folder: Path, case: dict[str, Any]) -> dict[str, Any]:
    s, w, rate = case["servers"], case["workers"], hosts.parse_rate(case["rate"])
    for h in bed:
        h.shape(case["rate"])
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
    try:
        for i in range(s):
            procs.append(bed[1 + i].popen(
                ["sh", "-c", f"exec {' '.join(ps_)} server --coordinator {bed[0].name}:7070 "
                 f"--host 0.0.0.0 --advertise $(hostname) {' '.join(secure)}"],
                cwd=folder, env=env, stdout=subprocess.DEVNULL,
                stderr=open(folder / f"server{i}.log", "w")))  # fmt: skip  # noqa: SIM115
        workers = [
            bed[1 + s + i].popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    case["kind"],
                    case["transport"],
                    str(case["n"]),
                    str(case["rounds"]),
                ],
                cwd=folder,
                env=wenv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in range(w)
        ]
        pids = [p.pid for p in procs + workers]
        links = [bed[1 + i] for i in range(s + w)]  # every server's and worker's link
        before = [_link_bytes(h) for h in links]
        cpu0, t0 = _cpu(pids), time.perf_counter()
        outs = [p.communicate(timeout=600) for p in workers]
        cpu = (_cpu(pids) - cpu0) / (time.perf_counter() - t0)
        moved = max(
            max(a - b for a, b in zip(_link_bytes(h), was, strict=True))
            for h, was in zip(links, before, strict=True)
        )
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    results = []
    for (out, err), p in zip(outs, workers, strict=True):
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            logs = "".join(f.read_text()[-1500:] for f in sorted(folder.glob("server*.log")))
            raise RuntimeError(f"worker exited {p.returncode}: {err[-2000:]}\nservers: {logs}")
        results.append(json.loads(line.removeprefix("RESULT ")))
    seconds = max(r["seconds"] for r in results)
    name = (f"{case['kind']} {case['rate']} {s} server x {w} worker hosts, "
            f"{'token' if case['token'] else 'no token'}, {case['transport']}")  # fmt: skip
    out: dict[str, Any] = {"bench": "hosts", "case": name, **case}
    if case["kind"] == "training":
        out["examples_per_s"] = round(sum(r["examples"] for r in results) / seconds)
        out["test_auc"] = next((r["auc"] for r in results if r["auc"] is not None), None)
    else:
        out["MB_per_s_each_way"] = round(sum(r["bytes"] for r in results) / seconds / 1e6, 1)
        moved = moved * case["rounds"] // (case["rounds"] + 1)  # less the untimed first step
    # the busiest link's bytes (the busier way) over what it carries in that time
    out["link_fraction"] = round(moved * 8 / rate / seconds, 3)
    out["value"], out["unit"] = out["link_fraction"], "fraction of the busiest link"
    out["cpu_cores"], out["cpu_bound"] = round(cpu, 2), cpu > 1.6
    return out


def cases(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"kind": "dense", "rate": "100mbit", "servers": 1, "workers": 1, "token": False,
                 "transport": "tcp", "n": 1 << 19, "rounds": 3}]  # fmt: skip
    out = []
    for rate, n in (("100mbit", 1 << 20), ("1gbit", 1 << 22), ("10gbit", 1 << 23)):
        for s, w in ((1, 1), (2, 2), (1, 2), (2, 1), (1, 4), (2, 4), (4, 4), (4, 1)):
            for token in (False, True):
                for kind, paths in (("dense", ("tcp", "zmq")), ("sparse", ("tcp",))):
                    for transport in paths:
                        out.append({"kind": kind, "rate": rate, "servers": s, "workers": w,
                                    "token": token, "transport": transport,
                                    "n": n if kind == "dense" else n // 4, "rounds": 4})  # fmt: skip
            out.append({"kind": "training", "rate": rate, "servers": s, "workers": w,
                        "token": True, "transport": "tcp", "n": 40_000, "rounds": 1})  # fmt: skip
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
    out, sealed_buf = memoryview(dst), bytearray(seal.RECORD + seal.TAG)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small case (CI)")
    p.add_argument("--rate", action="append", help="only these rates (e.g. 1gbit)")
    p.add_argument("--layout", action="append", help="only these SERVERS,WORKERS (e.g. 2,2)")
    p.add_argument("--kind", action="append", help="only dense, sparse or training")
    args = p.parse_args()
    print(json.dumps(seal_cost(8 if args.quick else 64)), flush=True)
    reason = hosts.unavailable()
    if reason is not None:
        print(json.dumps({"bench": "hosts", "case": "skipped", "value": 0, "unit": "-",
                          "skipped": reason}))  # fmt: skip
        return 0
    todo = [
        c
        for c in cases(args.quick)
        if (not args.rate or c["rate"] in args.rate)
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
