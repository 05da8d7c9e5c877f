"""``scripts/hosts.sh``: emulated hosts (tests/hosts.py) by hand, for trying a many-hosts
cluster out. The bed it makes stays until ``down``; sweeps by test runs leave it alone.

    scripts/hosts.sh up 3 --rate 1gbit          # h0, h1, h2 at 10.251.0.1-3
    scripts/hosts.sh exec h1 -- hostname        # a command inside a host, in this directory
    scripts/hosts.sh cut h1 --how drop          # and reconnect h1, kill h1, status
    scripts/hosts.sh down
"""

from __future__ import annotations

import argparse
import os
import sys

from tests.hosts import Bed, BedError, Host, attach, sweep, up

__all__ = ["main"]


def _host(bed: Bed, name: str) -> Host:
    for h in bed:
        if name in (h.name, h.address):
            return h
    raise BedError(f"no host {name!r} in the bed; there are {[h.name for h in bed]}")


def main(argv: list[str] | None = None) -> int:
    """``scripts/hosts.sh up 3 --rate 1gbit | status | exec h0 -- CMD | cut h1 | reconnect h1 |
    kill h1 | down``."""
    p = argparse.ArgumentParser(prog="scripts/hosts.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up", help="make N emulated hosts (h0, h1, ...)")
    u.add_argument("count", type=int)
    u.add_argument("--rate", default=None, help="link rate of every host, e.g. 1gbit")
    u.add_argument("--delay", default=None, help="delay of every link, e.g. 1ms (needs netem)")
    sub.add_parser("down", help="stop everything in the hosts and remove them")
    sub.add_parser("status", help="the hosts, their addresses, rates and processes")
    e = sub.add_parser("exec", help="run a command inside a host: exec h0 -- CMD ...")
    e.add_argument("host")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    for name in ("cut", "reconnect", "kill"):
        s = sub.add_parser(name, help=f"{name} a host")
        s.add_argument("host")
        if name == "cut":
            s.add_argument("--how", choices=["drop", "down"], default="drop")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            bed = up(args.count, rate=args.rate, delay=args.delay, manual=True)
            for h in bed:
                print(f"{h.name} {h.address}  (scripts/hosts.sh exec {h.name} -- CMD)")
        elif args.action == "down":
            print("removed:", " ".join(sweep(manual=True)) or "nothing")
        elif args.action == "status":
            for h in attach():
                print(f"{h.name} {h.address} rate={h.rate} delay={h.delay} pids={sorted(h.pids())}")
        elif args.action == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise BedError("exec needs a command: exec h0 -- CMD ...")
            argv_ = _host(attach(), args.host).command(cmd)
            os.execvp(argv_[0], argv_)
        else:
            h = _host(attach(), args.host)
            h.state = "cut" if args.action == "reconnect" else "up"  # its state lives here only
            if args.action == "cut":
                h.cut(args.how)
            else:
                getattr(h, args.action)()
    except BedError as exc:
        print(f"hosts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
