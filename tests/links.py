"""A link of the emulated hosts (tests/hosts.py): the tc commands that shape it (rate, delay)
and cut one path of it, and the one way the bed runs a command (a timeout, a clear error).

Example:
    shape(host.veth, None, parse_rate("1gbit"), None, drop_from=["10.251.0.1"])  # h0's vanish
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

__all__ = ["COMMAND_TIMEOUT", "BedError", "execute", "parse_delay", "parse_rate", "shape"]

COMMAND_TIMEOUT = 10.0
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$", re.IGNORECASE)


class BedError(RuntimeError):
    """The bed could not do what it was asked (the message says what and how to fix it)."""


def execute(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end (at most COMMAND_TIMEOUT s); BedError if it fails and ``check``."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BedError(f"`{' '.join(argv)}` did not finish within {COMMAND_TIMEOUT}s") from None
    except FileNotFoundError:
        raise BedError(f"`{argv[0]}` is not installed (iproute2 / util-linux)") from None
    if check and res.returncode != 0:
        raise BedError(f"`{' '.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def parse_rate(rate: str | int) -> int:
    """Bits per second of a tc-style rate (``"1gbit"``, ``"500mbit"``) or of an int."""
    if isinstance(rate, int) and not isinstance(rate, bool) and rate > 0:
        return rate
    m = _RATE.match(rate) if isinstance(rate, str) else None
    if m is None or float(m[1]) <= 0:
        raise BedError(f"rate must be like '100mbit', '1gbit' or bits/s > 0, got {rate!r}")
    unit = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[m[2].lower()]
    return round(float(m[1]) * unit)


def parse_delay(delay: str | float) -> float:
    """Seconds of a tc-style delay (``"2ms"``) or of a float."""
    if isinstance(delay, int | float) and not isinstance(delay, bool) and delay >= 0:
        return float(delay)
    m = _DELAY.match(delay) if isinstance(delay, str) else None
    if m is None:
        raise BedError(f"delay must be like '2ms', '500us' or seconds >= 0, got {delay!r}")
    return float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m[2].lower()]


def shape(
    dev: str,
    netns: str | None,
    rate: int | None,
    delay: float | None,
    drop_from: Sequence[str] = (),
) -> None:
    """Shape the egress of ``dev``: tbf at ``rate`` bits/s, packets from the addresses
    ``drop_from`` dropped (an htb class holding a blackhole: the kernel may have neither netem
    nor the drop action), then netem ``delay`` seconds."""
    tc = ["tc", *(["-n", netns] if netns else [])]
    execute([*tc, "qdisc", "del", "dev", dev, "root"], check=False)  # none there is fine
    parent = ["root"]
    if rate is not None:
        # a burst of 2 ms of traffic, at least 128 KiB (a 64 KiB TSO packet must fit whole)
        burst = max(rate // 8 // 500, 128 * 1024)
        execute([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                 "rate", f"{rate}bit", "burst", str(burst), "latency", "20ms"])  # fmt: skip
        parent = ["parent", "1:1"]
    if drop_from:
        execute([*tc, "qdisc", "add", "dev", dev, *parent, "handle", "2:", "htb", "default", "1"])
        for cls in ("2:1", "2:2"):  # 2:1 passes (the tbf above shapes), 2:2 drops
            execute([*tc, "class", "add", "dev", dev, "parent", "2:", "classid", cls, "htb",
                     "rate", "100gbit"])  # fmt: skip
        execute([*tc, "qdisc", "add", "dev", dev, "parent", "2:2", "blackhole"])
        for address in drop_from:
            execute([*tc, "filter", "add", "dev", dev, "parent", "2:", "protocol", "ip", "prio",
                     "1", "u32", "match", "ip", "src", f"{address}/32", "flowid", "2:2"])  # fmt: skip
        parent = ["parent", "2:1"]
    if delay:
        res = execute([*tc, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "netem",
                       "delay", f"{round(delay * 1e6)}us"], check=False)  # fmt: skip
        if res.returncode != 0:
            raise BedError(
                f"cannot delay the link of {dev}: {res.stderr.strip()} (this kernel may lack "
                "the netem qdisc, CONFIG_NET_SCH_NETEM); leave delay unset here"
            )
