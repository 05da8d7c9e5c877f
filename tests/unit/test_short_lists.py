"""A worker handles key lists up to ``SMALL_KEYS`` long in NumPy (a short pull loads no
numba): its dedup, routing hash and row placement must agree with the compiled kernels that
handle longer lists, on both sides of the threshold."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from paramserver.client.kernels import dedup, group_by_part
from paramserver.client.keyplan import KeyPlanCache, unique_inverse
from paramserver.client.sparse import place_reply
from paramserver.mix import splitmix64
from paramserver.partition import SMALL_KEYS, HashRing, hash_keys

SIZES = [0, 1, 9, SMALL_KEYS, SMALL_KEYS + 1]


def batch(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    keys = rng.zipf(1.4, size=n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps
    keys[: n // 5] = np.uint64(2**64 - 1)
    return keys


@pytest.mark.parametrize("n", SIZES)
def test_hash_keys_is_splitmix64(n: int) -> None:
    keys = batch(n)
    for salt in (np.uint64(0), np.uint64(0x243F6A8885A308D3)):
        np.testing.assert_array_equal(hash_keys(keys, salt), splitmix64(keys, salt))
    assert hash_keys(keys).dtype == np.uint64


@pytest.mark.parametrize("n", SIZES)
def test_unique_inverse_is_the_compiled_dedup(n: int) -> None:
    keys = batch(n)
    uniq, inverse = unique_inverse(keys)
    want_uniq, want_inverse = dedup(keys)
    np.testing.assert_array_equal(uniq, want_uniq)
    np.testing.assert_array_equal(inverse, want_inverse)
    assert uniq.dtype == np.uint64 and inverse.dtype == np.intp


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("servers", [1, 3])
def test_rows_land_where_the_list_wants_them(n: int, servers: int) -> None:
    keys = batch(n)
    cache = KeyPlanCache(HashRing.build(list(range(servers))), servers)
    plan, _ = cache.plan(keys, cacheable=False)
    # each server answers its part with rows that say which key they belong to
    out = np.full((n, 3), -1.0)
    for p, (_, _, part_keys) in enumerate(plan.parts):
        rows = np.repeat((part_keys % np.uint64(1_000_003)).astype(np.float64)[:, None], 3, 1)
        place_reply(plan, p, rows, out)
    want = np.repeat((keys % np.uint64(1_000_003)).astype(np.float64)[:, None], 3, 1)
    np.testing.assert_array_equal(out, want)
    if len(plan.parts) > 1 or plan.inverse is not None:
        # the same placement as the kernels give
        inverse = np.arange(len(plan.base)) if plan.inverse is None else plan.inverse
        part_of = np.empty(len(plan.base), np.intp)
        row_in_part = np.empty(len(plan.base), np.intp)
        for p, (_, idx, part_keys) in enumerate(plan.parts):
            where = slice(None) if idx is None else idx
            part_of[where] = p
            row_in_part[where] = np.arange(len(part_keys))
        for got, want_ in zip(
            plan.placement(),
            group_by_part(inverse, part_of, row_in_part, len(plan.parts)),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want_)


def test_a_short_pull_plan_loads_no_numba() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from paramserver.client.keyplan import KeyPlanCache
        from paramserver.client.sparse import place_reply
        from paramserver.partition import HashRing

        keys = np.array([5, 9, 5, 7, 7, 11, 3, 200, 5], np.uint64)
        plan, _ = KeyPlanCache(HashRing.build([0, 1]), 2).plan(keys, cacheable=False)
        out = np.empty((len(keys), 4), np.float32)
        for p, (_, _, part) in enumerate(plan.parts):
            place_reply(plan, p, np.ones((len(part), 4), np.float32), out)
        assert "numba" not in sys.modules, "a short pull loaded numba"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
