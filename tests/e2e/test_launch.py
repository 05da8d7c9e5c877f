"""End-to-end tests of the launcher, as a user runs it: ``paramserver run``, the multi-host roles
``paramserver coordinator`` / ``paramserver server``, ``LocalCluster`` and ``paramserver demo``.

Every test checks that no process it started is left, including processes that were reparented
away from the test (a launcher that died leaves its children to init, where the conftest's
check of this process's descendants cannot see them): a background sampler remembers every
descendant it ever saw, with its start time so that a reused pid is not mistaken for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

import paramserver as ps
from tests import procs
from tests.timing import FAST, FAST_ENV, FAST_FLAGS, wait_until

PROGRAMS = Path(__file__).parent / "programs"


# ---- helpers --------------------------------------------------------------------------------


def _paramserver() -> list[str]:
    """The ``paramserver`` command of this environment, as a user would type it."""
    script = Path(sys.executable).with_name("paramserver")
    return [str(script)] if script.exists() else [sys.executable, "-m", "paramserver"]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without PS_* variables (they would leak into the children)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _pids_from_files(folder: Path) -> dict[int, int]:
    """The pids the worker programs wrote into ``folder`` (with their start times)."""
    found = {}
    for f in folder.glob("worker-*.pid"):
        pid = int(f.read_text())
        st = procs.stat(pid)
        found[pid] = st.start if st is not None else -1
    return found


class _Watch:
    """Samples this process's descendants in the background and remembers every one it saw."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.before = procs.descendants()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        for pid, start in procs.descendants().items():
            if self.before.get(pid) != start:
                self.seen[pid] = start

    def assert_gone(self, extra: dict[int, int] | None = None, timeout: float = 5.0) -> None:
        """Fail (after killing them) if any process seen, or in ``extra``, outlives ``timeout``."""
        self._stop.set()
        self._thread.join(5.0)
        self.sample()
        watched = {**self.seen, **(extra or {})}
        left: list[int] = []

        def none_left() -> bool:
            nonlocal left
            left = procs.alive(watched)
            return not left

        with contextlib.suppress(AssertionError):
            wait_until(none_left, timeout, "the processes to exit", every=0.05)
        cmds = {pid: procs.cmdline(pid) for pid in left}
        procs.kill(left)  # one leak must not poison the rest of the run
        assert not left, f"processes left behind: {cmds}"


@contextmanager
def _watch() -> Iterator[_Watch]:
    w = _Watch()
    w._thread.start()
    try:
        yield w
    finally:
        w._stop.set()


class _Lines:
    """Reads a child's output in a thread, so that waiting for a line has a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"timed out after {timeout}s; output so far:\n" + "\n".join(self.lines)
                ) from None
            if line is None:
                raise AssertionError("output ended early:\n" + "\n".join(self.lines))
            self.lines.append(line)

    def rest(self, timeout: float) -> list[str]:
        """Every line until the end of the output (the child's pipe closed)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return self.lines


def _wait(proc: subprocess.Popen[str], timeout: float) -> int:
    """Exit code of ``proc`` within ``timeout`` seconds, or fail (after killing it)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
        raise AssertionError(f"{proc.args} did not exit within {timeout}s") from None


# ---- paramserver run ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_run_starts_cluster_and_prefixes_worker_output() -> None:
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "run", "-s", "2", "-w", "3", "--consistency", "sync", *FAST_FLAGS,
             str(PROGRAMS / "basic.py")],
            env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        watch.assert_gone()
    out = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    for line in out:
        assert re.match(r"\[(worker \d|server \d|coordinator|paramserver)\] ", line), line
    for r in range(3):
        mine = [line.split(" ", 2)[2] for line in out if line.startswith(f"[worker {r}] ")]
        assert f"rank {r} of 3 consistency sync" in mine, out
        env_line = next(line for line in mine if line.startswith("env "))
        assert f"PS_RANK={r} PS_NUM_WORKERS=3 PS_COORDINATOR=tcp://127.0.0.1:" in env_line
        # sync: the 3 workers' pushes of the clock are summed and divided by 3, and the pull
        # after the barrier waits for them; keys 1 and 2 had 3 pushes of 1.0, key 100 + r one
        assert "rows [-1.0, -1.0, -0.3333]" in mine, mine
        assert mine[-2:] == ["two lines", "on stderr"]  # stderr too, line by line
    coordinators = {line.split("PS_COORDINATOR=")[1] for line in out if "PS_COORDINATOR=" in line}
    assert len(coordinators) == 1


@pytest.mark.timeout(60)
def test_run_stops_everything_when_one_worker_fails(tmp_path: Path) -> None:
    start = time.monotonic()
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "run", "-s", "2", "-w", "3", *FAST_FLAGS,
             str(PROGRAMS / "fail_one.py"), str(tmp_path)],
            env=_env(), capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        watch.assert_gone(_pids_from_files(tmp_path))
    elapsed = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr
    assert "[worker 1] rank 1 fails now" in done.stdout
    assert "[worker 0] waiting at the barrier" in done.stdout
    assert "[worker 2] waiting at the barrier" in done.stdout
    assert "[paramserver] worker 1 failed with exit code 3; stopping the job" in done.stdout
    assert len(list(tmp_path.glob("worker-*.pid"))) == 3
    # the others were blocked at a barrier with an hour's timeout: they were stopped, not awaited
    assert elapsed < 40


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("target", "signum", "code"),
    [
        ("launcher", signal.SIGINT, 130),
        ("group", signal.SIGINT, 130),  # Ctrl-C in a terminal signals the whole group
        ("launcher", signal.SIGTERM, 143),
    ],
)
def test_run_interrupted_stops_everything(
    tmp_path: Path, target: str, signum: signal.Signals, code: int
) -> None:
    with _watch() as watch:
        proc = subprocess.Popen(
            [*_paramserver(), "run", "-s", "2", "-w", "3", *FAST_FLAGS,
             str(PROGRAMS / "sleeper.py"), str(tmp_path)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own group, so that killpg does not hit pytest
        )  # fmt: skip
        try:
            lines = _Lines(proc.stdout)  # type: ignore[arg-type]
            lines.wait_for(lambda ls: sum(line.endswith("] ready") for line in ls) == 3, 40)
            if target == "group":
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            rc = _wait(proc, 20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        watch.assert_gone(_pids_from_files(tmp_path))
    out = lines.rest(5.0)
    assert rc == code, "\n".join(out)
    # one line says it; the children, which ignore SIGINT, say nothing of it: no traceback per
    # worker, no server "exited ...; restarting it" while the job stops
    assert f"[paramserver] interrupted ({signum.name}): stopping the job" in out
    after = out[out.index(f"[paramserver] interrupted ({signum.name}): stopping the job") + 1 :]
    assert after == [], "\n".join(out)
    assert not [line for line in out if "Traceback" in line or "restarting" in line], out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_train_interrupted_says_so_in_one_line(tmp_path: Path, workers: int) -> None:
    """Ctrl-C of a ready program: in process (one worker) or under the launcher (two)."""
    with _watch() as watch:
        proc = subprocess.Popen(
            [*_paramserver(), "train", "logreg", "--data", "synthetic", "--examples", "20000",
             "-w", str(workers), "--epochs", "1000", "--no-progress", "--out", str(tmp_path)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            lines = _Lines(proc.stdout)  # type: ignore[arg-type]
            lines.wait_for(lambda ls: any("logreg epoch 1:" in line for line in ls), 90)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
            rc = _wait(proc, 20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        watch.assert_gone()
    out = lines.rest(5.0)
    assert rc == 130, "\n".join(out)
    said = [line for line in out if "interrupted" in line]
    assert said == (
        ["paramserver train: interrupted"]
        if workers == 1
        else ["[paramserver] interrupted (SIGINT): stopping the job"]
    ), out
    assert not [line for line in out if "Traceback" in line or "restarting" in line], out
    assert not [line for line in out if "KeyboardInterrupt" in line], out


@pytest.mark.timeout(90)
def test_run_says_where_to_watch_the_job(tmp_path: Path) -> None:
    """The coordinator's address and the metrics' URL are printed; both answer while it runs."""
    pytest.importorskip("prometheus_client")
    port = _free_port()
    with _watch() as watch:
        proc = subprocess.Popen(
            [*_paramserver(), "run", "-s", "2", "-w", "2", "--metrics-port", str(port),
             *FAST_FLAGS, str(PROGRAMS / "sleeper.py"), str(tmp_path)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            lines = _Lines(proc.stdout)  # type: ignore[arg-type]
            lines.wait_for(lambda ls: sum(line.endswith("] ready") for line in ls) == 2, 40)
            said = next(line for line in lines.lines if line.startswith("[paramserver] coord"))
            address = re.search(r"--coordinator (\S+)", said)
            assert address is not None, said
            status = subprocess.run(
                [*_paramserver(), "status", "--coordinator", address.group(1), "--json"],
                env=_env(), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}/metrics"
            assert f"[paramserver] Prometheus metrics at {url}" in lines.lines
            import urllib.request

            # the exporter serves the coordinator's newest status, rebuilt every second and on
            # each membership change: a read may come just before the last worker's join
            deadline = time.monotonic() + 15
            while True:
                with urllib.request.urlopen(url, timeout=10) as r:
                    metrics = r.read().decode()
                up = 'ps_node_up{rank="1",role="worker"} 1.0' in metrics
                if up or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = _wait(proc, 20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        watch.assert_gone(_pids_from_files(tmp_path))
    assert rc == 130
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert seen["address"].removeprefix("tcp://") == address.group(1)
    roles = sorted((n["role"], n["rank"], n["state"]) for n in seen["nodes"])
    assert roles == [(r, k, "alive") for r in ("server", "worker") for k in (0, 1)], roles
    assert 'ps_node_up{rank="1",role="worker"} 1.0' in metrics, metrics
    assert 'ps_node_up{rank="1",role="server"} 1.0' in metrics, metrics


@pytest.mark.timeout(30)
def test_status_of_a_dead_address_says_nothing_answers_there() -> None:
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    done = subprocess.run(
        [*_paramserver(), "status", "--coordinator", address, "--timeout", "1.5"],
        env=_env(), capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stdout + done.stderr
    said = done.stderr.strip()
    assert said.startswith(f"paramserver status: nothing answers at tcp://{address}"), said
    waited = re.search(r"no status of the coordinator after ([0-9.]+)s", said)
    assert waited is not None and 1.5 <= float(waited.group(1)) <= elapsed, (said, elapsed)
    assert "Traceback" not in said


@pytest.mark.timeout(60)
def test_run_killed_takes_its_children_along(tmp_path: Path) -> None:
    """SIGKILL leaves the launcher no chance to clean up: PR_SET_PDEATHSIG must."""
    with _watch() as watch:
        proc = subprocess.Popen(
            [*_paramserver(), "run", "-s", "2", "-w", "2", *FAST_FLAGS,
             str(PROGRAMS / "sleeper.py"), str(tmp_path)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            lines = _Lines(proc.stdout)  # type: ignore[arg-type]
            lines.wait_for(lambda ls: sum(line.endswith("] ready") for line in ls) == 2, 40)
            watch.sample()
            proc.kill()
            assert _wait(proc, 10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        watch.assert_gone(_pids_from_files(tmp_path))


# ---- many hosts: every role its own command -------------------------------------------------


@pytest.mark.timeout(90)
def test_roles_as_separate_commands_train_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coord", "s0", "s1")}  # noqa: SIM115

    def log_of(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    def role(name: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*_paramserver(), *args, *FAST_FLAGS], env=_env(), stdout=logs[name],
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    started: list[subprocess.Popen[str]] = []
    with _watch() as watch:
        try:
            coord = role("coord", "coordinator", "--bind", address, "-s", "2", "-w", "2")
            started.append(coord)
            servers = [role(f"s{i}", "server", "--coordinator", address) for i in range(2)]
            started += servers
            env = _env(PS_COORDINATOR=address, **FAST_ENV)
            workers = [_worker(PROGRAMS / "logreg_worker.py", env) for _ in range(2)]
            started += workers
            outputs = [w.communicate(timeout=60)[0] for w in workers]
            results = []
            for w, out in zip(workers, outputs, strict=True):
                assert w.returncode == 0, out
                line = next(line for line in out.splitlines() if line.startswith("RESULT "))
                results.append(json.loads(line.removeprefix("RESULT ")))
            assert sorted(r["rank"] for r in results) == [
                0,
                1,
            ]  # ranks given out by the coordinator
            lead = next(r for r in results if r["rank"] == 0)  # rank 0 evaluates each epoch
            losses = [h["test_logloss"] for h in lead["curve"]]
            # it learned: better than the best constant predictor on held-out data at the end
            # (async training with two workers on 20k examples can have a worse epoch between:
            # rank 0 evaluates while rank 1 goes on training)
            assert len(losses) == 3 and losses[-1] < lead["base"] - 0.02, (lead["base"], losses)
            assert lead["curve"][-1]["test_auc"] > 0.6, lead["curve"]

            for name, p in (("s0", servers[0]), ("s1", servers[1]), ("coord", coord)):
                p.send_signal(signal.SIGTERM)
                assert _wait(p, 10) == 0, log_of(name)
        finally:
            for p in started:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            for f in logs.values():
                f.close()
        watch.assert_gone()
    assert "signal SIGTERM: stopping" in log_of("coord")


def _worker(program: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A worker as any launcher starts one: a plain process that finds the cluster by PS_*."""
    return subprocess.Popen(
        [sys.executable, str(program)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_server_stops_on_sigterm_while_waiting_for_the_coordinator(tmp_path: Path) -> None:
    """Registration waits up to the connect timeout (30 s here); SIGTERM must not."""
    with _watch() as watch:
        proc = subprocess.Popen(
            [*_paramserver(), "--log-level", "INFO", "server", "--coordinator",
             f"127.0.0.1:{_free_port()}", "--connect-timeout", "30", *FAST_FLAGS],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            lines = _Lines(proc.stdout)  # type: ignore[arg-type]
            # its sockets exist once it waits for the coordinator's answer
            wait_until(lambda: procs.has_sockets(proc.pid), 30, "the server to open its sockets")
            proc.send_signal(signal.SIGTERM)
            rc = _wait(proc, 10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        watch.assert_gone()
    out = lines.rest(5.0)
    assert rc == 0, "\n".join(out)
    assert any("stopped before it had registered" in line for line in out), out


# ---- refusals and errors --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_coordinator_refuses_to_bind_beyond_loopback_without_insecure() -> None:
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "coordinator", "--bind", "0.0.0.0:0", "-s", "1", "-w", "1"],
            env=_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        watch.assert_gone()
    assert done.returncode != 0
    assert "refusing to bind 0.0.0.0" in done.stderr, done.stderr
    assert "--insecure" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_cli_errors_are_one_clear_line() -> None:
    with _watch() as watch:
        bad_level = subprocess.run(
            [*_paramserver(), "coordinator", "-s", "1", "-w", "1"],
            env=_env(PS_HEARTBEAT_INTERVAL="soon"), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        missing = subprocess.run(
            [*_paramserver(), "run", "-s", "1", "-w", "1", "no/such/program.py"],
            env=_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        watch.assert_gone()
    assert bad_level.returncode == 2
    assert "PS_HEARTBEAT_INTERVAL" in bad_level.stderr and "Traceback" not in bad_level.stderr
    assert missing.returncode == 2
    assert "no/such/program.py" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.timeout(60)
def test_connect_where_nothing_listens_times_out_naming_the_address() -> None:
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ps.errors.PSTimeoutError) as caught:
        ps.connect(address, timeouts=ps.Timeouts(connect=2.0))
    elapsed = time.monotonic() - start
    assert address in str(caught.value)
    # the connect timeout, plus the 1 s probe the client makes to explain the failure, plus slack
    assert elapsed < 2.0 + 1.0 + 5.0


# ---- LocalCluster ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_local_cluster_stops_its_processes_when_the_body_raises() -> None:
    with _watch() as watch:
        with pytest.raises(RuntimeError, match="body failed"):  # noqa: SIM117
            with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
                pids = dict(cluster.pids)
                assert set(pids) == {"coordinator", "server 0", "server 1"}
                assert cluster.address.startswith("tcp://127.0.0.1:")
                client = cluster.connect()
                client.sparse_table("emb", dim=2)
                raise RuntimeError("body failed")
        watch.assert_gone({pid: st.start for pid in pids.values() if (st := procs.stat(pid))})
    for pid in pids.values():
        assert procs.gone(pid), f"pid {pid} still alive"


@pytest.mark.timeout(60)
def test_local_cluster_closes_after_its_coordinator_was_killed() -> None:
    with _watch() as watch:
        with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
            os.kill(cluster.pids["coordinator"], signal.SIGKILL)
        watch.assert_gone()
    for pid in cluster.pids.values():
        assert procs.gone(pid), f"pid {pid} still alive"


# ---- the demo -------------------------------------------------------------------------------


@pytest.mark.timeout(170)
def test_demo_trains_both_models_and_writes_its_plot(tmp_path: Path) -> None:
    # one epoch: the AUCs after it are well above 0.6 (0.67 and 0.66 on MovieLens-100K; an
    # untrained model scores 0.5), and a second epoch cost a third of the test's CPU (82 -> 55
    # CPU-seconds). Training over several epochs is test_ready_programs' (deepfm, logreg).
    out = tmp_path / "demo"
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "demo", "--epochs", "1", "--out", str(out)],
            env=_env(), capture_output=True, text=True, timeout=160,
        )  # fmt: skip
        watch.assert_gone()
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "final test AUC" in line)
    aucs = [float(v) for v in re.findall(r"(\d\.\d{4})", line)]
    assert len(aucs) == 3 and min(aucs) > 0.6, line  # FTRL, DeepFM, single-process baseline
    assert "synthetic" in done.stdout.lower() or "MovieLens" in done.stdout
    assert (out / "demo.png").stat().st_size > 1000
    summary = json.loads((out / "logreg.json").read_text())
    assert summary, "the FTRL run wrote no summary"


@pytest.mark.timeout(170)
def test_demo_without_the_registry_says_so_and_trains_on_synthetic_data(tmp_path: Path) -> None:
    env = {**_env(), "PS_DATA_DIR": str(tmp_path / "empty-cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": ""}  # fmt: skip
    # one server and one worker: the fallback is what this test checks; the default layout of
    # 2 servers and 2 workers (the second worker a process of its own) is the test above's.
    # About a third less CPU than the default layout on 2 cores, the same AUCs; 20,000
    # examples, not the default 100,000: 11 s instead of 33
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "demo", "-s", "1", "-w", "1", "--epochs", "1", "--examples",
             "20000", "--out", str(tmp_path / "demo")],
            env=env, capture_output=True, text=True, timeout=160,
        )  # fmt: skip
        watch.assert_gone()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot be fetched" in done.stdout and "SYNTHETIC" in done.stdout, done.stdout
    assert "16000 train / 4000 test examples" in done.stdout, done.stdout
    line = next(line for line in done.stdout.splitlines() if "final test AUC" in line)
    assert min(float(v) for v in re.findall(r"(\d\.\d{4})", line)) > 0.6, line


def test_demo_refuses_too_few_synthetic_examples_before_it_starts_anything(
    tmp_path: Path,
) -> None:
    with _watch() as watch:
        done = subprocess.run(
            [*_paramserver(), "demo", "--examples", "5", "--out", str(tmp_path / "demo")],
            env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        watch.assert_gone()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--examples is 5: give at least 1000" in done.stderr, done.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.timeout(120)
def test_run_restore_resumes_at_the_saved_clock(tmp_path: Path) -> None:
    program = str(PROGRAMS / "save_restore.py")
    root = str(tmp_path / "ckpt")
    with _watch() as watch:
        first = subprocess.run(
            [*_paramserver(), "run", "-s", "2", "-w", "2", program, "save", root],
            env=_env(), capture_output=True, text=True, timeout=100,
        )  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        second = subprocess.run(
            [*_paramserver(), "run", "-s", "1", "-w", "2", "--restore", root, program, "check"],
            env=_env(), capture_output=True, text=True, timeout=100,
        )  # fmt: skip
        watch.assert_gone()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("OK") == 2 and "[worker 1] OK 1 3" in second.stdout, second.stdout


def test_local_cluster_on_a_port_in_use_says_so() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind the coordinator at 127.0.0.1:{port}"):
            ps.LocalCluster(servers=1, workers=1, port=port).start()
    finally:
        taken.close()
