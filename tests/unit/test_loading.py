"""A worker's kernels load off its requests' path (paramserver/loading.py): until the loader has
run, a long key list and a long gradient take the NumPy paths, which give the values the
compiled paths give; the first long request starts the loader, a short one does not; a process
with no loader (a server) takes the compiled paths. Each case runs in a fresh interpreter, where
nothing loaded the kernels before."""

from __future__ import annotations

from tests.procs import run_fresh

WHILE_LOADING = """
import sys, threading
import numpy as np
from paramserver import loading
from paramserver.arrays import all_finite, copy_finite
from paramserver.client.keyplan import KeyPlanCache
from paramserver.client.sparse import place_reply
from paramserver.partition import HashRing, hash_keys

release, started = threading.Event(), threading.Event()

def loader():  # stands for client/warm.py's, held until the NumPy results are taken
    started.set()
    assert release.wait(60), "never released"
    from paramserver.client.warm import warm_kernels
    warm_kernels()

loading.register(loader)
loading.hold()
loading.start()  # held: loads nothing ahead of need
rng = np.random.default_rng(3)
zipf = rng.zipf(1.2, 40_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
all_finite(np.ones(100, np.float32))  # short: starts nothing
assert not started.is_set(), "a short check or a held start() started the loads"

def results():
    out = {"hash": hash_keys(zipf)}
    for servers in (1, 3):
        ring = HashRing.build(list(range(servers)))
        plan = KeyPlanCache(ring, servers).find(zipf, cacheable=False)
        out[f"uniq{servers}"], out[f"inv{servers}"] = plan.base, plan.inverse
        rows = np.empty((len(zipf), 4), np.float32)
        for p, (_, _, keys) in enumerate(plan.parts):
            reply = np.repeat(keys.astype(np.float32)[:, None], 4, axis=1)
            place_reply(plan, p, reply, rows)
        out[f"rows{servers}"] = rows
    for dtype in (np.float32, np.float64):
        g = rng.standard_normal(300_000).astype(dtype)
        dst = np.empty_like(g)
        g[123_456] = np.nan
        out[f"finite{dtype.__name__}"] = np.array([all_finite(g[:123_456]), all_finite(g)])
        out[f"copy{dtype.__name__}"] = np.array([copy_finite(g, dst), np.array_equal(dst, g, equal_nan=True)])
    return out

numpy_path = results()
assert started.is_set(), "a long request did not start the loads"
assert "paramserver.client.kernels" not in sys.modules, "the compiled path ran before the loads"
release.set()
assert loading.loaded(timeout=120), "the loader did not finish"
compiled = results()
assert "paramserver.client.kernels" in sys.modules
for name in numpy_path:
    assert np.array_equal(numpy_path[name], compiled[name]), name
assert numpy_path["finitefloat32"].tolist() == [True, False]
assert numpy_path["copyfloat64"].tolist() == [False, True]
print("ok")
"""

NO_LOADER = """
from paramserver import loading
assert loading.use_kernels() and loading.ready()  # a server: no loader, the compiled paths
print("ok")
"""


def test_long_requests_take_numpy_paths_with_equal_values_while_kernels_load() -> None:
    run_fresh(WHILE_LOADING)


def test_a_process_without_a_loader_takes_the_compiled_paths() -> None:
    run_fresh(NO_LOADER)
