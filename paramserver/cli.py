"""``paramserver``: the command line.

``paramserver demo``                     the demo training run on a local cluster
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
import os
import sys
from collections.abc import Sequence

from paramserver.config import (
    Timeouts,
    from_env,
    normalize_address,
    parse_consistency,
    read_token_file,
)
from paramserver.errors import ConfigError, PSError

__all__ = ["main"]


def _add_timeouts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-interval", type=float, default=None, help="seconds between heartbeats"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds of silence before a node is declared dead",
    )
    p.add_argument("--request-timeout", type=float, default=None, help="default timeout of a call")
    p.add_argument(
        "--connect-timeout", type=float, default=None, help="timeout to join the cluster"
    )


def _pick(flag: float | None, default: float) -> float:
    return default if flag is None else flag


def _timeouts(args: argparse.Namespace) -> Timeouts:
    env = from_env().timeouts
    return Timeouts(
        heartbeat_interval=_pick(args.heartbeat_interval, env.heartbeat_interval),
        heartbeat_timeout=_pick(args.heartbeat_timeout, env.heartbeat_timeout),
        request=_pick(args.request_timeout, env.request),
        connect=_pick(args.connect_timeout, env.connect),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _refuse_exposed(host: str, insecure: bool, token: str | None, role: str) -> None:
    if not _is_loopback(host) and not insecure and token is None:
        raise ConfigError(
            f"{role}: refusing to bind {host} (beyond loopback) without a cluster token; set "
            "PS_TOKEN or pass --token-file, or pass --insecure to accept unauthenticated "
            "traffic on a trusted network"
        )


def _token(args: argparse.Namespace) -> str | None:
    """The cluster token: --token-file, else PS_TOKEN / PS_TOKEN_FILE. Never put on a command
    line or in a log."""
    if getattr(args, "token_file", None):
        return read_token_file(args.token_file)
    return from_env().token


def _add_token(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the cluster token (or set PS_TOKEN): every socket then uses CURVE",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paramserver", description="A parameter server for ML training."
    )
    p.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default: PS_LOG_LEVEL or INFO)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of a cluster")
    c.add_argument("--bind", default="127.0.0.1:7070", help="HOST:PORT to listen on (port 0: any)")
    c.add_argument("-s", "--servers", type=int, required=True, help="number of servers")
    c.add_argument("-w", "--workers", type=int, required=True, help="number of workers")
    c.add_argument("--insecure", action="store_true", help="allow binding beyond loopback")
    _add_token(c)
    c.add_argument(
        "--restore",
        default=None,
        help="resume from this checkpoint (its directory, or a root with LATEST)",
    )
    c.add_argument("--checkpoint-dir", default=None, help="write periodic checkpoints here")
    c.add_argument(
        "--checkpoint-every-clocks",
        type=int,
        default=None,
        help="write a checkpoint every N clocks (instead of every --checkpoint-every seconds)",
    )
    c.add_argument(
        "--checkpoint-every", type=float, default=None, help="seconds between periodic checkpoints"
    )
    c.add_argument(
        "--checkpoint-keep", type=int, default=None, help="how many periodic checkpoints to keep"
    )
    c.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _add_timeouts(c)

    s = sub.add_parser("server", help="run one server of a cluster")
    s.add_argument(
        "--coordinator", default=None, help="HOST:PORT of the coordinator (or PS_COORDINATOR)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    s.add_argument("--advertise", default=None, help="host name others reach this server by")
    s.add_argument(
        "--rank",
        type=int,
        default=None,
        help="take this server rank (a restarted server replaces the dead one of that rank)",
    )
    s.add_argument("--insecure", action="store_true", help="allow binding beyond loopback")
    _add_token(s)
    s.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _add_timeouts(s)

    r = sub.add_parser("run", help="start a local cluster and run a script once per worker")
    r.add_argument("-s", "--servers", type=int, default=2, help="number of servers (default 2)")
    r.add_argument("-w", "--workers", type=int, default=1, help="number of workers (default 1)")
    r.add_argument(
        "--consistency", default=None, help="default consistency of tables: sync, ssp:N, async"
    )
    _add_token(r)
    _add_timeouts(r)
    r.add_argument(
        "-m", dest="module", default=None, help="run a module (like python -m) instead of a file"
    )
    r.add_argument("script", nargs="?", help="the worker program (a Python file)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the worker program")

    d = sub.add_parser("demo", help="FTRL and DeepFM on MovieLens-100K on a local cluster")
    d.add_argument("-s", "--servers", type=int, default=2)
    d.add_argument("-w", "--workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--out", default="paramserver-demo", help="folder for the JSON and the plot")

    k = sub.add_parser("checkpoint", help="look at checkpoints")
    ksub = k.add_subparsers(dest="action", required=True)
    ki = ksub.add_parser("inspect", help="list a checkpoint's tables, rows, bytes and clock")
    ki.add_argument("path", help="a checkpoint directory, or a root with a LATEST file")
    ki.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser(
        "train", help="train a ready model: logreg, deepfm, word2vec, mlp", add_help=False
    )
    t.add_argument("model", choices=["logreg", "deepfm", "word2vec", "mlp"])
    t.add_argument("options", nargs=argparse.REMAINDER, help="the model's options (--help)")
    return p


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _log_level(args: argparse.Namespace) -> str:
    quiet = args.command in ("demo", "train")  # their own output says what happens
    level = str(args.log_level or ("WARNING" if quiet else from_env().log_level)).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


def _bind(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--bind must be HOST:PORT with a port in 0..65535, got {value!r}")
    return host


def _inspect_checkpoint(path: str, *, as_json: bool) -> int:
    import json
    import time

    from paramserver.server.checkpoint import describe

    info = describe(path)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"] or 0))
    print(
        f"{info['path']}: clock {info['clock']}, written {created} by {info['servers']} servers "
        f"for {info['workers']} workers (format {info['format']})"
    )
    print(
        f"{'table':<24} {'kind':<7} {'shape':<12} {'optimizer':<9} {'consistency':<11} "
        f"{'rows':>12} {'bytes':>14}"
    )
    for name, t in info["tables"].items():
        shape = "x".join(str(d) for d in t["shape"])
        print(
            f"{name:<24} {t['kind']:<7} {shape:<12} {t['optimizer']:<9} {t['consistency']:<11} "
            f"{t['rows']:>12,} {t['bytes']:>14,}"
        )
    return 0


def _command(args: argparse.Namespace) -> int:
    if args.command == "coordinator":
        from paramserver.launch import serve_coordinator

        token = _token(args)
        _refuse_exposed(_bind(args.bind), args.insecure, token, "coordinator")
        serve_coordinator(
            args.bind,
            args.servers,
            args.workers,
            _timeouts(args),
            ready_fd=args.ready_fd,
            parent_pid=args.parent_pid,
            restore=args.restore,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            checkpoint_keep=args.checkpoint_keep,
            token=token,
            checkpoint_every_clocks=args.checkpoint_every_clocks,
        )
        return 0
    if args.command == "server":
        from paramserver.launch import serve_server

        address = args.coordinator or from_env().coordinator
        if not address:
            raise ConfigError("server: pass --coordinator HOST:PORT or set PS_COORDINATOR")
        token = _token(args)
        _refuse_exposed(args.host, args.insecure, token, "server")
        serve_server(
            normalize_address(address),
            args.host,
            args.port,
            _timeouts(args),
            parent_pid=args.parent_pid,
            advertise=args.advertise,
            token=token,
            rank=args.rank,
        )
        return 0
    if args.command == "run":
        from paramserver.launch import run_job

        if args.consistency is not None:
            parse_consistency(args.consistency)  # refuse a bad value before starting anything
        if (args.module is None) == (args.script is None):
            raise ConfigError("run: give a worker program file or -m MODULE (one of them)")
        program = ["-m", args.module] if args.module else [args.script]
        return run_job(
            [*program, *args.args],
            servers=args.servers,
            workers=args.workers,
            consistency=args.consistency,
            timeouts=_timeouts(args),
            log_level=args.log_level or "WARNING",
            token=_token(args),
        )
    if args.command == "checkpoint":
        return _inspect_checkpoint(args.path, as_json=args.json)
    if args.command == "demo":
        from pathlib import Path

        from paramserver.models.demo import main as demo

        return demo(args.servers, args.workers, args.epochs, Path(args.out))
    if args.command == "train":
        import importlib

        model = importlib.import_module(f"paramserver.models.{args.model}")
        return int(model.main(args.options))
    raise ConfigError(f"unknown command {args.command!r}")


def _split_module(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``run ... -m MODULE ARGS``: everything after MODULE belongs to the program (argparse
    cannot tell a program's options from ours there)."""
    if "run" not in argv:
        return argv, None
    start = argv.index("run") + 1
    for j in range(start, len(argv) - 1):
        if argv[j] == "-m":
            return argv[: j + 2], argv[j + 2 :]
        if argv[j].endswith(".py") or os.path.isfile(argv[j]):
            break  # a program file: what follows is its own
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paramserver`` command; returns the exit code.

    Exit codes: 0 success; 1 a system error (an address in use); 2 bad settings or a cluster
    error; 130 Ctrl-C; ``run`` returns the first failed worker's code.

    Example:
        main(["coordinator", "--bind", "127.0.0.1:7070", "-s", "2", "-w", "4"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, module_args = _split_module(argv)
    args = _parser().parse_args(argv)
    if module_args is not None:
        args.args = module_args
    try:
        _setup_logging(_log_level(args), args.command)
        return _command(args)
    except PSError as exc:
        print(f"paramserver {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"paramserver {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
