"""``paramserver``: the command line.

``paramserver demo``                     the demo training run on a local cluster
``paramserver train MODEL [options]``    a ready program: logreg, deepfm, word2vec, mlp
``paramserver run -s 2 -w 4 train.py``   a local cluster plus one process per worker
``paramserver coordinator --bind H:P``   the coordinator of a multi-host cluster
``paramserver server --coordinator H:P`` one server of a multi-host cluster

Flags map one-to-one onto the fields of :class:`paramserver.config.Timeouts`; a flag overrides the
matching ``PS_*`` variable, which overrides the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence

from paramserver.config import Timeouts, from_env, normalize_address
from paramserver.errors import ConfigError, PSError

__all__ = ["main"]


def _add_timeouts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat-interval", type=float, default=None, help="seconds between heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="seconds of silence before a node is declared dead")
    p.add_argument("--request-timeout", type=float, default=None, help="default timeout of a call")
    p.add_argument("--connect-timeout", type=float, default=None, help="timeout to join the cluster")


def _timeouts(args: argparse.Namespace) -> Timeouts:
    env = from_env().timeouts

    def pick(flag: float | None, default: float) -> float:
        return default if flag is None else flag

    return Timeouts(
        heartbeat_interval=pick(args.heartbeat_interval, env.heartbeat_interval),
        heartbeat_timeout=pick(args.heartbeat_timeout, env.heartbeat_timeout),
        request=pick(args.request_timeout, env.request),
        connect=pick(args.connect_timeout, env.connect),
    )


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_exposed(host: str, insecure: bool, role: str) -> None:
    if not _is_loopback(host) and not insecure:
        raise ConfigError(
            f"{role}: refusing to bind {host} (beyond loopback) without security; pass --insecure "
            "to accept unauthenticated traffic on a trusted network")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paramserver", description="A parameter server for ML training.")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: PS_LOG_LEVEL or INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of a cluster")
    c.add_argument("--bind", default="127.0.0.1:7070", help="HOST:PORT to listen on (port 0: any)")
    c.add_argument("-s", "--servers", type=int, required=True, help="number of servers")
    c.add_argument("-w", "--workers", type=int, required=True, help="number of workers")
    c.add_argument("--insecure", action="store_true", help="allow binding beyond loopback")
    c.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _add_timeouts(c)

    s = sub.add_parser("server", help="run one server of a cluster")
    s.add_argument("--coordinator", default=None, help="HOST:PORT of the coordinator (or PS_COORDINATOR)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    s.add_argument("--advertise", default=None, help="host name others reach this server by")
    s.add_argument("--insecure", action="store_true", help="allow binding beyond loopback")
    s.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _add_timeouts(s)

    r = sub.add_parser("run", help="start a local cluster and run a script once per worker")
    r.add_argument("-s", "--servers", type=int, default=2, help="number of servers (default 2)")
    r.add_argument("-w", "--workers", type=int, default=1, help="number of workers (default 1)")
    r.add_argument("--consistency", default=None, help="default consistency of tables: sync, ssp:N, async")
    _add_timeouts(r)
    r.add_argument("script", help="the worker program (a Python file)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the worker program")

    d = sub.add_parser("demo", help="FTRL and DeepFM on MovieLens-100K on a local cluster")
    d.add_argument("-s", "--servers", type=int, default=2)
    d.add_argument("-w", "--workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--out", default="paramserver-demo", help="folder for the JSON and the plot")

    t = sub.add_parser("train", help="train a ready model: logreg, deepfm, word2vec, mlp",
                       add_help=False)
    t.add_argument("model", choices=["logreg", "deepfm", "word2vec", "mlp"])
    t.add_argument("options", nargs=argparse.REMAINDER, help="the model's options (--help)")
    return p


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paramserver`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    quiet = args.command in ("demo", "train")  # their own output says what happens
    level = args.log_level or ("WARNING" if quiet else from_env().log_level)
    _setup_logging(level, args.command)
    try:
        if args.command == "coordinator":
            from paramserver.launch import serve_coordinator

            host, _, port = args.bind.rpartition(":")
            if not port.isdigit():
                raise ConfigError(f"--bind must be HOST:PORT, got {args.bind!r}")
            _refuse_exposed(host, args.insecure, "coordinator")
            serve_coordinator(args.bind, args.servers, args.workers, _timeouts(args),
                              ready_fd=args.ready_fd, parent_pid=args.parent_pid)
            return 0
        if args.command == "server":
            from paramserver.launch import serve_server

            address = args.coordinator or from_env().coordinator
            if not address:
                raise ConfigError("server: pass --coordinator HOST:PORT or set PS_COORDINATOR")
            _refuse_exposed(args.host, args.insecure, "server")
            serve_server(normalize_address(address), args.host, args.port, _timeouts(args),
                         parent_pid=args.parent_pid, advertise=args.advertise)
            return 0
        if args.command == "run":
            from paramserver.launch import run_job

            return run_job([args.script, *args.args], servers=args.servers, workers=args.workers,
                           consistency=args.consistency, timeouts=_timeouts(args),
                           log_level=args.log_level or "WARNING")
        if args.command == "demo":
            from pathlib import Path

            from paramserver.models.demo import main as demo

            return demo(args.servers, args.workers, args.epochs, Path(args.out))
        if args.command == "train":
            import importlib

            program = importlib.import_module(f"paramserver.models.{args.model}")
            return int(program.main(args.options))
    except PSError as exc:
        print(f"paramserver {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
