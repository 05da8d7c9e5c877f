"""Data leases: every shard of an epoch is handed out once, whatever the number of workers."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.data import ArrayShards, CTRBatch
from paramserver.errors import ProtocolError, RemoteError
from paramserver.wire import protocol
from tests.timing import FAST

pytestmark = pytest.mark.timeout(60)


def test_two_workers_share_each_epoch_exactly_once() -> None:
    n = 1000
    data = CTRBatch(
        np.arange(n, dtype=np.uint64)[:, None],
        np.zeros((n, 0), np.float32),
        np.zeros(n, np.float32),
    )
    shards = ArrayShards("toy/train", data, rows=64)
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(), cluster.connect()
        for epoch in (1, 2):
            ia, ib = shards.epoch(a, epoch), shards.epoch(b, epoch)
            seen: dict[str, list[int]] = {"a": [], "b": []}
            done = {"a": False, "b": False}
            while not all(done.values()):  # interleave the two workers' reads
                for name, it in (("a", ia), ("b", ib)):
                    if done[name]:
                        continue
                    part = next(it, None)
                    if part is None:
                        done[name] = True
                    else:
                        seen[name].extend(part.keys[:, 0].tolist())
            assert seen["a"] and seen["b"]
            assert sorted(seen["a"] + seen["b"]) == list(range(n))
        # workers that disagree on the number of shards are refused
        with pytest.raises(RemoteError, match="the workers disagree"):
            a.acquire_lease("toy/train", 1, 99)
        shard = a.acquire_lease("toy/other", 1, 2)
        assert shard is not None
        with pytest.raises(RemoteError, match="is not leased to worker"):
            b.complete_lease("toy/other", 1, shard)
        a.complete_lease("toy/other", 1, shard)


def test_lease_messages_are_validated() -> None:
    ok = {"kind": "acquire_lease", "id": 1, "dataset": "d", "epoch": 1, "shards": 4, "rank": 0}
    protocol.decode(protocol.encode(ok))
    for bad in ({"shards": 0}, {"shards": -1}, {"epoch": -1}, {"dataset": ""}, {"rank": "x"}):
        with pytest.raises(ProtocolError):
            protocol.decode(protocol.encode({**ok, **bad}))
    with pytest.raises(ProtocolError, match="missing field 'shard'"):
        protocol.decode(
            protocol.encode(
                {"kind": "complete_lease", "id": 1, "dataset": "d", "epoch": 1, "rank": 0}
            )
        )
