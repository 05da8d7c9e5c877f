"""Emulated hosts: machines as Linux namespaces on one bridge, for tests of many-hosts clusters.

Each host of a bed has its own network namespace (one veth on the bed's bridge, the address
``10.251.0.N/24``, no route to anywhere else: the bridge has no address and is joined to no real
interface, so there is no way out and no NAT), its own mount namespace (a private tmpfs on
``/dev/shm``, so shared memory is not shared between hosts, and an ``/etc/hosts`` naming every
host of the bed) and its own UTS namespace (its hostname: ``h0``, ``h1``, ...). Its link is
shaped in both directions with ``tc tbf`` (and, where the kernel has netem, delayed; the tc
commands are in tests/links.py).
One direction of one path can be cut alone (``bed[4].cut_path(bed[0])``: what h0 sends to h4
vanishes), so that one host's messages reach another late.
Processes started in a host are tracked by pid; anything living in a host's namespaces is
found by its namespace inodes, so a grandchild is not missed either.

Everything a bed creates is written to ``/run/paramserver-hosts/RUN/bed.json`` *before* it is
created, with the owner's pid and start time. ``Bed.close`` removes it all; a bed whose owner
died without closing it (SIGKILL, a test run killed on timeout) is swept by the next
:func:`up` or by ``sweep()``. Needs root, ``ip`` and ``tc`` (iproute2), ``nsenter`` and
``unshare`` (util-linux); :func:`unavailable` says what is missing.

Example:
    with up(2, rate="1gbit") as bed:
        server = bed[1].popen([sys.executable, "-m", "http.server", "--bind", bed[1].address])
        bed[0].run(["getent", "hosts", "h1"], timeout=5)        # 10.251.0.2 h1
        bed[1].cut()                                             # its packets vanish
        bed[1].reconnect()

Manual use (tests/hosts_cli.py): ``scripts/hosts.sh up 3 --rate 1gbit``,
``scripts/hosts.sh exec h0 -- CMD``, ``scripts/hosts.sh down``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.links import COMMAND_TIMEOUT, BedError, execute, parse_delay, parse_rate, shape

PREFIX = "psh"
STATE_ROOT = Path("/run/paramserver-hosts")
NETNS_DIR = Path("/run/netns")
SUBNET = "10.251.0"  # host i is SUBNET.(i + 1); exists only inside the bed's namespaces
MANUAL_RUN = "man00"  # the bed of scripts/hosts.sh, kept until `down`
_RUN_CHARS = string.ascii_lowercase + string.digits
_RUN = re.compile(rf"^{PREFIX}([a-z0-9]{{5}})(?:h\d+|v\d+|br)$")

Stream = int | IO[Any] | None


@functools.cache
def unavailable() -> str | None:
    """Why emulated hosts cannot be made on this machine, or None if they can."""
    if sys.platform != "linux":
        return "emulated hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, veths, tc): run the tests as root"
    tools = ("ip", "tc", "nsenter", "unshare", "mount", "umount", "sh", "hostname")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"emulated hosts need {', '.join(missing)} (iproute2, util-linux): not installed"
    # everything a bed needs, tried in a throwaway namespace that vanishes with the shell
    probe = (
        "ip link add psprobe0 type veth peer name psprobe1 && ip link add psprobe2 type bridge "
        "&& tc qdisc add dev psprobe0 root tbf rate 1mbit burst 32kb latency 10ms "
        "&& mount -t tmpfs tmpfs /dev/shm && hostname psprobe"
    )
    try:
        res = subprocess.run(
            ["unshare", "--net", "--mount", "--uts", "sh", "-c", probe],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"emulated hosts cannot be made here: {exc}"
    if res.returncode != 0:
        return f"emulated hosts cannot be made here (namespaces, veth, bridge, tbf): {res.stderr}"
    return None


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _inodes(files: Sequence[Path]) -> set[tuple[int, int]]:
    found = set()
    for f in files:
        with contextlib.suppress(OSError):
            st = os.stat(f)
            found.add((st.st_dev, st.st_ino))
    return found


def members(files: Sequence[Path]) -> set[int]:
    """Pids of every live process in any of the namespaces bound at ``files``."""
    inodes = _inodes(files)
    found: set[int] = set()
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for kind in ("net", "mnt"):
            try:  # a zombie has left its namespaces: the stat fails
                st = os.stat(f"/proc/{entry}/ns/{kind}")
            except OSError:
                break
            if (st.st_dev, st.st_ino) in inodes:
                found.add(int(entry))
                break
    return found


def _kill_all(files: Sequence[Path], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pids := members(files):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise BedError(f"processes {sorted(pids)} in {what} outlived SIGKILL by {timeout}s")
        time.sleep(0.02)


def _mounted() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serializes sweeps and the set-up of STATE_ROOT between processes."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT.with_name(STATE_ROOT.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if str(STATE_ROOT) not in _mounted():
                # namespace files can only be bound on a mount that is not shared
                execute(["mount", "--bind", str(STATE_ROOT), str(STATE_ROOT)])
                execute(["mount", "--make-private", str(STATE_ROOT)])
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Host:
    """One emulated machine of a :class:`Bed` (``name`` resolves to ``address`` on every host).

    Example:
        proc = bed[0].popen(["paramserver", "coordinator", "--bind", "0.0.0.0:7070", ...])
    """

    def __init__(self, bed_dir: Path, run: str, index: int, shm_size: str) -> None:
        self.index = index
        self.name = f"h{index}"
        self.address = f"{SUBNET}.{index + 1}"
        self.netns = f"{PREFIX}{run}h{index}"
        self.veth = f"{PREFIX}{run}v{index}"  # the bridge's end; the host's end is its eth0
        self.mnt = bed_dir / f"{self.name}.mnt"
        self.uts = bed_dir / f"{self.name}.uts"
        self.shm_size = shm_size
        self.rate: int | None = None
        self.delay: float | None = None
        self.state = "up"  # up, cut, killed
        self.cut_from: list[str] = []  # the addresses whose packets to it vanish (cut_path)
        self.procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address}, {self.state})"

    @property
    def files(self) -> list[Path]:
        """The files its namespaces are bound at."""
        return [NETNS_DIR / self.netns, self.mnt, self.uts]

    def command(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """``argv`` prefixed so that it runs inside this host (in ``cwd``, default this one's)."""
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", f"--mount={self.mnt}",
                f"--uts={self.uts}", f"--wd={wd}", "--", *argv]  # fmt: skip

    def popen(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        text: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host; the bed stops it at the latest when it closes.

        It gets a session of its own, so a Ctrl-C meant for the test reaches only the test,
        which then closes the bed."""
        if self.state == "killed":
            raise BedError(f"{self.name} was killed: reconnect() it before starting processes")
        proc = subprocess.Popen(
            self.command(argv, cwd), cwd=cwd, env=None if env is None else dict(env),
            stdin=stdin, stdout=stdout, stderr=stderr, text=text, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        self._wait_inside(proc)
        return proc

    def _wait_inside(self, proc: subprocess.Popen[Any]) -> None:
        """Return once ``proc`` has entered this host (nsenter's setns), so that it is found
        among :meth:`pids` and killed with the host; or once it has ended."""
        inside = _inodes([NETNS_DIR / self.netns])
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{proc.pid}/ns/net")
                if (st.st_dev, st.st_ino) in inside:
                    return
            if time.monotonic() > deadline:
                proc.kill()
                raise BedError(f"{proc.args!r} did not enter {self.name} in {COMMAND_TIMEOUT}s")
            time.sleep(0.002)

    def _kill_tracked(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to its end (killed after ``timeout`` s); its output."""
        proc = self.popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BedError(
                f"{list(argv)} on {self.name} did not finish within {timeout}s; output: "
                f"{out!r} {err!r}"
            ) from None
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise BedError(f"{list(argv)} on {self.name} exited {proc.returncode}: {err}")
        return res

    def pids(self) -> set[int]:
        """Every live process in this host, started by :meth:`popen` or not."""
        return members(self.files)

    def shape(self, rate: str | int | None, delay: str | float | None = None) -> None:
        """Limit this host's link to ``rate`` (both directions; None: unlimited) and delay each
        packet by ``delay`` on its way in and out (one way between two hosts: both delays)."""
        self.rate = None if rate is None else parse_rate(rate)
        self.delay = None if delay is None else parse_delay(delay)
        if self.state == "up":
            self._apply_shape()

    def _apply_shape(self) -> None:
        shape("eth0", self.netns, self.rate, self.delay)  # what it sends
        shape(self.veth, None, self.rate, self.delay, self.cut_from)  # what it receives

    def cut_path(self, sender: Host, cut: bool = True) -> None:
        """Make what ``sender`` sends to this host vanish (``cut=False``: arrive again), and only
        that: every other path and direction stays as it is. Once mended, TCP sends the lost
        packets again: ``sender``'s messages arrive late (the kernel may lack netem's delay)."""
        self.cut_from = [a for a in self.cut_from if a != sender.address] + [sender.address] * cut
        if self.state == "up":
            self._apply_shape()

    def cut(self, how: str = "drop") -> None:
        """Cut this host off: ``drop`` (a partition: its link stays up, every packet in or out
        vanishes) or ``down`` (its interface goes down: its own sends fail at once)."""
        if how == "drop":
            for dev, ns in (("eth0", self.netns), (self.veth, None)):
                tc = ["tc", *(["-n", ns] if ns else [])]
                execute([*tc, "qdisc", "replace", "dev", dev, "root", "blackhole"])
        elif how == "down":
            execute(["ip", "-n", self.netns, "link", "set", "eth0", "down"])
        else:
            raise BedError(f"cut(how=...) must be 'drop' or 'down', got {how!r}")
        self.state = "cut"

    def stop(self) -> None:
        """SIGKILL every process in this host (started here or not); its link stays as it is."""
        self._kill_tracked()
        _kill_all(self.files, self.name)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(COMMAND_TIMEOUT)
        self.procs = [p for p in self.procs if p.returncode is None]

    def kill(self) -> None:
        """Take the whole host away: SIGKILL every process in it, then its link down."""
        self.stop()
        execute(["ip", "-n", self.netns, "link", "set", "eth0", "down"])
        execute(["ip", "link", "set", self.veth, "down"])
        self.state = "killed"

    def reconnect(self) -> None:
        """Undo :meth:`cut`, or bring a killed host back as after a reboot (an empty /dev/shm)."""
        if self.state == "killed":
            execute(["nsenter", f"--mount={self.mnt}", "--", "sh", "-c",
                  f"umount /dev/shm && mount -t tmpfs -o size={self.shm_size},mode=1777 "
                  "tmpfs /dev/shm"])  # fmt: skip
        execute(["ip", "link", "set", self.veth, "up"])
        execute(["ip", "-n", self.netns, "link", "set", "eth0", "up"])
        self._apply_shape()
        self.state = "up"


class Bed:
    """Emulated hosts on one bridge; made by :func:`up`, removed by :meth:`close`.

    Example:
        with up(3, rate="1gbit") as bed:
            bed[0].run(["hostname"], timeout=5).stdout   # 'h0\\n'
    """

    def __init__(self, run: str, count: int, shm_size: str = "1g") -> None:
        self.run = run
        self.dir = STATE_ROOT / run
        self.bridge = f"{PREFIX}{run}br"
        self.hosts = [Host(self.dir, run, i, shm_size) for i in range(count)]
        self.closed = False

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state(self, manual: bool) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "owner": pid, "start": _start_time(pid), "manual": manual, "bridge": self.bridge,
            "hosts": [{"name": h.name, "address": h.address, "netns": h.netns, "veth": h.veth,
                       "rate": h.rate, "delay": h.delay, "shm_size": h.shm_size}
                      for h in self.hosts],
        }  # fmt: skip

    def create(self, rate: str | int | None, delay: str | float | None) -> None:
        names = "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
        execute(["ip", "link", "add", self.bridge, "type", "bridge"])
        execute(["ip", "link", "set", self.bridge, "up"])
        for h in self.hosts:
            execute(["ip", "netns", "add", h.netns])
            execute(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0",
                  "netns", h.netns])  # fmt: skip
            execute(["ip", "link", "set", h.veth, "master", self.bridge, "up"])
            execute(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            execute(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
            execute(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            h.mnt.touch()
            h.uts.touch()
            # inside: a private /dev/shm, the bed's /etc/hosts, its hostname; and other
            # namespaces' bind mounts dropped, so that this copy does not keep them alive
            setup = (
                f"mount -t tmpfs -o size={h.shm_size},mode=1777 tmpfs /dev/shm && "
                f"mount --bind {self.dir / 'hosts'} /etc/hosts && hostname {h.name} && "
                f"{{ umount -l {NETNS_DIR} 2>/dev/null; umount -l {STATE_ROOT}; true; }}"
            )
            execute(["unshare", f"--mount={h.mnt}", f"--uts={h.uts}", "--propagation", "private",
                  "sh", "-c", setup])  # fmt: skip
            h.shape(rate, delay)

    def close(self) -> None:
        """Stop every process in every host and remove the namespaces, links and files.
        Safe to call twice; raises BedError naming whatever could not be removed."""
        if self.closed:
            return
        self.closed = True
        try:
            for h in self.hosts:
                h._kill_tracked()
            _remove(self.dir, _read_state(self.dir) or self.state(manual=False))
        finally:
            for h in self.hosts:  # killed by now: reap them
                for proc in h.procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(COMMAND_TIMEOUT)


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((folder / "bed.json").read_text())
    except (OSError, ValueError):
        return None
    return state


def _remove(folder: Path, state: Mapping[str, Any]) -> None:
    """Remove a bed described by ``state`` (its processes must be gone or are killed now)."""
    hosts = state.get("hosts", [])
    bound = [folder / f"{h['name']}.{kind}" for h in hosts for kind in ("mnt", "uts")]
    files = [NETNS_DIR / h["netns"] for h in hosts] + bound
    _kill_all(files, f"bed {folder.name}")
    for h in hosts:
        execute(["ip", "link", "del", h["veth"]], check=False)  # takes the host's end along
    execute(["ip", "link", "del", state.get("bridge", "")], check=False)
    for h in hosts:
        if (NETNS_DIR / h["netns"]).exists():
            execute(["ip", "netns", "del", h["netns"]])
    mounted = _mounted()
    for f in bound:
        if str(f) in mounted:
            execute(["umount", str(f)])
    shutil.rmtree(folder, ignore_errors=True)
    left = [str(f) for f in files if f.exists()] + [d for d in _links() if d[3:8] == folder.name]
    if left:
        raise BedError(f"bed {folder.name}: could not remove {left}")


def _links() -> list[str]:
    out = execute(["ip", "-o", "link", "show"]).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if _RUN.match(n)]


def _alive(state: Mapping[str, Any]) -> bool:
    pid, start = state.get("owner"), state.get("start")
    return isinstance(pid, int) and start is not None and _start_time(pid) == start


def sweep(*, manual: bool = False) -> list[str]:
    """Remove every bed whose owner process is gone (and, with ``manual``, the bed of
    scripts/hosts.sh too), and any namespace or link of this prefix that no bed claims.
    Returns the run ids removed."""
    if not STATE_ROOT.exists() and not _links():
        return []
    removed = []
    with _locked():
        for folder in sorted(p for p in STATE_ROOT.iterdir() if p.is_dir()):
            state = _read_state(folder)
            if state is not None and state.get("manual") and not manual:
                continue
            if state is not None and not state.get("manual") and _alive(state):
                continue
            _remove(folder, state or {})
            removed.append(folder.name)
        claimed = {p.name for p in STATE_ROOT.iterdir() if p.is_dir()}
        netns = [p.name for p in NETNS_DIR.iterdir()] if NETNS_DIR.exists() else []
        for name in netns:
            m = _RUN.match(name)
            if m and m[1] not in claimed:
                _kill_all([NETNS_DIR / name], name)
                execute(["ip", "netns", "del", name])
                removed.append(m[1])
        for name in _links():
            m = _RUN.match(name)
            if m and m[1] not in claimed:
                execute(["ip", "link", "del", name], check=False)
                removed.append(m[1])
    return sorted(set(removed))


def up(
    count: int,
    *,
    rate: str | int | None = None,
    delay: str | float | None = None,
    shm_size: str = "1g",
    manual: bool = False,
) -> Bed:
    """Make ``count`` emulated hosts, links shaped to ``rate`` (None: unlimited), after
    sweeping beds left by dead runs. Close it (``with up(...) as bed:``) to remove it.

    Example:
        bed = up(3, rate="100mbit"); ...; bed.close()
    """
    if not isinstance(count, int) or not 1 <= count <= 250:
        raise BedError(f"count must be 1..250 hosts, got {count!r}")
    if rate is not None:
        parse_rate(rate)  # bad input fails before anything is made
    if delay is not None:
        parse_delay(delay)
    reason = unavailable()
    if reason is not None:
        raise BedError(reason)
    sweep()
    with _locked():
        if manual:
            run = MANUAL_RUN
            if (STATE_ROOT / run).exists():
                raise BedError("a manual bed is up already: `scripts/hosts.sh down` first")
        else:
            run = MANUAL_RUN
            while run == MANUAL_RUN or (STATE_ROOT / run).exists():
                run = "".join(secrets.choice(_RUN_CHARS) for _ in range(5))
        bed = Bed(run, count, shm_size)
        bed.dir.mkdir()
        # recorded before anything exists, so a run killed half-way is swept whole
        (bed.dir / "bed.json").write_text(json.dumps(bed.state(manual)))
    try:
        bed.create(rate, delay)
    except BaseException:
        bed.close()
        raise
    (bed.dir / "bed.json").write_text(json.dumps(bed.state(manual)))
    return bed


def attach(run: str = MANUAL_RUN) -> Bed:
    """The bed ``run`` made by another process (default: the one of scripts/hosts.sh)."""
    state = _read_state(STATE_ROOT / run)
    if state is None:
        raise BedError(f"no bed {run} is up (scripts/hosts.sh up N makes one)")
    bed = Bed(run, len(state["hosts"]), state["hosts"][0]["shm_size"] if state["hosts"] else "1g")
    for h, s in zip(bed.hosts, state["hosts"], strict=True):
        h.rate, h.delay = s["rate"], s["delay"]
    return bed
