"""--netns on hand-built host snapshots (no I/O): moved kernel devices routed by the
namespace holding their socket, transports forwarded into another namespace's tunnel, the
netns label on every series, the grouped check output; and the small pure helpers of the
namespace source (the spec, paths inside a container's root, labels)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wgnest.analysis.forwarding import address_index, forwarded_flows
from wgnest.analysis.host import diagnose_host
from wgnest.analysis.paths import PathVerdict, PeerPath
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
from wgnest.model.netns import Guest, HostSnapshot, Moved, NetnsSnapshot
from wgnest.sources import netns as netns_source
from wgnest.sources.netns import NetnsSpec, process_label, resolve_in_root
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.metrics import Health, exporter_families, netns_families
from wgnest.surfaces.report import render_json_netns, render_text_netns

N = ipaddress.ip_network
IP = ipaddress.ip_address
KA, KB = "A" * 43 + "=", "B" * 43 + "="
EP = "203.0.113.9"
# namespace "host": eth0 2 (uplink, gw 192.0.2.1), veth0 3 (10.9.0.1, towards "box"),
# wg0 4 (a wg-quick full tunnel: `not fwmark 51820 lookup 51820`)
# namespace "box": lo 1, eth0 2 (veth, 10.9.0.2, default via 10.9.0.1), wgbox 3
HOST_LINKS = (Link(1, "lo", "", 65536, True), Link(2, "eth0", "", 1500, True),
              Link(3, "veth0", "veth", 1500, True), Link(4, "wg0", "wireguard", 1420, True))
BOX_LINKS = (Link(1, "lo", "", 65536, True), Link(2, "eth0", "veth", 1500, True),
             Link(3, "wgbox", "tun", 1420, True))
FULL_TUNNEL_RULES = (
    Rule(4, 0, 255, 1), Rule(4, 32764, 254, 1, suppress_prefixlength=0),
    Rule(4, 32765, 51820, 1, fwmark=51820, fwmask=0xFFFFFFFF, invert=True),
    Rule(4, 32766, 254, 1), Rule(4, 32767, 253, 1))
PLAIN_RULES = (Rule(4, 0, 255, 1), Rule(4, 32766, 254, 1), Rule(4, 32767, 253, 1))
UPLINK = RouteAnswer(oif=2, gateway="192.0.2.1", prefsrc="192.0.2.10", table=254)


def _peer(key: str, ep: str | None, port: int = 51820, allowed: str = "10.99.0.0/24") -> Peer:
    endpoint = Endpoint(IP(ep), port) if ep else None
    return Peer(key, endpoint, (N(allowed),), 0.0, 0, 0, 0)


def _device(name: str, index: int, impl: str, port: int, mark: int, *peers: Peer) -> Device:
    return Device(name, index, impl, "P" * 43 + "=", port, mark, 1420, peers)


WG0 = _device("wg0", 4, "kernel", 51820, 51820, _peer(KA, "198.51.100.1", allowed="0.0.0.0/0"))
WGBOX = _device("wgbox", 3, "userspace", 40000, 0, _peer(KB, EP, 51999))
BOX_FLOW = Flow(IP(EP), 0, 40000, 51999)
FORWARDED = Flow(IP(EP), 0, 40000, 51999, 0, 3, IP("10.9.0.2"))
WG0_FLOW = Flow(IP("198.51.100.1"), 51820, 51820, 51820)


def _box(extra: dict[Flow, RouteAnswer] | None = None) -> NetnsSnapshot:
    snap = Snapshot(100.0, (WGBOX,), BOX_LINKS, PLAIN_RULES,
                    (MainRoute(N("0.0.0.0/0"), 2, "10.9.0.1"),),
                    {BOX_FLOW: RouteAnswer(oif=2, gateway="10.9.0.1", prefsrc="10.9.0.2",
                                           table=254), **(extra or {})})
    return NetnsSnapshot("box", snap, "/proc/77/ns/net", enter="nsenter -t 77 -n",
                         addresses=((1, "127.0.0.1"), (2, "10.9.0.2")))


def _host(lookups: dict[Flow, RouteAnswer]) -> NetnsSnapshot:
    snap = Snapshot(100.0, (WG0,), HOST_LINKS, FULL_TUNNEL_RULES,
                    (MainRoute(N("0.0.0.0/0"), 2, "192.0.2.1"),),
                    {WG0_FLOW: UPLINK, **lookups})
    return NetnsSnapshot("host", snap, "", addresses=((1, "127.0.0.1"), (2, "192.0.2.10"),
                                                      (3, "10.9.0.1")))


def test_a_container_behind_the_host_full_tunnel_is_nested_in_the_host_tunnel() -> None:
    # the host forwards the box's transport: unmarked, it is captured by wg-quick's rule
    host = HostSnapshot(100.0, (_host({FORWARDED: RouteAnswer(oif=4, table=51820)}), _box()),
                        labelled=True)
    paths = diagnose_host(host)
    (box,) = paths["box"]
    assert box.verdict == PathVerdict.NESTED
    assert (box.outer, box.outer_netns, box.transport_netns) == ("wg0", "host", "")
    assert box.chain == ("wgbox", "eth0", "host/veth0", "host/wg0")
    assert box.outer_peer == KA  # the host tunnel's peer whose allowed IPs hold the endpoint
    # inner MTU: the box's link 1500 and the host's wg0 1420 each less one layer of headers
    assert box.mtu is not None
    assert (box.mtu.usable_mtu, box.mtu.direct_mtu, box.mtu.cost_bytes) == (1360, 1440, 80)
    assert "32765" in box.captured_by
    # no mark set in the box reaches the host: the fix is the host's, and wg-quick's
    # suppress_prefixlength rule lets a host route in its main table win
    assert box.fix is not None
    assert box.fix.commands == ("ip route add 203.0.113.9/32 via 192.0.2.1 dev eth0",)
    assert box.fix.config_lines == ()  # not the box's wg-quick config: it runs in the box
    assert paths["host"][0].verdict == PathVerdict.DIRECT


def test_a_fix_in_a_namespace_wgnest_does_not_run_in_says_how_to_enter_it() -> None:
    host = _host({FORWARDED: RouteAnswer(oif=4, table=51820)})
    named = NetnsSnapshot("gw", host.snapshot, "/run/netns/gw", enter="ip netns exec gw",
                          addresses=host.addresses)
    box = diagnose_host(HostSnapshot(100.0, (named, _box()), labelled=True))["box"][0]
    assert box.fix is not None
    assert box.outer_netns == "gw"
    assert box.fix.commands == (
        "ip netns exec gw ip route add 203.0.113.9/32 via 192.0.2.1 dev eth0",)


def test_forwarding_is_followed_only_when_the_next_hop_is_a_namespace_read() -> None:
    lonely = HostSnapshot(100.0, (_box(),), labelled=True)
    assert diagnose_host(lonely)["box"][0].verdict == PathVerdict.DIRECT
    assert forwarded_flows(lonely.by_name()) == {}
    # not asked yet: the builder is told what to ask where
    host = HostSnapshot(100.0, (_host({}), _box()), labelled=True)
    assert forwarded_flows(host.by_name()) == {"host": [FORWARDED]}
    assert diagnose_host(host)["box"][0].verdict == PathVerdict.DIRECT
    # the host routes it to its uplink: direct, and nothing more to ask
    routed = HostSnapshot(100.0, (_host({FORWARDED: UPLINK}), _box()), labelled=True)
    assert forwarded_flows(routed.by_name()) == {}
    assert diagnose_host(routed)["box"][0].verdict == PathVerdict.DIRECT


def test_an_address_held_by_two_namespaces_is_not_followed() -> None:
    twin = NetnsSnapshot("twin", Snapshot(100.0), "/run/netns/twin", addresses=((5, "10.9.0.1"),))
    host = HostSnapshot(100.0, (_host({FORWARDED: RouteAnswer(oif=4, table=51820)}), _box(),
                                twin), labelled=True)
    assert address_index(host.by_name())["10.9.0.1"] == [("host", 3), ("twin", 5)]
    assert diagnose_host(host)["box"][0].verdict == PathVerdict.DIRECT


# The netns trick: kernel device "wgmv" made in "host" and moved into "vpn", whose only
# route is the device. Seen from "vpn" alone its transport loops; its socket is in "host".
WGMV = _device("wgmv", 7, "kernel", 51877, 0, _peer(KB, EP, 51999))
MV_FLOW = Flow(IP(EP), 0, 51877, 51999)
VPN_LINKS = (Link(1, "lo", "", 65536, True), Link(7, "wgmv", "wireguard", 1420, True))


def _vpn() -> NetnsSnapshot:
    snap = Snapshot(100.0, (WGMV,), VPN_LINKS, PLAIN_RULES,
                    (MainRoute(N("0.0.0.0/0"), 7, ""),), {MV_FLOW: RouteAnswer(oif=7, table=254)},
                    udp_ports=frozenset())
    return NetnsSnapshot("vpn", snap, "/run/netns/vpn", enter="ip netns exec vpn")


def _birth(answer: RouteAnswer, fixes: dict[Flow, RouteAnswer] | None = None) -> NetnsSnapshot:
    host = _host({MV_FLOW: answer, **(fixes or {})})
    snap = host.snapshot
    return NetnsSnapshot("host", Snapshot(snap.taken_at, snap.devices, snap.links, snap.rules,
                                          snap.main_routes, snap.lookups,
                                          frozenset({(4, 51877), (4, 51820)})),
                         "", guests=(Guest("vpn", WGMV),))


def test_a_moved_device_is_routed_by_its_birth_namespace() -> None:
    alone = diagnose_host(HostSnapshot(100.0, (_vpn(),), labelled=True))["vpn"][0]
    assert alone.verdict == PathVerdict.UNKNOWN
    assert "namespace" in alone.error
    host = HostSnapshot(100.0, (_vpn(), _birth(UPLINK)), labelled=True,
                        moved=(Moved("vpn", "wgmv", "host"),))
    path = diagnose_host(host)["vpn"][0]
    assert (path.verdict, path.transport_netns, path.egress) == (
        PathVerdict.DIRECT, "host", "eth0")


def test_a_moved_device_nested_in_a_full_tunnel_of_its_birth_namespace() -> None:
    fixed = Flow(IP(EP), 51820, 51877, 51999)
    host = HostSnapshot(100.0, (_vpn(), _birth(RouteAnswer(oif=4, table=51820),
                                               {fixed: UPLINK})),
                        labelled=True, moved=(Moved("vpn", "wgmv", "host"),))
    path = diagnose_host(host)["vpn"][0]
    assert path.verdict == PathVerdict.NESTED
    assert (path.outer, path.outer_netns, path.transport_netns) == ("wg0", "host", "host")
    assert path.fix is not None
    assert path.fix.fwmark == 51820
    assert path.fix.verified
    # the mark is set on the device, in the device's namespace
    assert path.fix.commands == ("ip netns exec vpn wg set wgmv fwmark 51820",)


def test_a_moved_device_whose_socket_is_not_found_is_unknown_with_the_reason() -> None:
    why = "no UDP socket on port 51877 here, and none of the namespaces wgnest can enter has it"
    host = HostSnapshot(100.0, (_vpn(),), labelled=True, moved=(Moved("vpn", "wgmv", "", why),))
    path = diagnose_host(host)["vpn"][0]
    assert (path.verdict, path.error) == (PathVerdict.UNKNOWN, why)


def _views() -> list[tuple[str, str, Snapshot, list[PeerPath]]]:
    host = HostSnapshot(100.0, (_host({FORWARDED: RouteAnswer(oif=4, table=51820)}), _box()),
                        labelled=True)
    paths = diagnose_host(host)
    return [(ns.name, ns.path, ns.snapshot, paths[ns.name]) for ns in host.namespaces]


def test_every_series_has_the_netns_label_and_families_are_merged() -> None:
    text = exposition(netns_families(_views(), {})).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE wireguard_device_info gauge") == 1
    assert [s.value for s in families.pop("wgnest_netns").samples] == [2]
    for family in families.values():
        for sample in family.samples:
            assert sample.labels.get("netns") in ("host", "box"), sample
    nested = {s.labels["device"]: s for s in families["wireguard_peer_nested"].samples}
    assert nested["wgbox"].value == 1
    assert nested["wgbox"].labels["outer_device"] == "wg0"
    assert nested["wgbox"].labels["outer_netns"] == "host"
    info = {s.labels["netns"]: s.labels["path"] for s in families["wgnest_netns_info"].samples}
    assert info == {"host": "", "box": "/proc/77/ns/net"}


def test_same_device_name_in_two_namespaces_stays_two_series() -> None:
    a = NetnsSnapshot("a", Snapshot(1.0, (WGBOX,), BOX_LINKS), "/run/netns/a")
    b = NetnsSnapshot("b", Snapshot(1.0, (WGBOX,), BOX_LINKS), "/run/netns/b")
    host = HostSnapshot(1.0, (a, b), labelled=True)
    paths = diagnose_host(host)
    text = exposition(netns_families([(n.name, n.path, n.snapshot, paths[n.name])
                                      for n in host.namespaces], {})).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("wireguard_device_info{")]
    assert len(lines) == 2
    assert len(set(lines)) == 2


def test_health_per_namespace_and_an_unreadable_one() -> None:
    failures = (SourceFailure("netns", "eperm", "netns c: setns: Operation not permitted "
                              "(entering a namespace needs CAP_SYS_ADMIN)", "c"),
                SourceFailure("rules", "errno", "boom", "b"))
    health = Health(("links", "rules", "refresh"), failures, {}, {}, 5.0, 0, ("a", "b"),
                    {"a": {"links": 0.5}})
    text = exposition(exporter_families(1.0, health)).decode()
    success = {(s.labels["collector"], s.labels["netns"]): s.value
               for f in text_string_to_metric_families(text) if f.name == "wgnest_collector_success"
               for s in f.samples}
    assert success[("netns", "c")] == 0
    assert ("links", "c") not in success  # never read: only its netns failure shows
    assert success[("rules", "b")] == 0
    assert success[("rules", "a")] == 1
    assert success[("netns", "a")] == 1
    assert success[("refresh", "")] == 1
    assert 'wgnest_collector_duration_seconds{collector="links",netns="a"} 0.5' in text


def test_check_json_and_text_group_by_namespace() -> None:
    views = _views()
    failure = SourceFailure("netns", "eperm", "netns c: setns denied", "c")
    doc = json.loads(render_json_netns(views, [failure]))
    assert [ns["netns"] for ns in doc["namespaces"]] == ["host", "box"]
    (peer,) = doc["namespaces"][1]["peers"]
    assert (peer["netns"], peer["verdict"], peer["outer_netns"]) == ("box", "nested", "host")
    assert doc["status"] == "critical"
    assert doc["exit_code"] == 2
    assert doc["errors"] == [{"collector": "netns", "reason": "eperm",
                              "message": "netns c: setns denied", "netns": "c"}]
    text = render_text_netns(views, [failure], Path("/nonexistent"))
    assert "netns box  (/proc/77/ns/net)" in text
    assert "NESTED in wg0 of netns host" in text


def test_spec_parsing() -> None:
    assert NetnsSpec.parse([]) == NetnsSpec("self")
    assert NetnsSpec.parse("all") == NetnsSpec("all")
    assert NetnsSpec.parse(["a,b", "/proc/1/ns/net", "a"]) == NetnsSpec(
        "list", ("a", "b", "/proc/1/ns/net"))
    for bad in (["self,a"], ["all", "x"], ["x/y"], [".."]):
        with pytest.raises(ValueError, match="--netns"):
            NetnsSpec.parse(bad)


def test_paths_inside_a_container_root_follow_its_own_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run" / "wireguard").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var" / "run")  # absolute: would leave the root if followed
    assert resolve_in_root(root, Path("/var/run/wireguard")) == root / "run" / "wireguard"
    os.symlink("../run", root / "var" / "rel")
    assert resolve_in_root(root, Path("/var/rel/wireguard")) == root / "run" / "wireguard"


def test_a_process_namespace_is_labelled_by_hostname_then_comm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pid in ("self", "42", "43"):
        (tmp_path / pid / "ns").mkdir(parents=True)
        (tmp_path / pid / "ns" / "uts").write_text(pid)  # distinct inodes: distinct namespaces
    (tmp_path / "42" / "root" / "etc").mkdir(parents=True)
    (tmp_path / "42" / "root" / "etc" / "hostname").write_text("wg-easy\n")
    (tmp_path / "42" / "comm").write_text("node\n")
    (tmp_path / "43" / "comm").write_text("wireguard go\n")
    monkeypatch.setattr(netns_source, "PROC", tmp_path)
    assert process_label([42]) == "wg-easy"
    assert process_label([43]) == "wireguard_go"  # no hostname: its comm, made label-safe


def test_status_page_groups_by_namespace_problems_first() -> None:
    from wgnest.surfaces.status_page import render_netns

    failure = SourceFailure("netns", "eperm", "netns c: setns denied", "c")
    page = render_netns(_views(), [failure], {})
    problems = page.index("<h2>Problems (1)</h2>")
    assert page.index('<h2 id="netns-host">netns host</h2>') > problems
    assert page.index('<h2 id="netns-box">netns box</h2>') > page.index("netns host</h2>")
    assert "box/wgbox" in page[problems:page.index("netns host</h2>")]  # NETNS/DEVICE
    assert 'id="dev-box/wgbox"' in page  # device anchors are per namespace
    assert "netns c: setns denied" in page
    assert "CRITICAL" in page
