"""Applying pushes: at once (``async``, ``ssp``) or when their clock completes (``sync``).

:meth:`Pushes.on_push` checks the request (live worker, shapes, finite values, room), drops a
push it has seen (the sequence number), then runs the optimizer over the rows
(``SparseShard.push``, ``DenseShard.push``) or buffers the gradient until every live worker has
finished its clock (``consistency.SyncBuffer``), when :meth:`Pushes.apply_sync` applies their
mean.
"""

from __future__ import annotations

from paramserver.server.consistency import aggregate_dense, aggregate_sparse
from paramserver.server.copies import dense_applied, not_applied
from paramserver.server.rebuild import already_applied
from paramserver.server.shard import SparseShard
from paramserver.server.state import Handlers
from paramserver.server.table import Table, keys_and_values
from paramserver.wire.codec import decode_pushed
from paramserver.wire.messages import PushMsg
from paramserver.wire.paths import Request
from paramserver.wire.refusal import Refusal

__all__ = ["Pushes"]


def decode_gradient(req: Request, t: Table, codec: str, where: str) -> None:
    """Replace the encoded gradient of ``req`` by its values in the table's dtype."""
    if req.raw or req.header.get("shm"):
        raise Refusal("invalid", f"{where}: an encoded gradient must travel in frames")
    size = t.spec.dim if t.spec.kind == "sparse" else t.stop - t.start
    try:
        req.arrays = decode_pushed(req.arrays, codec, t.spec.kind, size, t.spec.np_dtype)
    except ValueError as exc:
        raise Refusal("invalid", f"{where}: {exc}") from None


class Pushes(Handlers):
    """The push handler and the sync tables' apply step.

    Example:
        pushes = Pushes(state, paths, progress=server.progress)
        pushes.on_push(header, request)
    """

    def on_push(self, h: PushMsg, req: Request) -> None:
        state = self.state
        t = state.table(h["table"], h["rank"])
        rank, seq = h["rank"], h["seq"]
        state.check_live(rank)
        if state.clocks.advance(rank, h["clock"]):  # see Pulls.on_pull
            self.progress()
        where = f"push to table {t.spec.name!r} from worker[{rank}]"
        dtype = t.spec.np_dtype
        shard = t.held(state.name)
        if "codec" in h:  # an encoded gradient: decoded before any check or the optimizer
            decode_gradient(req, t, h["codec"], where)
        arrays = req.keyed_arrays(where) if t.spec.kind != "dense" else req.arrays
        if "sig" in h:
            if t.sync is not None:
                raise Refusal("invalid", f"{where}: key signatures are for async/ssp tables")
            ids, dup = t.signed_rows(h, arrays, "push", state.name)
            grads = arrays[-1]
            keep = t.check_sparse_grads(rank, len(ids), grads)
            if keep is not None:
                ids, grads = ids[keep], grads[keep]
            if state.fresh(rank, seq):  # else a retry of a push already applied
                t.pushes += 1
                assert isinstance(shard, SparseShard)
                shard.push_rows(ids, grads, dup)
            req.reply.ok()
            return
        if isinstance(shard, SparseShard):
            keys, grads = keys_and_values(arrays, where, "gradient")
            want: tuple[int, ...] = (len(keys), t.spec.dim)
        else:
            keys, grads = None, req.dense_array(where, dtype)
            want = (t.stop - t.start,)
        if grads.shape != want or grads.dtype != dtype:
            raise Refusal(
                "invalid",
                f"{where}: gradient must be {want} {dtype}, got {tuple(grads.shape)} {grads.dtype}",
            )
        keep = None if req.prechecked else t.finite_rows(where, grads)
        if keep is not None:
            if keys is None:  # dense: the whole gradient is skipped
                req.reply.ok()
                return
            keys, grads = keys[keep], grads[keep]
        if keys is not None:
            t.check_room(keys, state.name)
        if not state.fresh(rank, seq) or already_applied(state, t, rank, seq, keys):
            req.reply.ok()  # a retry of a push already applied, or in a rebuild's rows
            return
        if t.sync is None and keys is not None and state.moved is not None:
            fresh = not_applied(state, rank, seq, keys)  # in the rows a move brought here
            if fresh is not None:
                keys, grads = keys[fresh], grads[fresh]
        elif t.sync is None and dense_applied(state, t.spec.name, rank, seq):
            req.reply.ok()  # in the values a move brought here
            return
        t.pushes += 1
        if t.sync is not None:
            if h["clock"] < state.sync_floor:  # in the rows a rebuild copied (server/rebuild.py)
                req.reply.ok()
                return
            if h["clock"] < state.clocks.clock[rank]:
                raise Refusal("invalid", f"{where}: clock {h['clock']} is already finished")
            # kept until the clock completes: copied out of reused or shared buffers
            grads = grads.copy()
            if keys is not None:
                keys = keys.copy()
            t.sync.add(h["clock"], (rank, keys, grads) if keys is not None else (rank, grads))
        elif isinstance(shard, SparseShard):
            assert keys is not None
            shard.push(keys, grads)
            req.reply.ok()
            shard.prepare()  # room for the next new rows, made after the answer
            return
        else:
            self.paths.changing(t.spec.name)
            # a worker that reads its own copy of the values gets it refreshed in the same pass
            mirror = req.reply.mirror()
            shard.push(grads, out=mirror)
            t.version += 1
            if mirror is not None:
                req.reply.mirrored(t.version)
        req.reply.ok()

    def apply_sync(self, below: int) -> None:
        """Apply the buffered sync pushes of every clock < ``below``: the mean over the live
        workers (``consistency.aggregate_sparse``, ``aggregate_dense``)."""
        live = self.state.clocks.live
        # (a dense table being re-cut: both placements, the old one for the pulls it holds)
        for t in [*self.state.tables.values(), *self.state.recut.values()]:
            if t.sync is None or t.shard is None or t.receiving:
                continue
            for _, items in t.sync.take_completed(below):
                items = [it for it in items if it[0] in live]
                if not items:
                    continue
                if isinstance(t.shard, SparseShard):
                    keys, mean = aggregate_sparse(items, len(live))
                    t.shard.push(keys, mean)
                else:
                    self.paths.changing(t.spec.name)
                    t.shard.push(aggregate_dense(items, len(live), t.stop - t.start))
                t.version += 1
