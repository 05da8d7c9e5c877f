"""Checkpoint round rules, without a socket (real files in a temporary directory): who must
answer, when a round fails, when a periodic one is due, how many checkpoints are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from paramserver.checkpoint import read_manifest
from paramserver.config import CheckpointPolicy
from paramserver.coordinator.membership import ALIVE, DEAD, Member
from paramserver.coordinator.refusal import Refusal
from paramserver.coordinator.rounds import CheckpointRounds, Round
from paramserver.spec import TableSpec


def servers(n: int = 2) -> list[Member]:
    return [Member("server", r, state=ALIVE) for r in range(n)]


def answer_all(rounds: CheckpointRounds, rnd: Round) -> Round | None:
    done = None
    for rank in sorted(rnd.waiting):
        assert done is None  # complete only once the last server answered
        done = rounds.answered(rnd.round_id, rank)
    return done


def test_a_round_waits_for_every_server_then_commits_a_readable_checkpoint(tmp_path: Path) -> None:
    rounds = CheckpointRounds(None, now=0.0)
    rnd = rounds.start(tmp_path, 10, 60.0, (b"worker", 4), servers(), now=0.0)
    assert rnd.waiting == {0, 1} and rnd.partial.is_dir() and rnd.deadline == 60.0
    assert rounds.answered(rnd.round_id, 0) is None
    assert rounds.answered(rnd.round_id + 1, 1) is None  # another round's answer
    assert rounds.answered(rnd.round_id, 1) is rnd
    spec = TableSpec("emb", "sparse", dim=4)
    final = rounds.commit(rnd, tables=[spec], num_servers=2, num_workers=3)
    directory, manifest, specs = read_manifest(tmp_path)
    assert directory == final and manifest["clock"] == 10 and specs == [spec]
    assert not rnd.partial.exists() and rounds.rounds == {}
    assert rounds.latest == {"path": str(final), "clock": 10}
    assert rounds.last_written is not None and rounds.last_written[1] == str(final)


def test_a_round_is_refused_while_another_runs_or_a_server_is_not_alive(tmp_path: Path) -> None:
    rounds = CheckpointRounds(None, now=0.0)
    members = servers(3)
    members[1].state = DEAD
    with pytest.raises(Refusal, match=r"not every server is alive: server\[1\] is dead") as e:
        rounds.start(tmp_path, 5, 60.0, None, members, now=0.0)
    assert e.value.code == "checkpoint" and list(tmp_path.iterdir()) == []
    members[1].state = ALIVE
    rounds.start(tmp_path, 5, 60.0, None, members, now=0.0)
    with pytest.raises(Refusal, match="already being written"):
        rounds.start(tmp_path, 6, 60.0, None, members, now=0.0)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(Refusal, match="cannot create"):
        CheckpointRounds(None, 0.0).start(blocked, 5, 60.0, None, members, now=0.0)


def test_a_round_fails_when_a_server_it_waits_for_dies(tmp_path: Path) -> None:
    rounds = CheckpointRounds(None, now=0.0)
    rnd = rounds.start(tmp_path, 5, 60.0, None, servers(), now=0.0)
    rounds.answered(rnd.round_id, 0)
    assert rounds.server_lost(0) == []  # server[0] has written already
    assert rounds.server_lost(1) == [rnd]
    rounds.fail(rnd, "server[1] died")
    assert rounds.rounds == {} and list(tmp_path.iterdir()) == []


def test_a_round_past_its_deadline_names_the_servers_it_waits_for(tmp_path: Path) -> None:
    rounds = CheckpointRounds(None, now=0.0)
    rnd = rounds.start(tmp_path, 7, 30.0, None, servers(3), now=100.0)
    rounds.answered(rnd.round_id, 1)
    assert rounds.expired(130.0) == []
    assert rounds.expired(130.5) == [
        (rnd, "timed out waiting for server[0], server[2] to reach clock 7 and write")
    ]


def test_too_late_drops_a_periodic_round_to_aim_further_but_fails_a_requested_one(
    tmp_path: Path,
) -> None:
    rounds = CheckpointRounds(CheckpointPolicy(str(tmp_path), every_seconds=60.0), now=0.0)
    periodic = rounds.start(tmp_path, 5, 60.0, None, servers(), now=0.0)
    assert rounds.refused(periodic.round_id, "too_late", "server[0] is at clock 6") is None
    assert rounds.rounds == {} and not periodic.partial.exists()
    assert (rounds.lead, rounds.next_periodic) == (4, 0.0)  # twice as far, and at once
    asked = rounds.start(tmp_path, 5, 60.0, (b"w", 1), servers(), now=0.0)
    assert rounds.refused(asked.round_id, "too_late", "server[0] is at clock 6") is asked
    assert rounds.refused(asked.round_id + 7, "io", "disk full") is None  # no such round


def test_periodic_rounds_are_due_every_interval_a_few_clocks_ahead(tmp_path: Path) -> None:
    rounds = CheckpointRounds(CheckpointPolicy(str(tmp_path), every_seconds=10.0), now=0.0)
    assert rounds.due(9.0, [3, 4], workers_alive=True) is None
    assert rounds.due(10.0, [3, 4], workers_alive=False) is None  # no worker moves the clocks
    assert rounds.due(10.0, [], workers_alive=True) is None
    assert rounds.due(10.0, [3, 4], workers_alive=True) == 6  # highest clock + lead 2
    assert rounds.due(15.0, [5, 5], workers_alive=True) is None
    assert rounds.due(20.0, [5, 5], workers_alive=True) == 7
    assert CheckpointRounds(None, 0.0).due(1e9, [1], workers_alive=True) is None


def test_periodic_rounds_by_clocks_fall_on_multiples(tmp_path: Path) -> None:
    policy = CheckpointPolicy(str(tmp_path), every_clocks=10)
    rounds = CheckpointRounds(policy, now=0.0)
    assert rounds.due(0.0, [3], workers_alive=True) is None  # first at 10: 3 + 2 < 10
    assert rounds.due(0.0, [8], workers_alive=True) == 10
    assert rounds.due(0.0, [12], workers_alive=True) is None  # next at 20
    assert rounds.due(0.0, [19], workers_alive=True) == 21  # late: a few clocks ahead of 19
    assert rounds.next_clock == 31
    rounds.start(tmp_path, 21, 60.0, None, servers(), now=0.0)
    assert rounds.due(0.0, [40], workers_alive=True) is None  # a round runs


def test_a_policy_keeps_exactly_the_newest_checkpoints(tmp_path: Path) -> None:
    rounds = CheckpointRounds(CheckpointPolicy(str(tmp_path), keep=2), now=0.0)
    for clock in (10, 20, 30, 40):
        rnd = rounds.start(tmp_path, clock, 60.0, None, servers(1), now=0.0)
        done = answer_all(rounds, rnd)
        assert done is rnd
        rounds.commit(done, tables=[], num_servers=1, num_workers=1)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == ["ckpt-00000030-3", "ckpt-00000040-4"]
    assert read_manifest(tmp_path)[1]["clock"] == 40


def test_a_periodic_round_starts_by_the_policy_and_is_skipped_while_a_server_is_dead(
    tmp_path: Path,
) -> None:
    policy = CheckpointPolicy(str(tmp_path / "p"), every_seconds=10.0, timeout=30.0)
    rounds = CheckpointRounds(policy, now=0.0)
    members = servers()
    members[0].clock, members[1].clock = 3, 4
    assert rounds.start_periodic(5.0, members, workers_alive=True) is None  # not due yet
    members[1].state = DEAD
    assert rounds.start_periodic(10.0, members, workers_alive=True) is None  # skipped
    assert rounds.rounds == {}
    members[1].state = ALIVE
    rnd = rounds.start_periodic(20.0, members, workers_alive=True)
    assert rnd is not None and rnd.requester is None and rnd.waiting == {0, 1}
    assert (rnd.root, rnd.clock, rnd.deadline) == (tmp_path / "p", 6, 50.0)
