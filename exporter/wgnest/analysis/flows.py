"""The flows WireGuard sends, as the kernel's route lookup must be asked them."""

from __future__ import annotations

from collections.abc import Iterable

from wgnest.model.host import Device, Flow, Peer


def transport_flow(device: Device, peer: Peer) -> Flow | None:
    """The flow WireGuard sends for this peer: UDP, device mark, listen port, uid 0."""
    if peer.endpoint is None:
        return None
    oif = peer.endpoint.scope_id if peer.endpoint.family == 6 else 0
    return Flow(peer.endpoint.address, device.fwmark, device.listen_port, peer.endpoint.port, oif)


def transport_flows(devices: Iterable[Device]) -> list[Flow]:
    return [f for d in devices for p in d.peers if (f := transport_flow(d, p)) is not None]
