"""Which addresses to probe for each peer (pure): the tunnel, its transport, the direct path."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from wgnest.analysis.fixes import FixKind
from wgnest.analysis.paths import PeerPath
from wgnest.model.host import IPAddress, Snapshot, peer_index
from wgnest.model.probes import ProbeTarget

# (device, public key or "") -> address inside the tunnel
Explicit = Mapping[tuple[str, str], IPAddress]


def parse_probe_target(spec: str) -> tuple[tuple[str, str], IPAddress]:
    """`wg1=10.0.0.1` or `wg1:PUBKEY=10.0.0.1` -> ((device, key), address)."""
    left, sep, right = spec.partition("=")
    device, _, key = left.partition(":")
    try:
        if not sep or not device:
            raise ValueError
        return (device, key), ipaddress.ip_address(right.strip())
    except ValueError:
        raise ValueError(f"--probe.target {spec!r}: expected DEVICE[:PUBKEY]=IP") from None


def probe_targets(snap: Snapshot, paths: Sequence[PeerPath], explicit: Explicit
                  ) -> list[ProbeTarget]:
    """Per peer with an endpoint: `tunnel` (explicit target, else its single-host allowed IP),
    `transport` (the endpoint with the device's own mark, as its UDP packets go) and
    `direct` (the endpoint as the fix would send it: with the kernel-verified fix mark, or
    bound to the underlay device a route or rule fix uses; else the device's own path)."""
    peers = peer_index(snap)
    out: list[ProbeTarget] = []
    for p in paths:
        if (found := peers.get((p.device, p.public_key))) is None:
            continue
        device, peer = found
        inner = explicit.get((p.device, p.public_key)) or explicit.get((p.device, ""))
        if inner is None:
            hosts = [n for n in peer.allowed_ips if n.prefixlen == n.max_prefixlen]
            inner = hosts[0].network_address if len(hosts) == 1 else None
        if inner is not None:
            out.append(ProbeTarget(p.device, p.public_key, "tunnel", inner, 0))
        if peer.endpoint is None:
            continue
        address = peer.endpoint.address
        out.append(ProbeTarget(p.device, p.public_key, "transport", address, device.fwmark))
        mark, bind = device.fwmark, ""
        if p.fix is not None and p.fix.kind == FixKind.FWMARK and p.fix.verified:
            mark = p.fix.fwmark
        elif p.fix is not None and p.fix.resulting_egress:
            bind = p.fix.resulting_egress  # the kernel then skips routes via other devices
        out.append(ProbeTarget(p.device, p.public_key, "direct", address, mark, bind))
    return out
