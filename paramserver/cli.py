"""``paramserver``: the command line.

``paramserver demo``                     the demo training run on a local cluster
``paramserver run -s 2 -w 4 train.py``   a local cluster plus one process per worker
``paramserver coordinator --bind H:P``   the coordinator of a multi-host cluster
``paramserver server --coordinator H:P`` one server of a multi-host cluster
``paramserver status --coordinator H:P`` nodes, tables, clocks, traffic, staleness (``--watch``)
``paramserver k8s manifest -s 4 -w 16``  Kubernetes manifests for a cluster

Flags map one-to-one onto the fields of :class:`paramserver.config.Timeouts`; a flag overrides the
matching ``PS_*`` variable, which overrides the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paramserver.config import (
    CheckpointPolicy,
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


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--restore",
        default=None,
        help="resume from this checkpoint (its directory, or a root with LATEST)",
    )
    p.add_argument("--checkpoint-dir", default=None, help="write periodic checkpoints here")
    p.add_argument(
        "--checkpoint-every-clocks",
        type=int,
        default=None,
        help="write a checkpoint every N clocks (instead of every --checkpoint-every seconds)",
    )
    p.add_argument(
        "--checkpoint-every", type=float, default=None, help="seconds between periodic checkpoints"
    )
    p.add_argument(
        "--checkpoint-keep", type=int, default=None, help="how many periodic checkpoints to keep"
    )
    # the policy's last field, for a launcher handing a whole CheckpointPolicy to a coordinator
    p.add_argument("--checkpoint-timeout", type=float, default=None, help=argparse.SUPPRESS)


def _checkpoints(args: argparse.Namespace) -> CheckpointPolicy | None:
    """The checkpoint policy the flags give (None without --checkpoint-dir)."""
    return CheckpointPolicy.from_settings(
        args.checkpoint_dir,
        every_seconds=args.checkpoint_every,
        keep=args.checkpoint_keep,
        every_clocks=args.checkpoint_every_clocks,
        timeout=args.checkpoint_timeout,
    )


def _add_coordinator(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator", default=None, help="HOST:PORT of the coordinator (or PS_COORDINATOR)"
    )


def _add_token(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the cluster token (or set PS_TOKEN): every socket then uses CURVE",
    )


_REPLICATION = "copies of every key range and dense table (default 1; at most --servers)"


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
    c.add_argument("--replication", type=int, default=1, help=_REPLICATION)
    c.add_argument("--insecure", action="store_true", help="allow binding beyond loopback")
    _add_token(c)
    _add_checkpoint_args(c)
    c.add_argument(
        "--exit-when-done",
        action="store_true",
        help="once every worker left: final checkpoint, stop the servers, exit 0",
    )
    c.add_argument(
        "--restart-grace",
        type=float,
        default=300.0,
        help="with --exit-when-done: seconds a dead worker may take to come back (default 300)",
    )
    c.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument(
        "--journal",
        default=None,
        help="file where the coordinator journals membership, tables, leases and checkpoints; "
        "a coordinator restarted with the same file (and address) carries on the job",
    )
    c.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _add_metrics_args(c)
    _add_timeouts(c)

    s = sub.add_parser("server", help="run one server of a cluster")
    _add_coordinator(s)
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
    r.add_argument("--replication", type=int, default=1, help=_REPLICATION)
    r.add_argument(
        "--consistency", default=None, help="default consistency of tables: sync, ssp:N, async"
    )
    _add_checkpoint_args(r)
    _add_token(r)
    _add_timeouts(r)
    r.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="the coordinator serves Prometheus metrics at http://127.0.0.1:PORT/metrics "
        "(needs paramserver[ops])",
    )
    r.add_argument(
        "-m", dest="module", default=None, help="run a module (like python -m) instead of a file"
    )
    r.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local processes (default) or Ray actors on a Ray cluster (RAY_ADDRESS or local)",
    )
    _add_ray_resources(r)
    r.add_argument("script", nargs="?", help="the worker program (a Python file)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the worker program")

    d = sub.add_parser("demo", help="FTRL and DeepFM on MovieLens-100K on a local cluster")
    d.add_argument("-s", "--servers", type=int, default=2)
    d.add_argument("-w", "--workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--out", default="paramserver-demo", help="folder for the JSON and the plot")
    d.add_argument(
        "--examples",
        type=int,
        default=100_000,
        help="examples generated when MovieLens-100K cannot be fetched (synthetic data)",
    )

    k = sub.add_parser("checkpoint", help="look at checkpoints")
    ksub = k.add_subparsers(dest="action", required=True)
    ki = ksub.add_parser("inspect", help="list a checkpoint's tables, rows, bytes and clock")
    ki.add_argument("path", help="a checkpoint directory, or a root with a LATEST file")
    ki.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser(
        "train",
        help="train a ready model: logreg, deepfm, word2vec, mlp",
        description="Train a ready model on a local cluster (or as one worker under "
        "paramserver run). 'paramserver train MODEL --help' lists the model's options.",
    )
    t.add_argument("model", choices=["logreg", "deepfm", "word2vec", "mlp"])
    t.add_argument("options", nargs=argparse.REMAINDER, help="the model's options (--help)")
    _add_ops_commands(sub)
    return p


_RAY_RESOURCES = (
    ("server", "cpus"), ("server", "memory"), ("worker", "cpus"), ("worker", "memory"),
    ("worker", "gpus"),
)  # fmt: skip


def _add_ray_resources(p: argparse.ArgumentParser) -> None:
    for role, what in _RAY_RESOURCES:
        p.add_argument(
            f"--{role}-{what}",
            type=str if what == "memory" else float,
            default=None,
            help=f"--backend ray: {what} each {role} actor claims"
            + (" (e.g. 4Gi, 512M)" if what == "memory" else ""),
        )


def _ray_resources(args: argparse.Namespace, role: str) -> Any:
    from paramserver.ray import Resources, parse_memory

    memory = getattr(args, f"{role}_memory")
    return Resources(
        cpus=getattr(args, f"{role}_cpus"),
        memory=None if memory is None else parse_memory(memory),
        gpus=getattr(args, f"{role}_gpus", None),
    )


def _run_ray(args: argparse.Namespace, program: list[str]) -> int:
    from paramserver.ray import run_job as run_ray_job

    checkpoints = None
    if args.checkpoint_dir is not None:
        given = {
            "every_seconds": args.checkpoint_every,
            "keep": args.checkpoint_keep,
            "every_clocks": args.checkpoint_every_clocks,
        }
        checkpoints = CheckpointPolicy(
            args.checkpoint_dir, **{k: v for k, v in given.items() if v is not None}
        )
    elif any(
        v is not None
        for v in (args.checkpoint_every, args.checkpoint_keep, args.checkpoint_every_clocks)
    ):
        raise ConfigError("run: --checkpoint-every, -keep and -every-clocks need --checkpoint-dir")
    return run_ray_job(
        [*program, *args.args],
        servers=args.servers,
        workers=args.workers,
        consistency=args.consistency,
        timeouts=_timeouts(args),
        token=_token(args),
        restore=args.restore,
        checkpoints=checkpoints,
        server_resources=_ray_resources(args, "server"),
        worker_resources=_ray_resources(args, "worker"),
    )


# ---- operations: status, metrics, Kubernetes --------------------------------------------------


def _add_metrics_args(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics over HTTP on this port (needs paramserver[ops])",
    )
    c.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")


def _add_ops_commands(sub: Any) -> None:
    from paramserver.k8s import add_manifest_arguments  # no package import beyond errors
    from paramserver.launch.drain import add_drain_arguments

    st = sub.add_parser("status", help="show a running cluster: nodes, tables, clocks, traffic")
    _add_coordinator(st)
    st.add_argument("--json", action="store_true", help="print the status as one JSON object")
    st.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    st.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")

    add_drain_arguments(sub.add_parser("drain", help="move a server's keys away, then stop it"))
    k = sub.add_parser("k8s", help="Kubernetes manifests")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    m = ksub.add_parser("manifest", help="write a claim, Services and the roles' Jobs (YAML)")
    add_manifest_arguments(m)


def _fetch_status(address: str, timeout: float) -> dict[str, Any]:
    from paramserver.errors import PSTimeoutError
    from paramserver.wire.transport import Endpoint, Security, new_context

    token = from_env().token
    ctx = new_context()
    ep = Endpoint(ctx, timeout, security=Security.from_token(token) if token else None)
    started = time.monotonic()
    try:
        ep.connect("coordinator", address)
        fut = ep.request(
            "coordinator", {"kind": "status"}, what=f"status of the coordinator at {address}"
        )
        try:
            status = fut.result(timeout)["status"]
        except PSTimeoutError:
            waited = time.monotonic() - started
            raise PSTimeoutError(
                f"nothing answers at {address}: no status of the coordinator after "
                f"{waited:.3g}s (--timeout); is a coordinator running there, with the same token?"
            ) from None
        assert isinstance(status, dict)
        return status
    finally:
        ep.close()
        ctx.term()


def _status(args: argparse.Namespace) -> int:
    from paramserver.metrics import format_status

    address = args.coordinator or from_env().coordinator
    if not address:
        raise ConfigError("status: pass --coordinator HOST:PORT or set PS_COORDINATOR")
    address = normalize_address(address)
    shown = 0
    while True:
        status = _fetch_status(address, args.timeout)
        text = json.dumps(status, sort_keys=True) if args.json else format_status(status)
        if args.watch and not args.json and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # refresh in place
        print(text, flush=True)
        shown += 1
        if not args.watch or (args.count is not None and shown >= args.count):
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _ops_command(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(args)
    from paramserver.k8s import manifest_from_arguments

    text = manifest_from_arguments(args)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _log_level(args: argparse.Namespace) -> str:
    # their own output says what happens
    quiet = args.command in ("demo", "train", "status", "k8s", "drain")
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
    from paramserver.checkpoint import describe

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
    if args.command in ("status", "k8s"):
        return _ops_command(args)
    if args.command == "drain":  # launch/drain.py set it
        return int(args.run(args))
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
            listen_fd=args.listen_fd,
            journal=args.journal,
            replication=args.replication,
            parent_pid=args.parent_pid,
            restore=args.restore,
            checkpoints=_checkpoints(args),
            token=token,
            exit_when_done=args.restart_grace if args.exit_when_done else None,
            **({"metrics_port": args.metrics_port} if args.metrics_port is not None else {}),
            **({"metrics_host": args.metrics_host} if args.metrics_port is not None else {}),
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
        if args.metrics_port is not None and args.backend == "ray":
            raise ConfigError(
                "run: --metrics-port is for the local backend; with --backend ray, run "
                "`paramserver coordinator --metrics-port` or use Ray's own dashboard"
            )
        if (args.module is None) == (args.script is None):
            raise ConfigError("run: give a worker program file or -m MODULE (one of them)")
        program = ["-m", args.module] if args.module else [args.script]
        if args.backend == "ray":
            if args.replication != 1:
                raise ConfigError("run: --replication applies to --backend local only")
            return _run_ray(args, program)
        given = [f"--{r}-{w}" for r, w in _RAY_RESOURCES if getattr(args, f"{r}_{w}") is not None]
        if given:
            raise ConfigError(f"run: {', '.join(given)} apply to --backend ray only")
        return run_job(
            [*program, *args.args],
            servers=args.servers,
            workers=args.workers,
            consistency=args.consistency,
            timeouts=_timeouts(args),
            log_level=args.log_level or "WARNING",
            token=_token(args),
            restore=args.restore,
            checkpoints=_checkpoints(args),
            metrics_port=args.metrics_port,
            replication=args.replication,
        )
    if args.command == "checkpoint":
        return _inspect_checkpoint(args.path, as_json=args.json)
    if args.command == "demo":
        from paramserver.models.demo import main as demo

        return demo(args.servers, args.workers, args.epochs, Path(args.out), args.examples)
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
        # one line, no traceback (``run`` says it itself and returns 130 without raising)
        print(f"paramserver {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
