"""rule_from_msg on real pyroute2 fibmsg objects (built, encoded, decoded afresh), Rule's text
and mark matching; as root, the same rules read back from a kernel in a namespace of our own,
through wgnest's own rtnetlink dumps and through pyroute2's (both must read the same)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from typing import Any

import pytest
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from wgnest.model.host import Rule
from wgnest.sources.netstate import NetState, rule_from_msg

UNSET = 0xFFFFFFFF
ALL = 0xFFFFFFFF


def kernel_rule(table: int, action: int = 1, flags: int = 0, family: int = socket.AF_INET,
                **attrs: Any) -> fibmsg:
    """A rule as fib_nl_fill_rule sends it: header table u8 (252 above 255), FRA_TABLE u32,
    FRA_SUPPRESS_PREFIXLEN always, FRA_PRIORITY only when not 0."""
    msg = fibmsg()
    msg["family"], msg["table"] = family, table if table < 256 else 252
    msg["action"], msg["flags"] = action, flags
    nlas = {"FRA_TABLE": table, "FRA_SUPPRESS_PREFIXLEN": UNSET, **attrs}
    msg["attrs"] = [[f"FRA_{k.removeprefix('FRA_')}", v] for k, v in nlas.items()]
    msg.encode()
    decoded = fibmsg(msg.data)
    decoded.decode()
    return decoded


WG_NOT_FWMARK = kernel_rule(51820, flags=0x2, FRA_PRIORITY=32765, FRA_FWMARK=51820,
                            FRA_FWMASK=ALL, FRA_PROTOCOL=0)
WG_SUPPRESS = kernel_rule(254, FRA_PRIORITY=32764, FRA_SUPPRESS_PREFIXLEN=0, FRA_PROTOCOL=0)
LOCAL = kernel_rule(255)
CASES = [
    (4, WG_NOT_FWMARK, Rule(4, 32765, 51820, 1, 51820, ALL, True, -1),
     "32765: not from all fwmark 0xca6c lookup 51820"),
    (4, WG_SUPPRESS, Rule(4, 32764, 254, 1, suppress_prefixlength=0),
     "32764: from all lookup main suppress_prefixlength 0"),
    (4, LOCAL, Rule(4, 0, 255, 1), "0: from all lookup local"),
    (6, kernel_rule(254, family=socket.AF_INET6, FRA_PRIORITY=32766), Rule(6, 32766, 254, 1),
     "32766: from all lookup main"),
    (4, kernel_rule(100, FRA_PRIORITY=100, FRA_FWMARK=0x99, FRA_FWMASK=0xFF),
     Rule(4, 100, 100, 1, 0x99, 0xFF), "100: from all fwmark 0x99/0xff lookup 100"),
    (4, kernel_rule(253, FRA_PRIORITY=32767, FRA_SUPPRESS_PREFIXLEN=8),
     Rule(4, 32767, 253, 1, suppress_prefixlength=8),
     "32767: from all lookup default suppress_prefixlength 8"),
]


def test_messages_carry_what_the_kernel_sends() -> None:
    assert WG_NOT_FWMARK["table"] == 252
    assert WG_NOT_FWMARK["flags"] == 0x2
    assert LOCAL.get_attr("FRA_PRIORITY") is None
    assert LOCAL.get_attr("FRA_SUPPRESS_PREFIXLEN") == UNSET


@pytest.mark.parametrize(("version", "msg", "want", "text"), CASES,
                         ids=["wg-not-fwmark", "wg-suppress", "local", "v6-main", "masked",
                              "default-suppress-8"])
def test_rule_from_msg(version: int, msg: fibmsg, want: Rule, text: str) -> None:
    rule = rule_from_msg(version, msg)
    assert rule == want
    assert str(rule) == text


BLACKHOLE = kernel_rule(0, action=6, FRA_PRIORITY=50)


def test_blackhole_rule() -> None:
    assert rule_from_msg(4, BLACKHOLE) == Rule(4, 50, 0, 6)


def test_blackhole_rule_text() -> None:
    assert str(rule_from_msg(4, BLACKHOLE)) == "50: from all blackhole"  # as `ip rule` prints


def test_header_table_when_no_fra_table() -> None:
    msg = fibmsg()
    msg["family"], msg["table"], msg["action"] = socket.AF_INET, 254, 1
    msg["attrs"] = [["FRA_PRIORITY", 32766]]
    msg.encode()
    decoded = fibmsg(msg.data)
    decoded.decode()
    assert rule_from_msg(4, decoded) == Rule(4, 32766, 254, 1)


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def rtnetlink_in(ns: str) -> Any:
    """wgnest's RtNetlink with its socket in namespace `ns` (made by a thread that entered
    it: a netlink socket stays in the namespace it was made in)."""
    import threading

    from wgnest.sources.netns import enter, ns_key
    from wgnest.sources.rtnetlink import RtNetlink

    made: list[Any] = []
    path = f"/run/netns/{ns}"

    def enter_and_open() -> None:
        enter(path, ns_key(path))
        made.append(RtNetlink())

    thread = threading.Thread(target=enter_and_open)
    thread.start()
    thread.join()
    return made[0]


def pyroute2_in(ns: str) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=ns)


OPENERS = pytest.mark.parametrize("opener", [rtnetlink_in, pyroute2_in],
                                  ids=["rtnetlink", "pyroute2"])


@OPENERS
def test_rules_from_a_real_kernel(opener: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and adds rules")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    ns = "ns" + secrets.token_hex(2)
    run("ip", "netns", "add", ns)
    state = NetState(lambda: opener(ns))
    try:
        for six in ([], ["-6"]):  # what wg-quick's add_default runs
            run("ip", "-n", ns, *six, "rule", "add", "not", "fwmark", "51820", "table", "51820")
            run("ip", "-n", ns, *six, "rule", "add", "table", "main", "suppress_prefixlength",
                "0")
        rules = state.rules()
    finally:
        state.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert [str(r) for r in rules if r.family == 4] == [
        "0: from all lookup local", "32764: from all lookup main suppress_prefixlength 0",
        "32765: not from all fwmark 0xca6c lookup 51820", "32766: from all lookup main",
        "32767: from all lookup default"]
    assert [str(r) for r in rules if r.family == 6] == [
        "0: from all lookup local", "32764: from all lookup main suppress_prefixlength 0",
        "32765: not from all fwmark 0xca6c lookup 51820", "32766: from all lookup main"]
    assert Rule(4, 32765, 51820, 1, 51820, ALL, True) in rules


@OPENERS
def test_every_selector_and_a_multipath_default_from_a_real_kernel(opener: Any) -> None:
    """Rules read back with every selector as `ip rule` prints them, and a multipath default
    route read by its first next hop (it has no RTA_OIF of its own)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace, links, rules and routes")
    ns = "ns" + secrets.token_hex(2)
    run("ip", "netns", "add", ns)
    state = NetState(lambda: opener(ns))
    try:
        run("ip", "-n", ns, "link", "add", "m0", "type", "veth", "peer", "name", "m1")
        for dev in ("m0", "m1"):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "addr", "add", "10.9.0.1/24", "dev", "m0")
        run("ip", "-n", ns, "addr", "add", "10.8.0.1/24", "dev", "m1")
        run("ip", "-n", ns, "rule", "add", "pref", "10", "not", "fwmark", "0x8888", "to",
            "1.2.3.0/24", "ipproto", "udp", "dport", "51820-51830", "sport", "5", "uidrange",
            "0-0", "iif", "lo", "lookup", "1000")
        run("ip", "-n", ns, "rule", "add", "pref", "11", "from", "10.9.0.0/24", "oif", "m0",
            "goto", "20")
        run("ip", "-n", ns, "route", "add", "default", "nexthop", "via", "10.9.0.2", "dev",
            "m0", "nexthop", "via", "10.8.0.2", "dev", "m1")
        rules, routes = state.rules(), state.main_routes()
        links = {link.index: link.name for link in state.links()}
    finally:
        state.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    texts = [str(r) for r in rules if r.family == 4]
    assert ("10: not from all to 1.2.3.0/24 fwmark 0x8888 iif lo uidrange 0-0 ipproto udp "
            "sport 5 dport 51820-51830 lookup 1000") in texts
    assert "11: from 10.9.0.0/24 oif m0 goto 20" in texts
    (default,) = [r for r in routes if r.family == 4 and r.dst.prefixlen == 0]
    assert (links[default.oif], default.gateway) == ("m0", "10.9.0.2")


def test_own_rtnetlink_reads_what_pyroute2_reads() -> None:
    """Links (kinds, groups), addresses, every rule selector, routes of every table (a
    multipath one, metrics, a table above 255, IPv6): wgnest's own dumps decode to exactly
    what pyroute2's do, through NetState and read_routing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace, links, rules and routes")
    from wgnest.sources.routing import read_routing

    ns = "ns" + secrets.token_hex(2)
    run("ip", "netns", "add", ns)
    ours, theirs = NetState(lambda: rtnetlink_in(ns)), NetState(lambda: pyroute2_in(ns))
    try:
        setup = [
            "link add d0 type veth peer name d0p", "link add d1 type veth peer name d1p",
            *(f"link set {d} up" for d in ("lo", "d0", "d0p", "d1", "d1p")),
            "link set d1 group 7", "addr add 192.0.2.1/24 dev d0",
            "addr add 192.0.2.9/24 dev d0", "addr add 198.51.100.1/24 dev d1",
            "addr add 2001:db8::1/64 dev d0 nodad",
            "route add default via 192.0.2.254 dev d0 mtu 1400",
            "route add 203.0.113.0/24 nexthop via 192.0.2.2 dev d0 nexthop via 198.51.100.2 "
            "dev d1",
            "route add 10.0.0.0/8 dev d1 table 51820",
            "route add default dev d1 table 100000 metric 5",
            "-6 route add default via 2001:db8::fe dev d0",
            "rule add not fwmark 0xca6c/0xffff table 51820 priority 100",
            "rule add table main suppress_prefixlength 0 priority 99",
            "rule add from 192.0.2.0/24 to 203.0.113.0/25 iif lo tos 0x10 table 100000 "
            "priority 200",
            "rule add oif d1 ipproto udp sport 1000-2000 dport 51820 uidrange 100-200 "
            "table 51820 priority 300",
            "rule add goto 300 priority 50", "rule add suppress_ifgroup 5 table main priority 400",
            "-6 rule add not fwmark 51820 table 51820 priority 100",
            "rule add blackhole priority 500"]
        for line in setup:
            run("ip", "-n", ns, *line.split())
        for read in ("links", "rules", "main_routes", "addresses"):
            assert getattr(ours, read)() == getattr(theirs, read)(), read
        assert len(ours.rules()) == 13
        routing = read_routing(lambda: rtnetlink_in(ns))
        assert routing == read_routing(lambda: pyroute2_in(ns))
        assert any(r.multipath for r in routing.routes)
        assert {r.table for r in routing.routes} >= {254, 255, 51820, 100000}
        assert any(r.mtu == 1400 for r in routing.routes)
        assert 7 in routing.groups.values()
    finally:
        ours.close()
        theirs.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_serving_never_loads_pyroute2_without_a_kernel_wireguard_device() -> None:
    """Its package import loads IPDB, NDB and more (24 MiB): a host of userspace devices
    only (and `wgnest serve`'s own imports) never needs it."""
    from tests.fresh_python import run_fresh

    code = ("import sys, wgnest.runtime.serve, wgnest.runtime.cli\n"
            "from wgnest.snapshot import Reader, take\n"
            "reader = Reader()\n"
            "snap = take(reader)\n"
            "reader.close()\n"
            "assert not any(k.startswith('wireguard') for k, *_ in snap.failures), snap\n"
            "kernel = any(link.kind == 'wireguard' for link in snap.links)\n"
            "print('pyroute2' in sys.modules, kernel)\n")
    loaded, kernel = run_fresh(code).stdout.split()
    assert loaded == kernel  # loaded only where a kernel WireGuard device was read
