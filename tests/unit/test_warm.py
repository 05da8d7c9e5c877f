"""The kernels loaded ahead (server/process.py warm_kernels, client/warm.py) are the ones the
first requests call: after warming, a first sparse pull and push of float32 rows, a dense
table's creation and SGD push, and the finite checks compile or load nothing more. Each check
runs in a fresh interpreter, where nothing else loaded them before."""

from __future__ import annotations

from tests.procs import run_fresh

SERVER = """
import numpy as np
from paramserver.arrays import _count_kernel, all_finite
from paramserver.init import Zeros
from paramserver.optim import SGD
from paramserver.server import kernels as k
from paramserver.server.process import warm_kernels
from paramserver.server.shard import DenseShard, SparseShard

def loaded():
    found = [_count_kernel()]
    for mod in (k.index, k.rows, k.optim):
        found += [v for v in vars(mod).values() if hasattr(v, "signatures")]
    return {d.py_func.__qualname__: len(d.signatures) for d in found}

warm_kernels()
before = loaded()
assert sum(before.values()) > 0, "warm_kernels loaded nothing"
sparse = SparseShard(4, np.dtype(np.float32), Zeros(), SGD(), 7)
keys = np.array([3, 9, 3**30], np.uint64)
sparse.pull(keys)
sparse.push(keys, np.ones((3, 4), np.float32))
for dtype in (np.float32, np.float64):
    dense = DenseShard(30, np.dtype(dtype), Zeros(), SGD(lr=1.0), 3, offset=5)
    grad = np.ones(30, dtype)
    assert all_finite(grad)
    dense.push(grad)
    dense.push(grad, out=np.empty(30, dtype))
    dense.pull()
after = loaded()
assert after == before, "compiled after warming: " + str(
    [k for k in after if after[k] != before.get(k)])
print("ok")
"""

CLIENT = """
import numpy as np
from paramserver.arrays import _copy_count_kernel, _count_kernel, all_finite, copy_finite
from paramserver.client import kernels as k
from paramserver.client.warm import warm_kernels
from paramserver.mix import _splitmix64
from paramserver.partition import HashRing

def loaded():
    found = [_count_kernel(), _copy_count_kernel(), _splitmix64]
    found += [v for v in vars(k).values() if hasattr(v, "signatures")]
    return {d.py_func.__qualname__: len(d.signatures) for d in found}

warm_kernels()
before = loaded()
assert sum(before.values()) > 0, "warm_kernels loaded nothing"
# what a first pull and push of a batch do (client/keyplan.py, client/sparse.py)
ring = HashRing.build([0, 1, 2])
batch = np.array([[5, 9, 5], [7, 7, 11]], np.uint64)
uniq, inverse = k.dedup(batch.reshape(-1))
owners = ring.route(uniq)
part_of = owners.astype(np.intp)
row_in_part = np.arange(len(uniq), dtype=np.intp)
pos, rows, bounds = k.group_by_part(inverse, part_of, row_in_part, 3)
reply = np.ones((len(uniq), 8), np.float32)
out = np.empty((len(inverse), 8), np.float32)
k.place_rows(reply, rows, pos, out)
k.expand_rows(reply, inverse, out)
grads = np.ones((len(inverse), 8), np.float32)
assert all_finite(grads) and all_finite(grads.astype(np.float64))
for dtype in (np.float32, np.float64):  # a plain dense push into shared memory
    assert copy_finite(np.ones(300, dtype), np.empty(300, dtype))
k.sum_rows_checked(inverse, grads, np.empty((len(uniq), 8), np.float32))
after = loaded()
assert after == before, f"compiled after warming: {before} -> {after}"
print("ok")
"""


def test_server_warming_loads_what_first_requests_use() -> None:
    run_fresh(SERVER)


def test_worker_warming_loads_what_first_pull_and_push_use() -> None:
    run_fresh(CLIENT)
