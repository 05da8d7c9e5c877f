"""The Ray backend: the coordinator, the servers and the workers as Ray actors on a Ray cluster.

Nothing here is imported from Ray until used (``pip install 'paramserver[ray]'``). Each role
runs in its own actor (its own process), exactly the code a local cluster runs, so everything
else (heartbeats, views, checkpoints, ``paramserver status``) is unchanged:

- ``launch(train, servers=2, workers=4)`` runs ``train(client)`` in each of ``workers`` worker
  actors, joined to a cluster of actors, and returns their results in rank order;
- ``run_job(["train.py", ...], ...)`` (``paramserver run --backend ray``) runs a program once
  per worker actor with the ``PS_*`` variables set, as ``paramserver run`` does locally.

Roles bind ``host`` (default loopback: one machine). On a multi-node Ray cluster pass
``host="0.0.0.0"`` with a cluster token (``PS_TOKEN``), or ``insecure=True`` on a trusted
network; the actors then advertise their node's address. With no Ray instance running, one is
started for the call (bound to 127.0.0.1) and stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from paramserver.config import CheckpointPolicy, Timeouts, cluster_to_env, from_env
from paramserver.errors import ConfigError, PSError, PSTimeoutError

__all__ = ["Resources", "launch", "parse_memory", "run_job"]


class _Node(Protocol):
    address: str

    def serve(self) -> None: ...

    def stop(self) -> None: ...


class _NodeRole:
    """A coordinator or a server serving on a thread of a Ray actor."""

    def _serve(self, node: _Node, name: str) -> None:
        self.node = node
        self.thread = threading.Thread(target=node.serve, name=name, daemon=True)
        self.thread.start()

    def address(self) -> str:
        return self.node.address

    def stop(self) -> None:
        self.node.stop()
        self.thread.join(timeout=10)


class _CoordinatorRole(_NodeRole):
    def __init__(
        self,
        servers: int,
        workers: int,
        host: str,
        timeouts: Timeouts,
        metrics_port: int | None,
        token: str | None,
        restore: str | None = None,
        checkpoints: CheckpointPolicy | None = None,
    ) -> None:
        from paramserver.coordinator import Coordinator

        coord = Coordinator(
            servers,
            workers,
            host,
            0,
            timeouts,
            restore=restore,
            checkpoints=checkpoints,
            metrics_port=metrics_port,
            metrics_host="127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0",
            security=_security(token),
        )
        self._serve(coord, "coordinator")


class _ServerRole(_NodeRole):
    def __init__(
        self,
        coordinator: str,
        host: str,
        advertise: str | None,
        timeouts: Timeouts,
        token: str | None,
        rank: int | None = None,
    ) -> None:
        from paramserver.server.loop import Server

        # With its rank, an actor that Ray restarts takes the dead server's place (and shards)
        server = Server(
            coordinator,
            host,
            0,
            timeouts,
            advertise=advertise,
            security=_security(token),
            rank=rank,
        )
        self._serve(server, "server")


class _WorkerRole:
    def ready(self) -> bool:
        return True

    def run(
        self,
        train: Callable[..., Any],
        coordinator: str,
        rank: int,
        timeouts: Timeouts,
        args: tuple[Any, ...],
        token: str | None,
    ) -> Any:
        from paramserver.client import connect

        with connect(coordinator, rank=rank, timeouts=timeouts, token=token) as client:
            return train(client, *args)

    def run_program(self, cmd: list[str], env: dict[str, str], prefix: str) -> int:
        from paramserver.launch import die_with_parent

        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # a killed actor takes its program with it
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
            sys.stdout.flush()
        return proc.wait()


def _security(token: str | None) -> Any:
    from paramserver.wire.transport import Security

    return Security.from_token(token) if token else None


@dataclass(frozen=True)
class Resources:
    """What one actor of a role claims from Ray: CPUs, memory (bytes), GPUs. None claims
    nothing of that kind (the default: roles mostly wait on sockets, and a job must never wait
    for a free slot that will not come).

    Example:
        ps.ray.launch(train, workers=4, worker_resources=Resources(cpus=2, gpus=1))
    """

    cpus: float | None = None
    memory: int | None = None
    gpus: float | None = None

    def __post_init__(self) -> None:
        for what, v in (("cpus", self.cpus), ("memory", self.memory), ("gpus", self.gpus)):
            if v is not None and (isinstance(v, bool) or not v >= 0):
                raise ConfigError(f"ray resources: {what} must be a number >= 0, got {v!r}")

    def options(self) -> dict[str, Any]:
        """The ``ray.remote`` options of an actor with these resources."""
        opts: dict[str, Any] = {"num_cpus": self.cpus or 0, "scheduling_strategy": "SPREAD"}
        if self.memory:
            opts["memory"] = int(self.memory)
        if self.gpus:
            opts["num_gpus"] = self.gpus
        return opts

    def describe(self) -> str:
        parts = [
            f"{self.cpus:g} CPUs" if self.cpus else "",
            f"{self.gpus:g} GPUs" if self.gpus else "",
        ]
        if self.memory:
            parts.append(f"{self.memory / 2**30:.3g} GiB memory")
        return ", ".join(p for p in parts if p) or "no resources"


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory(value: str) -> int:
    """Bytes from a size such as ``"512Mi"``, ``"4G"``, ``"1.5Gi"`` or ``"1000000"``.

    Example:
        parse_memory("2Gi")   # 2147483648
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", value)
    if m is None:
        raise ConfigError(
            f"memory must be a size such as 512Mi, 4G or a number of bytes, got {value!r}"
        )
    unit = m.group(2).lower()
    scale = 1024 ** "kmgt".index(unit) * 1024 if m.group(3) and unit else _SIZE_UNITS[unit]
    return int(float(m.group(1)) * scale)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("the Ray backend needs ray: pip install 'paramserver[ray]'") from exc
    return ray


def _check_fits(ray: Any, role: str, n: int, res: Resources) -> None:
    """Refuse resources a local Ray instance cannot ever give (else the start would wait for
    them until its timeout)."""
    have = ray.cluster_resources()
    for key, want, flag in (
        ("CPU", res.cpus, "cpus"),
        ("GPU", res.gpus, "gpus"),
        ("memory", res.memory, "memory"),
    ):
        if want and want * n > have.get(key, 0.0):
            raise ConfigError(
                f"ray backend: {n} {role}s with --{role}-{flag} {want:g} need "
                f"{want * n:g} {key} in all, but this Ray instance has {have.get(key, 0.0):g}"
            )


class _Cluster:
    """A coordinator actor and server actors; :meth:`close` stops and kills them."""

    def __init__(
        self,
        servers: int,
        workers: int,
        host: str,
        insecure: bool,
        timeouts: Timeouts,
        metrics_port: int | None,
        start_timeout: float,
        *,
        token: str | None = None,
        restore: str | None = None,
        checkpoints: CheckpointPolicy | None = None,
        server_resources: Resources | None = None,
        worker_resources: Resources | None = None,
    ) -> None:
        restore, checkpoints = _local_path(restore), _absolute(checkpoints)
        server_resources = server_resources or Resources()
        worker_resources = worker_resources or Resources()
        ray = self.ray = _ray()
        # the cluster token travels to the actors as an argument (Ray's own security covers it)
        self.token = token if token is not None else from_env().token
        if host not in ("127.0.0.1", "localhost") and not insecure and not self.token:
            raise ConfigError(
                f"ray backend: refusing to bind {host} (beyond loopback) without a cluster token "
                "(PS_TOKEN); pass insecure=True to accept unauthenticated traffic"
            )
        self.worker_resources = worker_resources
        self.own_ray = not ray.is_initialized()
        if self.own_ray and os.environ.get("RAY_ADDRESS"):
            ray.init()  # join the Ray cluster RAY_ADDRESS names
        elif self.own_ray:  # a local Ray instance for this call, on loopback only
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
        self.actors: list[Any] = []
        self.timeouts = timeouts
        self.start_timeout = start_timeout
        try:
            if self.own_ray and not os.environ.get("RAY_ADDRESS"):
                _check_fits(ray, "server", servers, server_resources)
                _check_fits(ray, "worker", workers, worker_resources)
            advertise = (
                None if host in ("127.0.0.1", "localhost") else ray.util.get_node_ip_address()
            )
            coord = ray.remote(num_cpus=0)(_CoordinatorRole).remote(
                servers,
                workers,
                "0.0.0.0" if advertise else host,
                timeouts,
                metrics_port,
                self.token,
                restore,
                checkpoints,
            )
            self.actors.append(coord)
            address = ray.get(coord.address.remote(), timeout=start_timeout)
            if advertise:
                address = f"tcp://{advertise}:{address.rsplit(':', 1)[1]}"
            self.address: str = address
            self.coordinator = coord
            # a server actor that dies is started again by Ray with its rank: it restores its
            # shards from the newest checkpoint, as under `paramserver run`
            server_cls = ray.remote(
                max_restarts=-1 if checkpoints else 0, **server_resources.options()
            )(_ServerRole)
            for r in range(servers):
                self.actors.append(server_cls.remote(address, host, None, timeouts, self.token, r))
            _wait(
                ray,
                [a.address.remote() for a in self.actors[1:]],
                start_timeout,
                f"placing {servers} server actors ({server_resources.describe()} each)",
                who="servers",
            )
        except BaseException:
            self.close()
            raise

    def add_workers(self, n: int) -> list[Any]:
        """``n`` worker actors, each placed (started) within the start timeout."""
        res = self.worker_resources
        worker_cls = self.ray.remote(**res.options())(_WorkerRole)
        actors = [worker_cls.remote() for _ in range(n)]
        self.actors.extend(actors)
        _wait(
            self.ray,
            [a.ready.remote() for a in actors],
            self.start_timeout,
            f"placing {n} worker actors ({res.describe()} each)",
        )
        return actors

    def close(self) -> None:
        ray = self.ray
        # servers first, then the coordinator, each told to stop cleanly, then killed anyway
        for actor in reversed(self.actors):
            with contextlib.suppress(Exception):  # one that died or hung is killed below
                ray.get(actor.stop.remote(), timeout=15)
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.own_ray:
            ray.shutdown()
            self.own_ray = False


def _wait(
    ray: Any,
    refs: list[Any],
    timeout: float | None,
    what: str,
    failed: Callable[[Any], bool] = lambda _: False,
    who: str = "workers",
) -> list[Any]:
    """ray.get on every ref, stopping at the first error or ``failed`` result, within
    ``timeout`` (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(refs)
    while pending:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise PSTimeoutError(
                f"{what}: {len(pending)} of {len(refs)} {who} not done after {timeout}s"
            )
        done, pending = ray.wait(
            pending, num_returns=1, timeout=1.0 if left is None else min(1.0, left)
        )
        for ref in done:
            if failed(ray.get(ref)):  # ray.get raises the worker's error at once
                return [ray.get(ref)]
    return list(ray.get(refs))


def launch(
    train: Callable[..., Any],
    *,
    servers: int = 2,
    workers: int = 1,
    args: Sequence[Any] = (),
    host: str = "127.0.0.1",
    insecure: bool = False,
    timeouts: Timeouts | None = None,
    metrics_port: int | None = None,
    timeout: float | None = None,
    start_timeout: float = 120.0,
    token: str | None = None,
    restore: str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    server_resources: Resources | None = None,
    worker_resources: Resources | None = None,
) -> list[Any]:
    """Run ``train(client, *args)`` in ``workers`` worker actors of a cluster of Ray actors;
    return the results in rank order. Every actor is stopped before this returns or raises.

    ``token`` (default ``PS_TOKEN``): every socket uses CURVE. ``restore``: resume from that
    checkpoint; ``checkpoints``: periodic checkpoints (a server actor that dies is then
    restarted by Ray with its rank and restores its shards). ``server_resources`` and
    ``worker_resources``: what each actor of the role claims from Ray.

    Example:
        def train(client):
            emb = client.sparse_table("emb", dim=8); client.clock(); return client.rank
        ps.ray.launch(train, servers=2, workers=2)   # [0, 1]
    """
    t = timeouts or Timeouts()
    cluster = _Cluster(
        servers, workers, host, insecure, t, metrics_port, start_timeout, token=token,
        restore=restore, checkpoints=checkpoints, server_resources=server_resources,
        worker_resources=worker_resources,
    )  # fmt: skip
    ray = cluster.ray
    try:
        actors = cluster.add_workers(workers)
        refs = [
            a.run.remote(train, cluster.address, r, t, tuple(args), cluster.token)
            for r, a in enumerate(actors)
        ]
        try:
            return _wait(ray, refs, timeout, "ray launch")
        except ray.exceptions.RayTaskError as exc:
            raise PSError(f"a worker failed: {exc}") from exc
    finally:
        cluster.close()


def _local_path(path: str | None) -> str | None:
    """An absolute path: the actors may run in another working directory."""
    return None if path is None else os.path.abspath(path)


def _absolute(policy: CheckpointPolicy | None) -> CheckpointPolicy | None:
    if policy is None:
        return None
    return replace(policy, directory=os.path.abspath(policy.directory))


def run_job(
    program: Sequence[str],
    *,
    servers: int,
    workers: int,
    consistency: str | None = None,
    timeouts: Timeouts | None = None,
    host: str = "127.0.0.1",
    insecure: bool = False,
    timeout: float | None = None,
    token: str | None = None,
    restore: str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    server_resources: Resources | None = None,
    worker_resources: Resources | None = None,
    metrics_port: int | None = None,
) -> int:
    """``paramserver run --backend ray``: run ``python PROGRAM...`` once per worker actor with
    ``PS_COORDINATOR``, ``PS_RANK``, ``PS_NUM_WORKERS``, ``PS_NUM_SERVERS`` (and ``PS_TOKEN``
    with a token) set; return 0, or the first failed worker's exit code. The other settings
    are :func:`launch`'s.

    Example:
        run_job(["train.py", "--epochs", "3"], servers=2, workers=4,
                worker_resources=Resources(cpus=2, gpus=1))
    """
    t = timeouts or Timeouts()
    if not program or (program[0] != "-m" and not os.path.isfile(program[0])):
        raise ConfigError(f"worker program {program[0] if program else ''!r} is not a file")
    program = [
        os.path.abspath(p) if i == 0 and os.path.isfile(p) else p for i, p in enumerate(program)
    ]
    cluster = _Cluster(
        servers, workers, host, insecure, t, metrics_port, 120.0, token=token,
        restore=restore, checkpoints=checkpoints, server_resources=server_resources,
        worker_resources=worker_resources,
    )  # fmt: skip
    ray = cluster.ray
    try:
        env = cluster_to_env(cluster.address, workers, servers, t, cluster.token)
        env["PYTHONUNBUFFERED"] = "1"
        if consistency is not None:
            env["PS_CONSISTENCY"] = consistency
        actors = cluster.add_workers(workers)
        refs = [
            a.run_program.remote(
                [sys.executable, *program], {**env, "PS_RANK": str(r)}, f"worker[{r}]"
            )
            for r, a in enumerate(actors)
        ]
        codes = _wait(ray, refs, timeout, "paramserver run --backend ray", lambda c: c != 0)
        return next((int(c) for c in codes if c != 0), 0)
    finally:
        cluster.close()
