"""Where each peer's transport packets go: direct, nested in another tunnel, or a loop.

Input is a Snapshot holding the kernel's answers for every transport flow (and for the
candidate fixes, see fix_flows). Output is one PeerPath per peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from wgnest.model import (
    TUNNEL_KINDS,
    WG_OVERHEAD,
    DefaultRoute,
    Device,
    Flow,
    IPAddress,
    Link,
    Peer,
    RouteAnswer,
    Snapshot,
    table_name,
)

DIRECT, NESTED, LOOP, NO_ROUTE, NO_ENDPOINT, UNKNOWN = (
    "direct", "nested", "loop", "no_route", "no_endpoint", "unknown")


@dataclass(frozen=True, slots=True)
class Fix:
    kind: str  # "fwmark" (set the device's fwmark) or "route" (host route via the underlay)
    fwmark: int  # 0 unless kind == "fwmark"
    verified: bool  # the kernel was asked again with the fix and routed it to the underlay
    config_line: str  # the line for the device's [Interface] section, "" for kind "route"
    command: str  # the runtime command that applies it
    explanation: str
    resulting_egress: str = ""


@dataclass(frozen=True, slots=True)
class MtuCost:
    device_mtu: int
    usable_mtu: int  # largest inner MTU that fits through the path taken
    direct_mtu: int  # largest inner MTU if the transport went straight to the underlay
    cost_bytes: int  # direct_mtu - usable_mtu


@dataclass(frozen=True, slots=True)
class PeerPath:
    device: str
    public_key: str
    endpoint: str  # "ip:port" or "[ip6]:port", "" when none
    verdict: str
    flow: Flow | None = None
    egress: str = ""
    egress_kind: str = ""
    table: str = ""
    gateway: str = ""
    source: str = ""
    error: str = ""
    outer: str = ""  # the tunnel the transport is routed into (nested, loop)
    outer_peer: str = ""  # the outer tunnel's peer that carries it; "" if none (dropped)
    chain: tuple[str, ...] = ()  # devices the packets cross, ending at the underlay
    allowed: bool = False  # nesting declared intentional with --allow-nesting
    fix: Fix | None = None
    mtu: MtuCost | None = None

    @property
    def alarming(self) -> bool:
        return self.verdict == LOOP or (self.verdict == NESTED and not self.allowed)


def transport_flow(device: Device, peer: Peer) -> Flow | None:
    """The flow WireGuard sends for this peer: UDP, device mark, listen port, uid 0."""
    if peer.endpoint is None:
        return None
    oif = peer.endpoint.scope_id if peer.endpoint.family == 6 else 0
    return Flow(peer.endpoint.address, device.fwmark, device.listen_port, peer.endpoint.port, oif)


def transport_flows(devices: Iterable[Device]) -> list[Flow]:
    return [f for d in devices for p in d.peers if (f := transport_flow(d, p)) is not None]


class _View:
    """Indexes over one snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.links = {link.index: link for link in snap.links}
        self.wg_by_index = {d.ifindex: d for d in snap.devices}
        self.wg_by_name = {d.name: d for d in snap.devices}

    def is_tunnel(self, oif: int) -> bool:
        link = self.links.get(oif)
        return oif in self.wg_by_index or (link is not None and link.kind in TUNNEL_KINDS)

    def name(self, oif: int) -> str:
        link = self.links.get(oif)
        return link.name if link else (f"if{oif}" if oif else "")

    def kind(self, oif: int) -> str:
        if oif in self.wg_by_index:
            return "wireguard"
        link = self.links.get(oif)
        return link.kind if link else ""

    def underlay_default(self, family: int) -> DefaultRoute | None:
        """The main table's first default route of this family that is not a tunnel."""
        return next((d for d in self.snap.defaults
                     if d.family == family and not self.is_tunnel(d.oif)), None)

    def answer(self, flow: Flow | None) -> RouteAnswer | None:
        return self.snap.lookups.get(flow) if flow is not None else None


def carrying_peer(device: Device, address: IPAddress) -> Peer | None:
    """The peer of `device` whose allowed IPs hold `address` (longest prefix), as wg_xmit picks."""
    best: tuple[int, Peer] | None = None
    for peer in device.peers:
        for net in peer.allowed_ips:
            if net.version == address.version and address in net and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, peer)
    return best[1] if best else None


def fix_candidates(view: _View, device: Device, answer: RouteAnswer, family: int) -> list[int]:
    """Marks worth trying, best first: the mark of the `not fwmark` rule that sent the packet
    to the table it was routed by, then every other rule's mark, in priority order."""
    rules = [r for r in view.snap.rules if r.family == family and r.fwmask and r.action == 1]
    first = [r.fwmark for r in rules if r.invert and r.table == answer.table]
    marks = [m for m in dict.fromkeys(first + [r.fwmark for r in rules]) if m]
    return [m for m in marks if m != device.fwmark]


def self_policy_routed(view: _View, device: Device) -> bool:
    """The device's own mark is the key of a `not fwmark` rule: it is a policy-routed full
    tunnel (wg-quick, NetworkManager). Changing its mark would break its own routing and
    wg-quick's teardown, so only a route can fix it."""
    full = any(n.prefixlen == 0 for p in device.peers for n in p.allowed_ips)
    return full and bool(device.fwmark) and any(
        r.invert and r.fwmask and r.fwmark == device.fwmark for r in view.snap.rules)


def fix_flows(snap: Snapshot) -> list[Flow]:
    """Flows to look up so the fix can be verified by the kernel (the caller asks them)."""
    view = _View(snap)
    out: list[Flow] = []
    if not any(a.ok and view.is_tunnel(a.oif) for a in snap.lookups.values()):
        return out  # no transport is routed into a tunnel: no fix to verify (the usual case)
    for device in snap.devices:
        if self_policy_routed(view, device):
            continue
        for peer in device.peers:
            flow = transport_flow(device, peer)
            ans = view.answer(flow)
            if flow is None or ans is None or not ans.ok or not view.is_tunnel(ans.oif):
                continue
            for mark in fix_candidates(view, device, ans, flow.dst.version):
                out.append(dataclasses.replace(flow, mark=mark))
    return out


def _underlay_fix(view: _View, device: Device, peer: Peer, why: str) -> Fix:
    assert peer.endpoint is not None
    ep = peer.endpoint.address
    plen = ep.max_prefixlen
    default = view.underlay_default(ep.version)
    six = "-6 " if ep.version == 6 else ""
    if default is None:
        command = f"ip {six}route add {ep}/{plen} via <underlay gateway> dev <underlay device>"
    else:
        via = f"via {default.gateway} " if default.gateway else ""
        command = f"ip {six}route add {ep}/{plen} {via}dev {view.name(default.oif)}"
    return Fix("route", 0, False, "", command, why)


def _fix(view: _View, device: Device, peer: Peer, flow: Flow, ans: RouteAnswer) -> Fix:
    if self_policy_routed(view, device):
        return _underlay_fix(view, device, peer, (
            f"{device.name} is itself a policy-routed full tunnel (fwmark {device.fwmark}); "
            "give its endpoint a host route via the underlay, which wg-quick's "
            "`suppress_prefixlength 0` rule honours"))
    for mark in fix_candidates(view, device, ans, flow.dst.version):
        alt = view.answer(dataclasses.replace(flow, mark=mark))
        if alt is not None and alt.ok and not view.is_tunnel(alt.oif):
            egress = view.name(alt.oif)
            return Fix("fwmark", mark, True, f"FwMark = {mark}",
                       f"wg set {device.name} fwmark {mark}",
                       f"with fwmark {mark} the kernel routes it via {egress} "
                       f"(table {table_name(alt.table)})", egress)
    if ans.table == 254:
        why = (f"a route in the main table sends {flow.dst} into {view.name(ans.oif)}; "
               "no fwmark avoids it: route the endpoint via the underlay "
               f"(or narrow {view.name(ans.oif)}'s AllowedIPs)")
    else:
        why = f"no fwmark the rules offer routes {flow.dst} around table {table_name(ans.table)}"
    return _underlay_fix(view, device, peer, why)


@dataclass(frozen=True, slots=True)
class _Hop:
    link: str
    overhead: int  # header bytes around the inner packet when it crosses this link


def _chain(view: _View, device: Device, peer: Peer, first_oif: int) -> tuple[list[_Hop], str]:
    """Follow the packets through nested tunnels. Returns (links crossed, outer peer key)."""
    assert peer.endpoint is not None
    hops: list[_Hop] = []
    seen = {device.name}
    oif, address, outer_peer = first_oif, peer.endpoint.address, ""
    overhead = WG_OVERHEAD[address.version]
    while True:
        hops.append(_Hop(view.name(oif), overhead))
        outer = view.wg_by_index.get(oif)
        if outer is None or outer.name in seen:
            return hops, outer_peer
        seen.add(outer.name)
        carrier = carrying_peer(outer, address)
        if carrier is None:
            return hops, outer_peer
        outer_peer = outer_peer or carrier.public_key
        flow = transport_flow(outer, carrier)
        ans = view.answer(flow)
        if flow is None or ans is None or not ans.ok:
            return hops, outer_peer
        oif, address = ans.oif, flow.dst
        overhead += WG_OVERHEAD[address.version]


def _mtu(view: _View, device: Device, peer: Peer, hops: list[_Hop]) -> MtuCost | None:
    """Each tunnel layer adds its own headers: the inner MTU that fits is the smallest
    (link MTU - headers carried there); direct, only the underlay and one layer count."""
    assert peer.endpoint is not None
    links = {link.name: link for link in view.snap.links}
    first = {h.link: h for h in reversed(hops)}  # a loop's repeated link carries nothing more
    fits = [links[h.link].mtu - h.overhead for h in first.values() if h.link in links]
    if not fits:
        return None
    usable = min(fits)
    family = peer.endpoint.family
    last = links.get(hops[-1].link)
    if last is not None and not view.is_tunnel(last.index):
        underlay: Link | None = last
    else:
        default = view.underlay_default(family)
        underlay = view.links.get(default.oif) if default is not None else None
    direct = underlay.mtu - WG_OVERHEAD[family] if underlay is not None else usable
    return MtuCost(device.mtu, usable, direct, max(0, direct - usable))


def peer_path(view: _View, device: Device, peer: Peer, allow: Collection[tuple[str, str]]
              ) -> PeerPath:
    # One PeerPath built once per peer (no dataclasses.replace): this runs for every peer.
    flow = transport_flow(device, peer)
    endpoint = str(peer.endpoint or "")
    ans = view.answer(flow)
    if flow is None:
        return PeerPath(device.name, peer.public_key, endpoint, NO_ENDPOINT, flow)
    if ans is None:
        return PeerPath(device.name, peer.public_key, endpoint, UNKNOWN, flow,
                        error="route lookup unavailable")
    egress, kind = view.name(ans.oif), view.kind(ans.oif)
    table = table_name(ans.table) if ans.table else ""
    if not ans.ok:
        return PeerPath(device.name, peer.public_key, endpoint, NO_ROUTE, flow, egress, kind,
                        table, ans.gateway, ans.prefsrc, error=ans.error or "unroutable")
    if not view.is_tunnel(ans.oif):
        return PeerPath(device.name, peer.public_key, endpoint, DIRECT, flow, egress, kind,
                        table, ans.gateway, ans.prefsrc, chain=(device.name, egress))
    hops, outer_peer = _chain(view, device, peer, ans.oif)
    chain = (device.name, *(h.link for h in hops))
    loop = ans.oif == device.ifindex or device.name in chain[1:]
    return PeerPath(
        device.name, peer.public_key, endpoint, LOOP if loop else NESTED, flow, egress, kind,
        table, ans.gateway, ans.prefsrc, outer=egress, outer_peer=outer_peer, chain=chain,
        allowed=not loop and (device.name, egress) in allow,
        fix=_fix(view, device, peer, flow, ans),
        mtu=None if loop else _mtu(view, device, peer, hops))


def diagnose(snap: Snapshot, allow: Collection[tuple[str, str]] = ()) -> list[PeerPath]:
    """One PeerPath per peer of every device. `allow` holds (inner, outer) device pairs."""
    view = _View(snap)
    return [peer_path(view, d, p, allow) for d in snap.devices for p in d.peers]


def parse_allow(spec: str) -> tuple[str, str]:
    """`wg2:wg1` -> ("wg2", "wg1"): wg2 may be nested in wg1."""
    inner, sep, outer = spec.partition(":")
    if not sep or not inner or not outer or ":" in outer:
        raise ValueError(f"--allow-nesting {spec!r}: expected INNER:OUTER, e.g. wg2:wg1")
    return inner, outer

