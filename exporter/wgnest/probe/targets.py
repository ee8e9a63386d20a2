"""Which addresses to probe for each peer (pure): the tunnel, its transport, the direct path."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from wgnest.analysis.fixes import FixKind
from wgnest.analysis.paths import PeerPath
from wgnest.model.host import IPAddress, Peer, Snapshot, peer_index
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


# A peer's targets as last planned, with what they were planned from: the same PeerPath and
# Peer objects (an unchanged peer comes back as both) and the same choices give the same
# targets, the very objects, so the prober sees an unchanged list at once. By public key:
# the PeerPath names the device (a key on two devices only misses; no tuple key a peer).
# An entry is (path, peer, choices, not selected, stale, *its targets): the targets in the
# entry, not in a tuple of their own (a gateway's 10,000 peers with one target each).
TargetCache = dict[str, tuple[object, ...]]
_TARGETS_AT = 5  # where an entry's targets begin


# one tuple for each combination of choices (a few), not one per peer
_CHOICES: dict[tuple[bool, bool, bool, int, bool], tuple[bool, bool, bool, int, bool]] = {}


def probe_targets(snap: Snapshot, paths: Sequence[PeerPath], explicit: Explicit,
                  selection: Selection = Selection(),
                  urgent: Collection[tuple[str, str]] = (),
                  cache: TargetCache | None = None, merge: bool = False) -> TargetPlan:
    """Per peer with an endpoint: `tunnel` (explicit target, else its single-host allowed IP),
    `transport` (the endpoint with the device's own mark, as its UDP packets go) and
    `direct` (the endpoint as the fix would send it: with the kernel-verified fix mark, or
    bound to the underlay device a route or rule fix uses; else the device's own path).

    Chosen by value: no tunnel probe to a peer without a handshake in the last three
    minutes (nothing inside would answer); nested, looping and `urgent` (anomalous) peers
    first, so a probe budget reaches them every round. `cache` (kept by the caller) reuses
    the targets of unchanged peers.

    With `merge`, a `direct` target that is the transport's very flow (no fix changes its
    mark or device: most of a gateway's peers) is left out: the prober sends one probe for
    both anyway, and the latency verdict reads the transport's series as the direct one. A
    gateway's 10,000 direct peers then keep 10,000 series, not 20,000."""
    peers = peer_index(snap)
    first: list[ProbeTarget] = []
    rest: list[ProbeTarget] = []
    skipped = {"not_selected": 0, "no_recent_handshake": 0}
    fresh: TargetCache = {}
    for p in paths:
        key = (p.device, p.public_key)
        if (found := peers.get(key)) is None:
            continue
        device, peer = found
        wanted = selection.wants(p.device, p.public_key)
        hurry = p.alarming or key in urgent
        recent = peer.last_handshake > 0 and (
            snap.taken_at - peer.last_handshake <= STALE_HANDSHAKE)
        choices = (wanted, hurry, recent, device.fwmark, merge)
        if len(_CHOICES) < 256:
            choices = _CHOICES.setdefault(choices, choices)
        hit = cache.get(p.public_key) if cache is not None else None
        if not (hit is not None and hit[0] is p and hit[1] is peer and hit[2] == choices):
            targets, not_selected, stale = _peer_targets(p, peer, device.fwmark, explicit,
                                                         wanted, hurry, recent, merge)
            hit = (p, peer, choices, not_selected, stale, *targets)
        fresh[p.public_key] = hit
        (first if hurry else rest).extend(
            cast("tuple[ProbeTarget, ...]", hit[_TARGETS_AT:]))
        not_selected, stale = cast(int, hit[3]), cast(int, hit[4])
        skipped["not_selected"] += not_selected
        skipped["no_recent_handshake"] += stale
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return TargetPlan(first + rest, skipped)


def _peer_targets(p: PeerPath, peer: Peer, fwmark: int, explicit: Explicit, wanted: bool,
                  hurry: bool, recent: bool, merge: bool = False
                  ) -> tuple[tuple[ProbeTarget, ...], int, int]:
    """One peer's targets, and how many were left out (not selected, no recent handshake)."""
    out: list[ProbeTarget] = []
    not_selected = stale = 0
    inner = explicit.get((p.device, p.public_key)) or explicit.get((p.device, ""))
    if inner is None:
        hosts = [n for n in peer.allowed_ips if n.prefixlen == n.max_prefixlen]
        inner = hosts[0].network_address if len(hosts) == 1 else None
    if inner is not None:
        if not wanted:
            not_selected += 1
        elif not recent:
            stale += 1
        else:
            out.append(ProbeTarget(p.device, p.public_key, "tunnel", inner, 0, "", hurry))
    if peer.endpoint is None:
        return tuple(out), not_selected, stale
    mark, bind = fwmark, ""
    if p.fix is not None and p.fix.kind == FixKind.FWMARK and p.fix.verified:
        mark = p.fix.fwmark
    elif p.fix is not None and p.fix.resulting_egress:
        bind = p.fix.resulting_egress  # the kernel then skips routes via other devices
    merged = merge and (mark, bind) == (fwmark, "")  # the transport's flow: its series serves
    if not wanted:
        return tuple(out), not_selected + (1 if merged else 2), stale
    address = peer.endpoint.address
    out.append(ProbeTarget(p.device, p.public_key, "transport", address, fwmark, "", hurry))
    if merged:
        return tuple(out), not_selected, stale
    out.append(ProbeTarget(p.device, p.public_key, "direct", address, mark, bind, hurry))
    return tuple(out), not_selected, stale
