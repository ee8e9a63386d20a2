"""Which addresses to probe for each peer (pure): the tunnel, its transport, the direct path."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

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


STALE_HANDSHAKE = 180.0  # seconds: WireGuard's session keys are gone (REJECT_AFTER_TIME)


@dataclass(frozen=True)
class Selection:
    """Which peers to probe (`--probe.device`, `--probe.peer`): all when empty."""

    device: re.Pattern[str] | None = None
    peers: frozenset[str] = frozenset()

    def wants(self, device: str, public_key: str) -> bool:
        return ((self.device is None or self.device.fullmatch(device) is not None)
                and (not self.peers or public_key in self.peers))


@dataclass(frozen=True)
class TargetPlan:
    targets: list[ProbeTarget]
    skipped: Mapping[str, int]  # reason -> targets not probed


def probe_targets(snap: Snapshot, paths: Sequence[PeerPath], explicit: Explicit,
                  selection: Selection = Selection(),
                  urgent: Collection[tuple[str, str]] = ()) -> TargetPlan:
    """Per peer with an endpoint: `tunnel` (explicit target, else its single-host allowed IP),
    `transport` (the endpoint with the device's own mark, as its UDP packets go) and
    `direct` (the endpoint as the fix would send it: with the kernel-verified fix mark, or
    bound to the underlay device a route or rule fix uses; else the device's own path).

    Chosen by value: no tunnel probe to a peer without a handshake in the last three
    minutes (nothing inside would answer); nested, looping and `urgent` (anomalous) peers
    first, so a probe budget reaches them every round."""
    peers = peer_index(snap)
    first: list[ProbeTarget] = []
    rest: list[ProbeTarget] = []
    skipped = {"not_selected": 0, "no_recent_handshake": 0}
    for p in paths:
        if (found := peers.get((p.device, p.public_key))) is None:
            continue
        device, peer = found
        wanted = selection.wants(p.device, p.public_key)
        hurry = p.alarming or (p.device, p.public_key) in urgent
        out = first if hurry else rest
        inner = explicit.get((p.device, p.public_key)) or explicit.get((p.device, ""))
        if inner is None:
            hosts = [n for n in peer.allowed_ips if n.prefixlen == n.max_prefixlen]
            inner = hosts[0].network_address if len(hosts) == 1 else None
        if inner is not None:
            recent = peer.last_handshake > 0 and (
                snap.taken_at - peer.last_handshake <= STALE_HANDSHAKE)
            if not wanted:
                skipped["not_selected"] += 1
            elif not recent:
                skipped["no_recent_handshake"] += 1
            else:
                out.append(ProbeTarget(p.device, p.public_key, "tunnel", inner, 0, "", hurry))
        if peer.endpoint is None:
            continue
        if not wanted:
            skipped["not_selected"] += 2
            continue
        address = peer.endpoint.address
        out.append(ProbeTarget(p.device, p.public_key, "transport", address, device.fwmark, "",
                               hurry))
        mark, bind = device.fwmark, ""
        if p.fix is not None and p.fix.kind == FixKind.FWMARK and p.fix.verified:
            mark = p.fix.fwmark
        elif p.fix is not None and p.fix.resulting_egress:
            bind = p.fix.resulting_egress  # the kernel then skips routes via other devices
        out.append(ProbeTarget(p.device, p.public_key, "direct", address, mark, bind, hurry))
    return TargetPlan(first + rest, skipped)
