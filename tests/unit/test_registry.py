"""Table registry rules, without a socket: idempotent creation, conflicts refused by field,
dense ranges over the servers, tables restored from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from paramserver.checkpoint import commit_checkpoint
from paramserver.config import Limits
from paramserver.coordinator.refusal import Refusal
from paramserver.coordinator.registry import TableRegistry
from paramserver.errors import ConfigError
from paramserver.init import Normal
from paramserver.optim import SGD, Adagrad
from paramserver.spec import TableSpec

BIG = 1 << 20  # elements: a dense table this large is cut over every server


def test_creating_the_same_table_again_gives_it_back() -> None:
    registry = TableRegistry([0, 1])
    spec = TableSpec("emb", "sparse", dim=8, optimizer=Adagrad(lr=0.1))
    first = registry.create(spec.to_wire())
    assert first == spec
    assert registry.create(spec.to_wire()) is first
    assert registry.specs() == [first] and registry.to_wire() == [first.to_wire()]


def test_a_conflicting_spec_is_refused_naming_the_fields_and_changes_nothing() -> None:
    registry = TableRegistry([0])
    registry.create(TableSpec("emb", "sparse", dim=8, optimizer=SGD(lr=0.1)).to_wire())
    other = TableSpec("emb", "sparse", dim=16, optimizer=SGD(lr=0.1), init=Normal(std=0.5))
    with pytest.raises(Refusal) as e:
        registry.create(other.to_wire())
    assert e.value.code == "conflict"
    assert e.value.message.startswith("table 'emb' already exists with a different dim, init ")
    assert "dim=8" in e.value.message and "init={'kind': 'zeros'}" in e.value.message
    assert registry.tables["emb"].dim == 8


def test_a_malformed_spec_is_a_config_error() -> None:
    registry = TableRegistry([0])
    with pytest.raises(ConfigError, match="kind must be 'sparse' or 'dense'"):
        registry.create({**TableSpec("t", "sparse").to_wire(), "kind": "tree"})
    assert registry.tables == {}


def test_dense_tables_get_ranges_that_cover_them_over_every_server() -> None:
    registry = TableRegistry([0, 1, 2])
    spec = registry.create(TableSpec("mlp", "dense", shape=(BIG,)).to_wire())
    assert [r[0] for r in spec.ranges] == [0, 1, 2]
    assert [(a, b) for _, a, b in spec.ranges] == [
        (0, BIG // 3),
        (BIG // 3, 2 * BIG // 3),
        (2 * BIG // 3, BIG),
    ]
    # ranges a client sends are not its to choose, and do not make a conflict
    again = TableSpec("mlp", "dense", shape=(BIG,)).with_ranges([(0, 0, BIG)])
    assert registry.create(again.to_wire()) is spec


def test_a_restored_cluster_starts_with_the_checkpoints_tables_cut_for_its_servers(
    tmp_path: Path,
) -> None:
    written = TableRegistry([0, 1])
    dense = written.create(TableSpec("mlp", "dense", shape=(BIG,)).to_wire())
    sparse = written.create(TableSpec("emb", "sparse", dim=4).to_wire())
    partial = tmp_path / ".partial"
    partial.mkdir()
    final = commit_checkpoint(
        tmp_path,
        partial,
        clock=12,
        round_id=3,
        tables=written.specs(),
        num_servers=2,
        num_workers=1,
    )
    registry = TableRegistry([0, 1, 2])
    assert registry.restore(str(tmp_path)) == {"path": str(final), "clock": 12}
    assert registry.tables["emb"] == sparse
    assert len(dense.ranges) == 2 and len(registry.tables["mlp"].ranges) == 3
    assert registry.tables["mlp"].ranges[-1][2] == BIG
    with pytest.raises(ConfigError, match="does not exist"):
        TableRegistry([0]).restore(str(tmp_path / "missing"))


def test_small_dense_tables_spread_over_the_servers_by_size() -> None:
    """A model's many small tables (a layer's weight and bias each) do not pile up on one
    server: each goes to the server holding the fewest dense elements so far."""
    registry = TableRegistry([0, 1, 2])
    sizes = {"l1/w": 6000, "l1/b": 60, "l2/w": 3000, "l2/b": 50, "l3/w": 2000, "l3/b": 1}
    for name, size in sizes.items():
        registry.create(TableSpec(name, "dense", shape=(size,)).to_wire())
    owner = {n: list(registry.tables[n].ranges) for n in sizes}
    assert owner == {
        "l1/w": [(0, 0, 6000)],
        "l1/b": [(1, 0, 60)],
        "l2/w": [(2, 0, 3000)],
        "l2/b": [(1, 0, 50)],
        "l3/w": [(1, 0, 2000)],
        "l3/b": [(1, 0, 1)],
    }
    assert registry.dense_load == {0: 6000, 1: 2111, 2: 3000}
    # a large table counts on every server, its share each
    registry.create(TableSpec("big", "dense", shape=(BIG,)).to_wire())
    registry.create(TableSpec("next", "dense", shape=(10,)).to_wire())
    assert list(registry.tables["next"].ranges) == [(1, 0, 10)]
    # the same spec again places nothing anew
    registry.create(TableSpec("l1/b", "dense", shape=(60,)).to_wire())
    assert list(registry.tables["l1/b"].ranges) == [(1, 0, 60)]


def test_many_small_dense_tables_load_every_server_about_evenly() -> None:
    registry = TableRegistry([0, 1, 2, 3])
    for i in range(40):
        registry.create(TableSpec(f"t{i}", "dense", shape=(100 + 37 * (i % 7),)).to_wire())
    load = dict.fromkeys(range(4), 0)
    for spec in registry.specs():
        for s, a, b in spec.ranges:
            load[s] += b - a
    loads = sorted(load.values())
    assert loads[-1] - loads[0] <= 100 + 37 * 6  # within one table of each other


def test_with_replication_a_large_dense_table_lives_whole_and_counts_on_every_copy() -> None:
    registry = TableRegistry([0, 1, 2], replication=2)
    big = registry.create(TableSpec("big", "dense", shape=(1 << 19,)).to_wire())
    assert big.ranges == ((0, 0, 1 << 19),)  # not cut: on server 0 and its copy, server 1
    assert registry.dense_load == {0: 1 << 19, 1: 1 << 19, 2: 0}
    small = registry.create(TableSpec("small", "dense", shape=(10,)).to_wire())
    assert small.ranges == ((2, 0, 10),)  # the least loaded server


def test_a_join_recuts_large_dense_tables_and_leaves_small_ones_where_they_are() -> None:
    registry = TableRegistry([0, 1])
    big = registry.create(TableSpec("big", "dense", shape=(BIG,)).to_wire())
    small = registry.create(TableSpec("small", "dense", shape=(10,)).to_wire())
    registry.create(TableSpec("emb", "sparse", dim=4).to_wire())
    plan = registry.replan([0, 1, 2])
    assert registry.tables["big"] is big and registry.server_ranks == [0, 1]  # nothing yet
    assert list(plan.specs) == ["big"]
    third = BIG // 3
    assert list(plan.specs["big"].ranges) == [(0, 0, third), (1, third, 2 * third),
                                              (2, 2 * third, BIG)]  # fmt: skip
    assert plan.pieces["big"] == [(0, 1, third, BIG // 2), (1, 2, 2 * third, BIG)]
    registry.adopt(plan)
    assert registry.tables["small"] is small and registry.server_ranks == [0, 1, 2]
    assert registry.dense_load == {0: third + 10, 1: third, 2: BIG - 2 * third}
    # a new small table goes to the least loaded server of the new set
    assert list(registry.create(TableSpec("s2", "dense", shape=(5,)).to_wire()).ranges) == [
        (1, 0, 5)
    ]


def test_a_drain_sends_the_leaving_servers_small_tables_to_the_least_loaded_others() -> None:
    registry = TableRegistry([0, 1, 2])
    for name, size in [("a", 100), ("b", 30), ("c", 20), ("d", 5)]:
        registry.create(TableSpec(name, "dense", shape=(size,)).to_wire())
    # a on 0, b on 1, c on 2, d on 2 (least loaded: 20 < 30)
    assert [registry.tables[n].ranges[0][0] for n in "abcd"] == [0, 1, 2, 2]
    plan = registry.replan([0, 1])
    assert {n: list(s.ranges) for n, s in plan.specs.items()} == {
        "c": [(1, 0, 20)],  # 1 holds 30 < 100
        "d": [(1, 0, 5)],  # 1 holds 50 < 100
    }
    assert plan.pieces == {"c": [(2, 1, 0, 20)], "d": [(2, 1, 0, 5)]}
    assert plan.load == {0: 100, 1: 55}


def test_a_replan_that_would_overfill_a_server_is_refused_and_changes_nothing() -> None:
    registry = TableRegistry([0, 1], limits=Limits(table_bytes=BIG * 3))  # SGD: 4 bytes each
    big = registry.create(TableSpec("big", "dense", shape=(BIG,), optimizer=SGD()).to_wire())
    with pytest.raises(Refusal, match=r"dense table 'big' would take \d+ bytes on server\[0\]"):
        registry.replan([0])
    assert registry.tables["big"] is big and registry.server_ranks == [0, 1]
    with pytest.raises(ValueError, match="no servers"):
        registry.replan([])


def test_with_replication_a_move_keeps_dense_tables_whole_and_names_those_whose_copies_move() -> (
    None
):
    registry = TableRegistry([0, 1, 2], replication=2)
    big = registry.create(TableSpec("big", "dense", shape=(1 << 19,)).to_wire())  # on 0 and 1
    small = registry.create(TableSpec("small", "dense", shape=(10,)).to_wire())  # on 2 and 0
    # a join of 3: server 2's copies go to 2 and 3 (not 0); server 0's stay on 0 and 1
    plan = registry.replan([0, 1, 2, 3])
    assert list(plan.specs) == ["small"] and plan.specs["small"].ranges == small.ranges
    assert plan.pieces == {"small": []}  # the owner stays: only its copies move
    assert plan.load == {0: 1 << 19, 1: 1 << 19, 2: 10, 3: 10}
    # a drain of 0: big's owner leaves, its copy on 1 owns it (held on 1 and 2 after)
    plan = registry.replan([1, 2])
    assert {n: list(s.ranges) for n, s in plan.specs.items()} == {
        "big": [(1, 0, 1 << 19)],
        "small": [(2, 0, 10)],  # owner 2 stays; its copy goes from 0 to 1
    }
    assert plan.pieces == {"big": [(0, 1, 0, 1 << 19)], "small": []}
    assert registry.tables["big"] is big  # nothing changes until adopt
