"""Answering pulls: now if the table's consistency allows, else when a clock advances.

:meth:`Pulls.on_pull` checks the request and asks ``consistency.pull_ready``; a pull that must
wait goes into ``state.deferred`` (``consistency.DeferredPulls``). :meth:`Pulls.answer` gathers
the rows (``SparseShard.pull``, creating missing rows with their initializer) or the dense range
and replies the way the request came (``wire.paths.Reply``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from paramserver.errors import ConfigError
from paramserver.server.consistency import pull_ready, staleness_of
from paramserver.server.shard import DenseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table
from paramserver.wire.codec import encode_flat
from paramserver.wire.messages import PullMsg
from paramserver.wire.paths import Reply, Request
from paramserver.wire.refusal import Refusal

__all__ = ["Pulls"]


class Pulls:
    """The pull handler and the deferred pulls' release and expiry.

    Example:
        pulls = Pulls(state, progress=server.progress)
        pulls.on_pull(header, request)      # answered, or deferred
    """

    def __init__(self, state: ServerState, progress: Callable[[], None]) -> None:
        self.state = state
        self.progress = progress  # called when a request moved a worker's clock

    def on_pull(self, h: PullMsg, req: Request) -> None:
        state = self.state
        t = state.table(h["table"], h["rank"])
        # a request at clock c means its worker finished every clock before c; a server that
        # restarted after the worker's clock messages learns it this way
        if state.clocks.advance(h["rank"], h["clock"]):
            self.progress()
        if "sig" in h:
            t.signed_rows(h, req.arrays, "pull", state.name)
            keys = None
        else:
            keys = t.pull_keys(req.arrays, state.name)
        mode, bound = t.spec.mode
        if pull_ready(mode, bound, h["clock"], state.clocks.min_clock):
            self.answer(h, req.reply, t, keys)
            return
        # answer just before the worker gives up, with a reason that names who is slow
        now = time.monotonic()
        wait = max(0.0, h["timeout"] * 0.95 - 0.05)
        kept = None if keys is None else keys.copy()  # keys may live in a reused buffer
        state.deferred.add((h, req.reply, kept, t), mode, bound, h["clock"], now + wait, now)

    def answer(self, h: PullMsg, reply: Reply, t: Table, keys: np.ndarray | None) -> None:
        if str(h["kind"]) == "pull_many":  # a deferred pull of a group of tables (many.py)
            from paramserver.server.many import answer_pull_many

            answer_pull_many(self.state, dict(h), reply)
            return
        assert t.shard is not None
        staleness = staleness_of(h["clock"], self.state.clocks.min_clock)
        self.state.metrics.observe_staleness(t.spec.name, staleness)
        if isinstance(t.shard, DenseShard):
            if "codec" in h and not h.get("shm"):  # the worker asked for encoded values
                from paramserver.server.codec_kernels import encode_rows_fast

                values = encode_flat(t.shard.weights, h["codec"], encode_rows_fast)
                reply.send(values, staleness=staleness)
                t.pulls += 1
                return
            reply.dense(t.shard, t.version, raw=t.spec.codec == "none", staleness=staleness)
            t.pulls += 1
            return
        spec, codec = t.spec, t.spec.codec
        if "sig" in h:
            ids, _ = t.signed_rows(h, [], "pull", self.state.name)
            out = reply.rows_out(len(ids), spec.dim, spec.np_dtype) if codec == "none" else None
            rows = t.shard.pull_rows(ids, out=out)
        else:
            assert keys is not None
            if h["create"]:
                t.check_room(keys, self.state.name)
            out = reply.rows_out(len(keys), spec.dim, spec.np_dtype) if codec == "none" else None
            rows = t.shard.pull(keys, create=h["create"], out=out)
        t.pulls += 1
        if codec == "none":
            reply.send([rows], staleness=staleness)
        else:  # compiled encoders, loaded only by a server that has a codec table
            from paramserver.server.codec_kernels import encode_rows_fast

            reply.send(encode_rows_fast(rows, codec), staleness=staleness)
        t.shard.prepare()  # room for the next new rows, while the worker reads these

    def release(self) -> None:
        """Answer the deferred pulls that the clocks now allow, in the order they came."""
        for h, reply, keys, t in self.state.deferred.release(self.state.clocks.min_clock):
            try:
                self.answer(h, reply, t, keys)  # never dropped
            except (Refusal, ConfigError) as exc:  # e.g. its key list left the cache
                reply.refuse(exc)

    def expire(self, now: float) -> None:
        """Refuse the deferred pulls whose worker is about to give up, naming who is slow."""
        state = self.state
        for d in state.deferred.expire(now):
            h, reply, _, _ = d.item
            slow = ", ".join(f"worker[{r}] at clock {c}" for r, c in state.clocks.slowest())
            table = state.tables.get(h["table"])
            mode = table.spec.consistency if table is not None else "?"
            reply.error(
                "timeout",
                f"pull of table {h['table']!r} at clock {h['clock']} ({mode}) "
                f"waited {now - d.since:.1f}s on {state.name} for {slow or 'no one'}",
            )
