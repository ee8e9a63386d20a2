"""Plain data the sources return and the analysis reads. No I/O here.

Keys are always base64. Private and preshared keys never reach these classes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from wgnest.model.failures import SourceFailure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Bytes WireGuard adds around each inner packet: outer IP header + UDP (8) + WireGuard (32).
WG_OVERHEAD = {4: 20 + 8 + 32, 6: 40 + 8 + 32}

# Link kinds that carry packets inside another protocol: a transport routed into one is nested.
TUNNEL_KINDS = frozenset(
    {"wireguard", "tun", "tap", "gre", "gretap", "ip6gre", "ip6gretap", "ipip", "sit", "ip6tnl",
     "vti", "vti6", "xfrm", "ppp", "erspan", "ip6erspan", "geneve", "vxlan", "l2tp"}
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a peer's transport packets are sent."""

    address: IPAddress
    port: int
    scope_id: int = 0
    # its text, made once: a label and a comparison of every peer on every refresh
    _text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = (f"[{self.address}]:{self.port}" if self.address.version == 6
                else f"{self.address}:{self.port}")
        object.__setattr__(self, "_text", text)

    @property
    def family(self) -> int:
        return self.address.version

    def __str__(self) -> str:
        return self._text


@dataclass(frozen=True, slots=True)
class Peer:
    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    last_handshake: float  # Unix seconds; 0 means never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int  # seconds; 0 means off


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    ifindex: int
    implementation: str  # "kernel" or "userspace"
    public_key: str  # base64; "" when the device has no private key
    listen_port: int
    fwmark: int  # 0 means none
    mtu: int
    peers: tuple[Peer, ...]


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND, "" for physical devices
    mtu: int
    up: bool


ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
LOOKUP, GOTO, NOP = 1, 2, 3
PortRange = tuple[int, int]  # inclusive


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy routing rule (ip rule) with every selector the kernel has."""

    family: int  # 4 or 6
    priority: int
    table: int
    action: int  # 1 = lookup table; 2 goto; 3 nop; 6 blackhole; 7 unreachable; 8 prohibit
    fwmark: int = 0
    fwmask: int = 0
    invert: bool = False
    suppress_prefixlength: int = -1  # -1 means not set
    suppress_ifgroup: int = -1  # -1 means not set
    src: IPNetwork | None = None  # `from`; None = all
    dst: IPNetwork | None = None  # `to`; None = all
    iif: str = ""
    oif: str = ""
    tos: int = 0
    ipproto: int = 0  # 0 = any
    sport: PortRange | None = None
    dport: PortRange | None = None
    uid: PortRange | None = None  # uid range
    l3mdev: bool = False
    goto: int = 0  # target priority of a goto

    def selector_text(self) -> str:
        """The selectors as `ip rule` prints them."""
        sel = [f"from {self.src}" if self.src is not None else "from all"]
        if self.dst is not None:
            sel.append(f"to {self.dst}")
        if self.tos:
            sel.append(f"tos {self.tos:#x}")
        if self.fwmask:
            mask = "" if self.fwmask == 0xFFFFFFFF else f"/{self.fwmask:#x}"
            sel.append(f"fwmark {self.fwmark:#x}{mask}")
        if self.iif:
            sel.append(f"iif {self.iif}")
        if self.oif:
            sel.append(f"oif {self.oif}")
        if self.l3mdev:
            sel.append("l3mdev")
        if self.uid is not None:
            sel.append(f"uidrange {self.uid[0]}-{self.uid[1]}")
        if self.ipproto:
            sel.append(f"ipproto {IPPROTO_NAMES.get(self.ipproto, self.ipproto)}")
        for word, ports in (("sport", self.sport), ("dport", self.dport)):
            if ports is not None:
                sel.append(f"{word} {_ports(ports)}")
        text = " ".join(sel)
        return "not " + text if self.invert else text

    def __str__(self) -> str:
        action = ACTIONS.get(self.action, f"action {self.action}")
        text = f"{self.priority}: {self.selector_text()} {action}"
        if self.action == LOOKUP:
            text += f" {table_name(self.table)}"
        elif self.action == GOTO:
            text += f" {self.goto}"
        if self.suppress_prefixlength >= 0:
            text += f" suppress_prefixlength {self.suppress_prefixlength}"
        if self.suppress_ifgroup >= 0:
            text += f" suppress_ifgroup {self.suppress_ifgroup}"
        return text


IPPROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}


def _ports(ports: PortRange) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


@dataclass(frozen=True, slots=True)
class Flow:
    """A transport flow exactly as WireGuard sends it (UDP, uid 0, no source address), or as
    a namespace that forwards it receives it (`iif` and `src` set, mark 0)."""

    dst: IPAddress
    mark: int
    sport: int
    dport: int
    oif: int = 0  # only for IPv6 link-local endpoints (scope id)
    iif: int = 0  # forwarded: the link it arrives on (an input route lookup)
    src: IPAddress | None = None  # forwarded: the sender's source address
    # A flow is a dict key several times per peer and refresh (the route cache, the
    # snapshot's answers, the analysis): its hash is computed once, from the address's
    # integer (ipaddress hashes hex(int(address)) on every call).
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        src = None if self.src is None else int(self.src)
        object.__setattr__(self, "_hash", hash((int(self.dst), self.dst.version, self.mark,
                                                self.sport, self.dport, self.oif, self.iif,
                                                src)))

    def __hash__(self) -> int:
        return self._hash


RTN_UNICAST, RTN_LOCAL = 1, 2


@dataclass(frozen=True, slots=True)
class RouteAnswer:
    """The kernel's answer to a route lookup of one flow."""

    oif: int = 0
    gateway: str = ""
    prefsrc: str = ""
    table: int = 0
    route_type: int = 1  # RTN_UNICAST
    error: str = ""  # e.g. "ENETUNREACH"; empty when the lookup succeeded

    @property
    def ok(self) -> bool:
        """A usable route: unicast, or local (an endpoint on this host goes over loopback)."""
        return not self.error and self.route_type in (RTN_UNICAST, RTN_LOCAL)


@dataclass(frozen=True, slots=True)
class MainRoute:
    """A route of the main table: what a `lookup main` rule finds (and the underlay a fix
    can point at). A multipath route is listed by its first next hop."""

    dst: IPNetwork
    oif: int
    gateway: str
    route_type: int = RTN_UNICAST

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read from one host at one moment, and what could not be read."""

    taken_at: float
    devices: tuple[Device, ...] = ()
    links: tuple[Link, ...] = ()
    rules: tuple[Rule, ...] = ()
    main_routes: tuple[MainRoute, ...] = ()
    lookups: dict[Flow, RouteAnswer] = field(default_factory=dict)
    # (family, port) of every UDP socket bound in this namespace; None when unread. A kernel
    # device whose listen port is missing was made in another namespace: its socket, and
    # so its transport's routing, stayed there.
    udp_ports: frozenset[tuple[int, int]] | None = None
    # UAPI sockets named after a link that is no TUN device: left over, never connected to
    stale_sockets: tuple[str, ...] = ()
    failures: tuple[SourceFailure, ...] = ()
    durations: dict[str, float] = field(default_factory=dict)
    # device -> public key -> the peer's transport flow, the very objects `lookups` is keyed
    # by (the snapshot builder's): the analysis takes them where they still match, instead of
    # making an equal one for every peer (10,000 peers: 1.3 MB)
    transport_flows: Mapping[str, Mapping[str, Flow]] = field(
        default_factory=dict, compare=False, repr=False)


TABLE_NAMES = {253: "default", 254: "main", 255: "local"}


def peer_index(snap: Snapshot) -> dict[tuple[str, str], tuple[Device, Peer]]:
    """(device name, public key) -> (device, peer), for looking peers up by a path's labels."""
    return {(d.name, p.public_key): (d, p) for d in snap.devices for p in d.peers}


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))
