"""diagnose(), fix_flows() and the check report on hand-built snapshots (no I/O).

Each scenario is a Snapshot holding exactly what the kernel would have answered for every
transport flow and for the candidate-fix flows, on this host:
  lo 1, eth0 2 (underlay, gw 192.0.2.1 / fe80::1), wg0 3, wg1 4, wg2 5 (wireguard),
  gre1 6 (gre), tun0 7 (tun, no WireGuard), wg3 8 (wireguard-go: kind tun + UAPI device).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple

import pytest

from wgnest.analysis.fixes import fix_flows
from wgnest.analysis.nagios import Nagios, check_result
from wgnest.analysis.paths import MtuCost, PathVerdict, PeerPath, diagnose, parse_allow
from wgnest.model.failures import SourceFailure
from wgnest.model.host import (
    Device,
    Endpoint,
    Flow,
    Link,
    MainRoute,
    Peer,
    RouteAnswer,
    Rule,
    Snapshot,
)
from wgnest.surfaces.report import render_json, render_text

DIRECT, NESTED, LOOP = PathVerdict.DIRECT, PathVerdict.NESTED, PathVerdict.LOOP
NO_ENDPOINT, NO_ROUTE, UNKNOWN = PathVerdict.NO_ENDPOINT, PathVerdict.NO_ROUTE, PathVerdict.UNKNOWN
OK, WARNING, CRITICAL, NAGIOS_UNKNOWN = Nagios.OK, Nagios.WARNING, Nagios.CRITICAL, Nagios.UNKNOWN

ETH, WG0, WG1, WG2, GRE, TUN, WG3 = 2, 3, 4, 5, 6, 7, 8
GW4, GW6 = "192.0.2.1", "fe80::1"
N = ipaddress.ip_network
DEFAULTS = (MainRoute(N("0.0.0.0/0"), ETH, GW4), MainRoute(N("::/0"), ETH, GW6))
KA, KB, KC, KD, KE = (c * 43 + "=" for c in "ABCDE")
LINKS = (
    Link(1, "lo", "", 65536, True), Link(ETH, "eth0", "", 1500, True),
    Link(WG0, "wg0", "wireguard", 1420, True), Link(WG1, "wg1", "wireguard", 1340, True),
    Link(WG2, "wg2", "wireguard", 1420, True), Link(GRE, "gre1", "gre", 1476, True),
    Link(TUN, "tun0", "tun", 1400, True), Link(WG3, "wg3", "tun", 1420, True),
)
UNDER4 = RouteAnswer(oif=ETH, gateway=GW4, prefsrc="192.0.2.10", table=254)
UNDER6 = RouteAnswer(oif=ETH, gateway=GW6, prefsrc="2001:db8:ff::10", table=254)
EP0, EP1 = "203.0.113.1:51820", "198.51.100.7:51820"
EP0_6, EP1_6 = "[2001:db8::1]:51820", "[2001:db8:1::7]:51820"


def into(oif: int, table: int) -> RouteAnswer:
    return RouteAnswer(oif=oif, table=table)


def endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    host, _, scope = host.strip("[]").partition("%")
    return Endpoint(ipaddress.ip_address(host), int(port), int(scope or 0))


def peer(key: str, ep: str | None, *allowed: str) -> Peer:
    nets = tuple(ipaddress.ip_network(a) for a in allowed)
    return Peer(key, endpoint(ep) if ep else None, nets, 0.0, 0, 0, 0)


def dev(index: int, port: int, mark: int, *peers: Peer, impl: str = "kernel") -> Device:
    link = next(link for link in LINKS if link.index == index)
    return Device(link.name, index, impl, "P" * 43 + "=", port, mark, link.mtu, peers)


def flow(ep: str, mark: int, sport: int) -> Flow:
    e = endpoint(ep)
    return Flow(e.address, mark, sport, e.port, e.scope_id)


def base_rules(family: int = 4) -> tuple[Rule, ...]:
    tail = (Rule(family, 32767, 253, 1),) if family == 4 else ()
    return (Rule(family, 0, 255, 1), Rule(family, 32766, 254, 1), *tail)


def wg_quick(mark: int, prio: int = 32765, family: int = 4) -> tuple[Rule, ...]:
    """wg-quick's pair: `lookup main suppress_prefixlength 0` and `not fwmark M lookup M`."""
    return (Rule(family, prio - 1, 254, 1, suppress_prefixlength=0),
            Rule(family, prio, mark, 1, mark, 0xFFFFFFFF, invert=True))


def snap(devices: tuple[Device, ...], rules: tuple[Rule, ...],
         lookups: dict[Flow, RouteAnswer]) -> Snapshot:
    rules = tuple(sorted(base_rules(4) + base_rules(6) + rules,
                         key=lambda r: (r.family, r.priority)))
    return Snapshot(1700000000.0, devices, LINKS, rules, DEFAULTS, lookups)


# wg0: a wg-quick full tunnel (FwMark/Table 51820); wg1: a site tunnel without a fwmark.
WG0_FULL = dev(WG0, 51820, 51820, peer(KA, EP0, "0.0.0.0/0"))
WG1_PLAIN = dev(WG1, 40000, 0, peer(KB, EP1, "10.1.0.0/24"))


def seed() -> Snapshot:
    return snap((WG0_FULL, WG1_PLAIN), wg_quick(51820), {
        flow(EP0, 51820, 51820): UNDER4,
        flow(EP1, 0, 40000): into(WG0, 51820),
        flow(EP1, 51820, 40000): UNDER4,
    })


def fixed() -> Snapshot:
    """wg1 already carries FwMark = 51820: both direct."""
    return snap((WG0_FULL, dev(WG1, 40000, 51820, peer(KB, EP1, "10.1.0.0/24"))),
                wg_quick(51820), {flow(EP0, 51820, 51820): UNDER4,
                                  flow(EP1, 51820, 40000): UNDER4})


def candidate_still_tunnel() -> Snapshot:
    s = seed()
    return dataclasses.replace(s, lookups={**s.lookups, flow(EP1, 51820, 40000): into(WG2, 200)})


def candidate_unanswered() -> Snapshot:
    s = seed()
    return dataclasses.replace(s, lookups={
        k: v for k, v in s.lookups.items() if k != flow(EP1, 51820, 40000)})


def custom_mark() -> Snapshot:
    return snap((dev(WG0, 51820, 0x1234, peer(KA, EP0, "0.0.0.0/0")), WG1_PLAIN),
                wg_quick(0x1234), {
                    flow(EP0, 0x1234, 51820): UNDER4,
                    flow(EP1, 0, 40000): into(WG0, 0x1234),
                    flow(EP1, 0x1234, 40000): UNDER4,
                })


def main_capture() -> Snapshot:
    """wg2 carries 198.51.100.0/24 (a main-table route) which holds wg1's endpoint. wg0 is a
    wg-quick full tunnel too, so mark 51820 is a candidate, but main still wins for it."""
    wg2 = dev(WG2, 51822, 0, peer(KC, "203.0.113.9:51820", "198.51.100.0/24"))
    return snap((WG0_FULL, WG1_PLAIN, wg2), wg_quick(51820), {
        flow(EP0, 51820, 51820): UNDER4,
        flow("203.0.113.9:51820", 0, 51822): UNDER4,
        flow(EP1, 0, 40000): into(WG2, 254),
        flow(EP1, 51820, 40000): into(WG2, 254),
    })


def double() -> Snapshot:
    """wg1 -> wg2 (main route for 198.51.100.0/24) -> wg0 (wg-quick full tunnel) -> eth0."""
    wg2 = dev(WG2, 51822, 0, peer(KC, "203.0.113.9:51820", "198.51.100.0/24"))
    return snap((WG0_FULL, WG1_PLAIN, wg2), wg_quick(51820), {
        flow(EP0, 51820, 51820): UNDER4,
        flow("203.0.113.9:51820", 0, 51822): into(WG0, 51820),
        flow("203.0.113.9:51820", 51820, 51822): UNDER4,
        flow(EP1, 0, 40000): into(WG2, 254),
        flow(EP1, 51820, 40000): into(WG2, 254),
    })


def split_default() -> Snapshot:
    """wg0 with 0.0.0.0/1 + 128.0.0.0/1 in main (no fwmark, no rules): its own endpoint too."""
    wg0 = dev(WG0, 51820, 0, peer(KA, EP0, "0.0.0.0/1", "128.0.0.0/1"))
    return snap((wg0, WG1_PLAIN), (), {
        flow(EP0, 0, 51820): into(WG0, 254),
        flow(EP1, 0, 40000): into(WG0, 254),
    })


def two_full() -> Snapshot:
    """Two wg-quick full tunnels: wg0 (51820, rules 32764/5), wg1 (51821, rules 32762/3)."""
    wg1 = dev(WG1, 51821, 51821, peer(KB, EP1, "0.0.0.0/0"))
    return snap((WG0_FULL, wg1), wg_quick(51820) + wg_quick(51821, 32763), {
        flow(EP0, 51820, 51820): into(WG1, 51821),
        flow(EP1, 51821, 51821): into(WG0, 51820),
    })


def no_carrier() -> Snapshot:
    """Table 51820 sends everything to wg0, but wg0's peer only carries 10.0.0.0/8."""
    s = seed()
    return dataclasses.replace(s, devices=(
        dev(WG0, 51820, 51820, peer(KA, EP0, "10.0.0.0/8")), WG1_PLAIN))


def ipv6() -> Snapshot:
    wg0 = dev(WG0, 51820, 51820, peer(KA, EP0_6, "0.0.0.0/0", "::/0"))
    wg1 = dev(WG1, 40000, 0, peer(KB, EP1_6, "fd00:1::/64"))
    wg2 = dev(WG2, 51822, 0, peer(KC, "[fe80::2%2]:51820", "fd00:2::/64"))
    return snap((wg0, wg1, wg2), wg_quick(51820) + wg_quick(51820, family=6), {
        flow(EP0_6, 51820, 51820): UNDER6,
        flow(EP1_6, 0, 40000): into(WG0, 51820),
        flow(EP1_6, 51820, 40000): UNDER6,
        flow("[fe80::2%2]:51820", 0, 51822): RouteAnswer(oif=ETH, table=254),
    })


def ipv6_main() -> Snapshot:
    wg0 = dev(WG0, 51820, 0, peer(KA, EP0_6, "2001:db8:1::/48"))
    return snap((wg0, dev(WG1, 40000, 0, peer(KB, EP1_6, "fd00:1::/64"))), (), {
        flow(EP0_6, 0, 51820): UNDER6,
        flow(EP1_6, 0, 40000): into(WG0, 254),
    })


def unroutable() -> Snapshot:
    wg1 = dev(WG1, 40000, 0, peer(KA, None, "10.1.0.0/24"), peer(KB, "198.51.100.8:1"),
              peer(KC, "198.51.100.9:2"), peer(KD, "198.51.100.10:3"))
    return snap((wg1,), (), {
        flow("198.51.100.8:1", 0, 40000): RouteAnswer(error="ENETUNREACH"),
        flow("198.51.100.10:3", 0, 40000): RouteAnswer(table=254, route_type=7),
    })


def other_tunnels() -> Snapshot:
    """wg1's peers go out through gre1, tun0 (OpenVPN) and wg3 (wireguard-go on a tun)."""
    wg1 = dev(WG1, 40000, 0, peer(KA, "198.51.100.1:1"), peer(KB, "198.51.100.2:2"),
              peer(KC, "198.51.100.3:3"))
    wg3 = dev(WG3, 51823, 0, peer(KD, "203.0.113.3:51820", "198.51.100.0/24"), impl="userspace")
    return snap((wg1, wg3), (), {
        flow("198.51.100.1:1", 0, 40000): into(GRE, 254),
        flow("198.51.100.2:2", 0, 40000): into(TUN, 254),
        flow("198.51.100.3:3", 0, 40000): into(WG3, 254),
        flow("203.0.113.3:51820", 0, 51823): UNDER4,
    })


Build = Callable[[], Snapshot]


class Want(NamedTuple):
    verdict: str
    chain: tuple[str, ...] = ()
    table: str = ""
    outer: str = ""
    outer_peer: str = ""
    fix: tuple[str, int, str, str] | None = None  # kind, fwmark, proof, first command
    mtu: MtuCost | None = None
    allowed: bool = False


def route_fix(ep: str) -> tuple[str, int, str, str]:
    return ("route", 0, "rule_order", f"ip route add {ep}/32 via {GW4} dev eth0")


MARK_FIX = ("fwmark", 51820, "kernel", "wg set wg1 fwmark 51820")
DIRECT_WG0 = Want(DIRECT, ("wg0", "eth0"), "main")
CASES = [
    ("seed", seed, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "51820", "wg0", KA, MARK_FIX,
        MtuCost(1340, 1360, 1440, 80))),
    ("seed-outer", seed, KA, DIRECT_WG0),
    ("fixed", fixed, KB, Want(DIRECT, ("wg1", "eth0"), "main")),
    ("candidate-still-tunnel", candidate_still_tunnel, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "51820", "wg0", KA, route_fix("198.51.100.7"),
        MtuCost(1340, 1360, 1440, 80))),
    ("candidate-unanswered", candidate_unanswered, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "51820", "wg0", KA, route_fix("198.51.100.7"),
        MtuCost(1340, 1360, 1440, 80))),
    ("custom-mark", custom_mark, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "4660", "wg0", KA,
        ("fwmark", 4660, "kernel", "wg set wg1 fwmark 4660"), MtuCost(1340, 1360, 1440, 80))),
    ("main-capture", main_capture, KB, Want(
        NESTED, ("wg1", "wg2", "eth0"), "main", "wg2", KC, route_fix("198.51.100.7"),
        MtuCost(1340, 1360, 1440, 80))),
    ("main-capture-outer", main_capture, KC, Want(DIRECT, ("wg2", "eth0"), "main")),
    ("double-inner", double, KB, Want(
        NESTED, ("wg1", "wg2", "wg0", "eth0"), "main", "wg2", KC, route_fix("198.51.100.7"),
        MtuCost(1340, 1300, 1440, 140))),
    ("double-middle", double, KC, Want(
        NESTED, ("wg2", "wg0", "eth0"), "51820", "wg0", KA,
        ("fwmark", 51820, "kernel", "wg set wg2 fwmark 51820"), MtuCost(1420, 1360, 1440, 80))),
    ("split-default-self", split_default, KA, Want(
        LOOP, ("wg0", "wg0"), "main", "wg0", "", route_fix("203.0.113.1"))),
    ("split-default-other", split_default, KB, Want(
        NESTED, ("wg1", "wg0", "wg0"), "main", "wg0", KA, route_fix("198.51.100.7"),
        MtuCost(1340, 1360, 1440, 80))),
    ("two-full-wg0", two_full, KA, Want(
        LOOP, ("wg0", "wg1", "wg0"), "51821", "wg1", KB, route_fix("203.0.113.1"))),
    ("two-full-wg1", two_full, KB, Want(
        LOOP, ("wg1", "wg0", "wg1"), "51820", "wg0", KA, route_fix("198.51.100.7"))),
    ("no-carrier", no_carrier, KB, Want(
        NESTED, ("wg1", "wg0"), "51820", "wg0", "", MARK_FIX, MtuCost(1340, 1360, 1440, 80))),
    ("ipv6", ipv6, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "51820", "wg0", KA, MARK_FIX,
        MtuCost(1340, 1340, 1420, 80))),
    ("ipv6-link-local", ipv6, KC, Want(DIRECT, ("wg2", "eth0"), "main")),
    ("ipv6-main", ipv6_main, KB, Want(
        NESTED, ("wg1", "wg0", "eth0"), "main", "wg0", KA,
        ("route", 0, "rule_order", f"ip -6 route add 2001:db8:1::7/128 via {GW6} dev eth0"),
        MtuCost(1340, 1340, 1420, 80))),
    ("no-endpoint", unroutable, KA, Want(NO_ENDPOINT)),
    ("enetunreach", unroutable, KB, Want(NO_ROUTE)),
    ("lookup-missing", unroutable, KC, Want(UNKNOWN)),
    ("unreachable-route", unroutable, KD, Want(NO_ROUTE, table="main")),
    ("gre", other_tunnels, KA, Want(
        NESTED, ("wg1", "gre1"), "main", "gre1", "", route_fix("198.51.100.1"),
        MtuCost(1340, 1416, 1440, 24))),
    ("tun-without-wg", other_tunnels, KB, Want(
        NESTED, ("wg1", "tun0"), "main", "tun0", "", route_fix("198.51.100.2"),
        MtuCost(1340, 1340, 1440, 100))),
    ("wireguard-go", other_tunnels, KC, Want(
        NESTED, ("wg1", "wg3", "eth0"), "main", "wg3", KD, route_fix("198.51.100.3"),
        MtuCost(1340, 1360, 1440, 80))),
]


def path_of(paths: list[PeerPath], key: str) -> PeerPath:
    (found,) = [p for p in paths if p.public_key == key]
    return found


@pytest.mark.parametrize(("build", "key", "want"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_diagnose(build: Build, key: str, want: Want) -> None:
    p = path_of(diagnose(build()), key)
    fix = None if p.fix is None else (p.fix.kind, p.fix.fwmark, p.fix.proof, p.fix.commands[0])
    got = Want(p.verdict, p.chain, p.table, p.outer, p.outer_peer, fix, p.mtu, p.allowed)
    assert got == want
    assert p.alarming == (want.verdict in (NESTED, LOOP))


def test_one_path_per_peer_in_device_order() -> None:
    paths = diagnose(other_tunnels())
    assert [(p.device, p.public_key) for p in paths] == [
        ("wg1", KA), ("wg1", KB), ("wg1", KC), ("wg3", KD)]


def test_seed_details() -> None:
    p = path_of(diagnose(seed()), KB)
    assert (p.endpoint, p.egress, p.egress_kind, p.gateway) == (EP1, "wg0", "wireguard", "")
    assert p.flow == Flow(ipaddress.ip_address("198.51.100.7"), 0, 40000, 51820)
    assert p.fix is not None
    assert p.fix.config_lines == ("FwMark = 51820",)
    assert p.fix.resulting_egress == "eth0"
    assert p.fix.explanation == "with fwmark 51820 the kernel routes it via eth0 (table main)"
    outer = path_of(diagnose(seed()), KA)
    assert (outer.gateway, outer.source) == (GW4, "192.0.2.10")


def test_unverified_fix_explanations() -> None:
    still = path_of(diagnose(candidate_still_tunnel()), KB).fix
    assert still is not None
    assert still.kind != "fwmark"
    assert "around table 51820" in still.explanation
    main = path_of(diagnose(main_capture()), KB).fix
    assert main is not None
    assert "main table" in main.explanation
    assert "wg2's AllowedIPs" in main.explanation
    full = path_of(diagnose(two_full()), KA).fix
    assert full is not None
    assert "policy-routed full tunnel (fwmark 51820)" in full.explanation


def test_route_fix_without_underlay_default_uses_placeholders() -> None:
    s = dataclasses.replace(main_capture(), main_routes=())
    fix = path_of(diagnose(s), KB).fix
    assert fix is not None
    assert fix.commands == ("ip route add 198.51.100.7/32 via <underlay gateway> "
                            "dev <underlay device>",)
    assert fix.proof == "none"  # placeholders: never presented as proven


def test_link_local_flow_carries_scope_id_as_oif() -> None:
    p = path_of(diagnose(ipv6()), KC)
    assert p.flow == Flow(ipaddress.ip_address("fe80::2"), 0, 51822, 51820, oif=2)
    assert p.endpoint == "[fe80::2]:51820"


def test_errors_recorded() -> None:
    paths = diagnose(unroutable())
    assert [(p.verdict, p.error) for p in paths] == [
        (NO_ENDPOINT, ""), (NO_ROUTE, "ENETUNREACH"), (UNKNOWN, "route lookup unavailable"),
        (NO_ROUTE, "unroutable")]
    assert paths[0].flow is None
    assert not any(p.alarming for p in paths)


def test_allow_nesting() -> None:
    p = path_of(diagnose(seed(), {("wg1", "wg0")}), KB)
    assert (p.verdict, p.allowed, p.alarming) == (NESTED, True, False)
    assert path_of(diagnose(seed(), {("wg0", "wg1")}), KB).allowed is False  # wrong direction


def test_loop_is_never_allowed() -> None:
    paths = diagnose(two_full(), {("wg0", "wg1"), ("wg1", "wg0")})
    assert [(p.verdict, p.allowed, p.alarming) for p in paths] == [(LOOP, False, True)] * 2
    self_loop = path_of(diagnose(split_default(), {("wg0", "wg0")}), KA)
    assert (self_loop.verdict, self_loop.allowed, self_loop.alarming) == (LOOP, False, True)


NOT_TO_UNDERLAY = pytest.mark.parametrize(
    ("build", "key", "usable"),
    [(no_carrier, KB, 1360), (other_tunnels, KA, 1416), (other_tunnels, KB, 1340),
     (split_default, KB, 1360)], ids=["no-carrier", "gre", "tun", "outer-loops"])


@NOT_TO_UNDERLAY
def test_usable_mtu_when_chain_stops_before_underlay(build: Build, key: str, usable: int) -> None:
    mtu = path_of(diagnose(build()), key).mtu
    assert mtu is not None
    assert (mtu.device_mtu, mtu.usable_mtu) == (1340, usable)


@NOT_TO_UNDERLAY
def test_direct_mtu_is_the_underlay_mtu(build: Build, key: str, usable: int) -> None:
    mtu = path_of(diagnose(build()), key).mtu
    assert mtu is None or (mtu.direct_mtu, mtu.cost_bytes) == (1440, 1440 - usable)


def test_usable_mtu_counts_every_layer() -> None:
    mtu = path_of(diagnose(double()), KB).mtu
    # wg1 inner X: X+60 <= 1420 (wg2), X+120 <= 1420 (wg0), X+180 <= 1500 (eth0)
    assert mtu == MtuCost(1340, 1300, 1440, 140)


def with_rules(s: Snapshot, *rules: Rule) -> Snapshot:
    return dataclasses.replace(s, rules=(*rules, *s.rules))


@pytest.mark.parametrize(("build", "want"), [
    (seed, [flow(EP1, 51820, 40000)]),
    (fixed, []),
    (main_capture, [flow(EP1, 51820, 40000)]),  # wg0 and wg2 are direct: none for them
    (two_full, []),  # policy-routed full tunnels: never a new mark
    (split_default, []),  # no fwmark rule at all
    (unroutable, []),
    (ipv6, [flow(EP1_6, 51820, 40000)]),
    # best first: the `not fwmark` rule's mark that led to the table, then the others in order
    (lambda: with_rules(seed(), Rule(4, 100, 100, 1, 0x99, 0xFF)),
     [flow(EP1, 51820, 40000), flow(EP1, 0x99, 40000)]),
    # a v4 rule's mark is no candidate for a v6 flow; a non-lookup rule's neither
    (lambda: with_rules(ipv6(), Rule(4, 100, 100, 1, 0x77, 0xFF),
                        Rule(6, 101, 0, 6, 0x78, 0xFF)), [flow(EP1_6, 51820, 40000)]),
], ids=["seed", "fixed", "main-capture", "two-full", "split-default", "unroutable", "ipv6",
        "order", "family"])
def test_fix_flows(build: Build, want: list[Flow]) -> None:
    assert fix_flows(build()) == want


def test_parse_allow() -> None:
    assert parse_allow("wg2:wg1") == ("wg2", "wg1")


@pytest.mark.parametrize("spec", ["wg2", ":wg1", "wg2:", "", ":", "a:b:c"])
def test_parse_allow_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="expected INNER:OUTER"):
        parse_allow(spec)


def with_errors(s: Snapshot, **errors: tuple[str, str]) -> Snapshot:
    return dataclasses.replace(s, failures=tuple(
        SourceFailure(c, r, m) for c, (r, m) in errors.items()))


@pytest.mark.parametrize(("build", "allow", "code", "summary"), [
    (lambda: Snapshot(0.0), (), OK, "no WireGuard devices found"),
    (fixed, (), OK, "no nesting (2 tunnels, 2 peers)"),
    (seed, {("wg1", "wg0")}, OK, "no nesting (2 tunnels, 2 peers, 1 nested as allowed)"),
    (seed, (), CRITICAL, "1 nested, 0 routing loops (2 tunnels, 2 peers)"),
    (two_full, (), CRITICAL, "0 nested, 2 routing loops (2 tunnels, 2 peers)"),
    (lambda: with_errors(seed(), route_lookup=("timeout", "t")), (), CRITICAL,
     "1 nested, 0 routing loops (2 tunnels, 2 peers)"),
    (lambda: with_errors(fixed(), links=("errno", "boom")), (), NAGIOS_UNKNOWN,
     "cannot read links (errno): boom"),
    (lambda: with_errors(fixed(), route_lookup=("timeout", "slow")), (), NAGIOS_UNKNOWN,
     "cannot read route_lookup (timeout): slow"),
    (lambda: with_errors(Snapshot(0.0), wireguard_kernel=("eperm", "denied")), (),
     NAGIOS_UNKNOWN, "cannot read wireguard_kernel (eperm): denied (needs CAP_NET_ADMIN)"),
    (unroutable, (), WARNING, "2 endpoints without a route; 1 endpoints whose route is unknown"
                              " (1 tunnels, 4 peers)"),
    (lambda: with_errors(fixed(), wireguard_uapi=("timeout", "wg9: no answer")), (), WARNING,
     "wireguard_uapi failed (timeout): wg9: no answer (2 tunnels, 2 peers)"),
    (lambda: with_errors(Snapshot(0.0), rules=("parse", "x")), (), WARNING,
     "rules failed (parse): x (0 tunnels, 0 peers)"),
], ids=["empty", "direct", "allowed", "nested", "loops", "nested-beats-unknown", "links",
        "route-lookup", "eperm", "no-route", "partial", "partial-no-devices"])
def test_verdict(build: Build, allow: Collection[tuple[str, str]], code: int, summary: str) -> None:
    s = build()
    v = check_result(s, diagnose(s, allow))
    assert (v.code, v.summary) == (code, summary)


def test_render_text_names_the_config_file(tmp_path: Path) -> None:
    s = seed()
    paths = diagnose(s)
    assert "wg1's config:  FwMark = 51820" in render_text(s, paths, tmp_path)
    (tmp_path / "wg1.conf").write_text("[Interface]\n")
    text = render_text(s, paths, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "WGNEST CRITICAL - 1 nested, 0 routing loops (2 tunnels, 2 peers)"
    assert f"    fix: add to the [Interface] section of {tmp_path}/wg1.conf:  FwMark = 51820" \
        in lines
    assert "wg set wg1 fwmark 51820" in text
    assert "wg1  kernel  fwmark off  listen 40000  mtu 1340  peers 1" in lines
    assert "wg0  kernel  fwmark 0xca6c  listen 51820  mtu 1420  peers 1" in lines
    assert "nesting costs 80 bytes" in text
    assert any("NESTED in wg0 [wg1 -> wg0 -> eth0]" in line for line in lines)


def test_render_text_route_fix_allowed_and_errors(tmp_path: Path) -> None:
    s = with_errors(two_full(), wireguard_uapi=("timeout", "slow"))
    text = render_text(s, diagnose(s), tmp_path)
    assert "         now: ip route add 203.0.113.1/32 via 192.0.2.1 dev eth0" in text.splitlines()
    assert "ROUTING LOOP [wg0 -> wg1 -> wg0]" in text
    assert "source wireguard_uapi failed (timeout): slow" in text
    allowed = render_text(seed(), diagnose(seed(), {("wg1", "wg0")}), tmp_path)
    assert "nested (allowed) in wg0" in allowed
    assert "fix:" not in allowed


@pytest.mark.parametrize("build", [seed, two_full, unroutable, ipv6, other_tunnels])
def test_render_json_round_trips(build: Build) -> None:
    s = with_errors(build(), wireguard_uapi=("timeout", "slow"))
    paths = diagnose(s)
    text = render_json(s, paths)
    doc = json.loads(text)
    assert doc["exit_code"] == check_result(s, paths).code
    assert doc["status"] == {OK: "ok", WARNING: "warning", CRITICAL: "critical",
                             NAGIOS_UNKNOWN: "unknown"}[doc["exit_code"]]
    assert doc["errors"] == [
        {"collector": "wireguard_uapi", "reason": "timeout", "message": "slow"}]
    assert [(p["device"], p["public_key"], p["verdict"]) for p in doc["peers"]] == [
        (p.device, p.public_key, p.verdict) for p in paths]
    assert "private" not in text.lower()
    assert "preshared" not in text.lower()
    keys = set(re.findall(r"[A-Za-z0-9+/]{43}=", text))
    assert keys <= {"P" * 43 + "=", KA, KB, KC, KD, KE}


def test_render_json_seed_fields() -> None:
    s = seed()
    doc = json.loads(render_json(s, diagnose(s)))
    assert (doc["status"], doc["exit_code"]) == ("critical", 2)
    assert [d["name"] for d in doc["devices"]] == ["wg0", "wg1"]
    wg1 = next(p for p in doc["peers"] if p["device"] == "wg1")
    assert wg1["flow"] == {"dst": "198.51.100.7", "mark": 0, "sport": 40000, "dport": 51820,
                           "proto": "udp", "uid": 0, "oif": 0}
    assert wg1["chain"] == ["wg1", "wg0", "eth0"]
    assert (wg1["verdict"], wg1["outer"], wg1["outer_peer"]) == ("nested", "wg0", KA)
    assert wg1["fix"]["fwmark"] == 51820
    assert wg1["fix"]["verified"] is True
    assert wg1["mtu"] == {"device_mtu": 1340, "usable_mtu": 1360, "direct_mtu": 1440,
                          "cost_bytes": 80}
    assert wg1["alarming"] is True
    assert wg1["allowed_ips"] == ["10.1.0.0/24"]


def test_unknown_names_every_device_that_failed() -> None:
    s = dataclasses.replace(fixed(), failures=(
        SourceFailure("wireguard_uapi", "eperm", "/run/wireguard/wg5.sock: Permission denied"),
        SourceFailure("wireguard_uapi", "eperm", "/run/wireguard/wg6.sock: Permission denied")))
    v = check_result(s, diagnose(s))
    assert v.code == NAGIOS_UNKNOWN
    assert "wg5.sock" in v.summary
    assert "wg6.sock" in v.summary
    assert v.summary.count("root-only") == 2


@pytest.mark.parametrize("build", [seed, fixed, main_capture, double, ipv6, unroutable,
                                   other_tunnels, two_full])
def test_incremental_diagnose_equals_a_fresh_one(build: Build) -> None:
    """Reusing the previous paths gives exactly the paths a fresh diagnosis gives, and the
    self-contained ones are the previous objects themselves (no analysis redone)."""
    s = build()
    first = diagnose(s)
    again = dataclasses.replace(s, taken_at=s.taken_at + 5)
    second = diagnose(again, (), (s, first))
    assert second == diagnose(again)
    # nothing a path depends on changed (the same peers and answers): every path is kept
    assert all(b is a for a, b in zip(first, second, strict=True))
    # one peer's counters moved (a new Peer object, as the sources give it): each path is
    # then checked on its own, and only the self-contained ones are kept as they were
    i, d = next((i, d) for i, d in enumerate(s.devices) if d.peers)
    busy_peer = dataclasses.replace(d.peers[0], rx_bytes=d.peers[0].rx_bytes + 1)
    busy_device = dataclasses.replace(d, peers=(busy_peer, *d.peers[1:]))
    busy = dataclasses.replace(again, devices=(*s.devices[:i], busy_device, *s.devices[i + 1:]))
    third = diagnose(busy, (), (s, first))
    assert third == diagnose(busy)
    reused = [b is a for a, b in zip(first, third, strict=True)]
    assert reused == [p.verdict in ("direct", "no_endpoint", "no_route") for p in first]


def test_incremental_diagnose_redoes_what_changed() -> None:
    s = seed()
    first = diagnose(s)
    # the kernel now routes wg0's transport elsewhere: its path is built anew
    moved = dataclasses.replace(s, lookups={**s.lookups,
                                            flow(EP0, 51820, 51820): into(WG2, 254)})
    assert diagnose(moved, (), (s, first)) == diagnose(moved)
    assert path_of(diagnose(moved, (), (s, first)), KA).verdict == NESTED
    # a rule changed: nothing is reused
    ruled = dataclasses.replace(s, rules=(*s.rules, Rule(4, 5, 9, 1)))
    assert not any(b is a for a, b in zip(first, diagnose(ruled, (), (s, first)), strict=True))


def test_reported_devices_and_peers_are_filtered_after_the_analysis() -> None:
    import re

    from wgnest.analysis.selection import Reported, reported

    s = seed()
    paths = diagnose(s)
    snap, kept = reported(s, paths, Reported(interfaces=re.compile("wg1")))
    assert [d.name for d in snap.devices] == ["wg1"]
    # wg0 is left out of the report, yet wg1 is still nested in it
    assert [(p.device, p.verdict, p.outer) for p in kept] == [("wg1", NESTED, "wg0")]
    snap, kept = reported(s, paths, Reported(interfaces_exclude=re.compile("wg.*")))
    assert (snap.devices, kept) == ((), [])
    snap, kept = reported(s, paths, Reported(peers_exclude=frozenset({KB})))
    assert [p.public_key for p in kept] == [KA]
    assert [len(d.peers) for d in snap.devices] == [1, 0]


def test_paths_hold_the_snapshots_own_flows_where_they_still_match() -> None:
    """The snapshot builder's flow objects (the keys of its route answers) are the ones the
    paths hold, not equal copies; a flow that no longer matches its peer (an endpoint moved
    since) is made again."""
    from wgnest.analysis.flows import transport_flow

    s = seed()
    made = {d.name: {p.public_key: f for p in d.peers if (f := transport_flow(d, p))}
            for d in s.devices}
    own = dataclasses.replace(s, transport_flows=made)
    for path in diagnose(own):
        if path.flow is not None:
            assert path.flow is made[path.device][path.public_key]
    wg1 = s.devices[1]
    moved = dataclasses.replace(wg1.peers[0], endpoint=Endpoint(
        ipaddress.ip_address("198.51.100.77"), 51999))
    stale = dataclasses.replace(own, devices=(s.devices[0], dataclasses.replace(
        wg1, peers=(moved, *wg1.peers[1:]))))
    path = next(p for p in diagnose(stale) if p.public_key == moved.public_key)
    assert path.flow is not made[wg1.name][moved.public_key]
    assert path.flow == transport_flow(wg1, moved)
