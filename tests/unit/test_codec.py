"""Value codecs against NumPy: round-trip error bounds, exact zero rows, bfloat16 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.errors import ConfigError
from paramserver.spec import TableSpec
from paramserver.wire.codec import decode_rows, encode_rows


def rows(n: int = 200, dim: int = 16, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    r *= np.float32(10.0) ** np.random.default_rng(seed + 1).integers(-3, 3, (n, 1))
    return r


def roundtrip(r: np.ndarray, codec: str, dtype: object = np.float32) -> np.ndarray:
    out = decode_rows(encode_rows(r, codec), codec, r.shape[1], dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == r.shape
    return out


def test_none_is_the_rows_themselves() -> None:
    r = rows()
    np.testing.assert_array_equal(roundtrip(r, "none"), r)


def test_float16_is_numpy_half_rounding() -> None:
    r = rows()
    np.testing.assert_array_equal(roundtrip(r, "float16"), r.astype(np.float16).astype(np.float32))
    big = np.abs(r) > 1e-4  # normal half range: relative error <= 2**-11
    assert np.all(np.abs(roundtrip(r, "float16") - r)[big] <= np.abs(r[big]) * 2.0**-11)


def test_bfloat16_rounds_to_nearest_even() -> None:
    r = rows()
    got = roundtrip(r, "bfloat16")
    assert np.all(np.abs(got - r) <= np.abs(r) * 2.0**-8)
    # the result has only 8 significant bits, and it is the nearer of the two neighbours
    bits = got.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    # ties go to the even pattern: 1 + 2**-8 lies halfway between 1 and 1 + 2**-7
    ties = np.array([[1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        roundtrip(ties, "bfloat16"), np.array([[1.0, 1 + 2.0**-6, -1.0, 0.0]], np.float32)
    )
    # the reference: truncation of float32 bits after adding half an ulp (ties to even)
    b = r.view(np.uint32).astype(np.uint64)
    ref = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(got, ref)


def test_bfloat16_keeps_nan_and_inf() -> None:
    r = np.array([[np.nan, np.inf, -np.inf, 3.4e38]], np.float32)
    got = roundtrip(r, "bfloat16")
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf
    assert got[0, 3] == np.inf or abs(got[0, 3] - r[0, 3]) <= r[0, 3] * 2.0**-8


def test_int8_error_is_within_half_a_step_of_the_row_scale() -> None:
    r = rows()
    got = roundtrip(r, "int8")
    amax = np.abs(r).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - r) <= amax / 254 * (1 + 1e-5))
    # the largest value of each row comes back exactly +-127 steps
    q, scale = encode_rows(r, "int8")
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (len(r),)
    assert np.all(np.abs(q).max(axis=1) == 127)


def test_int8_zero_rows_are_exact() -> None:
    r = rows(10)
    r[[0, 4, 9]] = 0.0
    got = roundtrip(r, "int8")
    np.testing.assert_array_equal(got[[0, 4, 9]], 0.0)
    q, scale = encode_rows(r, "int8")
    assert np.all(scale[[0, 4, 9]] == 0) and np.all(q[[0, 4, 9]] == 0)


def test_float64_tables_decode_to_float64() -> None:
    r = rows().astype(np.float64)
    for codec in ("float16", "bfloat16", "int8"):
        got = roundtrip(r, codec, np.float64)
        assert np.all(np.abs(got - r) <= np.abs(r).max(axis=1, keepdims=True) / 100)


def test_empty_replies() -> None:
    r = np.zeros((0, 4), np.float32)
    for codec in ("none", "float16", "bfloat16", "int8"):
        assert roundtrip(r, codec).shape == (0, 4)


def test_malformed_replies_are_refused() -> None:
    q, scale = encode_rows(rows(4), "int8")
    with pytest.raises(ValueError):
        decode_rows([q], "int8", 16, np.float32)
    with pytest.raises(ValueError):
        decode_rows([q, scale[:2]], "int8", 16, np.float32)
    with pytest.raises(ValueError):
        decode_rows([q.astype(np.float16)], "float16", 8, np.float32)
    with pytest.raises(ValueError):
        decode_rows([rows(4)], "bfloat16", 16, np.float32)


def test_spec_validates_the_codec_and_compares_it() -> None:
    with pytest.raises(ConfigError, match="codec"):
        TableSpec(name="t", kind="sparse", dim=4, codec="int4")
    with pytest.raises(ConfigError, match="push_codec"):
        TableSpec(name="t", kind="dense", shape=(4,), codec="float16", push_codec="bf16")
    a = TableSpec(name="t", kind="sparse", dim=4, codec="int8")
    b = TableSpec(name="t", kind="sparse", dim=4)
    assert a.push_codec == "int8" and b.push_codec == "none"  # pushes follow codec
    assert a.conflicts(b) == ["codec"]
    assert TableSpec.from_wire(a.to_wire()) == a
    assert "codec" not in b.to_wire()  # a plain table's spec is what it was before codecs
    assert "push_codec" not in b.to_wire() and "push_codec" not in a.to_wire()
    assert TableSpec.from_wire(b.to_wire()).codec == "none"
    # pulls encoded, pushes exact; and a dense table with its own codecs
    c = TableSpec(name="t", kind="sparse", dim=4, codec="int8", push_codec="none")
    assert c.conflicts(a) == ["push_codec"]
    assert TableSpec.from_wire(c.to_wire()) == c
    d = TableSpec(name="d", kind="dense", shape=(4,), codec="float16", push_codec="bfloat16")
    assert TableSpec.from_wire(d.to_wire()) == d


@pytest.mark.parametrize("codec", ["float16", "bfloat16", "int8"])
def test_compiled_encoders_are_bit_identical_to_numpy(codec: str) -> None:
    from paramserver.server.codec_kernels import encode_rows_fast

    rng = np.random.default_rng(3)
    cases = [
        rows(),
        (rng.standard_normal((500, 16)) * 1e-6).astype(np.float32),  # half subnormals
        (rng.standard_normal((500, 16)) * 1e5).astype(np.float32),  # beyond half range
        np.zeros((4, 16), np.float32),
        np.zeros((0, 16), np.float32),
    ]
    if codec != "int8":  # every bit pattern, NaN payloads included
        bits = rng.integers(0, 2**32, size=(20_000, 16), dtype=np.uint64).astype(np.uint32)
        cases.append(bits.view(np.float32))
    for r in cases:
        with np.errstate(all="ignore"):
            want, got = encode_rows(r, codec), encode_rows_fast(r, codec)
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
