""":class:`DenseParameters`: the parameters of a torch module kept in dense tables on the
servers, driven like a torch optimizer (``zero_grad()``, ``backward()``, ``step()``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from paramserver.checkpoint import load_dense_range, read_manifest
from paramserver.client import Client
from paramserver.client.dense import DenseTable
from paramserver.errors import ConfigError
from paramserver.init import Constant, Initializer, Uniform, Zeros
from paramserver.optim import SGD, Optimizer
from paramserver.wire.transport import Future

__all__ = ["DenseParameters"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


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


class DenseParameters(torch.optim.Optimizer):
    """The parameters of ``module``, each in a dense table named ``{name}/{parameter}``, with
    the optimizer running on the servers. Used like a torch optimizer::

        opt = DenseParameters(client, "mlp", model, optimizer=ps.optim.Adam(lr=1e-3))
        opt.zero_grad(); loss.backward(); opt.step(); client.clock()

    The module gets the servers' values at construction. :meth:`step` sends every parameter's
    gradient; the module's next call pulls the fresh values first (a forward pre-hook: under
    ``sync`` the servers apply a step once every worker called ``clock()``, so the pull waits
    for that). :meth:`pull` refreshes at once. ``param_groups[0]["lr"]`` is the servers'
    learning rate: a change (by hand or by a ``torch.optim.lr_scheduler``) reaches them at the
    next step. float32 and float64 parameters are kept in tables of their dtype.

    Example:
        dense = DenseParameters(client, "mlp", model, optimizer=ps.optim.Adam(lr=1e-3))
        dense.zero_grad(); loss.backward(); dense.step(); client.clock()
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
        codec: str = "none",
    ) -> None:
        params = dict(module.named_parameters())
        if not params:
            raise ConfigError(f"dense parameters {name!r}: the module has no parameters")
        for pname, p in params.items():
            if p.dtype not in _DTYPES:
                raise ConfigError(
                    f"dense parameters {name!r}: parameter {pname!r} is {p.dtype}; tables hold "
                    "float32 or float64: convert the module with module.float() (or "
                    "module.double()) before handing it over"
                )
        server_opt = optimizer or SGD(lr=0.01)
        super().__init__(list(params.values()), {"lr": server_opt.lr})
        self.client = client
        self.module = module
        self.params = params
        self.tables: dict[str, DenseTable] = {}
        for pname, p in params.items():
            chosen = (init or {}).get(pname) or _default_init(pname, p.detach(), params)
            self.tables[pname] = client.dense_table(
                f"{name}/{pname}",
                shape=tuple(int(d) for d in p.shape) or (1,),
                dtype=_DTYPES[p.dtype],
                init=chosen,
                optimizer=server_opt,
                consistency=consistency,
                codec=codec,  # values and gradients that cross a socket (wire.codec)
            )
        # one request per server and step for the small tables (client/group.py)
        self.group = client.dense_group(list(self.tables.values()))
        self._lr = server_opt.lr
        self._pending: list[Future[None]] = []
        self._stale = False
        self._hook = module.register_forward_pre_hook(self._before_forward)
        self.pull()

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._stale:
            self.pull()

    def pull(self, timeout: float | None = None) -> None:
        """Copy the servers' current values into the module's parameters (one round trip).

        Example:
            dense.pull()        # e.g. before evaluating or saving the module
        """
        self.wait(timeout)
        values = self.group.pull(timeout=timeout)
        with torch.no_grad():
            for n, v in zip(self.tables, values, strict=True):
                p = self.params[n]
                p.copy_(torch.from_numpy(v).reshape(p.shape))
        self._stale = False

    def push(self) -> None:
        """Send every parameter's ``.grad`` (zero where None) and clear it; returns at once.

        Example:
            loss.backward(); dense.push(); client.clock(); dense.pull()
        """
        grads = []
        for n, t in self.tables.items():
            p = self.params[n]
            g = p.grad
            grads.append(
                np.zeros(t.shape, t.dtype)
                if g is None
                else np.ascontiguousarray(g.detach().cpu().numpy().reshape(t.shape))
            )
            p.grad = None
        self._pending.append(self.group.push(grads))

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Send the gradients (as :meth:`push`); the module pulls the updated values before its
        next call. A changed ``param_groups[0]["lr"]`` goes to the servers first.

        Example:
            dense.zero_grad(); loss.backward(); dense.step(); client.clock()
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = float(self.param_groups[0]["lr"])
        if lr != self._lr:
            for t in self.tables.values():
                t.set_lr(lr)
            self._lr = lr
        self.push()
        self._stale = True
        return loss

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every push so far is acknowledged.

        Example:
            dense.step(); dense.wait()
        """
        pending, self._pending = self._pending, []
        for f in pending:
            f.result(timeout)

    def assign(self, timeout: float | None = None) -> None:
        """Write the module's current parameter values into the tables, the servers'
        optimizer state started afresh: e.g. after ``module.load_state_dict(...)``, so that
        the servers hold what the module holds. Waits until every server has applied them.

        Example:
            model.load_state_dict(torch.load("head.pt")); dense.assign()
        """
        self.wait(timeout)
        with torch.no_grad():
            values = [
                np.ascontiguousarray(self.params[n].detach().cpu().numpy().reshape(t.shape))
                for n, t in self.tables.items()
            ]
        for t, v in zip(self.tables.values(), values, strict=True):
            t.assign(v, timeout=timeout)
        self._stale = False

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> None:
        """Put the values a checkpoint holds for these tables (``{name}/{parameter}``, written
        by :meth:`Client.save`) into the module and the running tables (as :meth:`assign`:
        a fresh optimizer state). Every table is read first: a missing or different one is a
        ConfigError, and nothing changes.

        Example:
            dense.load_checkpoint("ckpt/")
        """
        directory, manifest, specs = read_manifest(path)
        saved = {s.name: s for s in specs}
        values = []
        for n, t in self.tables.items():
            spec = saved.get(t.name)
            if spec is None or spec.kind != "dense" or spec.shape != t.shape:
                have = "none" if spec is None else f"{spec.kind} of shape {spec.shape}"
                raise ConfigError(
                    f"checkpoint {directory}: no dense table {t.name!r} of shape {t.shape} "
                    f"(it has {have}); nothing changed"
                )
            rows = load_dense_range(directory, manifest, t.name, 0, spec.size)
            assert rows is not None  # size >= 1
            values.append((n, rows[:, 0].reshape(t.shape)))
        with torch.no_grad():
            for n, v in values:
                p = self.params[n]
                p.copy_(torch.from_numpy(np.ascontiguousarray(v)).reshape(p.shape).to(p.dtype))
        self.assign(timeout)
