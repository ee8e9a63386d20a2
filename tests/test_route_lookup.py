"""RTM_GETROUTE encoding/decoding, and (as root) real lookups in a throwaway network namespace
compared with `ip route get`."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wgnest.model.host import Flow, RouteAnswer
from wgnest.sources.route_lookup import decode_route, encode_request

EXPORTER = Path(__file__).resolve().parents[1] / "exporter"
IP = ipaddress.ip_address


def parse_request(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, bytes]]]:
    """(nlmsghdr, rtmsg, [(rta type, payload)]) of one request, checking lengths and padding."""
    header = struct.unpack_from("=IHHII", data)
    rtm = struct.unpack_from("=BBBBBBBBI", data, 16)
    attrs, off = [], 28
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        attrs.append((kind, data[off + 4:off + length]))
        assert data[off + length:off + (length + 3) // 4 * 4] == b"\0" * (-length % 4)
        off += (length + 3) // 4 * 4
    assert off == len(data)
    return header, rtm, attrs


@pytest.mark.parametrize(("flow", "family", "flags", "dst", "oif"), [
    (Flow(IP("198.51.100.7"), 51820, 40000, 51821), socket.AF_INET, 0x1000,
     bytes([198, 51, 100, 7]), None),
    (Flow(IP("2001:db8::7"), 0xCA6C, 1, 65535), socket.AF_INET6, 0,
     bytes.fromhex("20010db8000000000000000000000007"), None),
    (Flow(IP("fe80::2"), 0, 51820, 443, oif=5), socket.AF_INET6, 0,
     bytes.fromhex("fe800000000000000000000000000002"), 5),
], ids=["v4", "v6", "v6-link-local-oif"])
def test_encode_request(flow: Flow, family: int, flags: int, dst: bytes, oif: int | None) -> None:
    data = encode_request(flow, 4242)
    header, rtm, attrs = parse_request(data)
    assert header == (len(data), 26, 0x1, 4242, 0)  # RTM_GETROUTE, NLM_F_REQUEST
    assert rtm == (family, len(dst) * 8, 0, 0, 0, 0, 0, 0, flags)
    want = [
        (1, dst),  # RTA_DST
        (16, struct.pack("=I", flow.mark)),  # RTA_MARK
        (25, struct.pack("=I", 0)),  # RTA_UID 0
        (27, bytes([17])),  # RTA_IP_PROTO UDP
        (28, flow.sport.to_bytes(2, "big")),  # RTA_SPORT
        (29, flow.dport.to_bytes(2, "big")),  # RTA_DPORT
    ]
    if oif is not None:
        want.append((4, struct.pack("=I", oif)))  # RTA_OIF
    assert attrs == want


def test_encode_request_ports_are_big_endian() -> None:
    attrs = dict(parse_request(encode_request(Flow(IP("192.0.2.1"), 0, 0x1234, 0xCA6C), 1))[2])
    assert (attrs[28], attrs[29]) == (b"\x12\x34", b"\xca\x6c")


def rta(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def reply(family: int, table8: int, rtype: int, *attrs: bytes) -> bytes:
    dst_len = 32 if family == socket.AF_INET else 128
    return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table8, 2, 0, rtype, 0) + b"".join(
        attrs)


def u32(kind: int, value: int) -> bytes:
    return rta(kind, struct.pack("=I", value))


def addr(kind: int, text: str) -> bytes:
    return rta(kind, IP(text).packed)


V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.mark.parametrize(("body", "want"), [
    (reply(V4, 252, 1, addr(1, "198.51.100.7"), u32(15, 51820), u32(4, 3),
           addr(7, "10.2.0.2"), rta(25, struct.pack("=I", 0))),
     RouteAnswer(oif=3, prefsrc="10.2.0.2", table=51820)),
    (reply(V4, 254, 1, u32(15, 254), addr(5, "192.0.2.1"), u32(4, 2), addr(7, "192.0.2.10")),
     RouteAnswer(oif=2, gateway="192.0.2.1", prefsrc="192.0.2.10", table=254)),
    (reply(V4, 200, 1, u32(4, 2)), RouteAnswer(oif=2, table=200)),  # no RTA_TABLE: header u8
    (reply(V6, 254, 1, addr(1, "2001:db8::7"), u32(15, 254), addr(5, "fe80::1"), u32(4, 2),
           addr(7, "2001:db8:ff::10"), u32(6, 1024)),
     RouteAnswer(oif=2, gateway="fe80::1", prefsrc="2001:db8:ff::10", table=254)),
    (reply(V4, 252, 7, u32(15, 1000)), RouteAnswer(table=1000, route_type=7)),
    (reply(V4, 254, 1, rta(15 | 0x8000, struct.pack("=I", 77)), u32(4, 9)),
     RouteAnswer(oif=9, table=77)),  # NLA flag bits are masked off
], ids=["v4-table-u32", "v4-gateway", "v4-u8-table", "v6", "unreachable", "nla-flags"])
def test_decode_route(body: bytes, want: RouteAnswer) -> None:
    got = decode_route(body)
    assert got == want
    assert got.ok == (want.route_type == 1)
    assert decode_route(body) is got  # equal answers are one object (a gateway's peers')


# --- real kernel, as root, in a namespace of our own ------------------------------------------

SNIPPET = r"""
import dataclasses, ipaddress, json, sys
from wgnest.model.host import Flow
from wgnest.sources.route_lookup import RouteLookup

IP = ipaddress.ip_address
req = json.loads(sys.argv[1])
flows = [Flow(IP(d), m, s, p, o) for d, m, s, p, o in req["flows"]]
batch = [Flow(IP(f"203.0.{i >> 8}.{i & 255}"), 0, 1024 + i, 4444 + i % 2) for i in range(2000)]
lookup = RouteLookup()
answers = lookup.lookup(flows + batch + batch[:100])
lookup.close()
print(json.dumps({
    "flows": [dataclasses.asdict(answers[f]) if f in answers else None for f in flows],
    "batch": [[answers[f].oif, answers[f].table] if f in answers else None for f in batch],
    "total": len(answers),
}))
"""


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[tuple[str, dict[str, int]]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace, veth pairs, rules and routes")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    ns = "rl" + secrets.token_hex(2)
    run("ip", "netns", "add", ns)
    try:
        for script in [
            "link add va0 type veth peer name vb0", "link add va1 type veth peer name vb1",
            "link set lo up", "link set va0 up", "link set vb0 up", "link set va1 up",
            "link set vb1 up", "addr add 10.10.0.1/24 dev va0", "addr add 10.11.0.1/24 dev va1",
            "-6 addr add fd10::1/64 dev va0 nodad", "-6 addr add fd11::1/64 dev va1 nodad",
            "route add default via 10.10.0.2 dev va0",
            "route add default via 10.11.0.2 dev va1 table 77",
            "-6 route add default via fd10::2 dev va0",
            "-6 route add default via fd11::2 dev va1 table 77",
            "route add unreachable 192.0.2.0/24",
            "rule add ipproto udp dport 4444 lookup 77",
            "-6 rule add ipproto udp dport 4444 lookup 77",
        ]:
            run("ip", "-n", ns, *script.split())
        links = {link["ifname"]: link["ifindex"]
                 for link in json.loads(run("ip", "-n", ns, "-j", "link", "show"))}
        yield ns, links
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def ip_route_get(ns: str, dst: str, dport: int) -> dict[str, Any]:
    six = ["-6"] if ":" in dst else []
    (route,) = json.loads(run("ip", "-n", ns, "-j", *six, "route", "get", dst, "mark", "0",
                              "ipproto", "udp", "sport", "40000", "dport", str(dport), "uid",
                              "0"))
    return route  # type: ignore[no-any-return]


def test_kernel_lookup_in_netns(netns: tuple[str, dict[str, int]]) -> None:
    ns, links = netns
    flows = [
        ("198.51.100.7", 0, 40000, 4444, 0), ("198.51.100.7", 0, 40000, 4445, 0),
        ("2001:db8::7", 0, 40000, 4444, 0), ("2001:db8::7", 0, 40000, 4445, 0),
        ("fe80::2", 0, 40000, 4445, links["va1"]), ("192.0.2.9", 0, 40000, 4445, 0),
    ]
    env = {**os.environ, "PYTHONPATH": str(EXPORTER)}
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SNIPPET, json.dumps({"flows": flows})],
        check=True, capture_output=True, text=True, env=env, timeout=60)
    got = json.loads(out.stdout)
    v4_77, v4_main, v6_77, v6_main, link_local, unreachable = (
        None if a is None else RouteAnswer(**a) for a in got["flows"])
    va0, va1 = links["va0"], links["va1"]
    assert v4_77 == RouteAnswer(oif=va1, gateway="10.11.0.2", prefsrc="10.11.0.1", table=77)
    assert v4_main == RouteAnswer(oif=va0, gateway="10.10.0.2", prefsrc="10.10.0.1", table=254)
    assert v6_77 == RouteAnswer(oif=va1, gateway="fd11::2", prefsrc="fd11::1", table=77)
    assert v6_main == RouteAnswer(oif=va0, gateway="fd10::2", prefsrc="fd10::1", table=254)
    assert link_local is not None
    assert (link_local.oif, link_local.table, link_local.ok) == (va1, 254, True)
    assert unreachable == RouteAnswer(error="EHOSTUNREACH")

    # the same questions through iproute2 (it omits `table` for main)
    for answer, (dst, _m, _s, dport, _o) in zip(
            (v4_77, v4_main, v6_77, v6_main), flows, strict=False):
        assert answer is not None
        route = ip_route_get(ns, dst, dport)
        assert (links[route["dev"]], route["gateway"], route["prefsrc"],
                route.get("table", "main")) == (
            answer.oif, answer.gateway, answer.prefsrc, "main" if answer.table == 254 else "77")

    # a 2000-flow batch (plus 100 duplicates) is answered flow by flow, in many round trips
    assert got["total"] == len(flows) + 2000
    assert got["batch"] == [[va1, 77] if i % 2 == 0 else [va0, 254] for i in range(2000)]


class _BrokenEvents:
    """An announcement socket whose every read fails the same way (not ENOBUFS)."""

    def __init__(self, code: int) -> None:
        self.code, self.reads, self.closed = code, 0, False

    def recv(self, size: int) -> bytes:
        self.reads += 1
        if self.reads > 1000:
            raise AssertionError("the drain spins on a persistent error")
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("code", [5, 105])  # EIO; ENOBUFS without end
def test_persistent_event_error_ends_the_drain_and_resubscribes(code: int) -> None:
    from wgnest.sources.route_lookup import CachedRouteLookup

    cached = CachedRouteLookup()
    broken = _BrokenEvents(code)
    cached._events = broken  # type: ignore[assignment]
    assert cached._changed() is True  # nothing cached is trusted meanwhile
    assert broken.reads <= 4
    assert broken.closed
    assert cached._events is None  # a fresh subscription next time
    cached.close()


class _CountingLookup:
    """The kernel's side of CachedRouteLookup, answering every flow but `unanswered`."""

    def __init__(self, unanswered: frozenset[Flow] = frozenset()) -> None:
        self.asked: list[list[Flow]] = []
        self.unanswered = unanswered

    def lookup(self, flows: list[Flow]) -> dict[Flow, RouteAnswer]:
        self.asked.append(list(flows))
        return {f: RouteAnswer(oif=2) for f in flows if f not in self.unanswered}

    def close(self) -> None:
        pass


def test_the_same_flows_of_an_unchanged_cache_get_the_same_answers_dict() -> None:
    """A refresh that asks for the same flows while nothing changed gets the very dict it
    got last time (the diagnosis then knows no answer moved); a change, other flows or a
    flow left unanswered give a new one."""
    from wgnest.sources.route_lookup import CachedRouteLookup

    inner = _CountingLookup(frozenset({Flow(IP("192.0.2.99"), 0, 51820, 1)}))
    cached = CachedRouteLookup(inner)  # type: ignore[arg-type]
    changed = [False]
    cached._changed = lambda: changed[0]  # type: ignore[method-assign]
    flows = [Flow(IP(f"192.0.2.{i}"), 0, 51820, 1) for i in range(1, 4)]
    fixes = [Flow(IP("192.0.2.1"), 0xCA6C, 51820, 1)]
    first, fix = cached.lookup(flows), cached.lookup(fixes)
    assert cached.lookup(list(flows)) is first  # a new list of the same flows
    assert cached.lookup(fixes) is fix  # a refresh asks twice: both are kept
    assert len(inner.asked) == 2
    assert cached.lookup(flows[:2]) is not first  # other flows: answered from the cache
    assert len(inner.asked) == 2
    changed[0] = True
    again = cached.lookup(flows)
    assert again is not first
    assert (again, len(inner.asked)) == (first, 3)
    changed[0] = False
    gap = [*flows, Flow(IP("192.0.2.99"), 0, 51820, 1)]
    assert cached.lookup(gap) is not cached.lookup(gap)  # asked again until it has an answer
