"""Rule evaluation and fixes that are never wrong, on hand-built snapshots (no I/O).

Layouts of other managers as they document them: systemd-networkd's full tunnel
(`10: not fwmark 0x8888 lookup 1000`) and Tailscale's (`5210-5250: fwmark 0x80000/0xff0000
...`, `5270: lookup 52`, table 52 holding its routes and, with an exit node, a default).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from tests.test_analysis import (
    DEFAULTS,
    EP0,
    EP1,
    ETH,
    GW4,
    KA,
    KB,
    LINKS,
    TUN,
    UNDER4,
    WG0,
    WG0_FULL,
    WG1_PLAIN,
    base_rules,
    dev,
    flow,
    into,
    path_of,
    peer,
    wg_quick,
)
from wgnest.analysis.fixes import FixKind, Proof
from wgnest.analysis.paths import PathVerdict, diagnose
from wgnest.analysis.rules import Packet, consulted, matches
from wgnest.model.host import LOOKUP, MainRoute, RouteAnswer, Rule, Snapshot
from wgnest.model.probes import ProbeTarget
from wgnest.probe.targets import probe_targets

N = ipaddress.ip_network
NETWORKD = Rule(4, 10, 1000, LOOKUP, 0x8888, 0xFFFFFFFF, invert=True)
TAILSCALE = (Rule(4, 5210, 254, LOOKUP, 0x80000, 0xFF0000),
             Rule(4, 5230, 253, LOOKUP, 0x80000, 0xFF0000),
             Rule(4, 5250, 0, 7, 0x80000, 0xFF0000),
             Rule(4, 5270, 52, LOOKUP))


def host(devices: tuple, rules: tuple[Rule, ...], lookups: dict,  # type: ignore[type-arg]
         routes: tuple[MainRoute, ...] = DEFAULTS) -> Snapshot:
    rules = tuple(sorted(base_rules(4) + base_rules(6) + rules,
                         key=lambda r: (r.family, r.priority)))
    return Snapshot(1700000000.0, devices, LINKS, rules, routes, lookups)


def networkd_catches_wg_quick() -> Snapshot:
    """A networkd full tunnel on tun0 (rule 10) and a wg-quick full tunnel wg0 (mark 51820,
    rules 32764/5): wg0's own marked transport matches rule 10 first, into tun0."""
    return host((WG0_FULL,), (NETWORKD, *wg_quick(51820)), {
        flow(EP0, 51820, 51820): into(TUN, 1000)})


def tailscale_exit_node() -> Snapshot:
    """Tailscale with an exit node (table 52 default via tun0 standing in for tailscale0):
    wg0 (wg-quick, 51820) and a site tunnel wg1 without a mark are both caught by 5270."""
    return host((WG0_FULL, WG1_PLAIN), (*TAILSCALE, *wg_quick(51820)), {
        flow(EP0, 51820, 51820): into(TUN, 52),
        flow(EP1, 0, 40000): into(TUN, 52),
        flow(EP1, 0x80000, 40000): UNDER4,
        flow(EP1, 51820, 40000): into(TUN, 52),
    })


def test_networkd_rule_captures_and_a_rule_fix_is_proposed() -> None:
    p = path_of(diagnose(networkd_catches_wg_quick()), KA)
    assert p.verdict == PathVerdict.NESTED
    assert p.captured_by == "10: not from all fwmark 0x8888 lookup 1000"
    fix = p.fix
    assert fix is not None
    # a host route in main would change nothing: rule 10 comes before every `lookup main`
    assert fix.kind == FixKind.RULE
    assert fix.proof == Proof.RULE_ORDER
    assert fix.commands == ("ip rule add pref 9 to 203.0.113.1/32 ipproto udp dport 51820 "
                            "lookup main",)
    assert fix.config_lines == (
        "PostUp = ip rule add pref 9 to 203.0.113.1/32 ipproto udp dport 51820 lookup main",
        "PostDown = ip rule del pref 9 to 203.0.113.1/32 ipproto udp dport 51820 lookup main")
    assert "suppress_prefixlength" not in fix.explanation
    assert fix.resulting_egress == "eth0"


def test_the_proposed_rule_really_wins_by_the_kernel_rules() -> None:
    """Adding the suggested rule to the rule set: the transport's first consulted rule is
    now a main lookup, and main's most specific route for the endpoint is the underlay."""
    s = networkd_catches_wg_quick()
    added = Rule(4, 9, 254, LOOKUP, dst=N("203.0.113.1/32"), ipproto=17, dport=(51820, 51820))
    pkt = Packet(flow(EP0, 51820, 51820), None)
    order = [r for r in consulted((*s.rules, added), pkt) if r.table != 255]  # local: no hit
    assert order[0] == added
    assert order[1] == NETWORKD  # what captured it before now comes after
    other_port = Packet(flow("203.0.113.1:1", 51820, 51820), None)
    assert not matches(added, other_port)  # only the transport is steered


def test_tailscale_site_tunnel_gets_the_kernel_verified_mark() -> None:
    p = path_of(diagnose(tailscale_exit_node()), KB)
    assert p.verdict == PathVerdict.NESTED
    assert p.captured_by == "5270: from all lookup 52"
    assert p.fix is not None
    assert (p.fix.kind, p.fix.fwmark, p.fix.proof) == (FixKind.FWMARK, 0x80000, Proof.KERNEL)


def test_tailscale_wg_quick_full_tunnel_gets_a_rule_before_5270() -> None:
    p = path_of(diagnose(tailscale_exit_node()), KA)
    assert p.captured_by == "5270: from all lookup 52"
    assert p.fix is not None
    assert p.fix.kind == FixKind.RULE
    assert p.fix.commands[0].startswith("ip rule add pref 5269 to 203.0.113.1/32 ")


def test_wg_quick_suppress_rule_lets_a_host_route_win() -> None:
    """The landed behaviour stays where it is right: two wg-quick full tunnels catch each
    other in their own tables; main's suppress_prefixlength 0 rule comes first."""
    wg1 = dev(4, 51821, 51821, peer(KB, EP1, "0.0.0.0/0"))
    s = host((WG0_FULL, wg1), wg_quick(51820) + wg_quick(51821, 32763), {
        flow(EP0, 51820, 51820): into(4, 51821), flow(EP1, 51821, 51821): into(WG0, 51820)})
    p = path_of(diagnose(s), KA)
    assert p.captured_by == "32763: not from all fwmark 0xca6d lookup 51821"
    assert p.fix is not None
    assert (p.fix.kind, p.fix.proof) == (FixKind.ROUTE, Proof.RULE_ORDER)
    assert "32762: from all lookup main suppress_prefixlength 0" in p.fix.explanation


def test_rule_before_main_with_a_tunnel_route_in_main_adds_the_host_route_too() -> None:
    routes = (*DEFAULTS, MainRoute(N("203.0.113.0/24"), TUN, ""))
    s = dataclasses.replace(networkd_catches_wg_quick(), main_routes=routes)
    fix = path_of(diagnose(s), KA).fix
    assert fix is not None
    assert fix.kind == FixKind.RULE
    assert fix.commands[1] == f"ip route add 203.0.113.1/32 via {GW4} dev eth0"


def test_selectors_that_exclude_the_transport_do_not_capture() -> None:
    pkt = Packet(flow(EP0, 0, 51820), ipaddress.ip_address("192.0.2.10"))
    assert not matches(Rule(4, 1, 9, LOOKUP, ipproto=6), pkt)  # tcp only
    assert matches(Rule(4, 1, 9, LOOKUP, ipproto=17, dport=(51820, 51820)), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, dport=(1, 100)), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, sport=(1, 100)), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, uid=(1000, 2000)), pkt)  # the kernel sends as 0
    assert matches(Rule(4, 1, 9, LOOKUP, iif="lo"), pkt)  # locally generated
    assert not matches(Rule(4, 1, 9, LOOKUP, iif="eth0"), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, oif="eth0"), pkt)  # the socket is not bound
    assert matches(Rule(4, 1, 9, LOOKUP, src=N("192.0.2.0/24")), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, src=N("10.0.0.0/8")), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, dst=N("10.0.0.0/8")), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, l3mdev=True), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, tos=0x10), pkt)
    # `not` inverts all selectors together, as the kernel does
    assert matches(Rule(4, 1, 9, LOOKUP, 0x8888, 0xFFFFFFFF, invert=True, ipproto=6), pkt)
    assert not matches(Rule(4, 1, 9, LOOKUP, invert=True, ipproto=17), pkt)


def test_goto_and_nop_are_followed() -> None:
    rules = (Rule(4, 100, 0, 2, goto=300), Rule(4, 200, 9, LOOKUP), Rule(4, 250, 0, 3),
             Rule(4, 300, 10, LOOKUP))
    pkt = Packet(flow(EP0, 0, 51820), None)
    assert [r.priority for r in consulted(rules, pkt)] == [300]


def test_rule_text_has_every_selector() -> None:
    r = Rule(4, 10, 1000, LOOKUP, 0x8888, 0xFFFFFFFF, True, dst=N("1.2.3.0/24"), iif="lo",
             uid=(0, 0), ipproto=17, sport=(5, 5), dport=(51820, 51830))
    assert str(r) == ("10: not from all to 1.2.3.0/24 fwmark 0x8888 iif lo uidrange 0-0 "
                      "ipproto udp sport 5 dport 51820-51830 lookup 1000")
    assert str(Rule(4, 11, 0, 2, goto=20)) == "11: from all goto 20"


def test_local_endpoint_is_direct_not_no_route() -> None:
    """RTN_LOCAL: the endpoint is an address of this host; the transport goes over lo."""
    wg1 = dev(4, 40000, 0, peer(KB, "192.0.2.10:51820", "10.1.0.0/24"))
    s = host((wg1,), (), {flow("192.0.2.10:51820", 0, 40000):
                          RouteAnswer(oif=1, table=255, route_type=2)})
    p = path_of(diagnose(s), KB)
    assert (p.verdict, p.egress, p.table) == (PathVerdict.DIRECT, "lo", "local")


def test_multipath_default_names_its_first_hop_device() -> None:
    """A default with several next hops is read by its first hop: never `dev ` empty."""
    main = host((WG0_FULL, WG1_PLAIN), (), {
        flow(EP0, 51820, 51820): UNDER4, flow(EP1, 0, 40000): into(WG0, 254)},
        routes=(MainRoute(N("0.0.0.0/0"), ETH, "192.0.2.1"),))
    fix = path_of(diagnose(main), KB).fix
    assert fix is not None
    assert fix.commands[0] == "ip route add 198.51.100.7/32 via 192.0.2.1 dev eth0"
    no_device = dataclasses.replace(main, main_routes=(MainRoute(N("0.0.0.0/0"), 0, GW4),))
    fix = path_of(diagnose(no_device), KB).fix
    assert fix is not None
    assert not fix.commands[0].endswith("dev ")
    assert fix.proof == Proof.NONE


def test_direct_probe_of_a_route_fix_is_bound_to_the_underlay() -> None:
    """With a route fix the device's own mark is the nested path again: the direct probe
    leaves bound to the underlay device, so the kernel skips routes via the tunnel."""
    s = host((WG0_FULL, WG1_PLAIN), (), {
        flow(EP0, 51820, 51820): UNDER4, flow(EP1, 0, 40000): into(WG0, 254)})
    targets = probe_targets(s, diagnose(s), {}).targets
    direct = [t for t in targets if t.device == "wg1" and t.path == "direct"]
    assert direct == [ProbeTarget("wg1", KB, "direct", ipaddress.ip_address("198.51.100.7"), 0,
                                  "eth0", urgent=True)]  # nested: probed every round
    transport = [t for t in targets if t.device == "wg1" and t.path == "transport"]
    assert transport[0].bind_device == ""


def test_merged_plan_leaves_out_only_a_direct_path_that_is_the_transport_flow() -> None:
    """merge=True (the defaults): a direct peer's direct path is its transport's flow and is
    left out; a nested peer's, bound to the underlay by its fix, is kept."""
    s = host((WG0_FULL, WG1_PLAIN), (), {
        flow(EP0, 51820, 51820): UNDER4, flow(EP1, 0, 40000): into(WG0, 254)})
    import re

    from wgnest.probe.targets import Selection

    paths = diagnose(s)
    full = probe_targets(s, paths, {}).targets
    merged = probe_targets(s, paths, {}, merge=True).targets

    def flow_of(device: str, path: str) -> tuple[object, ...]:
        (t,) = [t for t in full if (t.device, t.path) == (device, path)]
        return t.address, t.mark, t.bind_device

    assert flow_of("wg0", "direct") == flow_of("wg0", "transport")  # wg0 is direct
    assert flow_of("wg1", "direct") != flow_of("wg1", "transport")  # bound to eth0 by its fix
    assert [t for t in full if (t.device, t.path) != ("wg0", "direct")] == merged
    # not selected: as many targets as the plan would have had (one for wg0's two paths)
    skipped = probe_targets(s, paths, {}, Selection(re.compile("none")), merge=True).skipped
    assert skipped["not_selected"] == 1 + 2
    assert probe_targets(s, paths, {}, Selection(re.compile("none"))).skipped[
        "not_selected"] == 2 + 2


def test_kernel_device_whose_socket_is_elsewhere_is_unknown_not_a_loop() -> None:
    """The netns trick: a kernel device moved here from the namespace that made it keeps
    its UDP socket there; these tables (default via the device itself) do not route it."""
    wg0 = dev(WG0, 51820, 0, peer(KA, EP0, "0.0.0.0/0"))
    s = dataclasses.replace(host((wg0,), (), {flow(EP0, 0, 51820): into(WG0, 254)}),
                            udp_ports=frozenset({(4, 53)}))
    p = path_of(diagnose(s), KA)
    assert p.verdict == PathVerdict.UNKNOWN
    assert "another namespace" in p.error
    assert not p.alarming
    here = dataclasses.replace(s, udp_ports=frozenset({(4, 51820)}))
    assert path_of(diagnose(here), KA).verdict == PathVerdict.LOOP  # a real loop stays one


@pytest.mark.parametrize("impl", ["userspace"])
def test_userspace_devices_route_where_their_process_is(impl: str) -> None:
    wg0 = dev(WG0, 51820, 0, peer(KA, EP0, "0.0.0.0/0"), impl=impl)
    s = dataclasses.replace(host((wg0,), (), {flow(EP0, 0, 51820): into(WG0, 254)}),
                            udp_ports=frozenset())
    assert path_of(diagnose(s), KA).verdict == PathVerdict.LOOP


def test_tunnel_probes_need_a_recent_handshake_and_selection_filters() -> None:
    import re

    from wgnest.probe.targets import Selection

    base = host((WG0_FULL, WG1_PLAIN), wg_quick(51820), {
        flow(EP0, 51820, 51820): UNDER4, flow(EP1, 0, 40000): UNDER4})
    fresh = dataclasses.replace(WG0_FULL, peers=(dataclasses.replace(
        WG0_FULL.peers[0], allowed_ips=(N("10.0.0.1/32"),), last_handshake=base.taken_at - 10),))
    stale = dataclasses.replace(WG1_PLAIN, peers=(dataclasses.replace(
        WG1_PLAIN.peers[0], allowed_ips=(N("10.1.0.1/32"),),
        last_handshake=base.taken_at - 600),))
    s = dataclasses.replace(base, devices=(fresh, stale))
    plan = probe_targets(s, diagnose(s), {})
    tunnels = {t.device for t in plan.targets if t.path == "tunnel"}
    assert tunnels == {"wg0"}  # wg1's last handshake is 10 minutes old: nothing would answer
    assert plan.skipped == {"not_selected": 0, "no_recent_handshake": 1}
    only = probe_targets(s, diagnose(s), {}, Selection(re.compile("wg1")))
    assert {t.device for t in only.targets} == {"wg1"}
    assert only.skipped["not_selected"] == 3  # wg0's tunnel, transport and direct


def test_planned_targets_of_unchanged_peers_are_the_same_objects() -> None:
    from wgnest.probe.targets import TargetCache

    base = host((WG0_FULL, WG1_PLAIN), wg_quick(51820), {
        flow(EP0, 51820, 51820): UNDER4, flow(EP1, 0, 40000): UNDER4})
    fresh = dataclasses.replace(WG0_FULL, peers=(dataclasses.replace(
        WG0_FULL.peers[0], allowed_ips=(N("10.0.0.1/32"),), last_handshake=base.taken_at - 10),))
    s = dataclasses.replace(base, devices=(fresh, WG1_PLAIN))
    paths = diagnose(s)
    cache: TargetCache = {}
    cold = probe_targets(s, paths, {}, cache=cache)
    assert cold == probe_targets(s, paths, {})
    warm = probe_targets(s, paths, {}, cache=cache)
    assert warm == cold
    assert all(a is b for a, b in zip(warm.targets, cold.targets, strict=True))
    # the handshake ages past three minutes: wg0's tunnel probe goes, planned again
    later = dataclasses.replace(s, taken_at=s.taken_at + 600)
    aged = probe_targets(later, paths, {}, cache=cache)
    assert aged == probe_targets(later, paths, {})
    assert "tunnel" not in {t.path for t in aged.targets}
    assert aged.skipped["no_recent_handshake"] == 1
