"""What a worker's program holds: :func:`connect` and :class:`Client`, a
:class:`~paramserver.client.session.Session` with tables, barriers, checkpoints and data leases.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import os
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

from paramserver.client.cache import CacheSpec, check_cache
from paramserver.client.dense import DenseTable
from paramserver.client.group import DenseGroup
from paramserver.client.session import Session, server_name
from paramserver.client.sparse import SparseTable
from paramserver.config import Timeouts, from_env, normalize_address, parse_consistency
from paramserver.errors import ConfigError
from paramserver.init import Initializer, Zeros
from paramserver.optim import SGD, Optimizer
from paramserver.spec import TableSpec

__all__ = ["Client", "connect"]


def connect(
    address: str | None = None,
    *,
    rank: int | None = None,
    timeouts: Timeouts | None = None,
    token: str | None = None,
    transport: str | None = None,
) -> Client:
    """Join a cluster as a worker.

    With no address, the coordinator comes from ``PS_COORDINATOR`` (and the rank from
    ``PS_RANK``), as set by ``paramserver run`` or any other launcher. The cluster token comes
    from ``token`` or ``PS_TOKEN`` / ``PS_TOKEN_FILE``. ``transport``
    (default ``PS_TRANSPORT``, else ``"auto"``): ``"auto"`` passes dense tables, and the large
    arrays of sparse requests, through shared memory with servers on this host and uses TCP for
    the rest; ``"tcp"`` always uses TCP. Over TCP, large dense arrays take a raw socket beside
    ZeroMQ (the bulk channel), except with a cluster token (it is not encrypted) or with
    ``"zmq"``: ZeroMQ frames only.

    Example:
        client = ps.connect("127.0.0.1:7000")
        client.rank   # 0..num_workers-1
    """
    env = from_env()
    if address is None:
        if env.coordinator is None:
            raise ConfigError("no coordinator address: pass one, or set PS_COORDINATOR=host:port")
        address = env.coordinator
    return Client(
        normalize_address(address),
        rank=env.rank if rank is None else rank,
        timeouts=timeouts or env.timeouts,
        token=token or env.token,
        transport=transport,
    )


class Client(Session):
    """A worker's connection to the cluster. Use :func:`connect` or ``LocalCluster.connect()``.

    Example:
        with ps.connect() as client:
            emb = client.sparse_table("emb", dim=8)
            rows = emb.pull(np.array([1, 2, 3], dtype=np.uint64))
            client.clock()
    """

    def _opened(self) -> None:
        self._barriers: Counter[str] = Counter()
        self._tables: dict[str, SparseTable | DenseTable] = {}
        # A program that ends without close() would hold the other workers (barriers, sync
        # clocks) until its heartbeat timeout: leave at interpreter exit. Weakly referenced,
        # so a client dropped earlier is not kept alive for it.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self), os.getpid())
        atexit.register(self._at_exit)

    def close(self, *, leave_timeout: float = 2.0) -> None:
        """Leave the cluster (other workers stop waiting for this one) and close the sockets;
        done at interpreter exit for a client still open then.

        Example:
            client.close()
        """
        atexit.unregister(self._at_exit)
        super().close(leave_timeout=leave_timeout)

    # ---- tables ---------------------------------------------------------------------------

    def _create(self, spec: TableSpec) -> TableSpec:
        self.check()
        reply = self.endpoint.request(
            "coordinator",
            {"kind": "create_table", "spec": spec.to_wire()},
            what=f"creating table {spec.name!r} on the coordinator at {self.coordinator}",
        ).result(self.timeouts.request)
        final = TableSpec.from_wire(reply["spec"])
        futs = [
            self.request_server(
                s,
                {"kind": "create_shard", "spec": final.to_wire()},
                what=f"creating table {spec.name!r} on {server_name(s)}",
            )
            for s in self.servers
        ]
        for f in futs:
            f.result(self.timeouts.request)
        return final

    def sparse_table(
        self,
        name: str,
        dim: int,
        *,
        dtype: str = "float32",
        init: Initializer | None = None,
        optimizer: Optimizer | None = None,
        consistency: str | None = None,
        seed: int | None = None,
        nonfinite: str = "reject",
        max_rows: int | None = None,
        codec: str = "none",
        push_codec: str | None = None,
        cache: CacheSpec | None = None,
    ) -> SparseTable:
        """Create (or open, if it exists with the same spec) a sparse table of rows of ``dim``.

        ``nonfinite``: a push with NaN or Inf is refused whole ("reject", the default), or its
        rows holding them are dropped and the rest applied ("skip"; counted in ``stats()``).
        ``max_rows``: at most this many rows on each server; a pull or push that would create
        more is refused with :class:`~paramserver.errors.RemoteError` (code ``"full"``) and
        changes nothing.

        ``codec`` ("none", "float16", "bfloat16" or "int8" with a per-row scale) is how pulled
        rows and pushed gradients travel: fewer bytes, rounded values (see
        :mod:`paramserver.wire.codec`); what rounding takes off a gradient is added to the next
        push of the same key (error feedback). ``push_codec`` sets the pushes' codec apart
        ("none": exact gradients).
        ``cache``: keep hot rows on this worker, read at most ``cache.staleness`` clocks stale,
        gradients sent every ``cache.flush_every`` pushes and at ``clock()`` (see
        :mod:`paramserver.client.cache`; ``emb.cache.stats()`` counts hits and staleness).

        Example:
            emb = client.sparse_table("emb", dim=16, init=ps.init.Normal(std=0.01),
                                      optimizer=ps.optim.Adagrad(lr=0.05), consistency="async")
        """
        spec = _spec(
            name, "sparse", init, optimizer, consistency,
            dim=dim, dtype=dtype, seed=seed, nonfinite=nonfinite, max_rows=max_rows, codec=codec,
            push_codec=push_codec,
        )  # fmt: skip
        check_cache(name, spec.mode[0], cache)
        table = SparseTable(self, self._create(spec), cache)
        self._tables[name] = table
        return table

    def dense_table(
        self,
        name: str,
        shape: int | tuple[int, ...],
        *,
        dtype: str = "float32",
        init: Initializer | None = None,
        optimizer: Optimizer | None = None,
        consistency: str | None = None,
        seed: int | None = None,
        nonfinite: str = "reject",
        codec: str = "none",
        push_codec: str | None = None,
    ) -> DenseTable:
        """Create (or open) a dense table: one array of ``shape``, split over servers if large.

        ``codec`` and ``push_codec``: as for :meth:`sparse_table`, for the values that cross a
        socket (int8 scales blocks of 256 elements); shared memory carries them exact.

        Example:
            w = client.dense_table("mlp", shape=(4096,), optimizer=ps.optim.Adam(lr=1e-3),
                                   consistency="sync")
        """
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        spec = _spec(
            name, "dense", init, optimizer, consistency,
            shape=shp, dtype=dtype, seed=seed, nonfinite=nonfinite, codec=codec,
            push_codec=push_codec,
        )  # fmt: skip
        dense = DenseTable(self, self._create(spec))
        if name in self.dense_moved:
            dense.move_to(self.dense_moved[name])
        self._tables[name] = dense
        return dense

    def table(self, name: str) -> SparseTable | DenseTable:
        """Open an existing table by name (a typo is an error here, where ``sparse_table``
        would create a new table).

        Example:
            emb = client.table("emb")     # ConfigError naming the tables if there is none
        """
        if name in self._tables:
            return self._tables[name]
        specs = {t.name: t for t in self.tables()}
        spec = specs.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(specs), n=1)
            raise ConfigError(
                f"no table {name!r} in the cluster at {self.coordinator}"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + " Tables: "
                + (", ".join(repr(n) for n in sorted(specs)) or "none")
                + " (create one with client.sparse_table(...) or client.dense_table(...); a "
                "table another worker creates exists once it has returned: meet at a "
                "client.barrier() first)"
            )
        final = self._create(spec)  # idempotent: the same spec opens it on every server
        handle = SparseTable(self, final) if final.kind == "sparse" else DenseTable(self, final)
        if isinstance(handle, DenseTable) and name in self.dense_moved:
            handle.move_to(self.dense_moved[name])
        self._tables[name] = handle
        return handle

    def barrier(self, name: str = "barrier", *, timeout: float | None = None) -> None:
        """Wait until every live worker has reached this barrier.

        Example:
            client.barrier()            # all workers meet here
        """
        self.check()
        limit = self.timeouts.request if timeout is None else timeout
        self._barriers[name] += 1
        header = {
            "kind": "barrier",
            "name": f"{name}#{self._barriers[name]}",
            "rank": self.rank,
            "timeout": limit,
        }
        what = f"barrier {name!r} of worker[{self.rank}] (coordinator at {self.coordinator})"

        def ask() -> Any:  # again, if the coordinator restarted meanwhile
            return self.endpoint.request("coordinator", header, what=what)

        # a step's end: a move announced before or while it waits is switched to at once
        self.switch_ring()
        self.idle = True
        try:
            self.wait_coordinator(ask(), limit + 2.0, again=ask)
        finally:
            self.idle = False

    def save(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> str:
        """Write a consistent checkpoint of every table at this worker's clock boundary.

        Every server snapshots its shards when all live workers have reached this worker's
        clock (for ``sync`` tables: exactly the updates of earlier clocks), then the coordinator
        writes the manifest and makes the checkpoint visible by one rename. ``path`` must be on
        storage every server and the coordinator can reach. Returns the checkpoint directory.

        Example:
            client.save("ckpt/")       # later: ps.LocalCluster(restore="ckpt/")
        """
        self.check()
        limit = self.timeouts.request if timeout is None else timeout
        root = os.path.abspath(os.fspath(path))
        reply = self.endpoint.request(
            "coordinator",
            {"kind": "save", "path": root, "clock": self.current_clock, "timeout": limit},
            what=f"checkpoint into {root} at clock {self.current_clock}",
        ).result(limit + 2.0)
        return str(reply["path"])

    def restore(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        """Put every table of the running cluster that the checkpoint at ``path`` holds back
        to it: rows and optimizer state as saved, rows created since gone (what a cluster
        started with ``restore=path`` holds). Each server reads its own part of the files, so
        ``path`` must be on storage every server can reach; a table the checkpoint does not
        hold is left as it is. Every server first checks that it can (the checkpoint readable,
        its tables of the same kind, dtype, width and optimizer): if one cannot, nothing
        changes. Applied at once, after this worker's earlier pushes: meet the other workers
        at a barrier first. Returns the number of tables restored.

        Example:
            best = client.save("ckpt/best"); ...; client.restore(best)
        """
        self.check()
        limit = self.timeouts.request if timeout is None else timeout
        root = os.path.abspath(os.fspath(path))
        header = {
            "kind": "restore",
            "path": root,
            "rank": self.rank,
            "servers": self.num_servers,
            "ring": list(self.ring_servers),
        }

        def ask(check: bool) -> list[dict[str, Any]]:
            futs = [
                self.request_server(
                    s,
                    {**header, "check": check},
                    what=f"restore of {server_name(s)} from {root}",
                )
                for s in self.servers
            ]
            return [f.result(limit)["stats"] for f in futs]

        ask(True)
        for handle in self._tables.values():
            if isinstance(handle, SparseTable):
                handle.flush().result(limit)  # gradients a row cache kept go first
        done = ask(False)
        for handle in self._tables.values():
            if isinstance(handle, SparseTable) and handle.cache is not None:
                handle.cache.forget()
        return max((int(d.get("tables", 0)) for d in done), default=0)

    def move_dense(self, ranges: dict[str, list[tuple[int, int, int]]]) -> None:
        """A move (a join or a drain) placed these dense tables anew: their handles route by
        the new ranges (and so does a handle made later, whose spec the coordinator may give
        before the move ends)."""
        self.dense_moved = {**self.dense_moved, **ranges}
        for name, r in ranges.items():
            handle = self._tables.get(name)
            if isinstance(handle, DenseTable):
                handle.move_to(r)

    def dense_ranges(self, name: str) -> list[tuple[int, int, int]] | None:
        """The ranges dense table ``name``'s handle routes by now (None: no handle here)."""
        handle = self._tables.get(name)
        if isinstance(handle, DenseTable):
            return [(int(s), int(a), int(b)) for s, a, b in handle.spec.ranges]
        return self.dense_moved.get(name)

    def dense_group(self, tables: list[DenseTable]) -> DenseGroup:
        """Pull and push these dense tables together: one request per server and step for all
        the small ones (of one dtype and one consistency), instead of one per table.

        Example:
            group = client.dense_group([w, b])
            w_values, b_values = group.pull(); group.push([gw, gb]).result()
        """
        return DenseGroup(self, tables)

    def stats(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Per-server statistics: rows and bytes per table, clocks.

        Example:
            for s in client.stats(): print(s["rank"], s["tables"])
        """
        self.check()
        # with replication, a dead or rebuilding server is reached by no one: its state only
        down: dict[int, dict[str, Any]] = {
            s: {"rank": s, "state": self.server_states.get(s), "tables": {}}
            for s in self.servers
            if self.replication > 1 and not self.server_alive(s)
        }
        futs = {
            s: self.endpoint.request(
                server_name(s), {"kind": "stats"}, what=f"stats of {server_name(s)}"
            )
            for s in self.servers
            if s not in down
        }
        return [down[s] if s in down else futs[s].result(timeout)["stats"] for s in self.servers]

    def training(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The whole job's training numbers as the coordinator has them from every worker's
        :meth:`report` (a heartbeat interval behind): ``examples``, ``examples_per_s`` and per
        scalar its ``mean``, ``min``, ``max`` and how many ``workers`` reported it; what a
        plot of the job's loss should draw rather than one worker's own.

        Example:
            client.report(loss=0.41); ...; client.training()["scalars"]["loss"]["mean"]
        """
        self.check()
        reply = self.endpoint.request(
            "coordinator",
            {"kind": "status"},
            what=f"status of the coordinator at {self.coordinator}",
        ).result(timeout)
        training = reply["status"].get("training")
        return dict(training) if isinstance(training, dict) else {}

    def tables(self) -> list[TableSpec]:
        """The specs of every table in the cluster."""
        reply = self.endpoint.request(
            "coordinator", {"kind": "list_tables"}, what="listing tables"
        ).result()
        return [TableSpec.from_wire(t) for t in reply["tables"]]

    # ---- data leases ----------------------------------------------------------------------

    def acquire_lease(
        self, dataset: str, epoch: int, shards: int, *, timeout: float | None = None
    ) -> int | None:
        """Take the next shard of ``dataset`` in ``epoch`` (``shards`` in all); None when every
        shard of the epoch has been handed out.

        Example:
            shard = client.acquire_lease("criteo/train", epoch=1, shards=64)
        """
        self.check()
        reply = self.endpoint.request(
            "coordinator",
            {
                "kind": "acquire_lease",
                "dataset": dataset,
                "epoch": epoch,
                "shards": shards,
                "rank": self.rank,
            },
            what=f"lease on {dataset!r} epoch {epoch} from the coordinator at {self.coordinator}",
        ).result(timeout)
        shard = int(reply.get("shard", -1))
        return None if shard < 0 else shard

    def complete_lease(
        self, dataset: str, epoch: int, shard: int, *, timeout: float | None = None
    ) -> None:
        """Report shard ``shard`` of ``dataset`` in ``epoch`` as read and trained on."""
        self.check()
        self.endpoint.request(
            "coordinator",
            {
                "kind": "complete_lease",
                "dataset": dataset,
                "epoch": epoch,
                "shard": shard,
                "rank": self.rank,
            },
            what=f"completing lease {shard} of {dataset!r} epoch {epoch}",
        ).result(timeout)

    def leases(self, dataset: str, epoch: int, shards: int) -> Iterator[int]:
        """Shards of ``dataset`` for this worker in ``epoch``: each is completed when the loop
        asks for the next one; the iterator ends when none is left.

        Example:
            for shard in client.leases("criteo/train", epoch, len(shard_list)):
                train_on(shard_list[shard])
        """
        while True:
            shard = self.acquire_lease(dataset, epoch, shards)
            if shard is None:
                return
            yield shard
            self.complete_lease(dataset, epoch, shard)


def _close_at_exit(ref: weakref.ref[Client], pid: int) -> None:
    client = ref()
    # a forked child inherits the registration but not the membership: it must not leave
    if client is not None and os.getpid() == pid:
        # a coordinator already gone (its cluster closed first) must not hold the exit
        client.close(leave_timeout=2.0 if client.coordinator_answers() else 0.05)


def _spec(
    name: str,
    kind: str,
    init: Initializer | None,
    optimizer: Optimizer | None,
    consistency: str | None,
    **fields: Any,
) -> TableSpec:
    """The spec a table handle asks for: the defaults of every kind filled in (zeros, SGD, the
    ``PS_CONSISTENCY`` mode)."""
    return TableSpec(
        name=name,
        kind=kind,
        init=init or Zeros(),
        optimizer=optimizer or SGD(),
        consistency=_consistency(consistency),
        **fields,
    )


def _consistency(value: str | None) -> str:
    if value is None:
        return from_env().consistency
    parse_consistency(value)
    return value
