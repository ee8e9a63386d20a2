"""ICMP echo to each peer's tunnel, transport and direct paths, in its own thread.

Scrapes read snapshot(), a copy taken under a lock; they never wait for a probe. A round
sends one echo per unique (address, mark) flow, then collects replies with select() until
every flow answered or the timeout. A reply counts only if its id, sequence, source and
random payload token all match (raw sockets see every echo reply on the host).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

from icmplib import ICMPLibError, ICMPv4Socket, ICMPv6Socket, SocketPermissionError

log = logging.getLogger(__name__)

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5)
PATHS = ("tunnel", "transport", "direct")
SO_MARK, SO_TIMESTAMPNS, SO_RCVBUFFORCE = 36, 35, 33
RCVBUF = 2 << 20  # bytes asked (the kernel doubles it): a round's replies queue while it sends
DRAIN_EVERY = 64  # sends between reads of the replies that arrived meanwhile
PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
_TOKEN = 16  # random bytes leading each payload; the payload is 56 bytes like ping's
SeriesKey = tuple[str, str, str]  # (device, public_key, path)


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    device: str
    public_key: str
    path: str  # "tunnel", "transport" or "direct"
    address: IPv4Address | IPv6Address
    mark: int  # SO_MARK on the probe socket; 0 = none


@dataclass(frozen=True, slots=True)
class SeriesSnapshot:
    target: ProbeTarget
    sent: int
    received: int
    buckets: tuple[int, ...]  # cumulative counts, one per BUCKETS bound
    rtt_sum: float  # seconds
    recent: tuple[float, ...]  # RTTs of the last `window` probes (lost ones left out)
    recent_sent: int  # probes in the window, answered or not
    baseline: tuple[float, ...]  # RTTs of the last `baseline` answered probes
    error: str = ""  # why the last probe failed to send ("eperm: ..."); silence is no error

    @property
    def loss(self) -> float | None:
        """Lost fraction of the recent window; None when nothing was sent."""
        return 1 - len(self.recent) / self.recent_sent if self.recent_sent else None


@dataclass(frozen=True, slots=True)
class ProbeSnapshot:
    series: Mapping[SeriesKey, SeriesSnapshot] = field(default_factory=dict)
    ok: bool = False
    reason: str = ""  # "" when ok; "disabled", "eperm", "unreachable", "error"
    message: str = ""
    round_seconds: float = 0.0
    rounds: int = 0


def probe_mode(privileged: bool | None, cap_net_raw: bool, range_text: str | None,
               gids: Sequence[int]) -> tuple[bool, str]:
    """(use raw sockets, disabled reason or "") from CAP_NET_RAW and net.ipv4.ping_group_range."""
    if privileged or (privileged is None and cap_net_raw):
        return True, "" if cap_net_raw else "raw ICMP requested but the process has no CAP_NET_RAW"
    lo, hi = 1, 0
    with contextlib.suppress(ValueError, AttributeError):
        lo, hi = (int(x) for x in (range_text or "").split())
    if any(lo <= g <= hi for g in gids):
        return False, ""
    if range_text is None:
        return False, f"no CAP_NET_RAW and {PING_GROUP_RANGE} is unreadable"
    return False, (f"no CAP_NET_RAW and net.ipv4.ping_group_range '{' '.join(range_text.split())}'"
                   f" excludes gid {gids[0] if gids else '?'}")


def system_probe_mode(privileged: bool | None) -> tuple[bool, str]:
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:")).split()[1]
        cap_net_raw = bool(int(caps, 16) >> 13 & 1)
    except (OSError, StopIteration, IndexError, ValueError):
        cap_net_raw = os.geteuid() == 0
    try:
        with open(PING_GROUP_RANGE) as f:
            text: str | None = f.read()
    except OSError:
        text = None
    gids = list(dict.fromkeys([os.getegid(), os.getgid(), *os.getgroups()]))
    return probe_mode(privileged, cap_net_raw, text, gids)


@dataclass(frozen=True, slots=True)
class Reply:
    source: str
    ident: int
    sequence: int
    echo: bool  # an echo reply; else an ICMP error quoting our request
    payload: bytes
    stamp: int | None  # kernel receive time (Unix nanoseconds), if known


class Channel(Protocol):
    """One ICMP socket for one (family, mark). Tests substitute fakes via _open_channel."""

    def fileno(self) -> int: ...
    def ident(self, chosen: int) -> int: ...  # the id our replies carry
    def send(self, address: str, ident: int, sequence: int, payload: bytes) -> int | None: ...
    # ^ returns time.time_ns() right before the packet left, when known
    def receive(self) -> tuple[list[Reply], OSError | None]: ...  # drains, never blocks
    def close(self) -> None: ...


class _PayloadMixin:  # icmplib's parser drops the payload we match the token on
    @staticmethod
    def _checksum(data: bytes) -> int:  # same as icmplib's, 10x faster
        total: int = sum(struct.unpack(f"!{len(data) // 2}H", data[:len(data) // 2 * 2]))
        total += data[-1] << 8 if len(data) % 2 else 0
        total = (total & 0xFFFF) + (total >> 16)
        return ~(total + (total >> 16)) & 0xFFFF

    def _parse_reply(self, packet: bytes, source: str, current_time: float) -> Any:
        start = 0
        if self._IP_VERSION == 4 and self._privileged and packet:  # type: ignore[attr-defined]
            packet, start = bytes(20) + packet[(packet[0] & 0x0F) * 4:], 20  # any IP options
        reply = super()._parse_reply(packet, source, current_time)  # type: ignore[misc]
        return None if reply is None else (reply, packet[start + 8:])


_V4: Any = type("_V4", (_PayloadMixin, ICMPv4Socket), {})
_V6: Any = type("_V6", (_PayloadMixin, ICMPv6Socket), {})


class IcmpChannel:
    def __init__(self, family: int, mark: int, privileged: bool) -> None:
        try:
            self.icmp = (_V4 if family == 4 else _V6)(privileged=privileged)
        except SocketPermissionError as e:
            raise OSError(errno.EPERM, str(e)) from None
        except ICMPLibError as e:
            raise OSError(errno.EIO, str(e)) from None
        self.sock: socket.socket = self.icmp.sock
        self.echo_reply = 0 if family == 4 else 129
        try:
            if mark:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.setblocking(False)
        except OSError:
            self.close()
            raise
        # The default buffer holds ~200 replies: more targets than that lost most replies.
        # SO_RCVBUFFORCE (CAP_NET_ADMIN) may pass net.core.rmem_max; SO_RCVBUF stops there.
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF)
                break

    def fileno(self) -> int:
        return self.sock.fileno()

    def ident(self, chosen: int) -> int:  # ping sockets: the kernel sets the id to the port
        return chosen if self.icmp.is_privileged else int(self.sock.getsockname()[1])

    def send(self, address: str, ident: int, sequence: int, payload: bytes) -> int | None:
        packet, dest = self.icmp._create_packet(ident, sequence, payload), (address, 0)
        wall = time.time_ns()
        self.sock.sendto(packet, dest)
        return wall

    def receive(self) -> tuple[list[Reply], OSError | None]:
        out: list[Reply] = []
        while True:
            try:
                data, anc, _, addr = self.sock.recvmsg(2048, 64)
            except BlockingIOError:
                return out, None
            except OSError as e:  # e.g. an ICMP error the kernel reports on the socket
                return out, e
            stamp = next((sec * 10**9 + ns for lvl, typ, raw in anc
                          if (lvl, typ) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)
                          for sec, ns in [struct.unpack("qq", raw[:16])]), None)
            parsed = self.icmp._parse_reply(data, addr[0], 0.0)
            if parsed is not None:
                r, payload = parsed
                out.append(Reply(addr[0], r.id, r.sequence, r.type == self.echo_reply,
                                 payload, stamp))

    def close(self) -> None:
        self.icmp.close()


_RANK = ("eperm", "unreachable", "error")  # status reason: the first of these seen in a round


def _reason(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return "eperm"
    if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL):
        return "unreachable"
    return "error"


@dataclass(slots=True)
class _Series:
    target: ProbeTarget
    window: deque[float | None]
    baseline: deque[float]
    sent: int = 0
    received: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    rtt_sum: float = 0.0
    error: str = ""

    def add(self, rtt: float | None, error: str) -> None:
        self.sent, self.error = self.sent + 1, error
        self.window.append(rtt)
        if rtt is not None:
            self.received += 1
            self.rtt_sum += rtt
            self.counts[bisect.bisect_left(BUCKETS, rtt)] += 1
            self.baseline.append(rtt)

    def snapshot(self) -> SeriesSnapshot:
        return SeriesSnapshot(self.target, self.sent, self.received,
                              tuple(itertools.accumulate(self.counts[:-1])), self.rtt_sum,
                              tuple(x for x in self.window if x is not None), len(self.window),
                              tuple(self.baseline), self.error)


Flow = tuple[IPv4Address | IPv6Address, int]  # (address, mark)
Result = tuple[float | None, str]  # (rtt or None when lost, error)


@dataclass(slots=True)
class _Pending:
    flow: Flow
    ident: int
    token: bytes
    wall: int | None  # time.time_ns() at send, against kernel receive stamps
    mono: float  # clock() at send
    note: str = ""


class Prober:
    def __init__(self, targets: Callable[[], Sequence[ProbeTarget]], interval: float = 1.0,
                 timeout: float = 1.0, privileged: bool | None = None, window: int = 30,
                 baseline: int = 300, clock: Callable[[], float] = time.monotonic) -> None:
        self._targets, self.interval, self.timeout = targets, interval, timeout
        self.window, self.baseline, self._clock = window, baseline, clock
        self._raw, self.disabled_reason = system_probe_mode(privileged)
        self._ident = random.getrandbits(16)  # ours alone: concurrent Probers never collide
        self._seq = random.getrandbits(16)
        self._lock, self._round_lock = threading.Lock(), threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._channels: dict[tuple[int, int], Channel] = {}
        self._store: dict[SeriesKey, _Series] = {}
        self._status: tuple[bool, str, str, float] = (False, "", "no round yet", 0.0)
        self._rounds = 0

    def _open_channel(self, family: int, mark: int) -> Channel:
        return IcmpChannel(family, mark, self._raw)

    def snapshot(self) -> ProbeSnapshot:
        with self._lock:
            series = {k: s.snapshot() for k, s in self._store.items()}
            return ProbeSnapshot(series, *self._status, self._rounds)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._loop, name="wgnest-prober", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still in a round: leave its sockets alone
            self._thread = None
        with self._round_lock:
            self._close_channels(keep=())

    def _loop(self) -> None:
        while not self._stop_event.is_set():
            began = self._clock()
            try:
                self.run_once()
            except Exception as e:  # the thread must outlive any one round
                log.exception("probe round failed")
                with self._lock:
                    self._status = (False, "error", f"{type(e).__name__}: {e}", 0.0)
            self._stop_event.wait(max(0.0, self.interval - (self._clock() - began)))

    def _close_channels(self, keep: Iterable[tuple[int, int]]) -> None:
        for key in set(self._channels) - set(keep):
            self._channels.pop(key).close()

    def run_once(self) -> None:
        """One round: probe every flow once, then fold the results into the store."""
        with self._round_lock:
            began = self._clock()
            targets = {(t.device, t.public_key, t.path): t for t in self._targets()}
            with self._lock:
                if self.disabled_reason:
                    self._store.clear()
                    self._status = (False, "disabled", self.disabled_reason, 0.0)
                    return
                for key in set(self._store) - set(targets):
                    del self._store[key]  # vanished: its series disappear
                for key, t in targets.items():  # new ones appear at zero before the probe
                    s = self._store.setdefault(key, _Series(t, deque(maxlen=self.window),
                                                            deque(maxlen=self.baseline)))
                    s.target = t
            results, errors = self._probe({(t.address, t.mark) for t in targets.values()})
            with self._lock:
                for key, t in targets.items():
                    if (t.address, t.mark) in results and key in self._store:
                        self._store[key].add(*results[t.address, t.mark])
                reason = min(errors, key=_RANK.index, default="")
                self._status = (not errors, reason, "; ".join(errors.get(reason, [])[:3]),
                                self._clock() - began)
                self._rounds += 1

    def _probe(self, flows: set[Flow]) -> tuple[dict[Flow, Result], dict[str, list[str]]]:
        """One echo per flow, then replies until all answered or timeout: {flow: result}."""
        results: dict[Flow, Result] = {}
        errors: dict[str, list[str]] = {}
        pending: dict[int, _Pending] = {}  # by sequence (unique per round)
        used: set[tuple[int, int]] = set()
        ordered = sorted(flows, key=lambda f: (f[0].version, int(f[0]), f[1]))
        for count, flow in enumerate(ordered, 1):
            if count % DRAIN_EVERY == 0:  # read what came back so far: the buffer never fills
                for k in used:
                    self._receive(self._channels[k], pending, results, errors)
            key, what = (flow[0].version, flow[1]), "socket for"
            try:
                ch = self._channels.get(key) or self._open_channel(*key)
                self._channels[key], what = ch, "send to"
                used.add(key)
                self._seq = (self._seq + 1) & 0xFFFF
                token, mono = os.urandom(_TOKEN), self._clock()
                wall = ch.send(str(flow[0]), self._ident, self._seq, token + bytes(56 - _TOKEN))
                pending[self._seq] = _Pending(flow, ch.ident(self._ident), token, wall, mono)
            except OSError as e:  # no socket: not sent; unreachable or filtered: sent and lost
                text = f"{what} {flow[0]} mark {flow[1]:#x}: {e.strerror or e}"
                errors.setdefault(_reason(e), []).append(text)
                if what == "send to":
                    results[flow] = (None, f"{_reason(e)}: {text}")
        self._close_channels(keep=used)
        stop = self._stop_event if threading.current_thread() is self._thread else None
        deadline = self._clock() + self.timeout
        while pending and not (stop and stop.is_set()) and (left := deadline - self._clock()) > 0:
            chans = [self._channels[k] for k in used]
            for ch in select.select(chans, [], [], min(left, 0.1))[0]:
                self._receive(ch, pending, results, errors)
        results.update({p.flow: (None, p.note) for p in pending.values()})
        return results, errors

    def _receive(self, ch: Channel, pending: dict[int, _Pending], results: dict[Flow, Result],
                 errors: dict[str, list[str]]) -> None:
        replies, err = ch.receive()
        for r in replies:
            self._match(r, pending, results)
        if err is not None:
            errors.setdefault(_reason(err), []).append(f"receive: {err.strerror}")

    def _match(self, r: Reply, pending: dict[int, _Pending], results: dict[Flow, Result]) -> None:
        now, p = self._clock(), pending.get(r.sequence)
        if p is None or r.ident != p.ident:
            return  # not ours, or a duplicate of an answered probe
        if not r.echo:
            p.note = f"unreachable: ICMP error from {r.source}"  # still lost
            return
        family = socket.AF_INET if p.flow[0].version == 4 else socket.AF_INET6
        with contextlib.suppress(OSError):
            if (socket.inet_pton(family, r.source.split("%")[0]) == p.flow[0].packed
                    and r.payload[:_TOKEN] == p.token):  # else foreign or forged: never accept
                rtt = now - p.mono
                if r.stamp and p.wall and 0 <= r.stamp - p.wall <= rtt * 1e9:
                    rtt = (r.stamp - p.wall) / 1e9  # the kernel's receive time: no userspace delay
                results[p.flow] = (rtt, "")
                del pending[r.sequence]
