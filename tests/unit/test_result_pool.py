"""The pool of pull results: a buffer is handed out again only once nothing holds it."""

from __future__ import annotations

import gc

import numpy as np

from paramserver.client.table import POOL_MIN_BYTES, ResultPool, prefault

F32 = np.dtype(np.float32)
SHAPE = (2 * POOL_MIN_BYTES // 4 // 64, 64)


def test_a_held_result_is_never_handed_out_again() -> None:
    pool = ResultPool(keep=2)
    a, fresh_a = pool.take(SHAPE, F32)
    b, fresh_b = pool.take(SHAPE, F32)
    view = a[3:5]  # a view holds its base
    del a
    c, fresh_c = pool.take(SHAPE, F32)
    assert fresh_a and fresh_b and fresh_c
    addresses = {view.base.ctypes.data, b.ctypes.data, c.ctypes.data}  # type: ignore[union-attr]
    assert len(addresses) == 3


def test_a_result_let_go_of_comes_back_mapped() -> None:
    pool = ResultPool(keep=2)
    a, _ = pool.take(SHAPE, F32)
    address = a.ctypes.data
    del a
    gc.collect()
    again, fresh = pool.take((SHAPE[0] // 2, 64), F32)  # a smaller result fits too
    assert not fresh and again.ctypes.data == address
    assert again.shape == (SHAPE[0] // 2, 64) and again.flags.c_contiguous


def test_small_results_are_plain_new_arrays() -> None:
    pool = ResultPool()
    a, fresh = pool.take((3, 4), F32)
    assert a.shape == (3, 4) and not fresh and a.base is None


def test_prefault_touches_every_page_and_only_zeroes_one_byte_a_page() -> None:
    raw = np.full(3 * 4096 + 7, 255, np.uint8)
    prefault(raw)
    assert np.all(raw[::4096] == 0)
    assert np.count_nonzero(raw == 0) == len(raw[::4096]) == 4
