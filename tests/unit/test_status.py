"""Status aggregation, without a socket: what the servers' stats add up to, and stats of the
wrong shape ignored."""

from __future__ import annotations

from typing import Any

import numpy as np

from paramserver.coordinator.membership import ALIVE, DEAD, Member
from paramserver.coordinator.status import StatusBoard, sane_stats
from paramserver.metrics import STALENESS_BUCKETS, format_status
from paramserver.spec import TableSpec

SPECS = [TableSpec("emb", "sparse", dim=4), TableSpec("mlp", "dense", shape=(3,))]


def stats(pulls: int, staleness: list[int], rows: int = 5) -> dict[str, Any]:
    return {
        "tables": {"emb": {"rows": rows, "bytes": 80, "pulls": pulls, "pushes": pulls // 2}},
        "clocks": [3, 4, "x"],
        "deferred": 1,
        "metrics": {"latency": {}, "staleness": {"emb": [staleness, float(sum(staleness))]}},
    }


def members() -> tuple[list[Member], list[Member]]:
    servers = [Member("server", 0, state=ALIVE, clock=3), Member("server", 1, state=DEAD)]
    workers = [Member("worker", 0, state=ALIVE, examples=300, last_seen=1.0)]
    return servers, workers


def status(board: StatusBoard, now: float) -> dict[str, Any]:
    servers, workers = members()
    return board.status(
        now=now,
        address="tcp://h:1",
        view_number=4,
        servers=servers,
        workers=workers,
        tables=SPECS,
        last_checkpoint=None,
    )


def test_rates_counts_and_staleness_add_up_over_the_servers() -> None:
    board = StatusBoard(now=0.0)
    n = len(STALENESS_BUCKETS) + 1
    a, b = list(range(n)), [2] * n
    assert board.record_stats(0, stats(0, a), now=0.0)
    assert board.record_stats(0, stats(100, a), now=2.0)
    assert board.record_stats(1, stats(40, b), now=2.0)
    board.record_examples(0, 0.0, 0)
    board.record_examples(0, 4.0, 300)
    st = status(board, now=5.0)
    assert st["epoch"] == 4 and st["uptime"] == 5.0
    assert st["view"] == 4  # the view number's name; "epoch" stays as its alias for scripts
    [emb, mlp] = st["tables"]
    assert [s["rank"] for s in emb["servers"]] == [0, 1] and mlp["servers"] == []
    assert emb["servers"][0]["pulls_per_s"] == 50.0  # 100 pulls in 2 s
    assert emb["servers"][0]["pushes_per_s"] == 25.0
    assert st["servers"][0]["min_clock"] == 3 and st["servers"][0]["clocks"] == [3, 4]
    assert st["servers"][1]["age"] == 3.0
    counts, total = st["staleness"]["emb"]
    assert counts == (np.array(a) + np.array(b)).tolist() and total == sum(a) + sum(b)
    worker = st["nodes"][2]
    assert worker["examples_per_s"] == 75.0 and worker["last_heartbeat"] == 4.0
    assert st["nodes"][1]["last_heartbeat"] is None  # never beat
    assert "emb" in format_status(st)  # the text status reads this map


def test_stats_of_the_wrong_shape_are_ignored() -> None:
    board = StatusBoard(now=0.0)
    good = stats(10, [1, 2])
    assert sane_stats(good)
    bad = [
        None,
        {"tables": []},
        {"tables": {"emb": 3}},
        {**good, "metrics": {"staleness": {"emb": [[1, "2"], 3.0]}}},
        {**good, "metrics": {"latency": {"pull": [[1], "3"]}}},
        {**good, "metrics": []},
    ]
    for st in bad:
        assert not sane_stats(st), st
        assert not board.record_stats(0, st, now=1.0)
    assert status(board, now=2.0)["servers"] == []
