"""Where each peer's transport packets go: direct, nested in another tunnel, or a loop.

Input is a Snapshot holding the kernel's answers for every transport flow (and for the
candidate fixes, see fix_flows). Output is one PeerPath per peer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from wgnest.analysis.fixes import Fix, capture_of, derive_fix
from wgnest.analysis.view import HostView
from wgnest.model.host import (
    WG_OVERHEAD,
    Device,
    Flow,
    IPAddress,
    Link,
    Peer,
    RouteAnswer,
    Snapshot,
    table_name,
)


class PathVerdict(StrEnum):
    DIRECT = "direct"
    NESTED = "nested"
    LOOP = "loop"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    UNKNOWN = "unknown"


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
    verdict: PathVerdict
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
    captured_by: str = ""  # the rule that sent the transport where it goes (nested, loop)
    fix: Fix | None = None
    mtu: MtuCost | None = None
    transport_netns: str = ""  # the namespace routing the transport, when not the device's
    outer_netns: str = ""  # the outer tunnel's namespace, when not the device's

    @property
    def alarming(self) -> bool:
        return self.verdict == PathVerdict.LOOP or (
            self.verdict == PathVerdict.NESTED and not self.allowed)


def carrying_peer(device: Device, address: IPAddress) -> Peer | None:
    """The peer of `device` whose allowed IPs hold `address` (longest prefix), as wg_xmit picks."""
    best: tuple[int, Peer] | None = None
    for peer in device.peers:
        for net in peer.allowed_ips:
            if net.version == address.version and address in net and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, peer)
    return best[1] if best else None


@dataclass(frozen=True, slots=True)
class _Hop:
    link: str
    overhead: int  # header bytes around the inner packet when it crosses this link


def _chain(view: HostView, device: Device, peer: Peer, first_oif: int, guest: bool = False
           ) -> tuple[list[_Hop], str]:
    """Follow the packets through nested tunnels. Returns (links crossed, outer peer key).
    A guest device (of another namespace) is none of this view's tunnels."""
    assert peer.endpoint is not None
    hops: list[_Hop] = []
    seen = set() if guest else {device.name}
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
        flow = view.transport_flow(outer, carrier)
        ans = view.answer(flow)
        if flow is None or ans is None or not ans.ok:
            return hops, outer_peer
        oif, address = ans.oif, flow.dst
        overhead += WG_OVERHEAD[address.version]


def _mtu(view: HostView, device: Device, peer: Peer, hops: list[_Hop]) -> MtuCost | None:
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


# (device, egress) of direct paths, one tuple for every peer with the same (a gateway's
# 10,000 direct peers: 0.5 MB of equal tuples)
_CHAINS: dict[tuple[str, str], tuple[str, str]] = {}


def _direct_chain(device: str, egress: str) -> tuple[str, str]:
    chain = (device, egress)
    return _CHAINS.setdefault(chain, chain) if len(_CHAINS) < 1024 else chain


def peer_path(view: HostView, device: Device, peer: Peer, allow: Collection[tuple[str, str]],
              transport_netns: str = "") -> PeerPath:
    """`transport_netns`: the device is a guest of `view`, the namespace of that name that
    holds its socket (and so routes its transport); its own namespace is another one."""
    # One PeerPath built once per peer (no dataclasses.replace): this runs for every peer.
    flow = view.transport_flow(device, peer)
    endpoint = str(peer.endpoint or "")
    guest = bool(transport_netns)
    if flow is None:
        return PeerPath(device.name, peer.public_key, endpoint, PathVerdict.NO_ENDPOINT, flow)
    if not guest and view.socket_elsewhere(device):
        return PeerPath(device.name, peer.public_key, endpoint, PathVerdict.UNKNOWN, flow,
                        error=f"no UDP socket on port {device.listen_port} in this network "
                              "namespace: the device was created in another namespace, "
                              "which routes its transport")
    ans = view.answer(flow)
    if ans is None:
        return PeerPath(device.name, peer.public_key, endpoint, PathVerdict.UNKNOWN, flow,
                        error="route lookup unavailable")
    egress, kind = view.name(ans.oif), view.kind(ans.oif)
    table = table_name(ans.table) if ans.table else ""
    if not ans.ok:
        return PeerPath(device.name, peer.public_key, endpoint, PathVerdict.NO_ROUTE, flow,
                        egress, kind, table, ans.gateway, ans.prefsrc,
                        error=ans.error or "unroutable", transport_netns=transport_netns)
    if not view.is_tunnel(ans.oif):
        return PeerPath(device.name, peer.public_key, endpoint, PathVerdict.DIRECT, flow, egress,
                        kind, table, ans.gateway, ans.prefsrc,
                        chain=_direct_chain(device.name, egress),
                        transport_netns=transport_netns)
    hops, outer_peer = _chain(view, device, peer, ans.oif, guest)
    chain = (device.name, *(h.link for h in hops))
    loop = not guest and (ans.oif == device.ifindex or device.name in chain[1:])
    capture = capture_of(view, flow, ans)
    return PeerPath(
        device.name, peer.public_key, endpoint,
        PathVerdict.LOOP if loop else PathVerdict.NESTED, flow, egress, kind, table,
        ans.gateway, ans.prefsrc, outer=egress, outer_peer=outer_peer, chain=chain,
        allowed=not loop and (device.name, egress) in allow,
        captured_by=str(capture) if capture is not None else "",
        fix=derive_fix(view, device, flow, ans, capture),
        mtu=None if loop else _mtu(view, device, peer, hops),
        transport_netns=transport_netns, outer_netns=transport_netns)


def diagnose(snap: Snapshot, allow: Collection[tuple[str, str]] = (),
             previous: tuple[Snapshot, Sequence[PeerPath]] | None = None) -> list[PeerPath]:
    """One PeerPath per peer of every device. `allow` holds (inner, outer) device pairs.

    With the `previous` snapshot and its paths, a peer whose path cannot have changed keeps
    it: the host's links, rules, main table and UDP sockets are the same, and so are the
    peer's device, endpoint and the kernel's answer for its flow, and its path was one that
    depends on nothing else (direct, no endpoint, no route). A refresh of a gateway whose
    peers mostly keep their endpoints then analyses only the ones that moved."""
    view = HostView(snap)
    out: list[PeerPath] = []
    old = _Previous(snap, previous) if previous is not None else None
    lookups = snap.lookups
    if old is not None and old.unchanged(snap):
        return list(old.paths)  # the same peers, routes and answers: the same paths
    # the route cache hands back the very same answers when no flow changed (counters moved)
    same_answers = old is not None and lookups is old.snap.lookups
    for d in snap.devices:
        static = (d.ifindex, d.implementation, d.listen_port, d.fwmark)
        known = old if old is not None and old.devices.get(d.name) == static else None
        for p in d.peers:
            path = known.path(len(out), d.name, p.public_key) if known is not None else None
            if (known is not None and path is not None and path.endpoint == str(p.endpoint or "")
                    and (path.flow is None or same_answers
                         or known.same_answer(path.flow, lookups))):
                out.append(path)
            else:
                out.append(peer_path(view, d, p, allow))
    return out


_SELF_CONTAINED = frozenset({PathVerdict.DIRECT, PathVerdict.NO_ENDPOINT, PathVerdict.NO_ROUTE})


class _Previous:
    """The previous snapshot's paths that the unchanged host state lets stand, found by
    position (peers usually come back in the same order) or else by (device, key)."""

    def __init__(self, snap: Snapshot, previous: tuple[Snapshot, Sequence[PeerPath]]) -> None:
        self.snap, self.paths = previous
        old = self.snap
        same = (old.links, old.rules, old.main_routes, old.udp_ports) == (
            snap.links, snap.rules, snap.main_routes, snap.udp_ports)
        self.devices = {d.name: (d.ifindex, d.implementation, d.listen_port, d.fwmark)
                        for d in old.devices} if same else {}
        self._index: dict[tuple[str, str], PeerPath] | None = None
        self._same = same

    def unchanged(self, snap: Snapshot) -> bool:
        """Nothing any path depends on changed: the host, the kernel's answers (the same
        dict: the route cache gives it again only for the same flows, none changed), and
        every device with the very same peers (tuples compared element by identity first)."""
        return (self._same and snap.lookups is self.snap.lookups
                and snap.devices == self.snap.devices)

    def path(self, i: int, device: str, key: str) -> PeerPath | None:
        paths = self.paths
        found = paths[i] if i < len(paths) else None
        if found is None or found.public_key != key or found.device != device:
            if self._index is None:
                self._index = {(q.device, q.public_key): q for q in paths}
            found = self._index.get((device, key))
        return found if found is not None and found.verdict in _SELF_CONTAINED else None

    def same_answer(self, flow: Flow, lookups: Mapping[Flow, RouteAnswer]) -> bool:
        """The kernel answers `flow` as before (equal answers are mostly one object: the
        route lookup shares them)."""
        now, was = lookups.get(flow), self.snap.lookups.get(flow)
        return now is was or now == was


def parse_allow(spec: str) -> tuple[str, str]:
    """`wg2:wg1` -> ("wg2", "wg1"): wg2 may be nested in wg1."""
    inner, sep, outer = spec.partition(":")
    if not sep or not inner or not outer or ":" in outer:
        raise ValueError(f"--allow-nesting {spec!r}: expected INNER:OUTER, e.g. wg2:wg1")
    return inner, outer

