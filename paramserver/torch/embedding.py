"""Embeddings whose rows live in a sparse table on the servers: :class:`Embedding` (like
``torch.nn.Embedding``) and :class:`EmbeddingBag` (like ``torch.nn.EmbeddingBag``), and
:func:`read_embeddings` (a table's keys and weights from a checkpoint).

A forward pulls the distinct ids' rows once into a small local weight of ``(distinct ids, dim)``
and lets torch's own ``embedding`` / ``embedding_bag`` gather and reduce over it, so the
backward of that weight is torch's too. Its gradient goes to the servers once per backward pass,
summed over every call of every module over the table in the pass (a table shared by several
features gets one optimizer step, as a ``torch.nn.Embedding`` does).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paramserver.arrays import as_keys
from paramserver.checkpoint import load_sparse_rows, read_manifest
from paramserver.client import Client
from paramserver.client.sparse import SparseTable
from paramserver.errors import ConfigError
from paramserver.init import Initializer, Normal
from paramserver.optim import SGD, Optimizer
from paramserver.partition import HashRing
from paramserver.wire.transport import Future

__all__ = ["Embedding", "EmbeddingBag", "read_embeddings"]

_MODES = ("sum", "mean", "max")


class _ServerRows(torch.autograd.Function):
    """The pulled rows as a tensor in the autograd graph; its backward hands the rows' gradient,
    with this call's own keys, to the table's :class:`_TablePass`."""

    @staticmethod
    def forward(
        ctx: Any, trigger: torch.Tensor, rows: np.ndarray, owner: Any, keys: np.ndarray
    ) -> torch.Tensor:
        ctx.owner = owner
        ctx.keys = keys  # this call's distinct keys: a later call of the same module has others
        return torch.from_numpy(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        n = len(ctx.keys)  # a padding row after them gets no push
        g = grad[:n].detach().to(torch.float32).contiguous().numpy()
        ctx.owner.add(ctx.keys, g)
        return None, None, None, None


class _TablePass:
    """The gradients that every module over one table collects in a backward pass, pushed as
    one sum when the pass ends: a table shared by several calls, or by an :class:`Embedding`
    and an :class:`EmbeddingBag`, gets one optimizer step per pass, as one torch weight does."""

    def __init__(self, table: SparseTable) -> None:
        self.table = table
        self.grads: list[tuple[np.ndarray, np.ndarray]] = []  # (keys, summed rows) per call
        self.pending: list[Future[None]] = []

    def add(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """Called by the backward of each forward call; the engine runs :meth:`flush` once the
        whole pass is done."""
        if not self.grads:
            try:
                queue = torch.autograd.Variable._execution_engine.queue_callback
            except AttributeError:  # not inside the engine: nothing else to wait for
                self.grads.append((keys, grads))
                self.flush()
                return
            queue(self.flush)
        self.grads.append((keys, grads))

    def flush(self) -> None:
        calls, self.grads = self.grads, []
        if not calls:
            return
        if len(calls) == 1:
            keys, grads = calls[0]
        else:  # the table's push sums repeated keys
            keys = np.concatenate([k for k, _ in calls])
            grads = np.concatenate([g for _, g in calls])
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.table.push(keys, grads))

    def wait(self, timeout: float | None) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            f.result(timeout)


# per client, per table name: every module over a table shares its pass
_PASSES: weakref.WeakKeyDictionary[Client, dict[str, _TablePass]] = weakref.WeakKeyDictionary()


class _ServerEmbedding(nn.Module):
    """What :class:`Embedding` and :class:`EmbeddingBag` share: the table, ids to keys, the
    pull (read-only outside training), prefetch, and one push per backward pass."""

    def __init__(
        self,
        client: Client,
        name: str,
        dim: int,
        *,
        optimizer: Optimizer | None,
        init: Initializer | None,
        consistency: str | None,
        create: bool,
        padding_idx: int | None,
    ) -> None:
        super().__init__()
        if padding_idx is not None and (
            isinstance(padding_idx, bool)
            or not isinstance(padding_idx, int)
            or not 0 <= padding_idx < 2**64
        ):
            raise ConfigError(
                f"embedding {name!r}: padding_idx must be a non-negative id or None, got "
                f"{padding_idx!r} (there is no vocabulary size to count a negative one from)"
            )
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
        self.padding_idx = padding_idx
        self._pass = _PASSES.setdefault(client, {}).setdefault(name, _TablePass(self.table))
        self._prefetched: tuple[np.ndarray, bool, Future[np.ndarray]] | None = None
        self._trigger = torch.empty(0, requires_grad=True)

    def extra_repr(self) -> str:
        return f"table={self.table.name!r}, dim={self.dim}, padding_idx={self.padding_idx}"

    def _keys_of(self, ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
        """The distinct keys of ``ids`` (sorted, the padding id left out), the index of each id
        among them (shaped like ``ids``), and the index standing for the padding id."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ConfigError(
                f"embedding {self.table.name!r}: ids must be integers, got dtype {arr.dtype}"
            )
        keys = as_keys(arr, self.table.name, int64_bits=True).reshape(-1)
        uniq, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1).astype(np.int64, copy=False)
        if self.padding_idx is None:
            return uniq, inverse.reshape(arr.shape), None
        at = int(np.searchsorted(uniq, np.uint64(self.padding_idx)))
        if at == len(uniq) or uniq[at] != self.padding_idx:
            return uniq, inverse.reshape(arr.shape), len(uniq)
        # the padding id is not pulled: its index becomes the zero row after the others
        is_pad = inverse == at
        inverse = inverse - (inverse > at)
        inverse[is_pad] = len(uniq) - 1
        return np.delete(uniq, at), inverse.reshape(arr.shape), len(uniq) - 1

    def _reading(self) -> bool:
        """Outside training (``eval()``, ``torch.no_grad()``) the module only reads: no rows
        are created on the servers and nothing is pushed."""
        return not (self.training and torch.is_grad_enabled())

    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Start pulling the rows of the next batch's ``ids``; the next forward with the same
        distinct ids uses them.

        Example:
            emb.prefetch(next_ids); loss = model(ids); ...   # the pull overlaps this step
        """
        uniq, _, _ = self._keys_of(ids)
        create = self.create and not self._reading()
        self._prefetched = (uniq, create, self.table.pull_async(uniq, create=create))

    def _weight(
        self, ids: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The local weight ``(distinct ids [+ a zero padding row], dim)``, in the autograd
        graph while training, and the index of every id into it."""
        uniq, inverse, pad = self._keys_of(ids)
        reading = self._reading()
        create = self.create and not reading
        pre, self._prefetched = self._prefetched, None
        if pre is not None and pre[1] == create and np.array_equal(pre[0], uniq):
            rows = pre[2].result()
        else:
            rows = self.table.pull(uniq, create=create)
        rows = np.asarray(rows, dtype=np.float32)
        if pad is not None:
            rows = np.concatenate([rows, np.zeros((1, self.dim), np.float32)])
        if reading:
            weight = torch.from_numpy(rows)
        else:
            weight = _ServerRows.apply(self._trigger, rows, self._pass, uniq)  # type: ignore[no-untyped-call]
        return weight, torch.from_numpy(inverse), pad

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every push so far is acknowledged by the servers.

        Example:
            loss.backward(); emb.wait()      # the servers have applied this step
        """
        self._pass.wait(timeout)

    def export(
        self, path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write a checkpoint of the whole cluster into ``path`` (:meth:`Client.save`: every
        table, optimizer state included; restore it with ``LocalCluster(restore=path)`` or
        ``paramserver run --restore path``) and return this table's ``(keys, weights)`` from
        it: uint64 keys ``(n,)`` and float32 weights ``(n, dim)``, sorted by key.

        Example:
            keys, weights = emb.export("ckpt/")
        """
        self.wait(timeout)
        return read_embeddings(self.client.save(path, timeout=timeout), self.table.name)

    def load(
        self, ids: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray, *,
        timeout: float | None = None,
    ) -> None:  # fmt: skip
        """Write ``weights`` ``(len(ids), dim)`` into the running table as the rows of ``ids``
        (1-D, as the forward takes them: uint64 keys, or an int64 tensor of their bits),
        creating missing rows; their optimizer state starts afresh. Waits until the servers
        have applied them, after this worker's earlier pushes. Any other shape or dtype, NaN or
        Inf: ConfigError, and the table is unchanged.

        Example:
            emb.load(torch.tensor([3, 9]), torch.zeros(2, emb.dim))
        """
        self.wait(timeout)
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        name = self.table.name
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ConfigError(
                f"embedding {name!r}: load takes a 1-D array of integer ids, got {arr.dtype} of "
                f"shape {arr.shape}"
            )
        keys = as_keys(arr, name, int64_bits=True)
        w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights
        if not isinstance(w, np.ndarray) or w.dtype.kind != "f":
            raise ConfigError(
                f"embedding {name!r}: load takes float weights, got "
                f"{getattr(w, 'dtype', type(w).__name__)}"
            )
        self.table.assign(keys, w.astype(self.table.dtype, copy=False), timeout=timeout)

    def load_checkpoint(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        """Write this table's rows from a checkpoint (:meth:`export`, :meth:`Client.save`) into
        the running cluster, whatever it holds now (other rows are kept); returns how many. The
        weights only (:func:`read_embeddings`), with a fresh optimizer state: to resume training
        with the saved state, ``client.restore(path)`` puts every table back instead.

        Example:
            n = emb.load_checkpoint("ckpt/")     # a serving cluster gets the trained rows
        """
        keys, weights = read_embeddings(path, self.table.name)
        if weights.shape[1] != self.dim:
            raise ConfigError(
                f"embedding {self.table.name!r}: the checkpoint's rows are {weights.shape[1]} "
                f"wide, this table's {self.dim}"
            )
        self.load(keys, weights, timeout=timeout)
        return len(keys)


class Embedding(_ServerEmbedding):
    """Like ``torch.nn.Embedding``, over unbounded 64-bit ids: rows live in a sparse table on
    the servers, created on first touch while training.

    Ids are any integer tensor or array; an int64 tensor holds the bit patterns of uint64 ids
    (hashed ids >= 2**63 are negative there and reach the same rows as the uint64 keys).
    ``padding_idx``: that id gives a zero vector and no gradient, and is never stored.

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
        padding_idx: int | None = None,
    ) -> None:
        super().__init__(client, name, dim, optimizer=optimizer, init=init,
                         consistency=consistency, create=create, padding_idx=padding_idx)  # fmt: skip

    def forward(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings of ``ids`` (any shape): a tensor of shape ``(*ids.shape, dim)``."""
        weight, index, pad = self._weight(ids)
        return F.embedding(index, weight, padding_idx=pad)


class EmbeddingBag(_ServerEmbedding):
    """Like ``torch.nn.EmbeddingBag``: the sum, mean or max of the embeddings of each bag of
    ids, for multi-valued features, without materialising the per-id embeddings.

    Bags are the rows of a 2-D ``input``, or a 1-D ``input`` cut at ``offsets`` (each bag's
    start; ``include_last_offset`` as in torch). ``per_sample_weights`` (mode "sum") weighs
    each id. Ids equal to ``padding_idx`` are left out of their bag (and of its mean); an
    empty bag gives zeros. The reduction is torch's ``embedding_bag`` over the pulled rows.

    Example:
        bag = EmbeddingBag(client, "tags", dim=8, mode="mean")
        vecs = bag(torch.tensor([4, 7, 7, 1]), offsets=torch.tensor([0, 3]))   # (2, 8)
    """

    def __init__(
        self,
        client: Client,
        name: str,
        dim: int,
        *,
        mode: str = "mean",
        optimizer: Optimizer | None = None,
        init: Initializer | None = None,
        consistency: str | None = None,
        create: bool = True,
        padding_idx: int | None = None,
        include_last_offset: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(f"embedding bag {name!r}: mode must be one of {_MODES}, got {mode!r}")
        super().__init__(client, name, dim, optimizer=optimizer, init=init,
                         consistency=consistency, create=create, padding_idx=padding_idx)  # fmt: skip
        self.mode = mode
        self.include_last_offset = include_last_offset

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"

    def forward(
        self,
        input: torch.Tensor | np.ndarray,  # torch.nn.EmbeddingBag's name for it
        offsets: torch.Tensor | np.ndarray | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One vector per bag: ``(bags, dim)``. Bad bags are refused before anything is
        pulled (no row is created)."""
        ids = input if isinstance(input, torch.Tensor) else np.asarray(input)
        off = self._check_bags(ids, offsets, per_sample_weights)
        weight, index, pad = self._weight(ids)
        return F.embedding_bag(
            index,
            weight,
            off,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
            padding_idx=pad,
        )

    def _check_bags(
        self,
        ids: torch.Tensor | np.ndarray,
        offsets: torch.Tensor | np.ndarray | None,
        weights: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The offsets as a LongTensor, once the bags are known to be well formed."""
        name = self.table.name
        shape = tuple(ids.shape)
        if len(shape) not in (1, 2):
            raise ConfigError(f"embedding bag {name!r}: input must be 1-D or 2-D, got {shape}")
        if weights is not None:
            if self.mode != "sum":
                raise ConfigError(
                    f"embedding bag {name!r}: per_sample_weights needs mode 'sum', not "
                    f"{self.mode!r}"
                )
            if tuple(weights.shape) != shape:
                raise ConfigError(
                    f"embedding bag {name!r}: per_sample_weights has shape "
                    f"{tuple(weights.shape)}, input {shape}"
                )
        if len(shape) == 2:
            if offsets is not None:
                raise ConfigError(f"embedding bag {name!r}: offsets must be None for a 2-D input")
            return None
        if offsets is None:
            raise ConfigError(f"embedding bag {name!r}: a 1-D input needs offsets (bag starts)")
        off = offsets.detach().cpu().numpy() if isinstance(offsets, torch.Tensor) else np.asarray(
            offsets)  # fmt: skip
        if off.ndim != 1 or off.dtype.kind not in "iu":
            raise ConfigError(
                f"embedding bag {name!r}: offsets must be a 1-D integer array, got "
                f"{off.dtype} of shape {off.shape}"
            )
        n = shape[0]
        if len(off) and (off[0] != 0 or (np.diff(off) < 0).any() or off[-1] > n):
            raise ConfigError(
                f"embedding bag {name!r}: offsets must start at 0, never decrease and stay "
                f"within the input's {n} ids; got {off.tolist()[:8]}"
                f"{' ...' if len(off) > 8 else ''}"
            )
        return torch.from_numpy(off.astype(np.int64, copy=False))


def read_embeddings(checkpoint: str | os.PathLike[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The keys and weights of sparse table ``name`` in a checkpoint (a directory written by
    :meth:`Client.save`, or its root with a LATEST file): uint64 keys ``(n,)`` and weights
    ``(n, dim)`` without the optimizer state, sorted by key. Reads files only: no cluster.

    Example:
        keys, weights = read_embeddings("ckpt/", "emb")
    """
    directory, manifest, specs = read_manifest(checkpoint)
    spec = next((s for s in specs if s.name == name), None)
    if spec is None or spec.kind != "sparse":
        have = sorted(s.name for s in specs if s.kind == "sparse")
        raise ConfigError(
            f"checkpoint {directory}: no sparse table {name!r} (its sparse tables: {have})"
        )
    # one server owning every key: the rows of all the servers that wrote the checkpoint
    keys, rows = load_sparse_rows(directory, manifest, name, HashRing.build([0]), 0)
    order = np.argsort(keys, kind="stable")
    weights = np.empty((len(keys), spec.dim), spec.np_dtype)
    if len(keys):
        weights[...] = rows[order, : spec.dim]
    return keys[order], weights
