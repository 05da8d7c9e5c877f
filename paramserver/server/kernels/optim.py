"""Optimizer updates over rows: one kernel per optimizer.

The kernels run over distinct rows; scalars come in the table dtype so that every
operation rounds in that dtype. The dense shard calls them with one row. The inner loops work on
separate views (w, state, g): indexing one row array at offsets j and dim+j keeps LLVM from
proving the loop free of dependences, and then it does not vectorize (dense Adagrad 1.5 -> 8.8
GB/s with the views).
"""

from __future__ import annotations

import numpy as np

from paramserver.nontemporal import LINE, sgd_line, store_fence, stream_start
from paramserver.server.kernels.jit import Array, Scalar, inline, kernel, row_ahead

__all__ = ["adagrad_rows", "adam_rows", "ftrl_rows", "momentum_rows", "sgd_copy", "sgd_rows"]


@inline
def row_views(
    data: Array, rows: Array, grads: Array, i: int
) -> tuple[Array, Array, Array, Array, Array]:
    """Row ``rows[i]`` (the row ahead prefetched), its weights, state 0 and state 1 (views), and
    its gradient ``grads[i]``: the head of every optimizer's loop."""
    row = row_ahead(data, rows, i)
    dim = grads.shape[1]
    return row, row[:dim], row[dim : 2 * dim], row[2 * dim : 3 * dim], grads[i]


@kernel
def sgd_rows(data: Array, rows: Array, grads: Array, lr: Scalar) -> None:
    """SGD: ``w -= lr*g``."""
    dim = grads.shape[1]
    for i in range(rows.shape[0]):
        _row, w, _s0, _s1, g = row_views(data, rows, grads, i)
        for j in range(dim):
            w[j] = w[j] - lr * g[j]


@kernel
def momentum_rows(
    data: Array, rows: Array, grads: Array, lr: Scalar, mu: Scalar, nesterov: bool
) -> None:
    """Momentum (PyTorch): ``v = mu*v + g``; ``w -= lr*(g + mu*v if nesterov else v)``."""
    dim = grads.shape[1]
    for i in range(rows.shape[0]):
        _row, w, vel, _s1, g = row_views(data, rows, grads, i)
        if nesterov:
            for j in range(dim):
                v = mu * vel[j] + g[j]
                vel[j] = v
                w[j] = w[j] - lr * (g[j] + mu * v)
        else:
            for j in range(dim):
                v = mu * vel[j] + g[j]
                vel[j] = v
                w[j] = w[j] - lr * v


@kernel
def adagrad_rows(data: Array, rows: Array, grads: Array, lr: Scalar, eps: Scalar) -> None:
    """Adagrad: ``acc += g*g``; ``w -= lr*g/(sqrt(acc)+eps)``."""
    dim = grads.shape[1]
    for i in range(rows.shape[0]):
        _row, w, acc, _s1, g = row_views(data, rows, grads, i)
        for j in range(dim):
            a = acc[j] + g[j] * g[j]
            acc[j] = a
            w[j] = w[j] - lr * g[j] / (np.sqrt(a) + eps)


@kernel
def adam_rows(
    data: Array,
    rows: Array,
    grads: Array,
    lr: Scalar,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    one: Scalar,
) -> None:
    """Lazy Adam: the step count ``t`` is the row's last element, counted per row."""
    dim = grads.shape[1]
    c1 = one - b1
    c2 = one - b2
    for i in range(rows.shape[0]):
        row, w, mom, vel, g = row_views(data, rows, grads, i)
        t = row[3 * dim] + one
        row[3 * dim] = t
        bc1 = one - b1**t
        bc2 = one - b2**t
        for j in range(dim):
            m = b1 * mom[j] + c1 * g[j]
            v = b2 * vel[j] + c2 * g[j] * g[j]
            mom[j] = m
            vel[j] = v
            w[j] = w[j] - lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


@kernel
def ftrl_rows(
    data: Array,
    rows: Array,
    grads: Array,
    alpha: Scalar,
    beta: Scalar,
    l1: Scalar,
    l2: Scalar,
    zero: Scalar,
) -> None:
    """FTRL-Proximal (McMahan 2013) with state 0 = z and state 1 = n; w is recomputed."""
    dim = grads.shape[1]
    for i in range(rows.shape[0]):
        _row, w, zs, ns, g = row_views(data, rows, grads, i)
        for j in range(dim):
            gj = g[j]
            n_old = ns[j]
            n_new = n_old + gj * gj
            sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / alpha
            z = zs[j] + (gj - sigma * w[j])
            zs[j] = z
            ns[j] = n_new
            if np.abs(z) <= l1:
                w[j] = zero
            else:
                w[j] = -(z - np.sign(z) * l1) / ((beta + np.sqrt(n_new)) / alpha + l2)


@kernel
def sgd_copy(w: Array, g: Array, out: Array, lr: Scalar) -> None:
    """Dense SGD fused with the copy out: ``w -= lr*g; out[:] = w`` in one pass over memory
    (the same-host push that refreshes the worker's reply region). ``out`` is written with
    streaming stores a line at a time (``nontemporal.sgd_line``): the worker reads it later,
    and a plain store would first read every line of it."""
    n = w.shape[0]
    head = stream_start(out, n)
    for j in range(head):
        x = w[j] - lr * g[j]
        w[j] = x
        out[j] = x
    per = LINE // w.itemsize
    i = head
    while i + per <= n:
        sgd_line(w, g, out, i, lr)
        i += per
    for j in range(i, n):
        x = w[j] - lr * g[j]
        w[j] = x
        out[j] = x
    store_fence()
