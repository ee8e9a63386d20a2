"""Transports that leave one namespace towards another one that routes them on: a container
whose default route is the host's bridge, a namespace behind a veth. The next hop (the
gateway, or the destination when on-link) being a local address of another namespace read
means that namespace forwards the packet, with its own rules and tables: the packet arrives
on that link, from the sender's source address, its mark cleared (a mark never crosses a
namespace), and is routed by an input route lookup there."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from wgnest.analysis.flows import transport_flow
from wgnest.analysis.view import HostView
from wgnest.model.host import Flow, RouteAnswer
from wgnest.model.netns import NetnsSnapshot

MAX_HOPS = 3


@dataclass(frozen=True, slots=True)
class Hop:
    netns: str  # the namespace the packet is forwarded into
    link: str  # the link it arrives on there
    flow: Flow  # the input lookup asked there
    answer: RouteAnswer | None  # None: not asked yet


def address_index(namespaces: Mapping[str, NetnsSnapshot]) -> dict[str, list[tuple[str, int]]]:
    """Local address -> [(namespace, ifindex)], loopback left out."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, ns in namespaces.items():
        for ifindex, addr in ns.addresses:
            if not addr.startswith("127.") and addr != "::1":
                out.setdefault(addr, []).append((name, ifindex))
    return out


def hops(namespaces: Mapping[str, NetnsSnapshot], index: Mapping[str, list[tuple[str, int]]],
         start: str, flow: Flow, answer: RouteAnswer, views: Mapping[str, HostView]
         ) -> list[Hop]:
    """The namespaces a transport routed by `answer` in `start` is forwarded through, as far
    as the lookups asked so far tell (the last hop's answer may be None: to be asked)."""
    out: list[Hop] = []
    here, ans, sent = start, answer, flow
    seen = {start}

    while len(out) < MAX_HOPS and ans.ok and not views[here].is_tunnel(ans.oif):
        if not ans.gateway and not index.get(str(sent.dst)):
            break  # on-link, to no namespace read (the usual case: skip the rest)
        nxt = ans.gateway or str(sent.dst)
        owners = [o for o in index.get(nxt, []) if o[0] != here]
        if len(owners) != 1 or owners[0][0] in seen or not ans.prefsrc:
            break  # not forwarded to a namespace read (or ambiguous)
        name, ifindex = owners[0]
        there = namespaces[name]
        if any(addr == str(sent.dst) for _i, addr in there.addresses):
            break  # delivered there: the endpoint is that namespace's own address
        fwd = Flow(sent.dst, 0, sent.sport, sent.dport, 0, ifindex,
                   ipaddress.ip_address(ans.prefsrc))
        got = there.snapshot.lookups.get(fwd)
        link = next((ln.name for ln in there.snapshot.links if ln.index == ifindex), "")
        out.append(Hop(name, link, fwd, got))
        if got is None:
            break
        seen.add(name)
        here, ans, sent = name, got, fwd
    return out


def forwarded_flows(namespaces: Mapping[str, NetnsSnapshot]) -> dict[str, list[Flow]]:
    """Namespace -> the input lookups still to ask there, for every transport of every
    namespace (and of the devices whose sockets it holds) that leaves towards it."""
    index = address_index(namespaces)
    out: dict[str, list[Flow]] = {}
    if not index:
        return out
    views = {name: HostView(ns.snapshot) for name, ns in namespaces.items()}
    for name, ns in namespaces.items():
        lookups = ns.snapshot.lookups
        view = views[name]
        devices = [*(d for d in ns.snapshot.devices if not view.socket_elsewhere(d)),
                   *(g.device for g in ns.guests)]
        for d in devices:
            for p in d.peers:
                flow = transport_flow(d, p)
                ans = lookups.get(flow) if flow is not None else None
                if flow is None or ans is None:
                    continue
                for hop in hops(namespaces, index, name, flow, ans, views):
                    if hop.answer is None:
                        out.setdefault(hop.netns, []).append(hop.flow)
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}
