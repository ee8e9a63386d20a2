"""Dumps of links, addresses, policy rules and routes over one rtnetlink socket (standard
library only).

pyroute2, a package of the design card, can read all of these, but importing any of it
runs its package `__init__`, which loads IPDB, NDB, conntrack and asyncio: 24 MiB of a
serving process's resident memory, for four dumps. These few dumps are decoded here into
messages with pyroute2's accessors (`msg["field"]`, `msg.get_attr("NAME")`), so the code
that reads them is the same for both; pyroute2 is then imported only where it runs, for a
kernel WireGuard device's generic netlink (see wg_kernel).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETRULE = 18, 22, 26, 34
NLA_F_NESTED_MASK = 0x3FFF  # the attribute type without the nested / byte-order flags
DUMP_RETRIES = 5  # a dump the kernel marks interrupted (the table changed) is asked again

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_ATTR = struct.Struct("=HH")  # rtattr: length, type
_U32, _U16, _U8 = struct.Struct("=I"), struct.Struct("=H"), struct.Struct("=B")

Decoder = Callable[[bytes], Any]


def _u32(raw: bytes) -> int:
    return int(_U32.unpack_from(raw)[0]) if len(raw) >= 4 else 0


def _u8(raw: bytes) -> int:
    return raw[0] if raw else 0


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _address(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return raw.hex()


def _port_range(raw: bytes) -> dict[str, int] | None:  # struct fib_rule_port_range
    if len(raw) < 4:
        return None
    start, end = struct.unpack_from("=HH", raw)
    return {"start": start, "end": end}


def _uid_range(raw: bytes) -> dict[str, int] | None:  # struct fib_rule_uid_range
    if len(raw) < 8:
        return None
    start, end = struct.unpack_from("=II", raw)
    return {"start": start, "end": end}


class Message:
    """One decoded message (or nested attribute set): header fields by name, attributes
    by their kernel names, the first of each kept, unknown ones left out."""

    __slots__ = ("_attrs", "_fields")

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self._fields, self._attrs = fields, attrs

    def __getitem__(self, key: str) -> int:
        return self._fields[key]

    def get(self, key: str, default: int | None = None) -> int | None:
        return self._fields.get(key, default)

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)

    def __repr__(self) -> str:
        return f"Message({self._fields!r}, {self._attrs!r})"


Schema = dict[int, tuple[str, "Decoder"]]


def _attrs(raw: bytes, schema: Schema, offset: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    while offset + _ATTR.size <= len(raw):
        length, kind = _ATTR.unpack_from(raw, offset)
        if length < _ATTR.size or offset + length > len(raw):
            break  # a malformed attribute ends the set: nothing after it is trusted
        known = schema.get(kind & NLA_F_NESTED_MASK)
        if known is not None and known[0] not in out:
            out[known[0]] = known[1](raw[offset + _ATTR.size:offset + length])
        offset += (length + 3) & ~3
    return out


def _nested(schema: Schema) -> Decoder:
    return lambda raw: Message({}, _attrs(raw, schema))


def _multipath(raw: bytes) -> list[Message]:
    """RTA_MULTIPATH: struct rtnexthop (length, flags, hops, ifindex), then its attributes."""
    hops, offset = [], 0
    while offset + 8 <= len(raw):
        length, flags, _hops, ifindex = struct.unpack_from("=HBBi", raw, offset)
        if length < 8 or offset + length > len(raw):
            break
        hops.append(Message({"oif": ifindex, "flags": flags},
                            _attrs(raw[offset:offset + length], _ROUTE_HOP, 8)))
        offset += (length + 3) & ~3
    return hops


_LINK: Schema = {3: ("IFLA_IFNAME", _text), 4: ("IFLA_MTU", _u32), 27: ("IFLA_GROUP", _u32),
                 18: ("IFLA_LINKINFO", _nested({1: ("IFLA_INFO_KIND", _text)}))}
_ADDR: Schema = {1: ("IFA_ADDRESS", _address), 2: ("IFA_LOCAL", _address)}
_RULE: Schema = {
    1: ("FRA_DST", _address), 2: ("FRA_SRC", _address), 3: ("FRA_IIFNAME", _text),
    4: ("FRA_GOTO", _u32), 6: ("FRA_PRIORITY", _u32), 10: ("FRA_FWMARK", _u32),
    13: ("FRA_SUPPRESS_IFGROUP", _u32), 14: ("FRA_SUPPRESS_PREFIXLEN", _u32),
    15: ("FRA_TABLE", _u32), 16: ("FRA_FWMASK", _u32), 17: ("FRA_OIFNAME", _text),
    19: ("FRA_L3MDEV", _u8), 20: ("FRA_UID_RANGE", _uid_range), 21: ("FRA_PROTOCOL", _u8),
    22: ("FRA_IP_PROTO", _u8), 23: ("FRA_SPORT_RANGE", _port_range),
    24: ("FRA_DPORT_RANGE", _port_range)}
_ROUTE_HOP: Schema = {5: ("RTA_GATEWAY", _address)}
_ROUTE: Schema = {
    1: ("RTA_DST", _address), 2: ("RTA_SRC", _address), 4: ("RTA_OIF", _u32),
    5: ("RTA_GATEWAY", _address), 6: ("RTA_PRIORITY", _u32), 7: ("RTA_PREFSRC", _address),
    8: ("RTA_METRICS", _nested({2: ("RTAX_MTU", _u32)})), 9: ("RTA_MULTIPATH", _multipath),
    15: ("RTA_TABLE", _u32)}

# each request: its family header (packed for the request), and how a reply's is read
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr (the same layout)
_RTMSG_FIELDS = ("family", "dst_len", "src_len", "tos", "table", "protocol", "scope", "type",
                 "flags")
_RULE_FIELDS = ("family", "dst_len", "src_len", "tos", "table", "res1", "res2", "action",
                "flags")


def _link(body: bytes) -> Message:
    family, kind, index, flags, change = _IFINFO.unpack_from(body)
    return Message({"family": family, "ifi_type": kind, "index": index, "flags": flags,
                    "change": change}, _attrs(body, _LINK, _IFINFO.size))


def _addr(body: bytes) -> Message:
    family, prefixlen, flags, scope, index = _IFADDR.unpack_from(body)
    return Message({"family": family, "prefixlen": prefixlen, "flags": flags,
                    "scope": scope, "index": index}, _attrs(body, _ADDR, _IFADDR.size))


def _route(body: bytes) -> Message:
    return Message(dict(zip(_RTMSG_FIELDS, _RTMSG.unpack_from(body), strict=True)),
                   _attrs(body, _ROUTE, _RTMSG.size))


def _rule(body: bytes) -> Message:
    return Message(dict(zip(_RULE_FIELDS, _RTMSG.unpack_from(body), strict=True)),
                   _attrs(body, _RULE, _RTMSG.size))


class DumpInterrupted(OSError):
    """The kernel marked every attempt at a dump interrupted (its table kept changing)."""


class RtNetlink:
    """One NETLINK_ROUTE socket; each call is one dump, read to its end."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        self._seq = int.from_bytes(os.urandom(2), "little")

    def close(self) -> None:
        self._sock.close()

    def get_links(self) -> list[Message]:
        return self._dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0), _link)

    def get_addr(self) -> list[Message]:
        return self._dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0), _addr)

    def get_rules(self, family: int) -> list[Message]:
        return self._dump(RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), _rule)

    def get_routes(self, family: int, table: int | None = None) -> list[Message]:
        """Every route of `family`, or of one table (the kernel dumps them all; filtered
        here by RTA_TABLE, else the header's table, as pyroute2 does)."""
        msgs = self._dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), _route)
        if table is None:
            return msgs
        return [m for m in msgs if (m.get_attr("RTA_TABLE") or m["table"]) == table]

    def _dump(self, kind: int, header: bytes, decode: Callable[[bytes], Message]
              ) -> list[Message]:
        for _attempt in range(DUMP_RETRIES):
            msgs, interrupted = self._dump_once(kind, header, decode)
            if not interrupted:
                return msgs
        raise DumpInterrupted(0, f"dump {kind} interrupted {DUMP_RETRIES} times")

    def _dump_once(self, kind: int, header: bytes, decode: Callable[[bytes], Message]
                   ) -> tuple[list[Message], bool]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._sock.send(_HEADER.pack(_HEADER.size + len(header), kind,
                                     NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + header)
        out: list[Message] = []
        interrupted = False
        while True:
            data = self._sock.recv(1 << 16)
            if not data:
                raise OSError(0, "rtnetlink socket closed mid-dump")
            for msg_type, flags, msg_seq, body in _messages(data):
                if msg_seq != seq:
                    continue  # an answer to an earlier request, read too late: not ours
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if msg_type == NLMSG_DONE:
                    return out, interrupted
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out, interrupted
                out.append(decode(body))


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise OSError(0, "truncated rtnetlink message")
        yield msg_type, flags, seq, data[offset + _HEADER.size:offset + length]
        offset += (length + 3) & ~3
