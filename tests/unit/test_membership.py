"""Membership rules, without a socket: ranks, admission, rejoin, liveness, incarnations."""

from __future__ import annotations

import pytest

from paramserver.config import Timeouts
from paramserver.coordinator.membership import ALIVE, DEAD, LEFT, PENDING, Member, Membership
from paramserver.coordinator.refusal import Refusal
from paramserver.errors import ConfigError
from paramserver.wire.messages import HeartbeatMsg, RegisterMsg

T = Timeouts(heartbeat_interval=0.5, heartbeat_timeout=5.0)


def server_msg(rank: int | None = None, host: str = "h", pid: int = 100) -> RegisterMsg:
    return {
        "kind": "register",
        "id": 1,
        "role": "server",
        "address": f"tcp://{host}:{7000 + (rank or 0)}",
        "rank": rank,
        "host": host,
        "pid": pid,
    }


def worker_msg(rank: int | None = None) -> RegisterMsg:
    return {"kind": "register", "id": 2, "role": "worker", "rank": rank, "host": "h", "pid": 9}


def beat(m: Member, clock: int | None = None, examples: int | None = None) -> HeartbeatMsg:
    return {
        "kind": "heartbeat",
        "id": 3,
        "role": "server" if m.role == "server" else "worker",
        "rank": m.rank,
        "token": m.incarnation,
        "clock": clock,
        "examples": examples,
    }


def cluster(servers: int = 2, workers: int = 2, **kw: object) -> Membership:
    """Every server registered, every worker admitted, at time 0."""
    members = Membership(servers, workers, T, hostname="h", **kw)  # type: ignore[arg-type]
    for _ in range(servers):
        members.register_server(b"s", server_msg(), 0.0)
    for _ in range(workers):
        members.wait(b"w", worker_msg(), 0.0)
    for identity, h, _ in members.admissible():
        members.admit_worker(identity, h, 0.0)
    return members


def test_a_cluster_needs_a_server_and_a_worker() -> None:
    with pytest.raises(ConfigError, match="at least 1 server"):
        Membership(0, 1, T)
    with pytest.raises(ConfigError, match="at least 1 worker"):
        Membership(1, 0, T)


def test_servers_get_the_lowest_free_rank_or_the_one_they_ask_for() -> None:
    members = Membership(3, 1, T)
    m, replacing = members.register_server(b"a", server_msg(rank=2), 0.0)
    assert (m.rank, replacing, m.state) == (2, False, ALIVE)
    assert [members.register_server(b"b", server_msg(), 0.0)[0].rank for _ in range(2)] == [0, 1]
    with pytest.raises(Refusal, match="all 3 server ranks are taken") as full:
        members.register_server(b"c", server_msg(), 0.0)
    assert full.value.code == "full"
    with pytest.raises(Refusal, match="server rank 1 is not free") as taken:
        members.register_server(b"c", server_msg(rank=1), 0.0)
    assert taken.value.code == "taken"
    with pytest.raises(Refusal, match="server rank 3 is not free"):
        members.register_server(b"c", server_msg(rank=3), 0.0)
    no_address: RegisterMsg = {"kind": "register", "id": 1, "role": "server"}
    with pytest.raises(Refusal, match="must register its address") as bad:
        members.register_server(b"c", no_address, 0.0)
    assert bad.value.code == "invalid"
    assert [s.identity for s in members.servers] == [b"b", b"b", b"a"]  # refusals changed none


def test_a_dead_servers_rank_goes_to_its_replacement() -> None:
    members = cluster(servers=2, workers=1)
    members.mark_dead(members.servers[1], "test")
    m, replacing = members.register_server(b"new", server_msg(), 1.0)
    assert (m.rank, replacing, m.identity) == (1, True, b"new")


def test_workers_wait_until_every_server_registered() -> None:
    members = Membership(2, 2, T)
    members.wait(b"w0", worker_msg(), 0.0)
    members.register_server(b"s0", server_msg(), 0.0)
    assert members.admissible() == []  # server[1] still pending
    members.register_server(b"s1", server_msg(), 0.0)
    waiting = members.admissible()
    assert [identity for identity, _, _ in waiting] == [b"w0"]
    assert members.admissible() == []  # taken off the queue


def test_workers_get_pending_ranks_in_order_and_asked_ranks_are_checked() -> None:
    members = Membership(1, 3, T)
    members.register_server(b"s", server_msg(), 0.0)
    first, view, rejoin = members.admit_worker(b"w", worker_msg(), 0.0)
    assert (first.rank, rejoin) == (0, False)
    assert (
        view["token"] == first.incarnation and view["num_workers"] == 3 and view["start_clock"] == 0
    )
    assert members.admit_worker(b"w", worker_msg(rank=2), 0.0)[0].rank == 2
    with pytest.raises(Refusal, match="already taken by a live worker") as taken:
        members.admit_worker(b"w", worker_msg(rank=2), 0.0)
    assert taken.value.code == "taken"
    with pytest.raises(
        Refusal, match=r"rank 3 asked for, but the cluster has 3 workers \(ranks 0..2\)"
    ):
        members.admit_worker(b"w", worker_msg(rank=3), 0.0)
    assert members.admit_worker(b"w", worker_msg(), 0.0)[0].rank == 1
    members.mark_dead(members.workers[0], "test")
    # a dead rank is not handed to a stranger: only a worker asking for it gets it back
    with pytest.raises(Refusal, match="every rank has been taken") as full:
        members.admit_worker(b"w", worker_msg(), 0.0)
    assert full.value.code == "full"


def test_a_rejoining_worker_starts_at_the_live_servers_clock_until_every_server_passed_it() -> None:
    members = cluster(servers=2, workers=2)
    s0, s1 = members.servers
    members.heartbeat(beat(s0, clock=7), 1.0, 5)
    members.heartbeat(beat(s1, clock=9), 1.0, 6)
    members.mark_dead(members.workers[1], "test")
    m, view, rejoin = members.admit_worker(b"again", worker_msg(rank=1), 2.0)
    assert (
        m is members.workers[1] and rejoin and view["start_clock"] == 9
    )  # the highest min clock of the live servers
    assert members.view()["rejoined"] == [[1, 9]]
    members.heartbeat(beat(s0, clock=10), 3.0, 5)
    assert members.view()["rejoined"] == [[1, 9]]  # server[1] has not passed clock 9 yet
    members.heartbeat(beat(s1, clock=10), 3.0, 6)
    assert "rejoined" not in members.view()


def test_a_member_is_dead_only_when_silent_for_the_timeout_and_its_connection_gone() -> None:
    members = cluster(servers=1, workers=2)
    w0, w1 = members.workers
    s = members.servers[0]
    members.heartbeat(beat(w0), 1.0, 11)
    members.heartbeat(beat(w1), 1.0, 12)
    members.heartbeat(beat(s), 1.0, 13)
    assert members.expired(5.9) == []  # not silent for 5 s yet
    # silent for 5 s, but libzmq still holds the connections: a GIL-bound member is not dead
    assert members.expired(7.0) == []
    members.links_dropped([12, 99])
    [(dead, why)] = members.expired(7.0)
    assert dead is w1 and why == "no heartbeat for 6.0s"
    assert members.expired(5.0) == []  # connection gone, but not silent long enough


def test_a_member_that_never_beat_is_dead_after_the_timeout() -> None:
    members = cluster(servers=1, workers=1)
    assert {m.name for m, _ in members.expired(5.1)} == {"server[0]", "worker[0]"}


def test_heartbeats_of_another_incarnation_or_a_dead_member_are_refused() -> None:
    members = cluster(servers=1, workers=1)
    w = members.workers[0]
    stale = {**beat(w), "token": w.incarnation + 1}
    with pytest.raises(Refusal, match=r"worker\[0\] is not a live member") as e:
        members.heartbeat(stale, 1.0, 3)  # type: ignore[arg-type]
    assert e.value.code == "expelled" and w.last_seen == 0.0
    with pytest.raises(Refusal, match=r"worker\[5\]"):
        members.heartbeat({**beat(w), "rank": 5}, 1.0, 3)
    assert members.heartbeat(beat(w, clock=4, examples=640), 2.0, 3) is w
    assert (w.last_seen, w.clock, w.examples, w.link, w.link_up) == (2.0, 4, 640, 3, True)
    members.mark_dead(w, "test")
    with pytest.raises(Refusal, match="declared dead or never registered"):
        members.heartbeat(beat(w), 3.0, 3)
    old_incarnation = w.incarnation
    members.admit_worker(b"again", worker_msg(rank=0), 4.0)
    assert w.incarnation != old_incarnation  # a fresh incarnation


def test_leaving_takes_the_current_incarnation_only() -> None:
    members = cluster(servers=1, workers=1)
    w = members.workers[0]
    assert (
        members.leave({"kind": "leave", "id": 1, "role": "worker", "rank": 0, "token": 1}) is None
    )
    assert w.state == ALIVE
    incarnation = w.incarnation
    assert (
        members.leave({"kind": "leave", "id": 1, "role": "worker", "rank": 0, "token": incarnation})
        is w
    )
    assert w.state == LEFT and members.expected_at_barriers() == []


def test_a_server_whose_process_is_gone_is_superseded_at_once() -> None:
    gone: set[int] = {100}
    members = cluster(servers=1, workers=1, process_gone=lambda pid: pid in gone)
    old = members.servers[0]
    old.pid = 100
    replacement = server_msg(rank=0, pid=200)
    assert members.superseded(replacement, 0.5) is None  # beat 0.5 s ago: two beats not missed
    assert members.superseded(replacement, 1.1) is old
    assert members.superseded(server_msg(rank=0, host="elsewhere"), 1.1) is None
    assert members.superseded(server_msg(), 1.1) is None  # asks for no rank
    gone.clear()
    assert members.superseded(replacement, 1.1) is None  # its process still runs
    other_host = cluster(servers=1, workers=1, process_gone=lambda pid: True)
    other_host.hostname = "not-h"  # the old one ran on a host this coordinator cannot look at
    other_host.servers[0].pid = 100
    assert other_host.superseded(replacement, 1.1) is None


def test_views_go_to_live_members_and_number_up() -> None:
    members = cluster(servers=2, workers=1)
    members.mark_dead(members.servers[1], "test")
    number = members.view_number
    view, to = members.publish("test")
    assert view["epoch"] == members.view_number == number + 1
    assert view["servers"][1] == [1, "tcp://h:7000", DEAD]
    assert view["workers"] == [[0, ALIVE]]
    assert to == [b"s", b"w"]  # server[0] and worker[0], not the dead server[1]
    members.restore = {"path": "/ck", "clock": 40}
    members.start_clock = 40
    w = members.workers[0]
    assert members.view_for(w)["restore"] == {"path": "/ck", "clock": 40}
    assert members.current_clock() == 0  # the live server reported clock 0
    members.mark_dead(members.servers[0], "test")
    assert members.current_clock() == 40  # no live server: where the cluster started
    assert Membership(1, 1, T).servers[0].state == PENDING


def test_with_replication_a_replacement_server_rebuilds_and_the_view_says_so() -> None:
    members = Membership(3, 1, T, replication=2)
    for r in range(3):
        members.register_server(b"s%d" % r, server_msg(r, pid=100 + r), 0.0)
    view = members.view()
    assert view["replication"] == 2
    assert [s[2] for s in view["servers"]] == [ALIVE] * 3
    members.mark_dead(members.servers[1], "killed")
    m, replacing = members.register_server(b"new", server_msg(1, pid=200), 1.0)
    assert replacing and m.state == ALIVE
    assert [s[2] for s in members.view()["servers"]] == [ALIVE, "rebuilding", ALIVE]
    # a restarted coordinator reads it back from its journal
    again = Membership(3, 1, T, replication=2)
    again.load_record(members.to_record(), 2.0)
    assert again.servers[1].rebuilding and again.servers[1].state == ALIVE
    assert "replication" not in Membership(3, 1, T).view()  # without replication: as before
    with pytest.raises(ConfigError, match="replication=4 needs at least 4 servers"):
        Membership(3, 1, T, replication=4)
