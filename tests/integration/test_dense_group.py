"""Many small dense tables pulled and pushed together (``client.dense_group``, the servers'
``pull_many`` / ``push_many``): the same values as the same training with one request per
table, one request per server and dtype, and a bad push that changes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import ConfigError, RemoteError
from tests.timing import FAST

pytestmark = pytest.mark.timeout(120)

# name -> (shape, dtype): a model's weights and biases, one table too large to group, and
# float64 beside float32
TABLES = {
    "l1/w": ((16, 8), "float32"),
    "l1/b": ((16,), "float32"),
    "l2/w": ((4, 16), "float32"),
    "l2/b": ((4,), "float32"),
    "scale": ((3,), "float64"),
    "shift": ((3,), "float64"),
    "big": ((100_000,), "float32"),
}


@pytest.fixture
def three() -> Iterator[ps.LocalCluster]:
    with ps.LocalCluster(servers=3, workers=1, timeouts=FAST, restart_servers=False) as c:
        yield c


def _tables(client: ps.Client, prefix: str, consistency: str) -> list[ps.DenseTable]:
    # an explicit seed: the same initial values under another name
    return [
        client.dense_table(
            f"{prefix}/{name}", shape, dtype=dtype, init=ps.init.Uniform(-0.5, 0.5),
            optimizer=ps.optim.Adam(lr=0.05), consistency=consistency, seed=i,
        )
        for i, (name, (shape, dtype)) in enumerate(TABLES.items())
    ]  # fmt: skip


def _grads(values: list[np.ndarray], step: int) -> list[np.ndarray]:
    """A gradient that depends on the values (a quadratic pulled towards ``step``)."""
    return [(v - np.asarray(step * 0.01, v.dtype)) * v.dtype.type(1.5) for v in values]


@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_a_group_trains_to_the_same_values_as_one_request_per_table(
    three: ps.LocalCluster, consistency: str
) -> None:
    client = three.connect()
    grouped = _tables(client, "g", consistency)
    alone = _tables(client, "a", consistency)
    group = client.dense_group(grouped)
    for step in range(6):
        got = group.pull()
        want = [t.pull() for t in alone]
        for g, w, t in zip(got, want, grouped, strict=True):
            assert g.shape == t.shape and g.dtype == t.dtype
            np.testing.assert_array_equal(g, w)
        group.push(_grads(got, step)).result()
        for t, g in zip(alone, _grads(want, step), strict=True):
            t.push(g).result()
        client.clock()
    for g, w in zip(group.pull(), [t.pull() for t in alone], strict=True):
        np.testing.assert_array_equal(g, w)
    # the weights moved: the comparison above is not of two untouched tables
    assert not np.array_equal(group.pull()[0], client.dense_table(
        "fresh/l1/w", (16, 8), init=ps.init.Uniform(-0.5, 0.5), seed=0).pull())  # fmt: skip


def test_one_request_per_server_and_dtype(three: ps.LocalCluster) -> None:
    client = three.connect()
    tables = _tables(client, "g", "async")
    group = client.dense_group(tables)
    servers = {t.spec.ranges[0][0] for t in tables[:-1]}
    # the small tables spread over the servers by size (the registry), and the big one alone
    assert len(servers) >= 2
    assert {s for s, _ in group.by_server} == servers
    assert sorted(i for idx in group.by_server.values() for i in idx) == list(range(6))
    assert group.alone == [6]
    before = [s["tables"] for s in client.stats()]
    pulls_before = sum(_latency_count(s, "pull") for s in client.stats())
    pushes_before = sum(_latency_count(s, "push") for s in client.stats())
    for step in range(3):
        group.push(_grads(group.pull(), step)).result()
    stats = client.stats()
    # every table counts each pull and push ...
    for s, old in zip(stats, before, strict=True):
        for name, t in s["tables"].items():
            if name in old and t["rows"]:
                assert t["pulls"] - old[name]["pulls"] == 3, (name, t)
                assert t["pushes"] - old[name]["pushes"] == 3, (name, t)
    # ... but only the big table's went as per-table requests (it lives whole on one server)
    assert sum(_latency_count(s, "pull") for s in stats) - pulls_before == 3
    assert sum(_latency_count(s, "push") for s in stats) - pushes_before == 3


def _latency_count(stats: dict[str, object], kind: str) -> int:
    counts, _ = stats["metrics"]["latency"][kind]  # type: ignore[index]
    return int(sum(counts))


def test_a_bad_push_is_refused_whole_and_changes_nothing(three: ps.LocalCluster) -> None:
    client = three.connect()
    tables = _tables(client, "g", "async")[:4]
    group = client.dense_group(tables)
    before = group.pull()
    bad = [np.ones(t.shape, t.dtype) for t in tables]
    bad[3][0] = np.nan
    with pytest.raises(ConfigError, match="NaN or Inf"):
        group.push(bad)
    with pytest.raises(ConfigError, match="4 tables"):
        group.push(bad[:3])
    with pytest.raises(ConfigError, match="shape"):
        group.push([np.ones((2,), np.float32)] * 4)
    for b, a in zip(before, group.pull(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_server_refuses_a_bad_group_and_changes_nothing(three: ps.LocalCluster) -> None:
    """What a server checks itself, whatever a worker sends: one NaN anywhere in the group's
    gradient, a wrong length, a table it does not hold whole."""
    client = three.connect()
    tables = _tables(client, "g", "async")[:4]
    group = client.dense_group(tables)
    before = group.pull()
    (s, _), idx = next(iter(group.by_server.items()))
    names = [tables[i].name for i in idx]
    total = sum(tables[i].spec.size for i in idx)
    grad = np.ones(total, np.float32)
    grad[-1] = np.inf
    header = {"kind": "push_many", "tables": names, "rank": client.rank, "clock": 0,
              "seq": client.next_seq() + 100}  # fmt: skip
    with pytest.raises(RemoteError, match="NaN or Inf; no table is changed"):
        client.request_server(s, header, [grad], what="bad push_many").result(10)
    with pytest.raises(RemoteError, match="gradient must be"):
        client.request_server(s, header, [grad[:-1]], what="short push_many").result(10)
    other = next(t.name for t in tables if t.spec.ranges[0][0] != s)
    with pytest.raises(RemoteError, match=r"does not exist|not a dense table"):
        client.request_server(
            s, {**header, "tables": [*names, other]}, [np.ones(total + 1, np.float32)],
            what="foreign push_many",
        ).result(10)  # fmt: skip
    for b, a in zip(before, group.pull(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_dense_parameters_send_one_request_per_server_and_step(three: ps.LocalCluster) -> None:
    """A torch model's six tensors: spread over the servers, one pull and one push per server
    and step (no per-table request reaches a server), and the weights of torch.optim.SGD."""
    torch = pytest.importorskip("torch")
    import paramserver.torch as pst

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
            torch.nn.Linear(8, 1),
        )  # fmt: skip

    client = three.connect()
    net = model()
    opt = pst.DenseParameters(client, "m", net, optimizer=ps.optim.SGD(lr=0.1))
    ref = model()
    ref.load_state_dict(net.state_dict())  # the servers' initial values
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    servers = {t.spec.ranges[0][0] for t in opt.tables.values()}
    assert len(servers) >= 2  # six small tables placed by size, not all on one server
    assert len(opt.group.by_server) == len(servers) and not opt.group.alone
    stats = client.stats()
    before = sum(_latency_count(s, k) for s in stats for k in ("pull", "push"))
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32))
        y = torch.from_numpy(rng.standard_normal((8, 1)).astype(np.float32))
        for m, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        client.clock()
    opt.pull()
    after = sum(_latency_count(s, k) for s in client.stats() for k in ("pull", "push"))
    assert after == before
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_group_pull_under_sync_waits_for_the_slow_worker() -> None:
    """A pull_many at a clock the slowest worker has not finished is deferred, like one
    table's pull, and answered with the step of both workers once it has."""
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST, restart_servers=False) as c:
        fast, slow = c.connect(rank=0), c.connect(rank=1)
        mine = _tables(fast, "g", "sync")[:4]
        theirs = _tables(slow, "g", "sync")[:4]
        group_fast, group_slow = fast.dense_group(mine), slow.dense_group(theirs)
        start = group_fast.pull()
        np.testing.assert_array_equal(start[0], group_slow.pull()[0])
        group_fast.push(_grads(start, 0)).result()
        group_slow.push(_grads(start, 1)).result()
        fast.clock()
        waiting = group_fast.pull_async(timeout=30)
        fast.endpoint.poll(0.3)
        assert not waiting.done()  # deferred: worker[1] is still at clock 0
        slow.clock()
        got = waiting.result(30)
        want = [t.pull() for t in mine]
        for g, w, s in zip(got, want, start, strict=True):
            np.testing.assert_array_equal(g, w)
            assert not np.array_equal(g, s)  # the clock's step was applied
