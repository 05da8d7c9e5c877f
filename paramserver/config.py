"""Settings for every role, as frozen dataclasses, and the one place that reads ``PS_*`` variables.

Precedence is argument > environment variable > default: :func:`from_env` returns the
environment's values, and callers pass them to ``dataclasses.replace`` only for fields the
user did not set explicitly.

Environment variables:

=========================  ===================================================================
``PS_COORDINATOR``         coordinator address, ``host:port`` or ``tcp://host:port``
``PS_RANK``                worker rank requested by ``paramserver run`` (optional)
``PS_NUM_WORKERS``         number of workers in the job (informational for workers)
``PS_NUM_SERVERS``         number of servers in the job (informational for workers)
``PS_CONSISTENCY``         default consistency of tables created without one (default async)
``PS_HEARTBEAT_INTERVAL``  seconds between heartbeats (default 0.5)
``PS_HEARTBEAT_TIMEOUT``   seconds without a heartbeat before a node is declared dead (default 5)
``PS_REQUEST_TIMEOUT``     default timeout of a blocking call, seconds (default 60)
``PS_CONNECT_TIMEOUT``     timeout to join a cluster, seconds (default 30)
``PS_LOG_LEVEL``           log level of the CLI's handler (default INFO)
``PS_TOKEN``               the cluster token: every socket then uses CURVE (never logged)
``PS_TOKEN_FILE``          a file holding the cluster token (used when PS_TOKEN is unset)
``PS_DATA_DIR``            cache of downloaded data sets (default ``~/.cache/paramserver``)
``PS_TRANSPORT``           ``auto`` (shared memory with servers on this host, else TCP) or ``tcp``
``PS_LIMIT_<FIELD>``       a field of :class:`Limits` for the servers and the coordinator started
                           in this environment, e.g. ``PS_LIMIT_REQUEST_KEYS=1000000``
=========================  ===================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver.errors import ConfigError

__all__ = [
    "ENV_VARS",
    "CheckpointPolicy",
    "Limits",
    "Timeouts",
    "WorkerEnv",
    "cluster_to_env",
    "from_env",
    "limits_from_env",
    "normalize_address",
    "parse_consistency",
    "read_token_file",
]

ENV_VARS = (
    "PS_COORDINATOR",
    "PS_RANK",
    "PS_NUM_WORKERS",
    "PS_NUM_SERVERS",
    "PS_CONSISTENCY",
    "PS_HEARTBEAT_INTERVAL",
    "PS_HEARTBEAT_TIMEOUT",
    "PS_REQUEST_TIMEOUT",
    "PS_CONNECT_TIMEOUT",
    "PS_LOG_LEVEL",
    "PS_TOKEN",
    "PS_TOKEN_FILE",
    "PS_DATA_DIR",
    "PS_TRANSPORT",
)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class Timeouts:
    """How long nodes wait for each other.

    Example:
        Timeouts(heartbeat_timeout=2.0)  # declare a silent node dead after 2 s
    """

    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    request: float = 60.0
    connect: float = 30.0

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "heartbeat_timeout", "request", "connect"):
            _positive(name, getattr(self, name))
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout}s) must be at least twice "
                f"heartbeat_interval ({self.heartbeat_interval}s)"
            )


@dataclass(frozen=True)
class Limits:
    """How much coordinator state peers' requests may hold, so that no request (a lease book
    of 2**24 parts, ten thousand barrier names) can take the coordinator's memory or time.

    ``lease_parts``: the most parts of all open lease books together (a part costs ~9 bytes);
    ``datasets``: the most data-set epochs with a lease book at once (two epochs kept each);
    ``barriers``: the most barriers open at once, and ``peer_barriers`` the most one peer
    waits at; ``name_chars``: the longest data-set or barrier name.

    A server's (and, for ``table_bytes``, the coordinator's too): ``request_keys``, the most
    keys one pull or push of a sparse table may carry to one server; ``table_bytes``, the most bytes one table
    may take on one server (values and optimizer state; a dense range larger than this is not
    created, a sparse table refuses new rows past it as ``full``).

    Example:
        Limits(lease_parts=1 << 24)  # lease books of 16M parts in all (~150 MB)
    """

    lease_parts: int = 1 << 22
    datasets: int = 1024
    barriers: int = 1024
    peer_barriers: int = 16
    name_chars: int = 256
    request_keys: int = 1 << 22
    table_bytes: int = 1 << 36

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"limit {name} must be a positive integer, got {value!r}")


LIMIT_FIELDS = (
    "lease_parts",
    "datasets",
    "barriers",
    "peer_barriers",
    "name_chars",
    "request_keys",
    "table_bytes",
)


def limits_from_env(env: Mapping[str, str] | None = None) -> Limits:
    """:class:`Limits` with every field set by a ``PS_LIMIT_<FIELD>`` variable taken from the
    environment (the others at their defaults): how a launched server or coordinator gets the
    limits its launcher was given.

    Example:
        limits_from_env({"PS_LIMIT_REQUEST_KEYS": "1000"}).request_keys  # 1000
    """
    env = os.environ if env is None else env
    given = {name: _int(env, f"PS_LIMIT_{name.upper()}") for name in LIMIT_FIELDS}
    return Limits(**{k: v for k, v in given.items() if v is not None})


def limits_to_env(limits: Limits) -> dict[str, str]:
    """The ``PS_LIMIT_*`` variables that give a child process ``limits``."""
    return {f"PS_LIMIT_{name.upper()}": str(getattr(limits, name)) for name in LIMIT_FIELDS}


@dataclass(frozen=True)
class CheckpointPolicy:
    """Periodic checkpoints into ``directory``: every ``every_seconds``, or every
    ``every_clocks`` clocks when that is set; keeping the last ``keep``; a round that takes
    longer than ``timeout`` seconds fails.

    One object carries these from the command line (or :class:`paramserver.LocalCluster`)
    through the launcher to the coordinator.

    Example:
        CheckpointPolicy("/ckpt", every_clocks=100, keep=5)
    """

    directory: str
    every_seconds: float = 600.0
    keep: int = 3
    timeout: float = 600.0
    every_clocks: int | None = None

    @classmethod
    def from_settings(
        cls,
        directory: str | os.PathLike[str] | None,
        every_seconds: float | None = None,
        keep: int | None = None,
        every_clocks: int | None = None,
        timeout: float | None = None,
    ) -> CheckpointPolicy | None:
        """The policy for these settings, each None taking its default; None without a
        ``directory`` (no periodic checkpoints, whatever the rest says).

        Example:
            CheckpointPolicy.from_settings(args.checkpoint_dir, keep=args.checkpoint_keep)
        """
        if directory is None:
            return None
        given: dict[str, Any] = {
            "every_seconds": every_seconds,
            "keep": keep,
            "every_clocks": every_clocks,
            "timeout": timeout,
        }
        return cls(os.fspath(directory), **{k: v for k, v in given.items() if v is not None})

    def __post_init__(self) -> None:
        if not self.every_seconds > 0:
            raise ConfigError(f"checkpoint interval must be positive, got {self.every_seconds}")
        if not self.timeout > 0:
            raise ConfigError(f"checkpoint round timeout must be positive, got {self.timeout}")
        if not (isinstance(self.keep, int) and self.keep >= 1):
            raise ConfigError(f"checkpoints to keep must be at least 1, got {self.keep}")
        if self.every_clocks is not None and not self.every_clocks >= 1:
            raise ConfigError(f"checkpoint clock interval must be >= 1, got {self.every_clocks}")


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker started by ``paramserver run`` (or any launcher) learns from ``PS_*``."""

    coordinator: str | None = None
    rank: int | None = None
    num_workers: int | None = None
    num_servers: int | None = None
    consistency: str = "async"
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str = "INFO"
    token: str | None = field(default=None, repr=False)
    data_dir: str = ""
    transport: str = "auto"


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); ConfigError if unreadable."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token


def normalize_address(address: str) -> str:
    """Return ``tcp://host:port`` for ``host:port`` or ``tcp://host:port``; ConfigError otherwise.

    Example:
        normalize_address("127.0.0.1:5555")  # 'tcp://127.0.0.1:5555'
    """
    if not isinstance(address, str) or not address:
        raise ConfigError(f"coordinator address must be 'host:port', got {address!r}")
    rest = address[len("tcp://") :] if address.startswith("tcp://") else address
    if "://" in rest:
        raise ConfigError(f"only tcp:// addresses are supported, got {address!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address must be 'host:port' with a port in 1..65535, got {address!r}")
    return f"tcp://{host}:{int(port)}"


def parse_consistency(value: str) -> tuple[str, int]:
    """Parse ``"sync"``, ``"async"`` or ``"ssp:N"`` into (mode, bound).

    Example:
        parse_consistency("ssp:2")  # ('ssp', 2)
    """
    if value == "sync":
        return "sync", 0
    if value == "async":
        return "async", -1
    if isinstance(value, str) and value.startswith("ssp:") and value[4:].isdigit():
        return "ssp", int(value[4:])
    raise ConfigError(f"consistency must be 'sync', 'async' or 'ssp:N' with N >= 0, got {value!r}")


TRANSPORTS = ("auto", "tcp", "zmq")


def parse_transport(value: str, what: str = "transport") -> str:
    """``auto``: shared memory with servers on the same host, TCP otherwise; ``tcp``: always TCP
    (large dense arrays on the raw-socket bulk channel); ``zmq``: always TCP, in ZeroMQ frames.

    Example:
        parse_transport("tcp")  # "tcp"
    """
    if value not in TRANSPORTS:
        raise ConfigError(f"{what} must be one of {TRANSPORTS}, got {value!r}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise ConfigError(f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def from_env(env: Mapping[str, str] | None = None) -> WorkerEnv:
    """Read every ``PS_*`` variable (the only place that reads ``os.environ``).

    Example:
        from_env({"PS_COORDINATOR": "10.0.0.1:7000", "PS_RANK": "3"}).rank  # 3
    """
    env = os.environ if env is None else env
    defaults = Timeouts()
    timeouts = Timeouts(
        heartbeat_interval=_float(env, "PS_HEARTBEAT_INTERVAL", defaults.heartbeat_interval),
        heartbeat_timeout=_float(env, "PS_HEARTBEAT_TIMEOUT", defaults.heartbeat_timeout),
        request=_float(env, "PS_REQUEST_TIMEOUT", defaults.request),
        connect=_float(env, "PS_CONNECT_TIMEOUT", defaults.connect),
    )
    coordinator = env.get("PS_COORDINATOR") or None
    if coordinator is not None:
        try:
            coordinator = normalize_address(coordinator)
        except ConfigError as exc:
            raise ConfigError(f"PS_COORDINATOR: {exc}") from None
    consistency = env.get("PS_CONSISTENCY") or "async"
    try:
        parse_consistency(consistency)
    except ConfigError as exc:
        raise ConfigError(f"PS_CONSISTENCY: {exc}") from None
    token = env.get("PS_TOKEN") or None
    if token is None and env.get("PS_TOKEN_FILE"):
        token = read_token_file(env["PS_TOKEN_FILE"])
    return WorkerEnv(
        coordinator=coordinator,
        consistency=consistency,
        token=token,
        rank=_int(env, "PS_RANK"),
        num_workers=_int(env, "PS_NUM_WORKERS"),
        num_servers=_int(env, "PS_NUM_SERVERS"),
        timeouts=timeouts,
        log_level=env.get("PS_LOG_LEVEL", "INFO") or "INFO",
        data_dir=env.get("PS_DATA_DIR") or str(Path.home() / ".cache" / "paramserver"),
        transport=parse_transport(env.get("PS_TRANSPORT") or "auto", "PS_TRANSPORT"),
    )


def cluster_to_env(
    coordinator: str, num_workers: int, num_servers: int, timeouts: Timeouts, token: str | None
) -> dict[str, str]:
    """The ``PS_*`` variables that tell a worker process of a cluster (read back by
    :func:`from_env`): the coordinator's address, the cluster's size, the timeouts, and the
    token if the cluster has one.

    Example:
        cluster_to_env("tcp://10.0.0.1:7000", 4, 2, Timeouts(), None)["PS_NUM_WORKERS"]  # "4"
    """
    t = timeouts
    env = {
        "PS_COORDINATOR": coordinator,
        "PS_NUM_WORKERS": str(num_workers),
        "PS_NUM_SERVERS": str(num_servers),
        "PS_HEARTBEAT_INTERVAL": repr(t.heartbeat_interval),
        "PS_HEARTBEAT_TIMEOUT": repr(t.heartbeat_timeout),
        "PS_REQUEST_TIMEOUT": repr(t.request),
        "PS_CONNECT_TIMEOUT": repr(t.connect),
    }
    if token is not None:
        env["PS_TOKEN"] = token
    return env
