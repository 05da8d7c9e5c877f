"""Encoded pushes and dense values through a real local cluster, against NumPy.

The gradients are chosen so that every codec rounds them the same way each step (1 + 2**-12
next to 4.0: float16 and bfloat16 round it down to 1, int8 with the row's scale 4/127 rounds it
up): without error feedback the applied sum drifts by N times that rounding, with it the
applied sum stays within one rounding of the true sum. Each test checks both: the NumPy run
without feedback must leave the bound, the cluster's run must stay inside it.
"""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.wire.codec import decode_flat, decode_rows, encode_flat, encode_rows

pytestmark = pytest.mark.timeout(120)

CODECS = ["float16", "bfloat16", "int8"]
STEPS = 120


def biased(n: int, dim: int) -> np.ndarray:
    g = np.full((n, dim), 1.0 + 2.0**-12, np.float32)
    g[:, 0] = 4.0
    return g


def one_rounding(g: np.ndarray, codec: str) -> np.ndarray:
    """A bound on what one encoding of ``g`` (plus a residual below it) takes off each value:
    relative for the float codecs, the largest value's share for int8."""
    a = np.abs(g).astype(np.float64)
    if codec == "int8":
        return np.full_like(a, 1.5 * a.max() / 254)
    return 1.5 * a * (2.0**-11 if codec == "float16" else 2.0**-8)


@pytest.mark.parametrize("codec", CODECS)
def test_sparse_pushes_with_error_feedback_track_the_true_sum(
    cluster: ps.LocalCluster, codec: str
) -> None:
    client = cluster.connect()
    emb = client.sparse_table(
        f"ef_{codec}", dim=8, optimizer=ps.optim.SGD(lr=1.0), push_codec=codec
    )
    exact = client.sparse_table(f"ef_{codec}_f32", dim=8, optimizer=ps.optim.SGD(lr=1.0))
    rng = np.random.default_rng(5)
    keys = rng.choice(2**62, size=300, replace=False).astype(np.uint64)
    g = biased(len(keys), 8)
    true = np.zeros((len(keys), 8))
    for step in range(STEPS):
        # the same list (cached: signatures after a few sends), a shuffled one, repeated keys
        if step % 3 == 0:
            order = rng.permutation(len(keys))
            pushed = (keys[order], g[order])
            true += g
        elif step % 3 == 1:
            pushed = (keys, g)
            true += g
        else:
            twice = np.concatenate([keys[:50], keys[:50]])
            pushed = (twice, np.concatenate([g[:50], g[:50]]) * np.float32(0.5))
            true[:50] += g[:50]
        emb.push(*pushed).result()
        exact.push(*pushed).result()
    got = -emb.pull(keys).astype(np.float64)  # SGD, lr 1, from 0: minus the applied sum
    # the float32 run, and NumPy's sum, agree; the encoded run is within one rounding of both
    f32 = -exact.pull(keys).astype(np.float64)
    np.testing.assert_allclose(f32, true, rtol=1e-6)
    assert np.all(np.abs(got - f32) <= one_rounding(g, codec) + 1e-6 * np.abs(true))
    bound = one_rounding(g, codec)
    plain = STEPS * decode_rows(encode_rows(g, codec), codec, 8, np.float32).astype(np.float64)
    assert (np.abs(plain - true) > 3 * bound)[50:].any()  # without feedback: drift
    assert np.all(np.abs(got - true) <= bound), np.abs(got - true).max()


@pytest.mark.parametrize("codec", CODECS)
def test_dense_pushes_with_error_feedback_track_the_true_sum(
    cluster: ps.LocalCluster, codec: str
) -> None:
    client = cluster.connect(transport="tcp")  # encoded on the socket (shared memory: exact)
    size = 5000
    w = client.dense_table(
        f"dense_ef_{codec}", shape=(size,), optimizer=ps.optim.SGD(lr=1.0), push_codec=codec
    )
    g = biased(size // 250, 250).reshape(-1)
    for _ in range(STEPS):
        w.push(g).result()
    got = -w.pull().astype(np.float64)
    true = STEPS * g.astype(np.float64)
    bound = one_rounding(g, codec)
    plain = STEPS * decode_flat(encode_flat(g, codec), codec, size, np.float32)
    assert (np.abs(plain - true) > 3 * bound).any()
    assert np.all(np.abs(got - true) <= bound), np.abs(got - true).max()


@pytest.mark.parametrize("codec", CODECS)
def test_dense_pulls_come_encoded(cluster: ps.LocalCluster, codec: str) -> None:
    client = cluster.connect(transport="tcp")
    size = 300_000  # large enough to be split over both servers
    w = client.dense_table(
        f"dense_pull_{codec}",
        shape=(size,),
        init=ps.init.Constant(0.25),
        optimizer=ps.optim.SGD(lr=0.5),
        codec=codec,
        push_codec="none",
    )
    grad = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    w.push(grad).result()
    exact = np.float32(0.25) - np.float32(0.5) * grad
    want = np.empty(size, np.float32)
    for _, a, b in w.spec.ranges:  # each server encodes its own range
        want[a:b] = decode_flat(encode_flat(exact[a:b], codec), codec, b - a, np.float32)
    got = w.pull()
    assert len(w.spec.ranges) == 2
    np.testing.assert_array_equal(got, want)
    assert np.all(np.abs(got - exact) <= one_rounding(exact, codec).max())


def test_a_malformed_encoded_push_is_refused_and_changes_nothing(cluster: ps.LocalCluster) -> None:
    from paramserver.errors import RemoteError

    client = cluster.connect(transport="tcp")
    emb = client.sparse_table("bad_enc", dim=4, init=ps.init.Constant(1.0), push_codec="int8")
    w = client.dense_table("bad_enc_d", shape=(600,), init=ps.init.Constant(1.0), codec="int8")
    keys = np.array([3], np.uint64)
    q, scale = encode_rows(np.ones((1, 4), np.float32), "int8")
    s = emb._plans.plan(keys, cacheable=False)[0].parts[0][0]
    cases = [
        (s, emb, [keys, q], "int8"),  # no scales
        (s, emb, [keys, q, scale[:0]], "int8"),  # scales of the wrong length
        (s, emb, [keys, q], "bfloat16"),  # int8 values announced as bfloat16
    ]
    qd, sd = encode_flat(np.ones(600, np.float32), "int8")
    for srv, a, b in w.spec.ranges:
        blocks = -(-(b - a) // 256)
        cases.append((srv, w, [qd[a:b], np.ones(blocks + 1, np.float32)], "int8"))  # scales
        cases.append((srv, w, [qd[a : b - 1], sd[:blocks]], "int8"))  # a value short
    for srv, table, arrays, codec in cases:
        header = {**table.push_header(), "codec": codec}
        with pytest.raises(RemoteError, match=codec):
            client.request_server(srv, header, arrays, what="a malformed push").result(10)
    np.testing.assert_array_equal(emb.pull(keys), 1.0)
    np.testing.assert_array_equal(w.pull(), 1.0)
