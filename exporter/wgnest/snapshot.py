"""Build one Snapshot: read every source, then ask the kernel's route lookup for each
transport flow and for each candidate fix. A failing source is recorded, never raised."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wgnest.analysis.fixes import fix_flows
from wgnest.analysis.flows import is_transport_flow, transport_flow
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Device, Flow, Peer, RouteAnswer, Snapshot
from wgnest.sources.errors import SourceError
from wgnest.sources.netstate import NetState
from wgnest.sources.route_lookup import CachedRouteLookup
from wgnest.sources.udp_sockets import udp_listen_ports
from wgnest.sources.wg_kernel import kernel_devices, open_wireguard
from wgnest.sources.wg_uapi import PeerCache, uapi_devices

T = TypeVar("T")
COLLECTORS = ("links", "rules", "wireguard_kernel", "wireguard_uapi", "route_lookup",
              "udp_sockets")


@dataclass
class Reader:
    """The host's sources, kept open between refreshes."""

    uapi_dir: Path = Path("/var/run/wireguard")
    # further UAPI directories of this namespace (a container's, through /proc/PID/root)
    more_uapi_dirs: tuple[Path, ...] = ()
    uapi_timeout: float = 1.0
    netstate: NetState = field(default_factory=NetState)
    lookup: CachedRouteLookup = field(default_factory=CachedRouteLookup)
    open_wg: Callable[[], Any] = open_wireguard
    udp_ports: Callable[[], frozenset[tuple[int, int]]] = udp_listen_ports
    # each userspace device's peers by their text in its last answer (see parse_uapi)
    uapi_caches: dict[str, PeerCache] = field(default_factory=dict)
    # per device: its peers, (mark, port), their transport flows, and each peer's flow by
    # key, kept while the peer's endpoint is the one it was made from
    flows: dict[str, tuple[tuple[Peer, ...], tuple[int, int], list[Flow],
                           dict[str, Flow]]] = field(default_factory=dict)

    def close(self) -> None:
        self.netstate.close()
        self.lookup.close()


class _Run:
    def __init__(self) -> None:
        self.failures: list[SourceFailure] = []
        self.durations: dict[str, float] = {}

    def timed(self, collector: str, fn: Callable[[], T]) -> T | None:
        start = time.monotonic()
        try:
            return fn()
        except SourceError as exc:
            self.failures.append(exc.failure(collector))
            return None
        finally:
            self.durations[collector] = self.durations.get(collector, 0.0) + (
                time.monotonic() - start)

    def each(self, collector: str, errors: list[SourceError]) -> None:
        self.failures.extend(exc.failure(collector) for exc in errors)


def _flows(reader: Reader, devices: tuple[Device, ...]) -> list[Flow]:
    """The transport flows of every peer: a peer with the same endpoint, on a device with
    the same mark and port, keeps its Flow (whose hash is already made); a
    device whose peers are all the same objects keeps its list of them at once."""
    old, new = reader.flows, {}
    out: list[Flow] = []
    for d in devices:
        before = old.get(d.name)
        static = (d.fwmark, d.listen_port)
        if before is not None and before[1] == static and before[0] == d.peers:
            new[d.name] = before  # the tuples compare element by element, by identity first
            out += before[2]
            continue
        known = before[3] if before is not None and before[1] == static else {}
        flows, each = [], {}
        for p in d.peers:
            flow = known.get(p.public_key)
            # the flow is the endpoint's (on this device): a peer whose counters or
            # handshake moved keeps it (the UAPI parse gives an unchanged endpoint as the
            # same object, whose address the flow holds; the kernel's are compared)
            if flow is None or not is_transport_flow(flow, d, p):
                flow = transport_flow(d, p)
            if flow is not None:
                each[p.public_key] = flow
                flows.append(flow)
        new[d.name] = (d.peers, static, flows, each)
        out += flows
    reader.flows = new
    return out


def take(reader: Reader, now: Callable[[], float] = time.time) -> Snapshot:
    run = _Run()
    links = run.timed("links", reader.netstate.links) or []
    rules = run.timed("rules", reader.netstate.rules) or []
    routes = run.timed("rules", reader.netstate.main_routes) or []
    kdevs, kerr = run.timed(
        "wireguard_kernel", lambda: kernel_devices(links, reader.open_wg)) or ([], [])
    run.each("wireguard_kernel", kerr)
    skip = {link.name for link in links if link.kind == "wireguard"}
    udevs: list[Device] = []
    stale: list[Path] = []
    for uapi_dir in dict.fromkeys((reader.uapi_dir, *reader.more_uapi_dirs)):
        read = functools.partial(uapi_devices, links, uapi_dir, reader.uapi_timeout,
                                 skip=frozenset(skip), caches=reader.uapi_caches)
        found, uerr, left = run.timed("wireguard_uapi", read) or ([], [], [])
        run.each("wireguard_uapi", uerr)
        udevs += found
        stale += left
        skip |= {d.name for d in found}
    devices: tuple[Device, ...] = tuple(sorted(kdevs + udevs, key=lambda d: d.name))
    # Only kernel devices keep their socket where they were made (see HostView).
    ports = run.timed("udp_sockets", reader.udp_ports) if kdevs else None
    lookups: dict[Flow, RouteAnswer] = run.timed(
        "route_lookup", lambda: reader.lookup.lookup(_flows(reader, devices))) or {}
    snap = Snapshot(now(), devices, tuple(links), tuple(rules), tuple(routes), lookups, ports,
                    transport_flows={name: kept[3] for name, kept in reader.flows.items()})
    # A fix is only a fix if the kernel agrees: ask it again with each candidate mark.
    fixes = run.timed("route_lookup", lambda: reader.lookup.lookup(fix_flows(snap))) or {}
    return Snapshot(snap.taken_at, devices, snap.links, snap.rules, snap.main_routes,
                    {**lookups, **fixes} if fixes else lookups, ports, tuple(str(p) for p in stale),
                    tuple(run.failures), run.durations, snap.transport_flows)
