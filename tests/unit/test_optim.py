"""Optimizer and initializer specs, and the optimizer math of both shards against NumPy.

The reference below is written from the formulas in ``paramserver/optim.py``, in
plain NumPy on per-key state, without calling any kernel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paramserver.errors import ConfigError
from paramserver.init import Constant, Initializer, Normal, Uniform, Zeros
from paramserver.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer
from paramserver.server.shard import DenseShard, SparseShard

# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "opt",
    [
        SGD(lr=0.5),
        Momentum(lr=0.1, momentum=0.5, nesterov=True),
        Adagrad(lr=0.2, eps=1e-6, initial_accumulator=0.1),
        Adam(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-7),
        FTRL(alpha=0.1, beta=0.5, l1=0.2, l2=0.3),
    ],
)
def test_optimizer_spec_round_trip(opt: Optimizer) -> None:
    spec = opt.to_spec()
    assert spec["kind"] == opt.kind
    assert Optimizer.from_spec(spec) == opt
    assert opt.with_lr(0.125).lr == 0.125
    assert type(opt.with_lr(0.125)) is type(opt)


@given(lr=st.floats(min_value=1e-9, max_value=1e3), momentum=st.floats(0.0, 0.999))
def test_optimizer_spec_round_trip_property(lr: float, momentum: float) -> None:
    opt = Momentum(lr=lr, momentum=momentum)
    assert Optimizer.from_spec(opt.to_spec()) == opt


def test_spec_accepts_int_numbers() -> None:
    assert Optimizer.from_spec({"kind": "sgd", "lr": 1}) == SGD(lr=1.0)
    assert Initializer.from_spec({"kind": "constant", "value": 2}) == Constant(2.0)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "sgd", "lr": -1.0}, "lr"),
        ({"kind": "sgd", "lr": 0.0}, "lr"),
        ({"kind": "sgd", "lr": math.nan}, "lr"),
        ({"kind": "sgd", "lr": "0.1"}, "lr"),
        ({"kind": "sgd", "lr": True}, "lr"),
        ({"kind": "sgd", "rate": 0.1}, "rate"),
        ({"kind": "nadam"}, "kind"),
        ({"lr": 0.1}, "kind"),
        ({"kind": "momentum", "momentum": 1.0}, "momentum"),
        ({"kind": "momentum", "nesterov": 1}, "nesterov"),
        ({"kind": "momentum", "momentum": 0.0, "nesterov": True}, "momentum"),
        ({"kind": "adagrad", "eps": 0.0}, "eps"),
        ({"kind": "adagrad", "initial_accumulator": -1.0}, "initial_accumulator"),
        ({"kind": "adam", "beta1": 1.0}, "beta1"),
        ({"kind": "adam", "beta2": -0.1}, "beta2"),
        ({"kind": "ftrl", "alpha": 0.0}, "alpha"),
        ({"kind": "ftrl", "l1": -1.0}, "l1"),
        ({"kind": "ftrl", "beta": 0.0, "l2": 0.0}, "beta"),
    ],
)
def test_optimizer_spec_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Optimizer.from_spec(spec)


def test_with_lr_validates() -> None:
    with pytest.raises(ConfigError, match="lr"):
        SGD().with_lr(-1.0)
    with pytest.raises(ConfigError, match="alpha"):
        FTRL().with_lr(math.inf)


@pytest.mark.parametrize("init", [Zeros(), Constant(0.5), Normal(1.0, 2.0), Uniform(-1.0, 3.0)])
def test_initializer_spec_round_trip(init: Initializer) -> None:
    assert Initializer.from_spec(init.to_spec()) == init


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "normal", "std": -1.0}, "std"),
        ({"kind": "normal", "mean": math.inf}, "mean"),
        ({"kind": "uniform", "low": 1.0, "high": 1.0}, "low"),
        ({"kind": "constant", "value": math.nan}, "value"),
        ({"kind": "constant", "val": 1.0}, "val"),
        ({"kind": "gaussian"}, "kind"),
    ],
)
def test_initializer_spec_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Initializer.from_spec(spec)


# ----------------------------------------------------------------------------- NumPy reference


def ref_init_state(opt: Optimizer, w0: np.ndarray) -> dict[str, Any]:
    """Per-key state dict for the reference, starting from weights ``w0``."""
    t = w0.dtype.type
    zeros = np.zeros_like(w0)
    if isinstance(opt, Momentum):
        return {"w": w0.copy(), "v": zeros}
    if isinstance(opt, Adagrad):
        return {"w": w0.copy(), "acc": np.full_like(w0, opt.initial_accumulator)}
    if isinstance(opt, Adam):
        return {"w": w0.copy(), "m": zeros, "v": zeros.copy(), "t": t(0)}
    if isinstance(opt, FTRL):
        alpha, beta, l1, l2 = t(opt.alpha), t(opt.beta), t(opt.l1), t(opt.l2)
        z = -w0 * (beta / alpha + l2) - np.sign(w0) * l1
        return {"w": w0.copy(), "z": z, "n": zeros}
    return {"w": w0.copy()}


def ref_update(opt: Optimizer, s: dict[str, Any], g: np.ndarray) -> None:
    """One optimizer step on the reference state ``s``, all in ``g``'s dtype."""
    t = g.dtype.type
    if isinstance(opt, SGD):
        s["w"] = s["w"] - t(opt.lr) * g
    elif isinstance(opt, Momentum):
        mu = t(opt.momentum)
        s["v"] = mu * s["v"] + g
        upd = g + mu * s["v"] if opt.nesterov else s["v"]
        s["w"] = s["w"] - t(opt.lr) * upd
    elif isinstance(opt, Adagrad):
        s["acc"] = s["acc"] + g * g
        s["w"] = s["w"] - t(opt.lr) * g / (np.sqrt(s["acc"]) + t(opt.eps))
    elif isinstance(opt, Adam):
        b1, b2, one = t(opt.beta1), t(opt.beta2), t(1)
        s["t"] = s["t"] + one
        s["m"] = b1 * s["m"] + (one - b1) * g
        s["v"] = b2 * s["v"] + (one - b2) * g * g
        mhat = s["m"] / (one - b1 ** s["t"])
        vhat = s["v"] / (one - b2 ** s["t"])
        s["w"] = s["w"] - t(opt.lr) * mhat / (np.sqrt(vhat) + t(opt.eps))
    elif isinstance(opt, FTRL):
        alpha, beta, l1, l2 = t(opt.alpha), t(opt.beta), t(opt.l1), t(opt.l2)
        n_new = s["n"] + g * g
        sigma = (np.sqrt(n_new) - np.sqrt(s["n"])) / alpha
        s["z"] = s["z"] + (g - sigma * s["w"])
        s["n"] = n_new
        z = s["z"]
        w = -(z - np.sign(z) * l1) / ((beta + np.sqrt(n_new)) / alpha + l2)
        s["w"] = np.where(np.abs(z) <= l1, t(0), w).astype(g.dtype)
    else:
        raise AssertionError(opt)


def ref_sum_duplicates(keys: np.ndarray, grads: np.ndarray) -> dict[int, np.ndarray]:
    """Distinct keys in order of first occurrence, gradients summed in order of occurrence."""
    out: dict[int, np.ndarray] = {}
    for key, g in zip(keys.tolist(), grads, strict=True):
        out[key] = out[key] + g if key in out else g.copy()
    return out


OPTIMIZERS = [
    SGD(lr=0.1),
    Momentum(lr=0.05, momentum=0.9),
    Momentum(lr=0.05, momentum=0.8, nesterov=True),
    Adagrad(lr=0.1, initial_accumulator=0.1),
    Adagrad(lr=0.1),
    Adam(lr=0.01),
    FTRL(alpha=0.1, beta=1.0, l1=0.001, l2=0.01),
]
DTYPES = [np.float32, np.float64]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # 1e-6 relative, with an absolute floor far below the weights' scale (~1e-2) for values
    # that cross zero, where a relative bound means nothing.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o))
def test_sparse_matches_numpy_reference(opt: Optimizer, dtype: type[np.floating[Any]]) -> None:
    dim = 5
    rng = np.random.default_rng(0)
    shard = SparseShard(dim, dtype, Uniform(-0.5, 0.5), opt, seed=11, capacity=4)
    pool = np.array([0, 1, 2**64 - 1, 12345, 7, 99, 2**40], np.uint64)
    ref: dict[int, dict[str, Any]] = {}
    for _ in range(6):
        keys = rng.choice(pool, size=9)  # repeats are likely
        grads = rng.standard_normal((9, dim)).astype(dtype)
        for key, g in ref_sum_duplicates(keys, grads).items():
            if key not in ref:
                w0 = shard.pull(np.array([key], np.uint64), create=False)[0]
                ref[key] = ref_init_state(opt, w0)
            ref_update(opt, ref[key], g)
        shard.push(keys, grads)
    keys = np.array(list(ref), np.uint64)
    assert shard.num_rows == len(ref)
    assert_close(shard.pull(keys), np.stack([ref[k]["w"] for k in ref]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o))
def test_dense_matches_numpy_reference(opt: Optimizer, dtype: type[np.floating[Any]]) -> None:
    rng = np.random.default_rng(1)
    shard = DenseShard(13, dtype, Normal(0.0, 0.3), opt, seed=5, offset=100)
    ref = ref_init_state(opt, shard.pull())
    for _ in range(6):
        grad = rng.standard_normal(13).astype(dtype)
        ref_update(opt, ref, grad)
        shard.push(grad)
    assert_close(shard.pull(), ref["w"])


@pytest.mark.parametrize("dense", [False, True])
def test_sgd_float32_is_bitwise_numpy(dense: bool) -> None:
    rng = np.random.default_rng(2)
    lr = 0.037
    if dense:
        d = DenseShard(1000, np.float32, Normal(), SGD(lr=lr), seed=1)
        w = d.pull()
        for _ in range(5):
            g = rng.standard_normal(1000).astype(np.float32)
            w = w - np.float32(lr) * g
            d.push(g)
        np.testing.assert_array_equal(d.pull(), w)
    else:
        s = SparseShard(8, np.float32, Normal(), SGD(lr=lr), seed=1)
        keys = np.arange(200, dtype=np.uint64)
        w = s.pull(keys)
        for _ in range(5):
            g = rng.standard_normal((200, 8)).astype(np.float32)
            w = w - np.float32(lr) * g
            s.push(keys, g)
        np.testing.assert_array_equal(s.pull(keys), w)


def test_set_optimizer_changes_lr_keeps_state() -> None:
    s = SparseShard(3, np.float64, Zeros(), Momentum(lr=0.1, momentum=0.5), seed=0)
    keys = np.array([4], np.uint64)
    g = np.ones((1, 3))
    s.push(keys, g)
    s.set_optimizer(Momentum(lr=0.01, momentum=0.5))
    s.push(keys, g)
    # v1 = 1, w1 = -0.1; v2 = 1.5, w2 = -0.1 - 0.015
    np.testing.assert_allclose(s.pull(keys), [[-0.115] * 3])
    with pytest.raises(ConfigError, match="momentum"):
        s.set_optimizer(SGD())
    d = DenseShard(2, np.float32, Zeros(), Adam(), seed=0)
    d.set_optimizer(Adam(lr=0.5))
    assert d.optimizer.lr == 0.5
    with pytest.raises(ConfigError, match="adam"):
        d.set_optimizer(Adagrad())


# ----------------------------------------------------------------------------- FTRL specifics


@pytest.mark.parametrize("dtype", DTYPES)
def test_ftrl_large_l1_gives_exact_zeros(dtype: type[np.floating[Any]]) -> None:
    rng = np.random.default_rng(3)
    # Zero init: a non-zero one is honoured, its z then sits beyond l1 by construction.
    s = SparseShard(4, dtype, Zeros(), FTRL(alpha=0.1, l1=100.0), seed=2)
    keys = np.arange(50, dtype=np.uint64)
    for _ in range(3):
        s.push(keys, rng.standard_normal((50, 4)).astype(dtype))
    w = s.pull(keys)
    assert (w == 0.0).all()
    assert (s.export()["rows"][:, 4:] != 0).any()  # z and n moved; w stayed exactly 0
    d = DenseShard(20, dtype, Zeros(), FTRL(alpha=0.1, l1=100.0), seed=2)
    d.push(rng.standard_normal(20).astype(dtype))
    assert (d.pull() == 0.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w0", [0.5, -0.25, 0.0])
def test_ftrl_honours_nonzero_init(dtype: type[np.floating[Any]], w0: float) -> None:
    opt = FTRL(alpha=0.05, beta=1.0, l1=0.3, l2=0.2)
    s = SparseShard(3, dtype, Constant(w0), opt, seed=0)
    keys = np.array([1, 2], np.uint64)
    np.testing.assert_array_equal(s.pull(keys), np.full((2, 3), w0, dtype))
    # A zero gradient changes neither z nor n: the formula must give w0 back.
    s.push(keys, np.zeros((2, 3), dtype))
    np.testing.assert_allclose(s.pull(keys), np.full((2, 3), w0), rtol=1e-6)
    d = DenseShard(4, dtype, Constant(w0), opt, seed=0)
    d.push(np.zeros(4, dtype))
    np.testing.assert_allclose(d.pull(), np.full(4, w0), rtol=1e-6)
