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


def is_transport_flow(flow: Flow, device: Device, peer: Peer) -> bool:
    """Whether `flow` is transport_flow(device, peer), by identity of its address first
    (an unchanged endpoint is the same object, and its flow was made from it)."""
    ep = peer.endpoint
    return ep is not None and (flow.dst is ep.address or flow.dst == ep.address) and (
        flow.dport == ep.port and flow.mark == device.fwmark
        and flow.sport == device.listen_port and flow.iif == 0 and flow.src is None
        and flow.oif == (ep.scope_id if ep.family == 6 else 0))


def transport_flows(devices: Iterable[Device]) -> list[Flow]:
    return [f for d in devices for p in d.peers if (f := transport_flow(d, p)) is not None]
