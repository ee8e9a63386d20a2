"""The kernel's own route lookup for WireGuard transport flows (RTM_GETROUTE).

pyroute2's route('get') silently drops RTA_IP_PROTO, RTA_SPORT, RTA_DPORT and RTA_UID, so a
rule on `ipproto udp dport N` would be invisible. This module speaks rtnetlink directly
(stdlib struct over an AF_NETLINK socket), asks exactly what `ip route get EP mark M ipproto
udp sport LP dport EPP uid 0` asks, with RTM_F_LOOKUP_TABLE so the reply names the table that
matched, and pipelines many requests per round trip.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterable

from wgnest.model.host import Flow, RouteAnswer
from wgnest.sources.errors import SourceError, reason_for_errno

RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
RTM_F_LOOKUP_TABLE = 0x1000
RTA_DST, RTA_SRC, RTA_IIF, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 2, 3, 4, 5, 7
RTA_TABLE, RTA_MARK = 15, 16
RTA_UID, RTA_IP_PROTO, RTA_SPORT, RTA_DPORT = 25, 27, 28, 29
NLMSGHDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")
RTATTR = struct.Struct("=HH")
BATCH = 256
_ADDR_TEXT: dict[bytes, str] = {}  # packed gateway / source address -> its text
_ANSWERS: dict[RouteAnswer, RouteAnswer] = {}


def _attr(kind: int, payload: bytes) -> bytes:
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def encode_request(flow: Flow, seq: int) -> bytes:
    family = socket.AF_INET if flow.dst.version == 4 else socket.AF_INET6
    flags = RTM_F_LOOKUP_TABLE if flow.dst.version == 4 else 0
    src_len = flow.src.max_prefixlen if flow.src is not None else 0
    body = RTMSG.pack(family, flow.dst.max_prefixlen, src_len, 0, 0, 0, 0, 0, flags)
    body += _attr(RTA_DST, flow.dst.packed)
    if flow.src is not None:
        body += _attr(RTA_SRC, flow.src.packed)
    if flow.iif:
        body += _attr(RTA_IIF, struct.pack("=I", flow.iif))
    body += _attr(RTA_MARK, struct.pack("=I", flow.mark))
    body += _attr(RTA_UID, struct.pack("=I", 0))
    body += _attr(RTA_IP_PROTO, bytes([socket.IPPROTO_UDP]))
    body += _attr(RTA_SPORT, struct.pack("!H", flow.sport))
    body += _attr(RTA_DPORT, struct.pack("!H", flow.dport))
    if flow.oif:
        body += _attr(RTA_OIF, struct.pack("=I", flow.oif))
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def decode_route(payload: bytes) -> RouteAnswer:
    """Decode an RTM_NEWROUTE reply body (rtmsg + attributes)."""
    _family, _dl, _sl, _tos, table8, _proto, _scope, rtype, _flags = RTMSG.unpack_from(payload)
    attrs: dict[int, bytes] = {}
    off = RTMSG.size
    while off + RTATTR.size <= len(payload):
        length, kind = RTATTR.unpack_from(payload, off)
        if length < RTATTR.size:
            break
        attrs[kind & 0x3FFF] = payload[off + RTATTR.size:off + length]
        off += (length + 3) & ~3

    def addr(kind: int) -> str:
        raw = attrs.get(kind)
        if not raw or len(raw) not in (4, 16):
            return ""
        text = _ADDR_TEXT.get(raw)
        if text is None:  # few distinct gateways and sources: one shared str each
            if len(_ADDR_TEXT) >= 4096:
                _ADDR_TEXT.clear()
            text = _ADDR_TEXT[raw] = str(ipaddress.ip_address(raw))
        return text

    def u32(kind: int, default: int = 0) -> int:
        raw = attrs.get(kind)
        return int(struct.unpack("=I", raw[:4])[0]) if raw and len(raw) >= 4 else default

    answer = RouteAnswer(oif=u32(RTA_OIF), gateway=addr(RTA_GATEWAY),
                         prefsrc=addr(RTA_PREFSRC), table=u32(RTA_TABLE, table8),
                         route_type=rtype)
    # a gateway's peers are mostly routed alike: one shared answer each (10,000 peers: 1 MB)
    if len(_ANSWERS) >= 4096:
        _ANSWERS.clear()
    return _ANSWERS.setdefault(answer, answer)


def _error_answer(code: int) -> RouteAnswer:
    return RouteAnswer(error=errno.errorcode.get(code, str(code)))


def _rtnetlink(groups: int, rcvbuf: int) -> socket.socket:
    """An rtnetlink socket of this thread's network namespace, joined to `groups`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, groups))
    return sock


class RouteLookup:
    """Asks the kernel of this process's network namespace, many flows per round trip."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._seq = 0

    def _open(self) -> socket.socket:
        if self._sock is None:
            sock = _rtnetlink(0, 4 << 20)
            sock.settimeout(self._timeout)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def lookup(self, flows: Iterable[Flow]) -> dict[Flow, RouteAnswer]:
        todo = list(dict.fromkeys(flows))
        out: dict[Flow, RouteAnswer] = {}
        try:
            for start in range(0, len(todo), BATCH):
                out.update(self._round_trip(todo[start:start + BATCH]))
        except OSError as exc:
            self.close()
            raise SourceError(f"route lookup failed: {exc}", reason_for_errno(exc.errno)) from None
        return out

    def _round_trip(self, flows: list[Flow]) -> dict[Flow, RouteAnswer]:
        sock = self._open()
        pending: dict[int, Flow] = {}
        chunks = []
        for flow in flows:
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            pending[self._seq] = flow
            chunks.append(encode_request(flow, self._seq))
        sock.sendall(b"".join(chunks))
        out: dict[Flow, RouteAnswer] = {}
        while pending:
            data = sock.recv(1 << 20)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
                if length < NLMSGHDR.size:
                    break
                body = data[off + NLMSGHDR.size:off + length]
                off += (length + 3) & ~3
                if seq not in pending:
                    continue  # a stale answer from an earlier, abandoned round trip
                flow = pending.pop(seq)
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    out[flow] = _error_answer(code) if code else RouteAnswer(error="EINVAL")
                elif mtype == RTM_NEWROUTE:
                    out[flow] = decode_route(body)
        return out



# rtnetlink multicast groups whose messages can change a route lookup's answer.
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x1, 0x10, 0x40, 0x80
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_IPV6_RULE = 0x100, 0x400, 1 << 18
WATCHED = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE
           | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_RULE)


class CachedRouteLookup:
    """RouteLookup with a cache keyed by flow (endpoint, mark, ports, oif).

    The whole cache is dropped when the kernel announces any link, address, route or rule
    change (rtnetlink multicast, drained before each use, so a change that happened before
    a lookup is always seen by it), when the announcements overflowed, and after `ttl`.
    """

    def __init__(self, lookup: RouteLookup | None = None, ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup or RouteLookup()
        self._ttl, self._clock = ttl, clock
        self._cache: dict[Flow, RouteAnswer] = {}
        self._filled_at = 0.0
        self._events: socket.socket | None = None
        self.invalidations = 0
        # the last answers given, with the flows asked: the same flows asked again of an
        # unchanged cache get the very same dict (a refresh then knows at once that no
        # answer changed, without a look at each of a gateway's 10,000)
        self._given: list[tuple[list[Flow], dict[Flow, RouteAnswer]]] = []

    def _subscribe(self) -> socket.socket:
        if self._events is None:
            sock = _rtnetlink(WATCHED, 1 << 20)
            sock.setblocking(False)
            self._events = sock
            self._cache.clear()  # anything cached before we listened is unproven
        return self._events

    def _changed(self) -> bool:
        """Drain pending announcements; True if there were any (or some were lost)."""
        try:
            sock = self._subscribe()
        except OSError:
            return True  # cannot listen: never trust the cache
        changed, overflows = False, 0
        while True:
            try:
                if not sock.recv(1 << 16):
                    return changed
                changed = True
            except BlockingIOError:
                return changed
            except OSError as exc:
                overflows += 1
                if exc.errno == errno.ENOBUFS and overflows <= 3:
                    changed = True  # announcements were dropped: assume a change, read on
                    continue
                # any other error (or overflow without end) could repeat forever:
                # resubscribe on the next lookup, and trust nothing cached meanwhile
                self._unsubscribe()
                return True

    def lookup(self, flows: Iterable[Flow]) -> dict[Flow, RouteAnswer]:
        """The answer to each flow that has one. The same flows (in the same order) asked
        again while nothing changed get the same dict as last time: treat it as read-only."""
        asked = list(flows)
        now = self._clock()
        if self._changed() or now - self._filled_at > self._ttl:
            if self._cache:
                self.invalidations += 1
            self._cache.clear()
            self._given.clear()
            self._filled_at = now
        for i, (before, answers) in enumerate(self._given):
            if before == asked:  # unchanged flows are the very objects: compared by identity
                self._given.append(self._given.pop(i))
                return answers
        cache = self._cache
        wanted = dict.fromkeys(asked)
        missing = [f for f in wanted if f not in cache]
        if missing:
            cache.update(self._lookup.lookup(missing))
        answers = {f: answer for f in wanted if (answer := cache.get(f)) is not None}
        if len(answers) == len(wanted):  # a flow without an answer is asked again next time
            self._given = [*self._given[-1:], (asked, answers)]  # a refresh asks twice
        return answers

    def _unsubscribe(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def close(self) -> None:
        self._lookup.close()
        self._unsubscribe()
        self._cache.clear()
        self._given.clear()
