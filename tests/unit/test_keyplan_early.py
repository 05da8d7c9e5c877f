"""A long list that looks distinct goes to its one server as it is, and its dedup waits for
a request that needs it (the push of the same batch): a pull alone never makes it, the push
gets the same plan NumPy gives (a repeat the sample missed included), and a list sent again
and again still gets its signature on its third sighting."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client import keyplan
from paramserver.client.keyplan import AS_IS_KEYS, SAMPLE_KEYS, KeyPlanCache
from paramserver.partition import HashRing


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = keyplan.unique_inverse
    monkeypatch.setattr(keyplan, "unique_inverse", lambda flat: calls.append(1) or real(flat))
    return calls


def fresh(seed: int, repeat: bool = False) -> np.ndarray:
    n = AS_IS_KEYS + 3_000
    keys = np.random.default_rng(seed).choice(2**62, size=n, replace=False).astype(np.uint64)
    if repeat:  # between the sampled positions: the sample misses it
        keys[n // SAMPLE_KEYS + 1] = keys[n - 2]
    return keys


@pytest.mark.parametrize("repeat", [False, True])
def test_a_pull_alone_makes_no_dedup_and_the_push_gets_numpys_plan(
    counted: list[int], repeat: bool
) -> None:
    cache = KeyPlanCache(HashRing.build([0]), 1)
    keys = fresh(1, repeat)
    early = cache.sent_as_is(keys)
    assert early is not None and early.inverse is None and not early.checked
    cache.sent(early, cacheable=True)
    assert counted == []
    assert cache.known(keys, cacheable=True) is None  # a guess: no push may reuse it
    held = keys.copy()
    keys[:] = 0  # the caller reuses its array: the plan kept its own copy
    plan, sig = cache.plan(held, cacheable=True)
    assert counted == [1] and sig is None and plan.checked
    uniq, first = np.unique(held, return_index=True)
    order = np.argsort(first, kind="stable")
    np.testing.assert_array_equal(plan.base, uniq[order])
    if repeat:
        assert plan.inverse is not None
        np.testing.assert_array_equal(plan.base[plan.inverse], held)
    else:
        assert plan.inverse is None
    assert cache.plan(held, cacheable=True)[0] is plan and counted == [1]  # reused
    assert cache.known(held, cacheable=True) is plan


@pytest.mark.parametrize("where", ["first and last", "neighbours", "apart"])
def test_a_repeat_the_sample_sees_is_not_sent_as_it_is(where: str) -> None:
    cache = KeyPlanCache(HashRing.build([0]), 1)
    keys = fresh(3)
    n = len(keys)
    step = n // SAMPLE_KEYS
    sampled = np.arange(0, n, step)  # the positions the sample reads
    a, b = {"first and last": (0, -1), "neighbours": (7, 8), "apart": (100, 3)}[where]
    keys[sampled[a]] = keys[sampled[b]]
    assert len(np.unique(keys[::step])) < len(keys[::step])  # the sample holds the repeat
    assert cache.sent_as_is(keys) is None
    keys[sampled[a]] = np.uint64(2**63 + 5)  # no repeat again (fresh() draws below 2**62)
    assert cache.sent_as_is(keys) is not None


def test_a_list_sent_again_and_again_gets_its_signature(counted: list[int]) -> None:
    cache = KeyPlanCache(HashRing.build([0]), 1)
    keys = fresh(2)
    early = cache.sent_as_is(keys)
    assert early is not None
    cache.sent(early, cacheable=True)  # first sighting: no dedup
    assert counted == []
    again = cache.sent_as_is(keys)  # not known yet (unchecked): sent as it is again
    assert cache.known(keys, cacheable=True) is None and again is not None
    cache.sent(again, cacheable=True)  # seen before: planned now, while the server works
    assert counted == [1]
    plan = cache.known(keys, cacheable=True)
    assert plan is not None and plan.sig is None
    plan, sig = cache.plan(keys, cacheable=True)  # the third sighting
    assert sig is not None and counted == [1]
