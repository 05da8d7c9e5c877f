"""``paramserver run``: a local cluster plus one process per worker running a program, and
every process stopped when the job ends, fails or is interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from paramserver.config import CheckpointPolicy, Timeouts
from paramserver.errors import ConfigError
from paramserver.launch.children import Children, describe_exit, exit_code, say
from paramserver.launch.local import LocalCluster
from paramserver.launch.roles import checkpoint_policy

__all__ = ["run_job"]


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an interrupt, so that ``run_job`` cleans up as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt(signums: Sequence[int]) -> Iterator[None]:
    """Within the block, ``signums`` raise :class:`_Interrupted` (main thread only: elsewhere
    Python cannot install handlers, and the caller's own handling applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    # A signal ignored on purpose stays ignored (``nohup paramserver run ...``: no SIGHUP).
    previous = {
        s: signal.signal(s, handler) for s in signums if signal.getsignal(s) != signal.SIG_IGN
    }
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _watch(workers: Children, cluster: Children, out: IO[str]) -> int:
    """Wait for every worker; at the first failure return its exit code at once."""
    pending = dict(workers.procs)
    reported: set[str] = set()
    while pending:
        for name, p in list(pending.items()):
            rc = p.poll()
            if rc is None:
                continue
            del pending[name]
            if rc != 0:
                say(out, f"[paramserver] {name} failed with {describe_exit(rc)}; stopping the job")
                return exit_code(rc)
        for name, p in cluster.procs:
            # The workers see a lost node by themselves (and may survive it); say why it left.
            if name not in reported and p.poll() is not None:
                reported.add(name)
                say(out, f"[paramserver] {name} exited with {describe_exit(p.returncode)}")
        time.sleep(0.05)
    return 0


def _announce(cluster: LocalCluster, out: IO[str]) -> None:
    """Say where the job can be watched from: the coordinator, and its metrics if served."""
    address = cluster.address.removeprefix("tcp://")
    say(
        out,
        f"[paramserver] coordinator at {address} ({cluster.num_servers} servers, "
        f"{cluster.num_workers} workers); watch it with: "
        f"paramserver status --coordinator {address} --watch",
    )
    if cluster.metrics_port is not None:
        say(
            out,
            f"[paramserver] Prometheus metrics at http://127.0.0.1:{cluster.metrics_port}/metrics",
        )


def _check_program(script: Sequence[str]) -> None:
    if not script:
        raise ConfigError("no worker program given")
    if script[0] == "-m":
        import importlib.util

        if len(script) < 2 or importlib.util.find_spec(script[1]) is None:
            raise ConfigError(f"worker module {script[1] if len(script) > 1 else ''!r} not found")
    elif not os.path.isfile(script[0]):
        raise ConfigError(f"worker program {script[0]!r} is not a file")


def run_job(
    script: Sequence[str],
    *,
    servers: int,
    workers: int,
    host: str = "127.0.0.1",
    consistency: str | None = None,
    timeouts: Timeouts | None = None,
    log_level: str = "WARNING",
    out: IO[str] | None = None,
    token: str | None = None,
    restore: str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: float | None = None,
    checkpoint_every_clocks: int | None = None,
    checkpoint_keep: int | None = None,
    metrics_port: int | None = None,
    replication: int = 1,
) -> int:
    """``paramserver run``: a cluster plus one process per worker running ``script``.

    ``restore`` and ``checkpoints`` are :class:`LocalCluster`'s: resume from a checkpoint,
    write periodic ones (a server that dies is restarted from the newest). The ``checkpoint_*``
    settings are the same policy field by field (give one or the other).

    With a ``token`` (default: ``PS_TOKEN`` / ``PS_TOKEN_FILE``) every socket uses CURVE and the
    workers get the token in their environment. With ``metrics_port`` the coordinator serves
    Prometheus metrics at ``http://127.0.0.1:metrics_port/metrics``. With ``replication`` k,
    every key range lives on k servers (see :class:`LocalCluster`).

    Once the cluster is up it prints the coordinator's address (what ``paramserver status``
    takes) and the metrics' URL, as ``[paramserver]`` lines.

    Returns 0 if every worker exited 0, else the first failed worker's exit code (128 + N for
    a worker killed by signal N); 130 on Ctrl-C, 128 + N on SIGTERM or SIGHUP. Every process
    it started is stopped before it returns: the other workers at once (SIGTERM) when one fails
    or the job is interrupted. Interrupted, it says so in one line; the children, which ignore
    SIGINT, print nothing of it (no traceback per worker, no server "restarted").

    Example:
        code = run_job(["train.py", "--epochs", "2"], servers=2, workers=4)
        code = run_job(["-m", "paramserver.models.logreg"], servers=2, workers=2)
    """
    _check_program(script)
    out = out or sys.stdout
    timeouts = timeouts or Timeouts()
    policy = checkpoint_policy(
        checkpoints, checkpoint_dir, checkpoint_every, checkpoint_keep, checkpoint_every_clocks
    )
    cluster = LocalCluster(
        servers, workers, host=host, timeouts=timeouts, log_level=log_level, output=out,
        token=token, restore=restore, checkpoints=policy, metrics_port=metrics_port,
        replication=replication,
    )  # fmt: skip
    workers_ = Children()
    code = 0
    interrupted = False
    with _signals_interrupt([signal.SIGTERM, signal.SIGHUP]):
        try:
            try:
                cluster.start()
                _announce(cluster, out)
                env = {**os.environ, **cluster.worker_env(), "PYTHONUNBUFFERED": "1"}
                if consistency:
                    env["PS_CONSISTENCY"] = consistency
                for r in range(workers):
                    workers_.start(
                        f"worker {r}",
                        [sys.executable, *script],
                        env={**env, "PS_RANK": str(r)},
                        prefix_output=out,
                    )
                code = _watch(workers_, cluster.children, out)
            except KeyboardInterrupt as exc:
                interrupted = True
                signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
                code = 128 + signum
                name = signal.Signals(signum).name
                say(out, f"[paramserver] interrupted ({name}): stopping the job")
            finally:
                # The workers ignore SIGINT (children.py: the launcher alone answers Ctrl-C),
                # and after a failure the others are likely blocked on the failed one: SIGTERM
                # at once. The servers outlive them, and exit only when told: none restarted.
                if interrupted:
                    cluster.stop_restarting()
                workers_.stop(grace=0.0)
                cluster.close()
        except KeyboardInterrupt:  # interrupted again while cleaning up: no more grace
            workers_.kill()
            cluster.kill()
            code = code or 130
    return code
