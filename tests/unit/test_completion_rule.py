"""When a job is done (paramserver.coordinator.completion.job_done), on plain membership state."""

from __future__ import annotations

from paramserver.config import Timeouts
from paramserver.coordinator.completion import job_done
from paramserver.coordinator.membership import Membership
from paramserver.wire.messages import LeaveMsg, RegisterMsg

T = Timeouts(heartbeat_interval=0.5, heartbeat_timeout=5.0)


def cluster(workers: int) -> Membership:
    """One server and ``workers`` workers, all registered and alive."""
    members = Membership(1, workers, T, hostname="h")
    server: RegisterMsg = {
        "kind": "register", "id": 1, "role": "server", "address": "tcp://h:7000",
    }  # fmt: skip
    members.register_server(b"s", server, 0.0)
    for r in range(workers):
        w: RegisterMsg = {"kind": "register", "id": 2, "role": "worker", "rank": r}
        members.wait(b"w%d" % r, w, 0.0)
    for identity, h, _ in members.admissible():
        members.admit_worker(identity, h, 0.0)
    return members


def leave(members: Membership, rank: int) -> None:
    msg: LeaveMsg = {
        "kind": "leave", "id": 3, "role": "worker", "rank": rank,
        "token": members.workers[rank].incarnation,
    }  # fmt: skip
    assert members.leave(msg) is not None


def test_done_once_every_worker_left() -> None:
    members, since = cluster(2), {}
    assert not job_done(members, since, 1.0, grace=10.0)
    leave(members, 0)
    assert not job_done(members, since, 2.0, grace=10.0)  # worker[1] still trains
    leave(members, 1)
    assert job_done(members, since, 3.0, grace=10.0)


def test_a_worker_never_registered_keeps_the_job_going() -> None:
    members = Membership(1, 2, T, hostname="h")  # nobody registered yet
    assert not job_done(members, {}, 100.0, grace=0.0)


def test_a_dead_worker_ends_the_job_only_after_the_grace_unless_it_comes_back() -> None:
    members, since = cluster(2), {}
    leave(members, 0)
    members.mark_dead(members.workers[1], "test")
    assert not job_done(members, since, 10.0, grace=30.0)  # first seen dead at 10
    assert not job_done(members, since, 39.0, grace=30.0)
    # restarted within the grace: it takes its rank back and the job goes on
    w: RegisterMsg = {"kind": "register", "id": 4, "role": "worker", "rank": 1}
    members.wait(b"again", w, 39.5)
    assert not job_done(members, since, 40.0, grace=30.0)  # waiting for admission
    for identity, h, _ in members.admissible():
        members.admit_worker(identity, h, 40.0)
    assert not job_done(members, since, 100.0, grace=30.0)
    # dies again: the grace starts over from the new death
    members.mark_dead(members.workers[1], "test")
    assert not job_done(members, since, 101.0, grace=30.0)
    assert not job_done(members, since, 130.0, grace=30.0)
    assert job_done(members, since, 131.0, grace=30.0)
