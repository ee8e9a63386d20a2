"""A userspace delay line for lab tests (stdlib only).

The lab machines have no netem / tc qdisc delays, so this module emulates link latency with
a TUN device: every packet the kernel routes into the TUN is read by this process and written
back into the *same* device ``delay_ms`` later.  Written-back packets re-enter the stack as if
received on the TUN and are routed normally from there.

Two ways to use it:

* as a script, inside the target namespace::

      ip netns exec NS python delayline.py --dev NAME --delay-ms 10 [--ready-file PATH]

  It creates the TUN ``NAME`` (``IFF_TUN | IFF_NO_PI``), writes the ready file (or prints
  ``ready``) once the device exists, and exits cleanly on SIGTERM/SIGINT/SIGHUP.  The device
  disappears when the process exits.  It does *not* bring the device up or route anything.

* via :func:`delayed`, a context manager that starts the script in a router namespace and
  policy-routes the traffic forwarded between two interfaces through the delay line.

Routing set-up done by :func:`delayed` (for both ``ip -4`` and ``ip -6``)::

    ip rule add pref P iif IF0 lookup T
    ip rule add pref P iif IF1 lookup T
    ip route add default dev DEV table T

A packet arriving on IF0 or IF1 that is not for the router itself (the ``local`` table at
pref 0 still wins, so ARP/NDP/pings to the router are not delayed) matches one of the rules
and goes to the TUN.  The delay line writes it back, it arrives with ``iif DEV``, matches
neither rule and is routed by the ``main`` table to its real destination.  Each direction is
therefore delayed once: a ping across the router gets ``+2 * delay_ms`` of RTT.  Note that
everything *arriving* on IF0/IF1 and forwarded is delayed, whatever its egress interface.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29

MAX_LEAD = 0.001  # never wake more than 1 ms before a packet is due
LEAD_EWMA = 0.1  # weight of the newest timer-overshoot sample

MAX_PACKET = 65536
READ_BURST = 256  # packets read per wake-up before releasing due packets again

SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------
# The delay line process
# --------------------------------------------------------------------------------------------


def open_tun(dev: str) -> int:
    """Create (or attach to) TUN device ``dev`` in the current namespace; return the fd."""
    if not 0 < len(dev.encode()) < IFNAMSIZ:
        raise ValueError(f"bad interface name {dev!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_ready(path: str | None) -> None:
    if path is None:
        print("ready", flush=True)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM if the process that started us goes away (e.g. pytest killed -9)."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        sys.exit(0)


def run(
    dev: str, delay_ms: float, ready_file: str | None, max_queue: int, compensate: bool = True
) -> int:
    """Serve the delay line until a termination signal arrives.

    Timing: one thread, ``select`` with a timeout until the head of the queue is due; no
    busy-waiting.  Timer slack is set to 1 us, and (with ``compensate``) the loop learns how
    late its timer wake-ups are (an EWMA of the overshoot, typically 50-150 us on a VM) and
    wakes that much earlier, so packets leave on average at their due time instead of
    systematically late.
    """
    delay = delay_ms / 1000.0
    lead = 0.0  # how early to wake up: learned timer overshoot, seconds
    max_lead = min(MAX_LEAD, delay / 2)  # never cut more than half of a tiny delay
    with contextlib.suppress(OSError):
        _prctl(PR_SET_TIMERSLACK, 1000)  # ns; default is 50 us

    def on_signal(signum: int, frame: FrameType | None) -> None:
        """No-op: the signal number reaches the loop through the wake-up pipe."""

    # Self-pipe: the C-level handler writes the signal number into wake_w, which wakes select.
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in stop_signals:
        signal.signal(sig, on_signal)

    tun = open_tun(dev)
    _write_ready(ready_file)

    # The delay is constant, so arrival order == due order: a deque keyed by due time is a
    # correctly ordered priority queue with O(1) push/pop and keeps packet order.
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    clock = time.monotonic
    dropped = 0
    try:
        while True:
            target = queue[0][0] - lead if queue else None
            timeout = None if target is None else max(0.0, target - clock())
            readable, _, _ = select.select([tun, wake_r], [], [], timeout)
            if compensate and not readable and timeout and target is not None:
                overshoot = min(max(clock() - target, 0.0), max_lead)
                lead += (overshoot - lead) * LEAD_EWMA
            if wake_r in readable:
                received = bytearray()
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(wake_r, 512):
                        received += chunk
                if stop_signals.intersection(received):
                    break
            if tun in readable:
                for _ in range(READ_BURST):
                    try:
                        pkt = os.read(tun, MAX_PACKET)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EINTR, errno.EIO):  # EIO: device is down
                            break
                        raise
                    if len(queue) >= max_queue:
                        dropped += 1
                        continue
                    queue.append((clock() + delay, pkt))
            # Anything due within `lead` goes now: waiting again would overshoot by ~lead.
            now = clock() + lead
            while queue and queue[0][0] <= now:
                _, pkt = queue.popleft()
                try:
                    os.write(tun, pkt)
                except OSError:  # malformed packet, device down, ...: drop it like a link would
                    dropped += 1
    finally:
        os.close(tun)
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    if dropped:
        print(f"delayline {dev}: dropped {dropped} packets", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Delay every packet of a TUN device by a fixed time")
    p.add_argument("--dev", required=True, help="TUN device name to create (<= 15 chars)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay in milliseconds")
    p.add_argument("--ready-file", help="write our pid here once the device exists")
    p.add_argument("--max-queue", type=int, default=100_000, help="drop packets beyond this")
    p.add_argument("--parent-pid", type=int, help="exit when this parent process dies")
    p.add_argument(
        "--no-compensate",
        action="store_true",
        help="do not wake early by the learned timer overshoot",
    )
    args = p.parse_args(argv)
    if args.delay_ms < 0:
        p.error("--delay-ms must be >= 0")
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    return run(args.dev, args.delay_ms, args.ready_file, args.max_queue, not args.no_compensate)


# --------------------------------------------------------------------------------------------
# Context manager used by the lab tests
# --------------------------------------------------------------------------------------------


def _ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True, text=True)


def _sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"],
        check=True,
        capture_output=True,
        text=True,
    )


def _link_mtu(ns: str, dev: str) -> int:
    info = json.loads(_ip(ns, "-j", "link", "show", "dev", dev).stdout)
    return int(info[0]["mtu"])


def _used_rule_ids(ns: str) -> tuple[set[int], set[int]]:
    prefs: set[int] = set()
    tables: set[int] = set()
    for family in ("-4", "-6"):
        res = _ip(ns, family, "-j", "rule", "list", check=False)
        if res.returncode != 0 or not res.stdout.strip():
            continue
        for rule in json.loads(res.stdout):
            prefs.add(int(rule.get("priority", -1)))
            table = str(rule.get("table", ""))
            if table.isdigit():
                tables.add(int(table))
    return prefs, tables


def _pick(lo: int, hi: int, used: set[int]) -> int:
    rng = random.SystemRandom()
    while True:
        n = rng.randrange(lo, hi)
        if n not in used:
            return n


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def delayed(
    router_ns: str,
    dev: str,
    delay_ms: float,
    between: tuple[str, str],
    *,
    ipv6: bool = True,
    table: int | None = None,
    pref: int | None = None,
    ready_timeout: float = 10.0,
    selectors: Mapping[str, Sequence[Sequence[str]]] | None = None,
) -> Iterator[int]:
    """Delay every packet forwarded in `router_ns` between interface between[0] and interface
    between[1] (both directions) by delay_ms, by policy-routing them through a TUN device
    served by delayline.py.  Yields the delay process pid; always cleans up (process killed by
    pid, rules/routes removed).

    ``selectors`` replaces the default ``iif IF0`` / ``iif IF1`` rule selectors, per family
    ("-4", "-6"), e.g. to delay only what goes to or comes from one host.

    Sysctls set (and deliberately left set, since other users of the namespace may rely on
    them): ``net.ipv4.ip_forward=1``, ``net.ipv4.conf.{all,DEV}.rp_filter=0`` and, with
    ``ipv6``, ``net.ipv6.conf.all.forwarding=1``, ``net.ipv6.conf.DEV.accept_ra=0``.
    """
    if2 = tuple(between)
    if len(if2) != 2 or if2[0] == if2[1]:
        raise ValueError(f"between must name two different interfaces, got {between!r}")
    if not 0 < len(dev.encode()) < IFNAMSIZ:
        raise ValueError(f"bad interface name {dev!r}")
    if _ip(router_ns, "link", "show", "dev", dev, check=False).returncode == 0:
        raise RuntimeError(f"{dev} already exists in namespace {router_ns}")
    mtu = max(_link_mtu(router_ns, name) for name in if2)

    used_prefs, used_tables = _used_rule_ids(router_ns)
    if pref is None:
        pref = _pick(1000, 32000, used_prefs)
    if table is None:
        table = _pick(0x10000, 0x7FFFFFFF, used_tables)
    if table in (0, 253, 254, 255):
        raise ValueError(f"refusing to use reserved routing table {table}")
    families = ["-4", "-6"] if ipv6 else ["-4"]

    workdir = tempfile.mkdtemp(prefix="delayline-")
    ready = os.path.join(workdir, "ready")
    errlog_path = os.path.join(workdir, "stderr")
    added_rules: list[list[str]] = []
    added_routes: list[list[str]] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(errlog_path, "wb") as errlog:
            proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", router_ns,
                    sys.executable, str(SCRIPT),
                    "--dev", dev,
                    "--delay-ms", repr(float(delay_ms)),
                    "--ready-file", ready,
                    "--parent-pid", str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errlog,
            )  # fmt: skip
        deadline = time.monotonic() + ready_timeout
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = Path(errlog_path).read_text(errors="replace").strip()
                raise RuntimeError(f"delayline for {router_ns}/{dev} did not start: {err}")
            time.sleep(0.01)

        _ip(router_ns, "link", "set", "dev", dev, "mtu", str(mtu), "up")
        _sysctl(router_ns, "net.ipv4.ip_forward", "1")
        _sysctl(router_ns, "net.ipv4.conf.all.rp_filter", "0")
        _sysctl(router_ns, f"net/ipv4/conf/{dev}/rp_filter", "0")  # '/' form: dots in names
        if ipv6:
            _sysctl(router_ns, "net.ipv6.conf.all.forwarding", "1")
            _sysctl(router_ns, f"net/ipv6/conf/{dev}/accept_ra", "0")

        for fam in families:
            # The route lives in table T on DEV only; it disappears together with the device.
            route = [fam, "route", "add", "default", "dev", dev, "table", str(table)]
            _ip(router_ns, *route)
            added_routes.append(route)
            default = [("iif", iif) for iif in if2]
            for selector in (selectors or {}).get(fam, default):
                rule = [fam, "rule", "add", "pref", str(pref), *selector, "lookup", str(table)]
                _ip(router_ns, *rule)
                added_rules.append(rule)
        yield proc.pid
    finally:
        for rule in reversed(added_rules):
            _ip(router_ns, rule[0], "rule", "del", *rule[3:], check=False)
        for route in reversed(added_routes):
            _ip(router_ns, route[0], "route", "del", *route[3:], check=False)
        if proc is not None:
            _terminate(proc)
        for path in (ready, errlog_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
