"""The emulated-hosts bed itself (tests/hosts.py): hosts reach each other and nothing else,
each has its own /dev/shm and name, links hold their rate, a host can be cut off (or one path to
it), killed and brought back, and nothing of a bed outlives it, not even when its owner was SIGKILLed.

Connectivity is checked with Python sockets run inside the hosts (there is no ``ping`` here)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import hosts, procs
from tests.timing import wait_until

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., hosts.Bed]

# accepts connections one after another; answers each with its hostname and what it was sent;
# after `count` connections (0: forever) prints the bytes/s of the last one's payload
SERVER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5000))
s.listen()
print("listening", flush=True)
count = int(sys.argv[1])
n = 0
while count == 0 or n < count:
    c, peer = s.accept()
    n += 1
    first = c.recv(1 << 16)
    got, start = len(first), time.perf_counter()
    while b := c.recv(1 << 20):
        got += len(b)
    seconds = time.perf_counter() - start
    c.sendall(f"{socket.gethostname()} {peer[0]} {first[:4].decode()} {got}".encode())
    c.close()
    print(got, seconds, flush=True)
"""

# connects to argv[1]:5000 (retrying while refused, for `tries` s), sends argv[2] bytes, prints
# the answer, or the errno name / "timeout" of the failure
CLIENT = """
import errno, socket, sys, time
host, size, tries = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + tries
while True:
    try:
        s = socket.create_connection((host, 5000), timeout=1.0)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            print("ECONNREFUSED"); sys.exit(0)
        time.sleep(0.05)
    except (TimeoutError, socket.timeout):
        print("timeout"); sys.exit(0)
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, str(exc))); sys.exit(0)
s.settimeout(30)
s.sendall(b"ping" + b"x" * max(0, size - 4))
s.shutdown(socket.SHUT_WR)
print(s.recv(1 << 16).decode())
"""


def serve(host: hosts.Host, count: int = 0) -> subprocess.Popen[str]:
    proc = host.popen([sys.executable, "-c", SERVER, str(count)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
    return proc


def connect(host: hosts.Host, to: str, size: int = 4, tries: float = 5.0) -> str:
    """The answer of a server at ``to`` to ``size`` bytes sent from ``host``, or the error."""
    out = host.run([sys.executable, "-c", CLIENT, to, str(size), str(tries)], timeout=60)
    return out.stdout.strip()


def test_two_hosts_reach_each_other_by_name_and_nothing_else(emulated_hosts: Make) -> None:
    bed = emulated_hosts(2)
    serve(bed[1])
    assert connect(bed[0], "h1") == "h1 10.251.0.1 ping 4"  # the peer is h0's own address
    assert connect(bed[0], bed[1].address) == "h1 10.251.0.1 ping 4"
    # no route out of the bed: an outside address is unreachable at once, not after a timeout
    assert connect(bed[0], "192.0.2.1", tries=0) == "ENETUNREACH"
    # and the bed's addresses exist only inside it: the bridge has none, nor has this machine
    addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    assert hosts.SUBNET not in addrs
    assert [bed[i].run(["hostname"], timeout=10).stdout for i in (0, 1)] == ["h0\n", "h1\n"]


def test_dev_shm_is_private_to_each_host(emulated_hosts: Make) -> None:
    bed = emulated_hosts(2)
    name = f"/dev/shm/psh-test-{secrets.token_hex(4)}"
    bed[0].run(["sh", "-c", f"echo on-h0 > {name}"], timeout=10)
    try:
        # another process on the same host shares it; another host and this machine do not
        assert bed[0].run(["cat", name], timeout=10).stdout == "on-h0\n"
        assert bed[1].run(["cat", name], timeout=10, check=False).returncode != 0
        assert not Path(name).exists()
    finally:
        Path(name).unlink(missing_ok=True)


def test_a_shaped_link_holds_its_rate_both_ways(emulated_hosts: Make) -> None:
    bed = emulated_hosts(2)
    bed[0].shape("100mbit")  # bed[1] unlimited: the transfers meet only h0's limit
    size = 6_000_000  # about 0.5 s at 100 Mbit/s
    for sender, receiver in ((bed[0], bed[1]), (bed[1], bed[0])):
        server = serve(receiver, count=1)
        answer = connect(sender, receiver.name, size=size)
        assert answer.endswith(f" {size}"), answer
        out, _ = server.communicate(timeout=30)
        got, seconds = out.split()
        rate = int(got) * 8 / float(seconds) / 1e8
        # a property of the bed, on a busy machine: the limit holds, and not far below it
        assert 0.25 < rate < 1.2, f"{sender.name} -> {receiver.name}: {rate:.2f} x 100 Mbit/s"


@pytest.mark.parametrize("how", ["drop", "down"])
def test_a_cut_off_host_cannot_be_reached_and_comes_back(emulated_hosts: Make, how: str) -> None:
    bed = emulated_hosts(2)
    serve(bed[1])
    assert connect(bed[0], "h1") == "h1 10.251.0.1 ping 4"
    bed[1].cut(how)
    assert connect(bed[0], "h1", tries=0) in ("timeout", "EHOSTUNREACH")
    # its own sends: dropped silently, or refused at once with its interface down
    assert connect(bed[1], "h0", tries=0) == ("timeout" if how == "drop" else "ENETUNREACH")
    bed[1].reconnect()
    assert connect(bed[0], "h1") == "h1 10.251.0.1 ping 4"
    assert bed[1].rate is None and len(bed[1].pids()) == 1  # the server lived on


def test_a_cut_path_loses_only_what_one_host_sends_to_another(emulated_hosts: Make) -> None:
    bed = emulated_hosts(3, rate="1gbit")
    serve(bed[1])
    serve(bed[2])
    bed[1].cut_path(bed[0])
    assert connect(bed[0], "h1", tries=0) == "timeout"  # h0's SYN vanishes on its way to h1
    assert connect(bed[2], "h1") == "h1 10.251.0.3 ping 4"  # every other path is as it was
    assert connect(bed[0], "h2") == "h2 10.251.0.1 ping 4"
    bed[1].cut_path(bed[0], cut=False)
    assert connect(bed[0], "h1") == "h1 10.251.0.1 ping 4"


def test_a_killed_host_loses_every_process_and_comes_back_empty(emulated_hosts: Make) -> None:
    bed = emulated_hosts(2, rate="1gbit")
    server = serve(bed[1])
    # a grandchild in a session of its own, that no pid list of the test holds
    bed[1].run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"], timeout=10)
    bed[1].run(["sh", "-c", "echo x > /dev/shm/psh-test"], timeout=10)
    assert len(bed[1].pids()) == 2
    bed[1].kill()
    assert bed[1].pids() == set() and server.poll() == -signal.SIGKILL
    assert connect(bed[0], "h1", tries=0) in ("timeout", "EHOSTUNREACH")
    bed[1].reconnect()  # as after a reboot: nothing runs, /dev/shm is empty
    assert bed[1].run(["ls", "/dev/shm"], timeout=10).stdout == ""
    serve(bed[1])
    assert connect(bed[0], "h1") == "h1 10.251.0.1 ping 4"


def _left(run: str) -> list[str]:
    """Whatever of bed ``run`` still exists: namespaces, links, mounts, its folder."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    folder = hosts.STATE_ROOT / run
    return [
        *(line for line in netns.splitlines() if f"{hosts.PREFIX}{run}" in line),
        *(line for line in links.splitlines() if f"{hosts.PREFIX}{run}" in line),
        *(line for line in mounts.splitlines() if str(folder) in line),
        *([str(folder)] if folder.exists() else []),
    ]


def test_close_leaves_no_namespace_link_mount_or_process(emulated_hosts: Make) -> None:
    bed = emulated_hosts(3, rate="1gbit")
    serve(bed[0])
    sleeper = bed[1].popen(["sleep", "300"])
    assert bed[1].pids() == {sleeper.pid}  # popen returns once it is inside the host
    bed[2].run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"], timeout=10)
    pids = bed[0].pids() | bed[1].pids() | bed[2].pids()
    assert len(pids) == 3 and len(_left(bed.run)) == 3 + 4 + 6 + 1
    bed.close()
    assert _left(bed.run) == []
    assert all(procs.gone(pid) for pid in pids)
    bed.close()  # twice is fine


OWNER = """
import sys, time
from tests import hosts, procs
from tests.timing import wait_until
with hosts.up(2) as bed:
    sleeper = bed[1].popen(["sleep", "300"])
    print(bed.run, sleeper.pid, flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_bed_whose_owner_dies_is_removed(sig: signal.Signals) -> None:
    """Ctrl-C: the owner closes its bed itself. SIGKILL: the next bed's sweep removes it."""
    if (reason := hosts.unavailable()) is not None:
        pytest.skip(reason)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        run, sleeper = owner.stdout.readline().split()
        owner.send_signal(sig)
        owner.wait(20)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(5)
    if sig == signal.SIGKILL:
        assert _left(run) != [] and not procs.gone(int(sleeper))  # left behind, until ...
        hosts.sweep()  # (another test run may have swept it already: fine)
    assert _left(run) == []
    wait_until(lambda: procs.gone(int(sleeper)), 5, f"the bed's sleeper {sleeper} to vanish")


def test_bad_settings_are_refused_before_anything_is_made() -> None:
    with pytest.raises(hosts.BedError, match="rate must be like '100mbit'"):
        hosts.up(2, rate="fast")
    with pytest.raises(hosts.BedError, match=r"count must be 1\.\.250"):
        hosts.up(0)
    with pytest.raises(hosts.BedError, match="delay must be like '2ms'"):
        hosts.parse_delay("soon")
    assert hosts.parse_rate("1gbit") == 10**9 and hosts.parse_rate("2.5mbit") == 2_500_000
