"""PyTorch integration (extra ``torch``): embeddings and dense parameters kept on the servers.

* :class:`Embedding`: an ``nn.Module`` over a sparse table. ``forward(ids)`` pulls the distinct
  rows once and returns the embeddings; its backward (a custom autograd Function) sums the
  gradients of repeated ids and pushes them. :meth:`Embedding.prefetch` starts the next batch's
  pull while the current batch computes.
* :class:`DenseParameters`: every parameter of an ``nn.Module`` in a dense table of its own;
  :meth:`~DenseParameters.pull` copies the servers' values into the module before a step,
  :meth:`~DenseParameters.push` sends the gradients after ``backward()``. The servers run the
  optimizer: a worker never steps a local optimizer on parameters the servers own.

``import paramserver`` does not import this module (nor torch).

Example:
    emb = ps.torch.Embedding(client, "emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.05))
    mlp = nn.Sequential(nn.Linear(16, 1))
    dense = ps.torch.DenseParameters(client, "mlp", mlp, optimizer=ps.optim.Adam(lr=1e-3))
    for ids, y in loader:
        dense.pull()
        loss = F.binary_cross_entropy_with_logits(mlp(emb(ids).sum(1)).squeeze(1), y)
        loss.backward()
        dense.push()
        client.clock()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from paramserver.client import Client
from paramserver.client.dense import DenseTable
from paramserver.client.sparse import SparseTable
from paramserver.errors import ConfigError
from paramserver.init import Constant, Initializer, Normal, Uniform, Zeros
from paramserver.optim import SGD, Optimizer
from paramserver.wire.transport import Future

__all__ = ["DenseParameters", "Embedding"]


class _PullPush(torch.autograd.Function):
    """Gathers pulled rows for every id; backward sums per distinct id and hands the sum, with
    this call's own distinct keys, to the embedding (which pushes once per backward pass)."""

    @staticmethod
    def forward(
        ctx: Any,
        trigger: torch.Tensor,
        rows: torch.Tensor,
        inverse: torch.Tensor,
        owner: Any,
        keys: np.ndarray,
    ) -> torch.Tensor:
        ctx.owner = owner
        ctx.keys = keys  # this call's distinct keys: a later call of the same module has others
        ctx.save_for_backward(inverse)
        ctx.n_rows = rows.shape[0]
        return rows[inverse]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None, None]:
        (inverse,) = ctx.saved_tensors
        dim = grad.shape[-1]
        summed = torch.zeros((ctx.n_rows, dim), dtype=torch.float32)
        summed.index_add_(0, inverse.reshape(-1), grad.reshape(-1, dim).to(torch.float32))
        ctx.owner._accumulate(ctx.keys, summed.numpy())
        return None, None, None, None, None


class Embedding(nn.Module):
    """Embeddings of unbounded non-negative ids, stored in a sparse table on the servers.

    Example:
        emb = Embedding(client, "user_emb", dim=8, optimizer=ps.optim.Adagrad(lr=0.05))
        vecs = emb(torch.tensor([[3, 9], [3, 4]]))     # (2, 2, 8); id 3 pulled once
    """

    def __init__(
        self,
        client: Client,
        name: str,
        dim: int,
        *,
        optimizer: Optimizer | None = None,
        init: Initializer | None = None,
        consistency: str | None = None,
        create: bool = True,
    ) -> None:
        super().__init__()
        self.client = client
        self.table: SparseTable = client.sparse_table(
            name,
            dim=dim,
            init=init or Normal(std=0.01),
            optimizer=optimizer or SGD(lr=0.01),
            consistency=consistency,
        )
        self.dim = dim
        self.create = create
        # (keys, summed gradients) of each call whose backward ran in the current pass
        self._grads: list[tuple[np.ndarray, np.ndarray]] = []
        self._prefetched: tuple[np.ndarray, np.ndarray, Future[np.ndarray]] | None = None
        self._pending: list[Future[None]] = []
        self._trigger = torch.empty(0, requires_grad=True)

    def _keys_of(self, ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ConfigError(
                f"embedding {self.table.name!r}: ids must be integers, got dtype {arr.dtype}"
            )
        flat = arr.reshape(-1)
        if flat.size and arr.dtype.kind == "i" and flat.min() < 0:
            pos = int(np.flatnonzero(flat < 0)[0])
            raise ConfigError(
                f"embedding {self.table.name!r}: ids must be non-negative, got {flat[pos]} at "
                f"flat position {pos}"
            )
        uniq, inverse = np.unique(flat, return_inverse=True)
        return uniq.astype(np.uint64), inverse

    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Start pulling the rows of the next batch's ``ids``; the next forward with the same
        ids uses them.

        Example:
            emb.prefetch(next_ids); loss = model(ids); ...   # the pull overlaps this step
        """
        uniq, inverse = self._keys_of(ids)
        self._prefetched = (uniq, inverse, self.table.pull_async(uniq, create=self.create))

    def forward(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings of ``ids``: a LongTensor of any shape (or a NumPy array of non-negative
        integers, e.g. hashed uint64 keys); the result has shape ``(*ids.shape, dim)``."""
        shape = tuple(ids.shape)
        uniq, inverse = self._keys_of(ids)
        pre, self._prefetched = self._prefetched, None
        if pre is not None and len(pre[0]) == len(uniq) and np.array_equal(pre[0], uniq):
            rows = pre[2].result()
        else:
            rows = self.table.pull(uniq, create=self.create)
        out = _PullPush.apply(  # type: ignore[no-untyped-call]
            self._trigger,
            torch.from_numpy(np.array(rows, dtype=np.float32)),
            torch.from_numpy(inverse.astype(np.int64)),
            self,
            uniq,
        )
        assert isinstance(out, torch.Tensor)
        return out.reshape((*shape, self.dim))

    def _accumulate(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """Called by the backward of each forward call. A module used several times in one
        forward pass (one table shared by several features) gets one push per backward pass,
        of every call's gradients summed per key, as ``nn.Embedding`` gets one optimizer step:
        the engine runs :meth:`_flush` once the whole pass is done."""
        if not self._grads:
            try:
                queue = torch.autograd.Variable._execution_engine.queue_callback
            except AttributeError:  # not inside the engine: nothing else to wait for
                self._grads.append((keys, grads))
                self._flush()
                return
            queue(self._flush)
        self._grads.append((keys, grads))

    def _flush(self) -> None:
        calls, self._grads = self._grads, []
        if not calls:
            return
        if len(calls) == 1:
            keys, grads = calls[0]
        else:  # the table's push sums repeated keys
            keys = np.concatenate([k for k, _ in calls])
            grads = np.concatenate([g for _, g in calls])
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self.table.push(keys, grads))

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every push so far is acknowledged by the servers."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result(timeout)


def _default_init(name: str, p: torch.Tensor, params: Mapping[str, torch.Tensor]) -> Initializer:
    """Initializers with the bounds of PyTorch's defaults for Linear / Conv layers."""
    if p.dim() >= 2:
        fan_in = int(p.shape[1]) * math.prod(int(d) for d in p.shape[2:])
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        return Uniform(-bound, bound)
    if name.endswith("bias"):
        w = params.get(name[: -len("bias")] + "weight")
        if w is not None and w.dim() >= 2:
            fan_in = int(w.shape[1]) * math.prod(int(d) for d in w.shape[2:])
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            return Uniform(-bound, bound)
        return Zeros()
    return Constant(1.0)  # e.g. the scale of a norm layer


class DenseParameters:
    """The parameters of ``module``, each in a dense table named ``{name}/{parameter}``.

    Example:
        dense = DenseParameters(client, "mlp", model, optimizer=ps.optim.Adam(lr=1e-3))
        dense.pull(); loss.backward(); dense.push(); client.clock()
    """

    def __init__(
        self,
        client: Client,
        name: str,
        module: nn.Module,
        *,
        optimizer: Optimizer | None = None,
        consistency: str | None = None,
        init: dict[str, Initializer] | None = None,
    ) -> None:
        self.client = client
        self.module = module
        params = dict(module.named_parameters())
        if not params:
            raise ConfigError(f"dense parameters {name!r}: the module has no parameters")
        self.params = params
        self.tables: dict[str, DenseTable] = {}
        for pname, p in params.items():
            if p.dtype != torch.float32:
                raise ConfigError(f"{name}/{pname}: only float32 parameters, got {p.dtype}")
            chosen = (init or {}).get(pname) or _default_init(pname, p.detach(), params)
            self.tables[pname] = client.dense_table(
                f"{name}/{pname}",
                shape=tuple(int(d) for d in p.shape) or (1,),
                init=chosen,
                optimizer=optimizer or SGD(lr=0.01),
                consistency=consistency,
            )
        self._pending: list[Future[None]] = []

    def pull(self, timeout: float | None = None) -> None:
        """Copy the servers' current values into the module's parameters (one round trip)."""
        self.wait(timeout)
        futs = {n: t.pull_async(timeout=timeout) for n, t in self.tables.items()}
        with torch.no_grad():
            for n, f in futs.items():
                p = self.params[n]
                p.copy_(torch.from_numpy(f.result(timeout)).reshape(p.shape))

    def push(self) -> None:
        """Send every parameter's ``.grad`` (zero where None) and clear it; returns at once."""
        for n, t in self.tables.items():
            p = self.params[n]
            g = p.grad
            arr = (
                np.zeros(t.shape, np.float32)
                if g is None
                else np.ascontiguousarray(g.detach().cpu().numpy().reshape(t.shape))
            )
            self._pending.append(t.push(arr))
            p.grad = None

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every push so far is acknowledged."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result(timeout)
