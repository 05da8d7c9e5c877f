"""A cluster spread over emulated hosts (tests/hosts.py: network namespaces, each with its own
/dev/shm and hostname, links shaped with tc) trains as well as the same cluster on loopback.

The roles are started with the very command lines of README.md's "Many hosts" section, read
from the README (only the host name, the counts and, on loopback, the addresses differ), so
the README cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from paramserver.data.ctr import SyntheticCriteo
from tests import hosts

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


def hosts_commands(readme: dict[str, str], coordinator: str) -> dict[str, str]:
    """README's lines for separate hosts: its counts (``-s 2 -w 8``) made ours, ``hostA``
    made the coordinator's host."""
    assert re.search(r" -s \d+ -w \d+ ", readme["coordinator"]), readme["coordinator"]
    return {
        "coordinator": re.sub(r" -s \d+ -w \d+ ", f" -s {SERVERS} -w {WORKERS} ",
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# 46 CPU-seconds in all (16 processes): about half a minute on a quiet 2-core machine
@pytest.mark.timeout(300)
def test_a_token_cluster_on_eight_hosts_trains_as_well_as_on_loopback(
    emulated_hosts: Callable[..., hosts.Bed], tmp_path: Path
) -> None:
    readme = readme_commands()
    bed = emulated_hosts(1 + SERVERS + WORKERS, rate="1gbit")
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
