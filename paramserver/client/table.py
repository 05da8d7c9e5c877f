"""What every table handle shares (:class:`TableHandle`): its spec, the staleness its pulls
were served with, the learning rate, and the headers and gradient checks of its requests."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np

from paramserver.arrays import all_finite
from paramserver.client.session import Session, server_name
from paramserver.errors import ConfigError
from paramserver.spec import TableSpec

__all__ = ["TableHandle"]


class TableHandle:
    """What every table handle shares: its spec, staleness record, learning rate, and the
    headers and gradient checks of its requests."""

    def __init__(self, client: Session, spec: TableSpec) -> None:
        self.client = client
        self.spec = spec
        self.name = spec.name
        self.dtype = spec.np_dtype
        self._staleness: Counter[int] = Counter()

    def staleness(self) -> dict[int, int]:
        """Histogram of the staleness this worker's pulls were served with: {clocks: count}.

        Example:
            emb.staleness()    # {0: 950, 1: 40, 2: 10}
        """
        return dict(sorted(self._staleness.items()))

    def set_lr(self, lr: float, *, timeout: float | None = None) -> None:
        """Change the learning rate of this table's optimizer on every server.

        Example:
            emb.set_lr(0.01)
        """
        opt = self.spec.optimizer.with_lr(lr)
        futs = [
            self.client.endpoint.request(
                server_name(s),
                {"kind": "set_lr", "table": self.name, "lr": float(lr)},
                what=f"set_lr of table {self.name!r} on {server_name(s)}",
            )
            for s in range(self.client.num_servers)
        ]
        for f in futs:
            f.result(timeout)
        self.spec = replace(self.spec, optimizer=opt)

    def check_grads(self, grads: Any, shape: tuple[int, ...]) -> np.ndarray:
        g = np.asarray(grads)
        if g.dtype != self.dtype:
            raise ConfigError(
                f"table {self.name!r}: gradient dtype must be {self.dtype}, got {g.dtype}"
            )
        if g.shape != shape:
            raise ConfigError(f"table {self.name!r}: gradient shape must be {shape}, got {g.shape}")
        # with nonfinite="skip" the servers drop the rows holding NaN or Inf themselves
        if self.spec.nonfinite == "reject" and not all_finite(g):
            raise ConfigError(
                f"table {self.name!r}: gradient contains NaN or Inf; push refused, "
                "the table is unchanged (create the table with nonfinite='skip' to drop such "
                "rows instead)"
            )
        return np.ascontiguousarray(g)

    def push_header(self) -> dict[str, Any]:
        c = self.client
        return {"kind": "push", "table": self.name, "rank": c.rank, "clock": c.current_clock,
                "seq": c.next_seq()}  # fmt: skip

    def pull_header(self, create: bool, timeout: float) -> dict[str, Any]:
        c = self.client
        return {
            "kind": "pull",
            "table": self.name,
            "rank": c.rank,
            "clock": c.current_clock,
            "create": create,
            "timeout": timeout,
        }

    def record_staleness(self, staleness: list[int]) -> None:
        self._staleness[max(staleness, default=0)] += 1
