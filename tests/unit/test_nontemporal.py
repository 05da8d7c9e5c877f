"""Streaming stores (paramserver/nontemporal.py): the copy with its finite count and the dense
SGD that writes the reply region give NumPy's values bit for bit, at every alignment and length
(the head before the first line boundary, whole lines, the tail), and compile to streaming
stores and a fence where the machine has them."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from paramserver import nontemporal
from paramserver.arrays import copy_finite
from paramserver.parallel import SPLIT_BYTES, halves
from paramserver.server import kernels as k

N = nontemporal.STREAM_BYTES // 4 + 4000  # float32 elements: lines streamed
# (start, stop): whole, off by one element at either end, small (plain stores), empty
SPANS = [(0, N), (1, N - 1), (3, 20), (5, 5), (0, 0), (7, N - 999), (16, 32), (15, N - 15)]
EXP = {np.float32: (np.uint32, np.uint32(0x7F80_0000)),
       np.float64: (np.uint64, np.uint64(0x7FF0_0000_0000_0000))}  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_count_matches_numpy_at_every_alignment(dtype: type) -> None:
    uint, exponent = EXP[dtype]
    rng = np.random.default_rng(1)
    src = rng.standard_normal(N).astype(dtype)
    src[[0, 17, 1500, N // 2, N - 1]] = [np.nan, np.inf, -np.inf, np.inf, np.nan]
    bits = src.view(uint)
    for a, b in SPANS:
        dst = np.zeros(N, uint)
        count = nontemporal.copy_count(bits[a:b], dst[a:b], exponent)
        assert count == int((~np.isfinite(src[a:b])).sum()), (a, b)
        np.testing.assert_array_equal(dst[a:b], bits[a:b])
        assert not dst[:a].any() and not dst[b:].any(), "written outside the span"


def test_copy_count_into_memory_not_aligned_to_its_elements() -> None:
    raw = np.zeros(4 * N + 1, np.uint8)
    dst = np.frombuffer(raw.data, np.uint32, count=N, offset=1)  # one byte off: no line stored
    src = np.arange(N, dtype=np.uint32)
    assert nontemporal.copy_count(src, dst, np.uint32(0x7F80_0000)) == 0
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_copy_is_bit_identical_to_numpy(dtype: type) -> None:
    rng = np.random.default_rng(2)
    lr = dtype(0.37)
    for a, b in SPANS:
        w = rng.standard_normal(N).astype(dtype)
        g = rng.standard_normal(N).astype(dtype)
        want = w.copy()
        want[a:b] = want[a:b] - lr * g[a:b]  # NumPy rounds each operation in dtype
        out = np.zeros(N, dtype)
        k.sgd_copy(w[a:b], g[a:b], out[a:b], lr)
        assert w.tobytes() == want.tobytes(), (a, b)
        assert out[a:b].tobytes() == want[a:b].tobytes()
        assert not out[:a].any() and not out[b:].any(), "written outside the span"


def test_copy_finite_split_over_two_cores() -> None:
    n = SPLIT_BYTES // 4 + 5  # split in halves, the second one not line-aligned
    src = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    assert copy_finite(src, dst) and dst.tobytes() == src.tobytes()
    src[n // 2 + 1] = np.nan
    assert not copy_finite(src, dst) and dst.tobytes() == src.tobytes()
    strided, apart = src[::2], np.empty(len(src[::2]), np.float32)  # copied and checked apart
    assert copy_finite(strided, apart) == bool(np.isfinite(strided).all())
    assert apart.tobytes() == strided.tobytes()
    w, g = np.ones(n, np.float32), np.full(n, 0.25, np.float32)
    out = np.empty_like(w)
    halves(k.sgd_copy, [w, g, out], np.float32(2.0))
    assert (w == 0.5).all() and (out == 0.5).all()


@pytest.mark.skipif(not nontemporal.STREAMING, reason="streaming stores are x86-64's")
def test_kernels_compile_to_streaming_stores_and_a_fence() -> None:
    for kernel in (nontemporal.copy_count, k.sgd_copy):
        # compiled afresh (a kernel loaded from numba's cache has no assembly to show)
        options = {o: v for o, v in kernel.targetoptions.items() if o != "nopython"}
        fresh = numba.njit(**options)(kernel.py_func)
        for sig in kernel.signatures:
            fresh.compile(sig)
            asm = fresh.inspect_asm(sig)
            assert "movnt" in asm and "sfence" in asm, f"{kernel.py_func.__name__}{sig}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
def test_copy_of_any_dtype(dtype: type) -> None:
    src = (np.arange(N + 3) % 251).astype(dtype)
    for a, b in SPANS:
        dst = np.zeros(N + 3, dtype)
        nontemporal.copy(src[a:b], dst[a:b])
        assert dst[a:b].tobytes() == src[a:b].tobytes(), (a, b)
        assert not dst[:a].any() and not dst[b:].any(), "written outside the span"


def test_dense_shard_writes_a_pull_and_an_update_into_out() -> None:
    from paramserver.init import Normal
    from paramserver.optim import Adam
    from paramserver.server.shard import DenseShard

    shard = DenseShard(N, np.float32, Normal(), Adam(lr=0.1), seed=4)
    ref = DenseShard(N, np.float32, Normal(), Adam(lr=0.1), seed=4)
    out = np.zeros(N, np.float32)
    assert shard.pull(out) is out and out.tobytes() == ref.pull().tobytes()
    g = np.random.default_rng(5).standard_normal(N).astype(np.float32)
    shard.push(g, out=out)
    ref.push(g)
    assert out.tobytes() == ref.pull().tobytes() == shard.pull().tobytes()


def test_read_only_sources() -> None:
    src = np.random.default_rng(6).standard_normal(N).astype(np.float32)
    src.flags.writeable = False  # a gradient the caller froze, a region it holds
    dst = np.empty_like(src)
    assert copy_finite(src, dst) and dst.tobytes() == src.tobytes()
    w, out = np.ones(N, np.float32), np.empty(N, np.float32)
    k.sgd_copy(w, src, out, np.float32(1.0))
    assert out.tobytes() == w.tobytes() == (np.float32(1.0) - src).tobytes()
