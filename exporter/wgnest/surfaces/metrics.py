"""Metric families built from one diagnosed snapshot (no I/O).

Names follow mdlayher/wireguard_exporter where they overlap, so existing dashboards work.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import operator
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from wgnest import __version__
from wgnest.analysis.fixes import FixKind
from wgnest.analysis.paths import PathVerdict, PeerPath
from wgnest.model.failures import REASONS, SourceFailure, failed_collectors
from wgnest.model.host import IPNetwork, Peer, Snapshot
from wgnest.surfaces.exposition import (
    Family,
    Samples,
    counter,
    exposition,
    gauge,
    key_format,
    light_format,
    merged,
    needs_escape,
    sample_value,
    samples_writer,
    with_label,
)
from wgnest.surfaces.gzipped import Deflater, Piece

if TYPE_CHECKING:  # (prometheus_client's objects only where it is imported)
    from prometheus_client.core import Metric

DP = ("device", "public_key")
_T = TypeVar("_T")


def _order(net: IPNetwork) -> tuple[int, int, int]:
    """Family, then address, then prefix length: the order allowed IPs are shown in."""
    return net.version, int(net.network_address), net.prefixlen


FAMILY = {4: "IPv4", 6: "IPv6"}
_EMBEDS_IPV4 = 1 << 48  # below: ::/80 (::a.b.c.d, ::ffff:a.b.c.d), which inet_ntop prints so


def network_text(net: IPNetwork) -> str:
    """str(net), by the C library's inet_ntoa and inet_ntop: ipaddress writes an address in
    Python (an IPv6 4 µs, 0.7 µs here); both write RFC 5952's form but for the ::/80
    addresses and a zone (which inet_ntop leaves out), left to ipaddress (a test compares
    them)."""
    address = net.network_address
    if not isinstance(address, ipaddress.IPv6Address):
        return f"{socket.inet_ntoa(address.packed)}/{net.prefixlen}"
    if int(address) >= _EMBEDS_IPV4 and address.scope_id is None:
        return f"{socket.inet_ntop(socket.AF_INET6, address.packed)}/{net.prefixlen}"
    return str(net)


def allowed_ips_label(peer: Peer) -> str:
    """The peer's allowed IPs, sorted, comma-separated. Written again only with the info
    line of a peer whose block changed (not remembered: 1.5 MB at 10,000 peers)."""
    ips = peer.allowed_ips
    if len(ips) == 1:
        return network_text(ips[0])
    return ",".join([network_text(n) for n in sorted(ips, key=_order)])


def fwmark_text(mark: int, zero: str = "off") -> str:
    """A mark as `wg show` prints it: 0xca6c (lower-case hex), `zero` for none."""
    return f"{mark:#x}" if mark else zero


def device_families(snap: Snapshot) -> Iterator[Family]:
    info = gauge("wireguard_device_info", "Metadata about a device.", *DP)
    fwmark = gauge("wireguard_device_fwmark",
                    "Firewall mark of the device's transport packets (0 = none); label fwmark "
                    "as wg prints it (0xca6c, off).", "device", "fwmark")
    port = gauge("wireguard_device_listen_port", "UDP port the device listens on.", "device")
    mtu = gauge("wireguard_device_mtu_bytes", "MTU of the device.", "device")
    for d in snap.devices:
        info.add((d.name, d.public_key), 1)
        fwmark.add((d.name, fwmark_text(d.fwmark)), d.fwmark)
        port.add((d.name,), d.listen_port)
        mtu.add((d.name,), d.mtu)
    yield from (info, fwmark, port, mtu)


def peer_families(snap: Snapshot, names: Mapping[str, str]) -> Iterator[Family]:
    # The help of the families mdlayher/wireguard_exporter has too is its help, word for word.
    info = gauge("wireguard_peer_info",
                 "Metadata about a peer. The public_key label on peer metrics refers to the "
                 "peer's public key; not the device's public key.",
                 *DP, "endpoint", "name", "allowed_ips")
    allowed = gauge("wireguard_peer_allowed_ips_info",
                    "Metadata about each of a peer's allowed IP subnets for a given device.",
                    *DP, "allowed_ips", "family")
    rx = counter("wireguard_peer_receive_bytes", "Number of bytes received from a given peer.",
                 *DP)
    tx = counter("wireguard_peer_transmit_bytes",
                 "Number of bytes transmitted to a given peer.", *DP)
    last = gauge("wireguard_peer_last_handshake_seconds",
                 "UNIX timestamp for the last handshake with a given peer.", *DP)
    age = gauge("wireguard_peer_handshake_age_seconds",
                 "Seconds from the last handshake to the snapshot; absent if there was none.",
                 *DP)
    taken_at = snap.taken_at
    for d in snap.devices:
        for p in d.peers:
            labels = (d.name, p.public_key)
            info.add((*labels, str(p.endpoint or ""), names.get(p.public_key, ""),
                      allowed_ips_label(p)), 1)
            for net in sorted(p.allowed_ips, key=_order):
                allowed.add((*labels, network_text(net), FAMILY[net.version]), 1)
            rx.add(labels, p.rx_bytes)
            tx.add(labels, p.tx_bytes)
            last.add(labels, p.last_handshake)
            if p.last_handshake > 0:
                age.add(labels, max(0.0, taken_at - p.last_handshake))
    yield from (info, allowed, rx, tx, last, age)


def path_families(paths: Sequence[PeerPath], outer_netns: bool = False) -> Iterator[Family]:
    """`outer_netns`: the nesting says in which namespace the outer tunnel is (--netns)."""
    route = gauge("wireguard_peer_endpoint_route_info",
                   "Route the kernel picks for the peer's transport packets (value 1).",
                   *DP, "endpoint", "egress_device", "table", "gateway")
    nested = gauge(
        "wireguard_peer_nested",
        "1 if the peer's transport packets are routed into another tunnel (outer_device"
        + (", in namespace outer_netns" if outer_netns else "") + ").",
        *DP, "outer_device", *(("outer_netns",) if outer_netns else ()))
    # Only for the peers they concern (a few on a gateway): 12 series a peer at the most.
    loop = gauge("wireguard_peer_routing_loop",
                  "1 if the peer's transport packets are routed back into the tunnel itself "
                  "(directly or through other tunnels); only for such peers.", *DP)
    allowed = gauge("wireguard_peer_nesting_allowed",
                     "1 if this nesting was declared intentional (--allow-nesting); only for "
                     "such peers.", *DP)
    fwmark = gauge(
        "wireguard_peer_suggested_fwmark",
        "FwMark that routes the transport to the underlay (kernel-verified); 0 if no mark "
        "does; label fwmark as wg prints it (0xca6c, none); only for nested and looping "
        "peers.", *DP, "fwmark")
    mtu = gauge("wireguard_peer_nesting_mtu_cost_bytes",
                 "Inner MTU bytes lost because the transport is nested; only for nested "
                 "peers.", *DP)
    for p in paths:
        labels = (p.device, p.public_key)
        if p.endpoint and p.egress:
            route.add((*labels, p.endpoint, p.egress, p.table, p.gateway), 1)
        is_nested = p.verdict == PathVerdict.NESTED
        outer = p.outer if is_nested else ""
        nested.add((*labels, outer, p.outer_netns if is_nested else "") if outer_netns
                   else (*labels, outer), int(is_nested))
        if p.verdict == PathVerdict.LOOP:
            loop.add(labels, 1)
        if p.allowed:
            allowed.add(labels, 1)
        if is_nested or p.verdict == PathVerdict.LOOP:
            verified = p.fix is not None and p.fix.kind == FixKind.FWMARK and p.fix.verified
            mark = p.fix.fwmark if p.fix is not None and verified else 0
            fwmark.add((*labels, fwmark_text(mark, "none")), mark)
        if is_nested and p.mtu is not None:
            mtu.add(labels, p.mtu.cost_bytes)
    yield from (route, nested, loop, allowed, fwmark, mtu)


@dataclass(frozen=True)
class Health:
    """How the exporter's own collectors did in the last refresh attempt: the snapshot's
    sources, the prober beside it, and the refresh itself."""

    collectors: tuple[str, ...]
    failures: tuple[SourceFailure, ...]
    durations: Mapping[str, float]
    errors_total: Mapping[str, int]  # reason -> failures since start
    refresh_interval: float
    stale_sockets: int = 0
    # --netns other than self: the namespaces read, and each one's collector durations
    namespaces: tuple[str, ...] = ()
    netns_durations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def _collector_families(health: Health) -> tuple[Family, Family]:
    labels = ("collector", "netns") if health.namespaces else ("collector",)
    success = gauge("wgnest_collector_success",
                    "1 if the collector worked in the last refresh.", *labels)
    duration = gauge("wgnest_collector_duration_seconds",
                     "Time the collector took in the last refresh.", *labels)
    if not health.namespaces:
        failed = failed_collectors(health.failures)
        for c in health.collectors:
            success.add((c,), 0 if c in failed else 1)
            duration.add((c,), health.durations.get(c, 0.0))
        return success, duration
    host = [c for c in health.collectors if c in ("probe", "refresh")]
    per_ns = [c for c in health.collectors if c not in host]
    failed_in = {(f.collector, f.netns) for f in health.failures}
    # a namespace that could not be read at all has only its netns failure to show
    names = list(dict.fromkeys([*health.namespaces, *(f.netns for f in health.failures
                                                      if f.collector == "netns")]))
    for ns in names:
        for c in ("netns", *per_ns) if ns in health.namespaces else ("netns",):
            success.add((c, ns), 0 if (c, ns) in failed_in else 1)
            duration.add((c, ns), health.netns_durations.get(ns, {}).get(c, 0.0))
    for c in host:
        success.add((c, ""), 0 if (c, "") in failed_in else 1)
        duration.add((c, ""), health.durations.get(c, 0.0))
    return success, duration


def exporter_families(taken_at: float, health: Health) -> Iterator[Family]:
    success, duration = _collector_families(health)
    stamp = gauge("wgnest_snapshot_timestamp_seconds",
                  "Unix time of the snapshot these metrics describe; it stops "
                  "advancing while refreshes fail.")
    stamp.add((), taken_at)
    stale = gauge(
        "wgnest_uapi_stale_sockets",
        "UAPI sockets named after a link that is no TUN device (left over by a daemon gone); "
        "never read.")
    stale.add((), health.stale_sockets)
    interval = gauge("wgnest_refresh_interval_seconds",
                     "Seconds between refreshes (--refresh.interval).")
    interval.add((), health.refresh_interval)
    build = gauge("wgnest_build_info", "wgnest version (value 1).", "version")
    build.add((__version__,), 1)
    errors = counter("wgnest_errors", "Collector failures by reason, since start.", "reason")
    for reason in REASONS:  # zero-initialised: every reason has a series from the start
        errors.add((reason,), health.errors_total.get(reason, 0))
    yield from (success, duration, stamp, interval, stale, build, errors)


BLOCK_CUT = 64  # about this many peers (or paths) per block


def _cut(public_key: str) -> bool:
    """Whether a block starts at this peer: decided by its key alone (content-defined, so
    a peer added or gone changes one block, not those after it)."""
    return hash(public_key) % BLOCK_CUT == 0


def _blocks(keys: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive keys that ends before a cut key."""
    out, start = [], 0
    for i in range(1, len(keys)):
        if _cut(keys[i]):
            out.append((start, i))
            start = i
    if keys:
        out.append((start, len(keys)))
    return out


# What each family of path_families() is written from, in its order: the lines of a block
# of paths whose inputs are all equal are kept (a test changes each field of a PeerPath and
# checks that a family whose text changes has that field among its inputs).
PATH_INPUTS: tuple[Callable[[PeerPath], object], ...] = (
    operator.attrgetter("device", "public_key", "endpoint", "egress", "table", "gateway"),
    operator.attrgetter("device", "public_key", "verdict", "outer", "outer_netns"),
    operator.attrgetter("device", "public_key", "verdict"),
    operator.attrgetter("device", "public_key", "allowed"),
    operator.attrgetter("device", "public_key", "verdict", "fix"),
    operator.attrgetter("device", "public_key", "verdict", "mtu"),
)
# the same for peer_families()' info, allowed-IP, received, sent and handshake families (the
# names are compared apart)
PEER_INPUTS: tuple[Callable[[Peer], object], ...] = (
    operator.attrgetter("public_key", "endpoint", "allowed_ips"),
    operator.attrgetter("public_key", "allowed_ips"),
    operator.attrgetter("public_key", "rx_bytes"),
    operator.attrgetter("public_key", "tx_bytes"),
    operator.attrgetter("public_key", "last_handshake"),
)


@dataclass(slots=True)
class _PeerBlock:
    peers: tuple[Peer, ...]
    names: tuple[str, ...]
    pieces: tuple[Piece, ...]  # info, allowed, rx, tx, last handshake


@dataclass(slots=True)
class _PathBlock:
    paths: tuple[PeerPath, ...]
    pieces: tuple[Piece, ...]  # one per path family


class LineCache:
    """The compressed lines of each block of peers and of paths as last rendered. An
    unchanged peer comes back as the same Peer object (the sources reuse it) and its path as
    the same PeerPath (the diagnosis reuses it), so a block of them is reused, neither
    formatted nor compressed again. In a block that changed, a family's piece is kept when
    what it is written from is equal for every peer or path of the block (PEER_INPUTS,
    PATH_INPUTS): a moved counter leaves the info lines, a moved endpoint the counters, the
    allowed IPs and the nesting flags. Only the handshake ages, which move with the
    snapshot's time, are always new. Blocks are keyed by device and first key; one thread
    renders."""

    def __init__(self) -> None:
        self.peers: dict[tuple[str, str], _PeerBlock] = {}
        self.paths: dict[tuple[str, str], _PathBlock] = {}
        self.heads: dict[str, Piece] = {}
        self.deflater = Deflater()

    def head(self, text: str) -> Piece:
        got = self.heads.get(text)
        if got is None:
            got = self.heads[text] = self.deflater.piece(text.encode())
        return got


def _writers(families: Sequence[Family]) -> list[tuple[str, Callable[[Samples], str]]]:
    """Each family's header and the writer of its samples."""
    out = []
    for fam in families:
        form, write = light_format(fam), samples_writer(fam)
        if form is None or write is None:  # (every name here is valid: never taken)
            raise ValueError(f"family {fam.name} cannot be written by the fast path")
        out.append((form[0], write))
    return out


_COUNTERS = (operator.attrgetter("rx_bytes"), operator.attrgetter("tx_bytes"),
             operator.attrgetter("last_handshake"))


def _keyed_text(fmt: str | None, write: Callable[[Samples], str], device: str,
                peers: Sequence[Peer], value: Callable[[Peer], int | float]) -> bytes:
    """The samples of a (device, public_key) family for these peers: through key_format's
    %-format when there is one (no label needs escaping), else `write`."""
    if fmt is not None:
        return "".join([fmt % (p.public_key, sample_value(value(p))) for p in peers]).encode()
    return write([((device, p.public_key), value(p)) for p in peers]).encode()


def _identical(old: Sequence[object], new: Sequence[object]) -> bool:
    """Whether two blocks hold the very same objects (the sources and the diagnosis hand
    back an unchanged peer or path as the same object)."""
    return len(old) == len(new) and all(map(operator.is_, old, new))


def _same(old: Sequence[_T], new: Sequence[_T], inputs: Callable[[_T], object]) -> bool:
    """Whether two blocks hold as many items, each the same object or equal in `inputs`."""
    return len(old) == len(new) and all(
        a is b or inputs(a) == inputs(b) for a, b in zip(old, new, strict=True))


def _peer_pieces(dn: str, block: tuple[Peer, ...], names: tuple[str, ...],
                 hit: _PeerBlock | None, writers: Sequence[Callable[[Samples], str]],
                 formats: Sequence[str | None], piece: Callable[[bytes], Piece]
                 ) -> tuple[Piece, ...]:
    """The pieces of one block of peers: those of `hit`, the block before, where kept."""
    if hit is not None and hit.names == names and _identical(hit.peers, block):
        return hit.pieces
    info, allowed, rx, tx, last = writers[:5]
    old, kept = (hit.peers, hit.pieces) if hit is not None else ((), ())
    same_names = hit is not None and hit.names == names  # (only the info lines show names)

    def unchanged(family: int) -> bool:
        return bool(kept) and (family > 0 or same_names) and _same(old, block,
                                                                   PEER_INPUTS[family])

    plain = not needs_escape("".join([p.public_key for p in block]))
    counters = tuple(
        kept[family] if unchanged(family) else
        piece(_keyed_text(fmt if plain else None, write, dn, block, value))
        for family, fmt, write, value in zip((2, 3, 4), formats[2:5], (rx, tx, last),
                                             _COUNTERS, strict=True))
    info_piece = kept[0] if unchanged(0) else piece(info([
        ((dn, p.public_key, str(p.endpoint or ""), n, allowed_ips_label(p)), 1)
        for p, n in zip(block, names, strict=True)]).encode())
    allowed_piece = kept[1] if unchanged(1) else piece(allowed([
        ((dn, p.public_key, network_text(net), FAMILY[net.version]), 1)
        for p in block for net in sorted(p.allowed_ips, key=_order)]).encode())
    return (info_piece, allowed_piece, *counters)


def _path_pieces(run: tuple[PeerPath, ...], hit: _PathBlock | None,
                 writers: Sequence[Callable[[Samples], str]], piece: Callable[[bytes], Piece]
                 ) -> tuple[Piece, ...]:
    """The pieces of one block of paths: those of `hit`, the block before, where kept."""
    if hit is not None and _identical(hit.paths, run):
        return hit.pieces
    return tuple(
        hit.pieces[i] if hit is not None and _same(hit.paths, run, inputs)
        else piece(write(fam.samples).encode())
        for i, (fam, write, inputs) in enumerate(zip(path_families(run), writers,
                                                     PATH_INPUTS, strict=True)))


def wireguard_pieces(snap: Snapshot, paths: Sequence[PeerPath], names: Mapping[str, str],
                     cache: LineCache) -> list[Piece]:
    """exposition(wireguard_families(snap, paths, names)) as compressed pieces, reusing
    those of unchanged blocks of peers and paths from `cache` (which then holds this
    render's)."""
    empty = dataclasses.replace(snap, devices=())
    peer_fams = list(peer_families(empty, {}))
    pw = _writers(peer_fams)
    qw = _writers(list(path_families(())))
    peer_writers = [write for _head, write in pw]
    piece = cache.deflater.piece
    taken_at = snap.taken_at
    peer_pieces: list[tuple[Piece, ...]] = []
    ages: list[bytes] = []
    old_peers, new_peers = cache.peers, {}
    for d in snap.devices:
        peers = d.peers
        formats = [key_format(fam, d.name) for fam in peer_fams]
        for start, end in _blocks([p.public_key for p in peers]):
            block = peers[start:end]
            key = (d.name, block[0].public_key)
            block_names = tuple([names.get(p.public_key, "") for p in block])
            made = _peer_pieces(d.name, block, block_names, old_peers.get(key), peer_writers,
                                formats, piece)
            new_peers[key] = _PeerBlock(block, block_names, made)
            peer_pieces.append(made)
        shaken = [p for p in peers if p.last_handshake > 0]
        plain = not needs_escape("".join([p.public_key for p in shaken]))
        ages.append(_keyed_text(formats[5] if plain else None, peer_writers[5], d.name, shaken,
                                lambda p: max(0.0, taken_at - p.last_handshake)))
    cache.peers = new_peers
    path_pieces: list[tuple[Piece, ...]] = []
    old_paths, new_paths = cache.paths, {}
    path_writers = [write for _head, write in qw]
    for start, end in _blocks([p.public_key for p in paths]):
        run = tuple(paths[start:end])
        key = (run[0].device, run[0].public_key)
        made = _path_pieces(run, old_paths.get(key), path_writers, piece)
        new_paths[key] = _PathBlock(run, made)
        path_pieces.append(made)
    cache.paths = new_paths
    out = [piece(exposition(device_families(snap)))]
    for i, (head, _write) in enumerate(pw):
        out.append(cache.head(head))
        if i == 5:
            out.append(piece(b"".join(ages)))
        else:
            out += [made[i] for made in peer_pieces]
    for i, (head, _write) in enumerate(qw):
        out.append(cache.head(head))
        out += [made[i] for made in path_pieces]
    return out


def wireguard_families(snap: Snapshot, paths: Sequence[PeerPath], names: Mapping[str, str],
                       outer_netns: bool = False) -> list[Family]:
    """The WireGuard families of one diagnosed snapshot; rendered once per refresh."""
    return [*device_families(snap), *peer_families(snap, names),
            *path_families(paths, outer_netns)]


def netns_families(views: Sequence[tuple[str, str, Snapshot, Sequence[PeerPath]]],
                   names: Mapping[str, str]) -> list[Metric | Family]:
    """--netns other than self: every namespace's WireGuard families with its `netns`
    label, merged, and one wgnest_netns_info per namespace read. `views` hold (name,
    path, snapshot, paths)."""
    info = gauge("wgnest_netns_info", "A network namespace read (--netns), with the path "
                 "it is entered by (\"\" for wgnest's own).", "netns", "path")
    for name, path, _snap, _paths in views:
        info.add((name, path), 1)
    count = gauge("wgnest_netns", "Network namespaces read in the last refresh (--netns).")
    count.add((), len(views))
    return merged([*(with_label(wireguard_families(snap, paths, names, outer_netns=True),
                                "netns", name) for name, _path, snap, paths in views),
                   [info, count]])
