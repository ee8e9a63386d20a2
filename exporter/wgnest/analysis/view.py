"""Indexes over one snapshot, shared by the path, fix and MTU analyses."""

from __future__ import annotations

from collections.abc import Mapping

from wgnest.analysis.flows import is_transport_flow, transport_flow
from wgnest.model.host import (
    RTN_UNICAST,
    TUNNEL_KINDS,
    Device,
    Flow,
    IPAddress,
    MainRoute,
    Peer,
    RouteAnswer,
    Snapshot,
)

_NO_FLOWS: Mapping[str, Flow] = {}


class HostView:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.links = {link.index: link for link in snap.links}
        self.wg_by_index = {d.ifindex: d for d in snap.devices}

    def transport_flow(self, device: Device, peer: Peer) -> Flow | None:
        """transport_flow(device, peer): the snapshot's own object where it has one."""
        flow = self.snap.transport_flows.get(device.name, _NO_FLOWS).get(peer.public_key)
        if flow is not None and is_transport_flow(flow, device, peer):
            return flow
        return transport_flow(device, peer)

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

    def underlay_default(self, family: int) -> MainRoute | None:
        """The main table's first unicast default route of this family that is not a tunnel
        and names its device."""
        return next((r for r in self.snap.main_routes
                     if r.family == family and r.dst.prefixlen == 0 and r.oif
                     and r.route_type == RTN_UNICAST and not self.is_tunnel(r.oif)), None)

    def main_match(self, address: IPAddress) -> MainRoute | None:
        """The main table's most specific route holding `address` (what `lookup main` finds)."""
        best: MainRoute | None = None
        for r in self.snap.main_routes:
            if r.dst.version == address.version and address in r.dst and (
                    best is None or r.dst.prefixlen > best.dst.prefixlen):
                best = r
        return best

    def answer(self, flow: Flow | None) -> RouteAnswer | None:
        return self.snap.lookups.get(flow) if flow is not None else None

    def socket_elsewhere(self, device: Device) -> bool:
        """A kernel device whose UDP socket is not in this namespace (it was created in
        another one and moved here): its transport is routed there, not by these tables."""
        ports = self.snap.udp_ports
        link = self.links.get(device.ifindex)
        if (ports is None or device.implementation != "kernel" or not device.listen_port
                or link is None or not link.up):
            return False
        return all(port != device.listen_port for _family, port in ports)
