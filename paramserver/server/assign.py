"""Writing into running tables: ``assign`` (a worker's rows or values put in place of the
table's) and ``restore`` (every table of this server back to a checkpoint).

Both are applied at once, like an async push, in the order the server receives them: after the
earlier pushes of the same worker (one connection per worker), before its later ones. Under
``sync`` nothing is aggregated: the pushes buffered for a clock not yet complete are applied on
top of the new values when that clock completes (meet at a ``client.barrier()`` after
``client.clock()`` first to write between steps). A refused request changes nothing.
"""

from __future__ import annotations

import logging

from paramserver import checkpoint
from paramserver.arrays import all_finite
from paramserver.errors import ConfigError
from paramserver.partition import HashRing, owners_held
from paramserver.server.keycache import KeyCache
from paramserver.server.shard import DenseShard, SparseShard
from paramserver.server.snapshot import load_rows
from paramserver.server.state import Handlers
from paramserver.server.table import Table, keys_and_values, make_table
from paramserver.spec import TableSpec
from paramserver.wire.messages import AssignMsg, RestoreMsg
from paramserver.wire.paths import Request
from paramserver.wire.refusal import Refusal

__all__ = ["Assigns", "restore_mismatch"]

log = logging.getLogger(__name__)


def restore_mismatch(running: TableSpec, saved: TableSpec) -> str | None:
    """What keeps a checkpoint's table from going into a running one, in words (None: nothing).
    Hyperparameters (the rate), initializer and seed may differ: the running table keeps its."""
    for what, a, b in (
        ("kind", running.kind, saved.kind),
        ("dtype", running.dtype, saved.dtype),
        ("dim" if running.kind == "sparse" else "shape",
         running.dim if running.kind == "sparse" else running.shape,
         saved.dim if saved.kind == "sparse" else saved.shape),
        ("optimizer", running.optimizer.kind, saved.optimizer.kind),
    ):  # fmt: skip
        if a != b:
            return f"table {running.name!r} has {what} {a!r} here and {b!r} in the checkpoint"
    return None


class Assigns(Handlers):
    """The ``assign`` and ``restore`` handlers (see the module docstring).

    Example:
        assigns = Assigns(state, paths, progress=server.progress)
        assigns.on_assign(header, request)
    """

    def on_assign(self, h: AssignMsg, req: Request) -> None:
        state = self.state
        t = state.table(h["table"], h["rank"])
        rank = h["rank"]
        state.check_live(rank)
        where = f"assign to table {t.spec.name!r} from worker[{rank}]"
        shard = t.held(state.name)
        arrays = req.keyed_arrays(where)
        dtype, opt = t.spec.np_dtype, t.spec.optimizer
        keys = None
        if isinstance(shard, SparseShard):
            keys, values = keys_and_values(arrays, where, "row")
            n, widths = len(keys), (shard.dim, shard.stride)
            shapes: list[tuple[int, ...]] = [(n, w) for w in widths]
        else:
            if len(arrays) != 1:
                raise Refusal("invalid", f"{where}: needs exactly one value array")
            values = arrays[0]
            n = t.stop - t.start
            shapes = [(n,), (n, 1 + opt.n_slots + opt.n_scalars)]
        if tuple(values.shape) not in shapes or values.dtype != dtype:
            raise Refusal(
                "invalid",
                f"{where}: values must be {dtype} of shape {' or '.join(map(str, shapes))}, got "
                f"{values.dtype} of shape {tuple(values.shape)}",
            )
        if not all_finite(values):
            raise Refusal("non_finite", f"{where}: the values contain NaN or Inf; nothing changed")
        if keys is not None:
            t.check_room(keys, state.name)
        if not state.fresh(rank, h["seq"]):
            req.reply.ok()  # a resend of an assign already applied
            return
        if isinstance(shard, SparseShard):
            assert keys is not None
            shard.assign(keys, values)
        else:
            self.paths.changing(t.spec.name)
            shard.assign(values)
            t.version += 1
        req.reply.ok()

    def on_restore(self, h: RestoreMsg, req: Request) -> None:
        """Every table of this server that the checkpoint holds gets its rows and optimizer
        state from it, as a server restarted from it would (rows created since are gone); a
        table the checkpoint does not hold is kept as it is. All tables are read before any is
        replaced: a checkpoint that cannot be read changes nothing."""
        state = self.state
        state.check_live(h["rank"])
        if req.arrays:
            raise Refusal("invalid", "restore takes no arrays")
        try:
            directory, manifest, specs = checkpoint.read_manifest(h["path"])
        except ConfigError as exc:
            raise Refusal("invalid", str(exc)) from None
        saved = {s.name: s for s in specs}
        mine = {n: t for n, t in state.tables.items() if n in saved}
        for n, t in mine.items():
            why = restore_mismatch(t.spec, saved[n])
            if why is not None:
                raise Refusal("conflict", f"restore from {directory}: {why}; nothing changed")
        kept = sorted(n for n in state.tables if n not in saved)
        if h.get("check"):
            req.reply.ok(stats={"tables": len(mine), "kept": kept})
            return
        servers = int(h["servers"])
        members = sorted(int(r) for r in h.get("ring") or range(servers))
        ring = HashRing.build(members)
        # with replication this server holds the keys of the servers it is a copy of, too
        owners = owners_held(state.rank, members, state.replication)
        fresh: dict[str, Table] = {}
        try:
            for n, t in mine.items():
                fresh[n] = make_table(t.spec, state.rank, members, state.replication)
                load_rows(fresh[n], directory, manifest, ring, owners)
        except (ConfigError, OSError, ValueError) as exc:
            raise Refusal("invalid", f"restore from {directory}: {exc}") from None
        rows = 0
        for n, t in mine.items():
            if isinstance(t.shard, DenseShard):
                self.paths.changing(n)
            t.shard = fresh[n].shard
            t.keys = KeyCache()  # row ids changed: workers send their key lists again
            t.version += 1
            rows += 0 if t.shard is None else int(t.shard.num_rows)
        log.info(
            "%s: %d tables back to %s (clock %d) at worker[%d]'s request",
            state.name,
            len(mine),
            directory,
            manifest["clock"],
            h["rank"],
        )
        req.reply.ok(stats={"tables": len(mine), "rows": rows, "kept": kept})
