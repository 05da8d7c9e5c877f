"""sync, ssp:N and async with real worker processes, checked against a NumPy simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from tests.timing import FAST

PROGRAM = str(Path(__file__).parent / "programs" / "consistency_worker.py")
# FAST with the longer heartbeat timeout these tests have always run with (three worker
# processes start and compile at once)
TIMEOUTS = replace(FAST, heartbeat_timeout=5.0)


def run_workers(cluster: ps.LocalCluster, n: int, *args: str, timeout: float = 90) -> None:
    env = {**os.environ, "PS_COORDINATOR": cluster.address, "PS_NUM_WORKERS": str(n)}
    procs = [
        subprocess.Popen(
            [sys.executable, PROGRAM, *args],
            env={**env, "PS_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(n)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {r} failed:\n{out}"


def run_sync_training(tmp: Path, slow_rank: int, steps: int) -> dict[str, np.ndarray]:
    out = tmp / f"slow{slow_rank}"
    out.mkdir()
    with ps.LocalCluster(servers=2, workers=3, timeouts=TIMEOUTS) as cluster:
        run_workers(
            cluster,
            3,
            "train",
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--slow-rank",
            str(slow_rank),
        )
    return {f.stem: np.load(f) for f in out.glob("*.npy")}


# ---- the single-process NumPy simulation of the same 3-worker sync algorithm ----------------

DIM, DENSE_SIZE, VOCAB, BATCH = 4, 6, 20, 8
F32 = np.float32


class RefOptimizer:
    """Plain NumPy optimizers on float32, state per key (sparse) or per array (dense)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.state: dict[object, dict[str, np.ndarray | int]] = {}

    def apply(self, slot: object, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        st = self.state.setdefault(slot, {})
        if self.kind == "sgd":
            return w - F32(0.1) * g
        if self.kind == "adagrad":
            acc = st.get("acc", np.zeros_like(w)) + g * g
            st["acc"] = acc
            return w - F32(0.1) * g / (np.sqrt(acc) + F32(1e-10))
        t = int(st.get("t", 0)) + 1
        m = F32(0.9) * st.get("m", np.zeros_like(w)) + F32(0.1) * g
        v = F32(0.999) * st.get("v", np.zeros_like(w)) + F32(0.001) * g * g
        st.update(t=t, m=m, v=v)
        mhat = m / (1 - 0.9**t)
        vhat = v / (1 - 0.999**t)
        return (w - 0.01 * mhat / (np.sqrt(vhat) + 1e-8)).astype(F32)


def simulate(steps: int, workers: int = 3) -> dict[str, np.ndarray]:
    sparse = {
        "s_sgd": RefOptimizer("sgd"),
        "s_adagrad": RefOptimizer("adagrad"),
        "s_adam": RefOptimizer("adam"),
    }
    dense = {"d_sgd": RefOptimizer("sgd"), "d_adam": RefOptimizer("adam")}
    rows = {n: np.full((VOCAB, DIM), 0.5, F32) for n in sparse}
    arrays = {n: np.full(DENSE_SIZE, 0.5, F32) for n in dense}
    for step in range(steps):
        pushes_s: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in sparse}
        pushes_d: dict[str, list[np.ndarray]] = {n: [] for n in dense}
        for r in range(workers):
            rng = np.random.default_rng([r, step])
            keys = rng.integers(0, VOCAB, size=BATCH).astype(np.uint64)
            for n in sparse:
                w = rows[n][keys.astype(np.int64)]
                noise = rng.standard_normal((BATCH, DIM)).astype(F32)
                g = (F32(0.1) * w + noise).astype(F32)
                uniq, inv = np.unique(keys, return_inverse=True)
                summed = np.zeros((len(uniq), DIM), F32)
                np.add.at(summed, inv, g)  # the client's sum of repeated keys
                pushes_s[n].append((uniq, summed))
            for n in dense:
                noise = rng.standard_normal(DENSE_SIZE).astype(F32)
                pushes_d[n].append((F32(0.1) * arrays[n] + noise).astype(F32))
        for n, opt in sparse.items():
            total: dict[int, np.ndarray] = {}
            for uniq, summed in pushes_s[n]:  # ranks in order
                for k, g in zip(uniq.tolist(), summed, strict=True):
                    total[k] = g.copy() if k not in total else total[k] + g
            for k in sorted(total):
                rows[n][k] = opt.apply(k, rows[n][k], total[k] / F32(workers))
        for n, opt in dense.items():
            tot = pushes_d[n][0].copy()
            for g in pushes_d[n][1:]:
                tot = tot + g
            arrays[n] = opt.apply(n, arrays[n], tot / F32(workers))
    return {**rows, **arrays}


@pytest.mark.timeout(240)
def test_sync_is_bitwise_deterministic_and_matches_numpy(tmp_path: Path) -> None:
    steps = 12
    runs = [run_sync_training(tmp_path, slow, steps) for slow in (0, 2)]
    ref = simulate(steps)
    assert set(runs[0]) == set(ref)
    for name in ref:
        a, b = runs[0][name], runs[1][name]
        assert a.tobytes() == b.tobytes(), f"{name}: runs with different slow workers differ"
        assert not np.allclose(a, 0.5), f"{name}: never trained"
        if name.endswith("sgd"):
            assert a.tobytes() == ref[name].tobytes(), f"{name}: not bitwise equal to NumPy"
        else:
            np.testing.assert_allclose(a, ref[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.timeout(180)
def test_ssp_bounds_staleness_and_lets_fast_workers_run_ahead(tmp_path: Path) -> None:
    with ps.LocalCluster(servers=2, workers=3, timeouts=TIMEOUTS) as cluster:
        run_workers(
            cluster,
            3,
            "staleness",
            "--out",
            str(tmp_path),
            "--consistency",
            "ssp:2",
            "--steps",
            "40",
            "--pulls",
            "8",
            "--slow-rank",
            "1",
            "--slow-factor",
            "5",
        )
    hists = [json.loads((tmp_path / f"staleness_{r}.json").read_text()) for r in range(3)]
    total = sum(n for h in hists for n in h["hist"].values())
    assert total >= 1000
    worst = max(int(s) for h in hists for s in h["hist"])
    assert worst <= 2, f"ssp:2 served a pull with staleness {worst}"
    fast = [h for h in hists if h["rank"] != 1]
    assert any(int(s) == 2 for h in fast for s in h["hist"]), (
        f"fast workers never ran 2 clocks ahead: {fast}"
    )


@pytest.mark.timeout(120)
def test_async_never_waits_for_a_slow_worker(tmp_path: Path) -> None:
    steps = 30
    with ps.LocalCluster(servers=2, workers=2, timeouts=TIMEOUTS) as cluster:
        run_workers(
            cluster, 2, "nowait", "--out", str(tmp_path), "--steps", str(steps), "--slow-rank", "1"
        )
    hist = json.loads((tmp_path / "staleness_0.json").read_text())["hist"]
    # the slow worker sat at clock 0 throughout, so pull number c was served c clocks stale
    assert {int(s) for s in hist} == set(range(steps))
