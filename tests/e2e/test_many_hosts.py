"""A cluster spread over emulated hosts (tests/hosts.py: network namespaces, each with its own
/dev/shm and hostname, links shaped with tc) trains as well as the same cluster on loopback.

The roles are started with the very command lines of README.md's "Many hosts" section, read
from the README (only the host name, the counts and, on loopback, the addresses differ), so
the README cannot drift from what works.

The same bed (made once for the file) then loses hosts as docs/fault-tolerance.md describes: a
worker host and a server host taken away mid-training (processes killed, link down), a server
host cut off for twice the heartbeat timeout and back; ``paramserver status`` and the Prometheus
endpoint are read from a host that runs no role. Every test stops every process it started
(the ``bed`` fixture kills whatever is left in any host and brings every host back up)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from paramserver.data.ctr import SyntheticCriteo
from tests import hosts
from tests.timing import FAST_ENV, wait_until

ROOT = Path(__file__).parents[2]
PROGRAM = Path(__file__).parent / "programs" / "hosts_train.py"
SERVERS, WORKERS = 3, 4


def readme_commands() -> dict[str, str]:
    """The four command lines of README.md's "Many hosts" block: token, coordinator, server,
    worker (comments removed)."""
    section = (ROOT / "README.md").read_text().split("\n## Many hosts\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    token, coordinator, server, worker = [line for line in lines if line]
    assert "> token" in token and coordinator.startswith("paramserver coordinator "), block
    assert server.startswith("paramserver server ") and "train.py" in worker, block
    return {"token": token, "coordinator": coordinator, "server": server, "worker": worker}


def _env() -> dict[str, str]:
    """This environment without PS_* variables, with this interpreter's ``paramserver`` and
    ``python`` first on PATH (as after activating the virtual environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


Start = Callable[[str, str, IO[str]], "subprocess.Popen[str]"]


def _exec(line: str) -> list[str]:
    """``sh -c LINE`` with the shell replaced by the command (``VAR=x exec cmd``), so that the
    pid started is the role's own and a signal to it reaches the role."""
    assignments, command = re.fullmatch(r"((?:\w+=\S*\s+)*)(.*)", line).groups()  # type: ignore[union-attr]
    return ["sh", "-c", f"{assignments}exec {command}"]


def _train(start: Start, commands: dict[str, str], folder: Path) -> list[dict[str, Any]]:
    """Start a coordinator, SERVERS servers and WORKERS workers by ``start(role, line, log)``;
    wait for the workers; stop the rest with SIGTERM as a user would. The workers' RESULTs."""
    logs: dict[str, IO[str]] = {}
    procs: dict[str, subprocess.Popen[str]] = {}

    def role(name: str, line: str) -> None:
        logs[name] = open(folder / f"{name}.log", "w")  # noqa: SIM115
        procs[name] = start(name, line, logs[name])

    def log(name: str) -> str:
        return (folder / f"{name}.log").read_text()

    try:
        role("coordinator", commands["coordinator"])
        for i in range(SERVERS):
            role(f"server{i}", commands["server"])
        for i in range(WORKERS):
            role(f"worker{i}", commands["worker"])
        results = []
        for i in range(WORKERS):
            name = f"worker{i}"
            try:
                rc = procs[name].wait(120)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still runs after 120 s:\n{log(name)}") from None
            assert rc == 0, f"{name} exited {rc}:\n{log(name)}\n{log('coordinator')}"
            line = next(x for x in log(name).splitlines() if x.startswith("RESULT "))
            results.append(json.loads(line.removeprefix("RESULT ")))
        for name in [*(f"server{i}" for i in range(SERVERS)), "coordinator"]:
            procs[name].send_signal(signal.SIGTERM)
            try:
                rc = procs[name].wait(15)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} ignored SIGTERM for 15 s:\n{log(name)}") from None
            assert rc == 0, f"{name} exited {rc} on SIGTERM:\n{log(name)}"
        results.append({"coordinator": log("coordinator")})
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs.values():
            f.close()


def _lead(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The final test metrics of rank 0 (the one that evaluates)."""
    ranks = sorted(r["rank"] for r in results if "rank" in r)
    assert ranks == list(range(WORKERS)), ranks
    lead = next(r for r in results if r.get("rank") == 0)
    assert len(lead["curve"]) == 2, lead
    final: dict[str, Any] = lead["curve"][-1]
    return final


def _data(path: Path) -> None:
    train, test = SyntheticCriteo(examples=20_000).make()
    np.savez(
        path, train_keys=train.keys, train_dense=train.dense, train_y=train.y,
        test_keys=test.keys, test_dense=test.dense, test_y=test.y,
    )  # fmt: skip


def hosts_commands(
    readme: dict[str, str], coordinator: str, servers: int = SERVERS, workers: int = WORKERS
) -> dict[str, str]:
    """README's lines for separate hosts: its counts (``-s 2 -w 8``) made ours, ``hostA``
    made the coordinator's host."""
    assert re.search(r" -s \d+ -w \d+ ", readme["coordinator"]), readme["coordinator"]
    return {
        "coordinator": re.sub(r" -s \d+ -w \d+ ", f" -s {servers} -w {workers} ",
                              readme["coordinator"]),
        "server": readme["server"].replace("hostA", coordinator),
        "worker": readme["worker"].replace("hostA", coordinator),
    }  # fmt: skip


def loopback_commands(readme: dict[str, str], port: int) -> dict[str, str]:
    """The same lines on one machine's loopback: 127.0.0.1 for the coordinator's address, the
    servers on their default loopback (binding 0.0.0.0 here would expose them beyond it)."""
    ours = hosts_commands(readme, "127.0.0.1")
    out = {
        "coordinator": ours["coordinator"].replace("0.0.0.0:7070", f"127.0.0.1:{port}"),
        "server": re.sub(r" --host \S+ --advertise \S+", "", ours["server"]),
        "worker": ours["worker"],
    }
    out = {k: v.replace("127.0.0.1:7070", f"127.0.0.1:{port}") for k, v in out.items()}
    assert "--host" not in out["server"] and all(str(port) in v for v in out.values()), out
    return out


@pytest.fixture(scope="module")
def shared_bed() -> Iterator[hosts.Bed]:
    """Eight emulated hosts at 1 Gbit for every test of this file (made once: about a second)."""
    reason = hosts.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with hosts.up(8, rate="1gbit") as bed:
        yield bed


@pytest.fixture
def bed(shared_bed: hosts.Bed) -> Iterator[hosts.Bed]:
    """The shared bed; after the test every process in it is killed and every host is up."""
    yield shared_bed
    for h in shared_bed:
        h.stop()
        if h.state != "up":
            h.reconnect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# 46 CPU-seconds in all (16 processes): about half a minute on a quiet 2-core machine
@pytest.mark.timeout(300)
def test_a_token_cluster_on_eight_hosts_trains_as_well_as_on_loopback(
    bed: hosts.Bed, tmp_path: Path
) -> None:
    readme = readme_commands()
    places = {"coordinator": bed[0]}
    places |= {f"server{i}": bed[1 + i] for i in range(SERVERS)}
    places |= {f"worker{i}": bed[1 + SERVERS + i] for i in range(WORKERS)}
    env = _env()

    def on_hosts(folder: Path) -> Start:
        def start(name: str, line: str, log: IO[str]) -> subprocess.Popen[str]:
            return places[name].popen(
                _exec(line), cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )

        return start

    def on_loopback(folder: Path) -> Start:
        def start(name: str, line: str, log: IO[str]) -> subprocess.Popen[str]:
            return subprocess.Popen(
                _exec(line), cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip

        return start

    _data(tmp_path / "data.npz")
    runs = {}
    for name, commands, start in (
        ("hosts", hosts_commands(readme, bed[0].name), on_hosts),
        ("loopback", loopback_commands(readme, _free_port()), on_loopback),
    ):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tmp_path / "data.npz", folder)
        shutil.copy(PROGRAM, folder / "train.py")
        # the token made as README makes it; every host reads this file (a shared folder).
        # The coordinator binds 0.0.0.0: it refuses to start without the token.
        bed[0].run(["sh", "-c", readme["token"]], cwd=folder, timeout=10)
        assert len((folder / "token").read_text().strip()) >= 40
        runs[name] = _train(start(folder), commands, folder)

    # the servers were reached by their own hosts' names, the workers ran on theirs
    coordinator_log = runs["hosts"][-1]["coordinator"]
    for i in range(SERVERS):
        pattern = rf"server\[\d\] registered at tcp://{places[f'server{i}'].name}:\d+"
        assert re.search(pattern, coordinator_log), coordinator_log
    ran_on = sorted(r["host"] for r in runs["hosts"] if "host" in r)
    assert ran_on == [places[f"worker{i}"].name for i in range(WORKERS)], ran_on
    spread, local = _lead(runs["hosts"]), _lead(runs["loopback"])
    # sync training depends neither on timing nor on the path the arrays took (TCP between
    # hosts, shared memory on loopback): the same data, ranks and order of updates give the
    # same model (measured: bitwise equal metrics); a lost or doubled update would show
    assert local["test_auc"] > 0.7, local
    assert abs(spread["test_auc"] - local["test_auc"]) < 1e-3, (spread, local)
    assert abs(spread["test_logloss"] - local["test_logloss"]) < 1e-3, (spread, local)
    assert abs(spread["nonzero_weights"] - local["nonzero_weights"]) <= 10, (spread, local)


# ---- hosts taken away, cut off and back ---------------------------------------------------------

FAULTS = Path(__file__).parent / "programs" / "hosts_faults.py"
PROBE = Path(__file__).parent / "programs" / "hosts_probe.py"
HEARTBEAT_TIMEOUT = float(FAST_ENV["PS_HEARTBEAT_TIMEOUT"])


class Roles:
    """Roles of one cluster on the bed, started from README's lines in ``folder`` (the shared
    folder every host reads: the token, the programs, the checkpoints), logs beside them."""

    def __init__(self, bed: hosts.Bed, folder: Path, servers: int, workers: int) -> None:
        self.bed, self.folder = bed, folder
        readme = readme_commands()
        bed[0].run(["sh", "-c", readme["token"]], cwd=folder, timeout=10)
        self.lines = hosts_commands(readme, bed[0].name, servers, workers)
        # periodic checkpoints for a restarted server; metrics readable from other hosts
        self.lines["coordinator"] += (
            " --checkpoint-dir ckpt --checkpoint-every 0.5 --metrics-port 9100"
            f" --metrics-host {bed[0].address}"
        )
        self.env = {**_env(), **FAST_ENV}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs: list[IO[str]] = []

    def start(self, name: str, host: hosts.Host, line: str) -> subprocess.Popen[str]:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115
        self.logs.append(log)
        self.procs[name] = host.popen(
            _exec(line), cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait_line(self, name: str, pattern: str, timeout: float) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            m = re.search(pattern, self.log(name), re.MULTILINE)
            if m is None and self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {self.procs[name].returncode}:\n"
                                     f"{self.log(name)}")  # fmt: skip
            found[:] = [m] if m else []
            return m is not None

        wait_until(seen, timeout, f"{pattern!r} in the log of {name}", every=0.1)
        return found[0]

    def status(self, host: hosts.Host) -> dict[str, Any]:
        """``paramserver status --json``, run on ``host`` as an operator would."""
        env = {**self.env, "PS_TOKEN_FILE": "token"}
        out = host.run(["paramserver", "status", "--coordinator", f"{self.bed[0].name}:7070",
                        "--json"], cwd=self.folder, env=env, timeout=30).stdout  # fmt: skip
        status: dict[str, Any] = json.loads(out)
        return status

    def wait_status(
        self, host: hosts.Host, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        last: list[dict[str, Any]] = [{}]

        def ok() -> bool:
            last[0] = self.status(host)
            return check(last[0])

        try:
            wait_until(ok, 30, what, every=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(last[0])}") from None
        return last[0]

    def finish(self, name: str, timeout: float) -> None:
        try:
            rc = self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still runs after {timeout} s:\n{self.log(name)}"
            ) from None
        assert rc == 0, f"{name} exited {rc}:\n{self.log(name)}"

    def stop(self, name: str) -> None:
        """SIGTERM, as a user stops a role; it must exit 0 within 15 s."""
        self.procs[name].send_signal(signal.SIGTERM)
        self.finish(name, 15)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in self.logs:
            f.close()


@pytest.fixture
def roles(bed: hosts.Bed, tmp_path: Path) -> Iterator[Callable[[int, int], Roles]]:
    made: list[Roles] = []

    def make(servers: int, workers: int) -> Roles:
        made.append(Roles(bed, tmp_path, servers, workers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _nodes(status: dict[str, Any], role: str) -> dict[int, dict[str, Any]]:
    """The nodes of ``role`` by rank (a rank's newest member: a replacement, not its ghost)."""
    return {n["rank"]: n for n in status["nodes"] if n["role"] == role}


def _parts(log: str, what: str) -> list[int]:
    return [int(x) for x in re.findall(rf"^{what} (\d+)$", log, re.MULTILINE)]


def _metrics(host: hosts.Host, address: str) -> dict[str, float]:
    """The Prometheus samples at ``http://address:9100/metrics``, read from ``host``."""
    code = (f"import urllib.request; print(urllib.request.urlopen("
            f"'http://{address}:9100/metrics', timeout=10).read().decode())")  # fmt: skip
    text = host.run([sys.executable, "-c", code], timeout=30).stdout
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# 25 CPU-seconds (7 processes)
@pytest.mark.timeout(240)
def test_a_worker_host_then_a_server_host_taken_away_mid_training(
    bed: hosts.Bed, tmp_path: Path, roles: Callable[[int, int], Roles]
) -> None:
    """docs/fault-tolerance.md: a dead worker's leases go to the others; a dead server is
    started again (here on another host, by hand, as a supervisor would) and restores its keys
    from the newest checkpoint; training completes. ``paramserver status`` and the Prometheus
    endpoint, read from a host of no role, say so all along."""
    shutil.copy(FAULTS, tmp_path / "train.py")
    r = roles(2, 3)
    coordinator, observer, spare = bed[0], bed[7], bed[3]
    r.start("coordinator", coordinator, r.lines["coordinator"])
    for i in range(2):
        r.start(f"server{i}", bed[1 + i], r.lines["server"])
    for i in range(3):
        r.start(f"worker{i}", bed[4 + i], r.lines["worker"])

    # a worker host goes away in the middle of a part
    def mid_part() -> bool:  # the last line says it started a part (which takes 0.3 s or more)
        lines = r.log("worker2").split()
        return "DONE" in lines and lines[-2] == "LEASE"

    wait_until(mid_part, 60, "worker2 to be in the middle of its second part or later")
    bed[6].kill()
    held_part = _parts(r.log("worker2"), "LEASE")[-1]
    st = r.wait_status(observer, lambda s: any(
        n["host"] == "h6" and n["state"] == "dead" for n in _nodes(s, "worker").values()
    ), "the worker on h6 to be declared dead")  # fmt: skip
    dead_worker = next(n["rank"] for n in _nodes(st, "worker").values() if n["host"] == "h6")

    # then a server host, mid-training too; its rank is started again on a spare host
    dead_server = next(n["rank"] for n in _nodes(st, "server").values() if n["host"] == "h2")
    old_address = _nodes(st, "server")[dead_server]["address"]
    bed[2].kill()
    r.wait_status(observer, lambda s: _nodes(s, "server")[dead_server]["state"] == "dead",
                  "the server on h2 to be declared dead")  # fmt: skip
    r.start("server1b", spare, f"{r.lines['server']} --rank {dead_server}")
    r.wait_line("server1b", r"restored \d+ tables from \S*ckpt", 60)  # the newest checkpoint
    for i in range(2):
        r.finish(f"worker{i}", 120)

    # every part was trained, the one the dead worker held by someone else
    done = {i: _parts(r.log(f"worker{i}"), "DONE") for i in range(3)}
    survivors = set(done[0]) | set(done[1])
    assert held_part not in done[2] and held_part in survivors, (held_part, done)
    assert survivors | set(done[2]) == set(range(24)), done
    started = [p for i in range(3) for p in _parts(r.log(f"worker{i}"), "LEASE")]
    result = json.loads(r.wait_line("worker0", r"^RESULT (.*)$", 5)[1])
    values = np.array(result["values"])  # SGD lr 1 on ones from 0: minus the pushes applied
    assert np.all(values == np.round(values)) and np.all(values <= 0), values
    assert np.all(values >= -6 * np.bincount(started, minlength=24)[:, None]), values

    # the status from another host tells the truth: who is dead, who replaced whom, the rows
    def truthful(s: dict[str, Any]) -> bool:
        servers, workers = _nodes(s, "server"), _nodes(s, "worker")
        rows = {str(t["rank"]): t["rows"] for tab in s["tables"] if tab["name"] == "faults/w"
                for t in tab["servers"]}  # fmt: skip
        return (
            workers[dead_worker]["state"] == "dead"
            and all(workers[i]["state"] != "dead" for i in workers if i != dead_worker)
            and servers[dead_server]["state"] == "alive"
            and servers[dead_server]["host"] == spare.name
            and servers[dead_server]["address"] != old_address
            and rows == result["rows"]
        )

    st = r.wait_status(observer, truthful, "the status to show the cluster as it is")
    samples: dict[str, float] = {}

    def rows_scraped() -> bool:  # the endpoint serves the collector's latest snapshot
        samples.clear()
        samples.update(_metrics(observer, coordinator.address))
        rows = sum(v for k, v in samples.items()
                   if k.startswith("ps_table_rows{") and 'table="faults/w"' in k)  # fmt: skip
        return rows == sum(result["rows"].values()) == 24 * 64

    try:
        wait_until(rows_scraped, 30, "the Prometheus endpoint to show every row", every=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {samples}") from None
    assert samples[f'ps_node_up{{rank="{dead_worker}",role="worker"}}'] == 0, samples
    assert samples[f'ps_node_up{{rank="{dead_server}",role="server"}}'] == 1, samples
    assert samples["ps_dead_nodes"] >= 1, samples

    for name in ("server0", "server1b", "coordinator"):
        r.stop(name)


# 15 CPU-seconds (6 processes)
@pytest.mark.timeout(240)
def test_a_server_host_cut_off_for_twice_the_heartbeat_timeout_then_back(
    bed: hosts.Bed, tmp_path: Path, roles: Callable[[int, int], Roles]
) -> None:
    """A server host cut off (its packets vanish) for twice the heartbeat timeout, its rank
    started again on another host meanwhile, then reconnected: the workers finish without a
    hang, the view holds one server per rank, the table holds only whole pushes."""
    shutil.copy(FAULTS, tmp_path / "train.py")
    r = roles(2, 2)
    observer, spare = bed[7], bed[3]
    r.start("coordinator", bed[0], r.lines["coordinator"])
    for i in range(2):
        r.start(f"server{i}", bed[1 + i], r.lines["server"])
    for i in range(2):
        r.start(f"worker{i}", bed[4 + i], r.lines["worker"])
    r.wait_line("worker0", r"^DONE \d+$", 60)
    st = r.status(observer)
    rank = next(n["rank"] for n in _nodes(st, "server").values() if n["host"] == "h2")
    bed[2].cut("drop")
    r.wait_status(observer, lambda s: _nodes(s, "server")[rank]["state"] == "dead",
                  "the cut-off server to be declared dead")  # fmt: skip
    r.start("server1b", spare, f"{r.lines['server']} --rank {rank}")
    time.sleep(2 * HEARTBEAT_TIMEOUT)  # the cut lasts twice the timeout (the fault's length)
    bed[2].reconnect()
    for i in range(2):
        r.finish(f"worker{i}", 120)
    result = json.loads(r.wait_line("worker0", r"^RESULT (.*)$", 5)[1])
    started = [p for i in range(2) for p in _parts(r.log(f"worker{i}"), "LEASE")]
    values = np.array(result["values"])
    assert np.all(values == np.round(values)) and np.all(values <= 0), values
    assert np.all(values >= -6 * np.bincount(started, minlength=24)[:, None]), values
    st = r.status(observer)
    servers = [n for n in st["nodes"] if n["role"] == "server" and n["state"] == "alive"]
    assert sorted(n["rank"] for n in servers) == [0, 1], st["nodes"]
    assert _nodes(st, "server")[rank]["host"] == spare.name, st["nodes"]
    for name in ("server0", "server1b", "coordinator"):
        r.stop(name)


# 10 CPU-seconds (4 processes)
@pytest.mark.timeout(120)
def test_a_replaced_server_that_comes_back_serves_nothing(
    bed: hosts.Bed, tmp_path: Path, roles: Callable[[int, int], Roles]
) -> None:
    shutil.copy(PROBE, tmp_path / "train.py")
    r = roles(2, 1)
    observer, spare = bed[7], bed[3]
    r.start("coordinator", bed[0], r.lines["coordinator"])
    for i in range(2):
        r.start(f"server{i}", bed[1 + i], r.lines["server"])
    probe = bed[4].popen(
        _exec(r.lines["worker"]), cwd=tmp_path, env=r.env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    r.procs["probe"] = probe
    assert probe.stdout is not None and probe.stdin is not None
    assert probe.stdout.readline().strip() == "READY", probe.stdout.read()
    st = r.status(observer)
    old = next(n for n in _nodes(st, "server").values() if n["host"] == "h2")
    bed[2].cut("drop")
    r.wait_status(observer, lambda s: _nodes(s, "server")[old["rank"]]["state"] == "dead",
                  "the cut-off server to be declared dead")  # fmt: skip
    r.start("server1b", spare, f"{r.lines['server']} --rank {old['rank']}")
    r.wait_status(observer, lambda s: _nodes(s, "server")[old["rank"]]["host"] == spare.name
                  and _nodes(s, "server")[old["rank"]]["state"] == "alive",
                  "the replacement to take the rank")  # fmt: skip
    time.sleep(HEARTBEAT_TIMEOUT)  # cut for twice the heartbeat timeout in all
    bed[2].reconnect()
    time.sleep(HEARTBEAT_TIMEOUT)  # it heard from the coordinator that it was expelled
    out, _ = probe.communicate(f"{old['address']}\n", timeout=30)
    # the old process still answering as a server of the cluster is a second holder of the rank
    assert "ANSWER" not in out, out
