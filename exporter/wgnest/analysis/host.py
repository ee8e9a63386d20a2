"""The paths of every namespace of a HostSnapshot: each namespace diagnosed by its own
routing, then the two ways a transport is routed by another namespace's:

- a moved kernel device's transport, by the namespace holding its socket (a guest there);
- a transport forwarded into another namespace read, by that namespace's input lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from wgnest.analysis.fixes import Fix, FixKind, capture_of, route_or_rule_fix
from wgnest.analysis.forwarding import Hop, address_index, hops
from wgnest.analysis.paths import (
    MtuCost,
    PathVerdict,
    PeerPath,
    carrying_peer,
    diagnose,
    peer_path,
)
from wgnest.analysis.view import HostView
from wgnest.model.host import WG_OVERHEAD, Snapshot
from wgnest.model.netns import HostSnapshot, NetnsSnapshot

Paths = dict[str, list[PeerPath]]  # namespace name -> its peers' paths
Previous = Mapping[str, tuple[Snapshot, Sequence[PeerPath]]]


def in_netns(fix: Fix, enter: str) -> Fix:
    """The fix's commands as run in another namespace (`ip netns exec NAME ...`)."""
    if not enter:
        return fix
    commands = tuple(f"{enter} {c}" for c in fix.commands)
    lines = tuple(_hook_in(line, enter) for line in fix.config_lines)
    return dataclasses.replace(fix, commands=commands, config_lines=lines)


def _hook_in(line: str, enter: str) -> str:
    for hook in ("PostUp = ", "PostDown = ", "PreUp = ", "PreDown = "):
        if line.startswith(hook):
            return hook + enter + " " + line[len(hook):]
    return line


def _guest_paths(host: HostSnapshot, views: Mapping[str, HostView],
                 allow: Collection[tuple[str, str]]) -> dict[tuple[str, str], PeerPath]:
    """(home namespace, device) keyed paths of every moved device, by its socket's namespace."""
    by_name = host.by_name()
    out: dict[tuple[str, str], PeerPath] = {}
    for ns in host.namespaces:
        for guest in ns.guests:
            home = by_name.get(guest.netns)
            for peer in guest.device.peers:
                path = peer_path(views[ns.name], guest.device, peer, allow,
                                 transport_netns=ns.name)
                if path.fix is not None:
                    enter = ns.enter if path.fix.kind != FixKind.FWMARK else (
                        home.enter if home is not None else "")
                    path = dataclasses.replace(path, fix=in_netns(path.fix, enter))
                out[guest.netns, f"{guest.device.name}\0{peer.public_key}"] = path
    return out


def _forwarded(path: PeerPath, home: str, chain: list[Hop], views: Mapping[str, HostView],
               by_name: Mapping[str, NetnsSnapshot]) -> PeerPath:
    """A direct path whose transport is forwarded into a tunnel of another namespace."""
    last = chain[-1]
    view = views[last.netns]
    ans = last.answer
    if ans is None or not ans.ok or not view.is_tunnel(ans.oif):
        return path
    outer = view.name(ans.oif)
    crossed = (*(f"{h.netns}/{h.link}" for h in chain), f"{last.netns}/{outer}")
    outer_device = view.wg_by_index.get(ans.oif)
    carrier = carrying_peer(outer_device, last.flow.dst) if outer_device is not None else None
    capture = capture_of(view, last.flow, ans)
    fix = route_or_rule_fix(view, last.flow, ans, capture,
                            f"the transport is forwarded into {last.netns}, where no mark "
                            "set for it applies")
    # applied in the forwarding namespace, not by the device's wg-quick: no config lines
    fix = dataclasses.replace(in_netns(fix, by_name[last.netns].enter), config_lines=())
    return dataclasses.replace(
        path, verdict=PathVerdict.NESTED, outer=outer, outer_netns=last.netns,
        outer_peer=carrier.public_key if carrier is not None else "",
        chain=(*path.chain, *crossed), captured_by=str(capture) if capture is not None else "",
        fix=fix, mtu=_forwarded_mtu(path, views, home, last.netns, ans.oif))


def _forwarded_mtu(path: PeerPath, views: Mapping[str, HostView], home: str, there: str,
                   outer_oif: int) -> MtuCost | None:
    """The inner MTU that fits when the transport, having left by its own link, crosses the
    outer tunnel of the namespace it is forwarded into; and what would fit without it (its
    own link, then that namespace's underlay)."""
    if path.flow is None:
        return None
    here, far = views[home], views[there]
    overhead = WG_OVERHEAD[path.flow.dst.version]
    first = next((ln for ln in here.snap.links if ln.name == path.egress), None)
    outer = far.links.get(outer_oif)
    device = next((d for d in here.snap.devices if d.name == path.device), None)
    if first is None or outer is None or device is None:
        return None
    default = far.underlay_default(path.flow.dst.version)
    underlay = far.links.get(default.oif) if default is not None else None
    direct = min(first.mtu, underlay.mtu if underlay is not None else first.mtu) - overhead
    # the outer tunnel carries the whole transport packet, its underlay both layers' headers
    fits = [first.mtu - overhead, outer.mtu - overhead]
    if underlay is not None:
        fits.append(underlay.mtu - 2 * overhead)
    usable = min(fits)
    return MtuCost(device.mtu, usable, direct, max(0, direct - usable))


def diagnose_host(host: HostSnapshot, allow: Collection[tuple[str, str]] = (),
                  previous: Previous | None = None) -> Paths:
    """One list of paths per namespace (the unreported ones too: they are the routing homes
    of moved devices). `previous`: each namespace's snapshot and paths of the last refresh."""
    by_name = host.by_name()
    views = {n: HostView(ns.snapshot) for n, ns in by_name.items()}
    out: Paths = {n: diagnose(ns.snapshot, allow, (previous or {}).get(n))
                  for n, ns in by_name.items()}
    guests = _guest_paths(host, views, allow)
    lost = {(m.netns, m.device): m.error for m in host.moved if not m.birth}
    if guests or lost:
        for name, paths in out.items():
            for i, p in enumerate(paths):
                found = guests.get((name, f"{p.device}\0{p.public_key}"))
                if found is not None:
                    paths[i] = found
                elif (name, p.device) in lost and p.verdict == PathVerdict.UNKNOWN:
                    paths[i] = dataclasses.replace(p, error=lost[name, p.device])
    index = address_index(by_name)
    if not index:
        return out
    for name, paths in out.items():
        for i, p in enumerate(paths):
            if p.verdict != PathVerdict.DIRECT or p.flow is None:
                continue
            start = p.transport_netns or name
            ans = by_name[start].snapshot.lookups.get(p.flow)
            if ans is None:
                continue
            chain = hops(by_name, index, start, p.flow, ans, views)
            if chain:
                paths[i] = _forwarded(p, start, chain, views, by_name)
    return out
