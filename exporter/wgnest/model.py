"""Plain data the sources return and the analysis reads. No I/O here.

Keys are always base64. Private and preshared keys never reach these classes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

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

    @property
    def family(self) -> int:
        return self.address.version

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


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


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy routing rule (ip rule), as the kernel reports it."""

    family: int  # 4 or 6
    priority: int
    table: int
    action: int  # 1 = lookup table; 2 goto; 3 nop; 6 blackhole; 7 unreachable; 8 prohibit
    fwmark: int = 0
    fwmask: int = 0
    invert: bool = False
    suppress_prefixlength: int = -1  # -1 means not set

    def matches_mark(self, mark: int) -> bool:
        """True when the rule's fwmark selector (alone) selects packets with this mark."""
        hit = (self.fwmark ^ mark) & self.fwmask == 0
        return not hit if self.invert else hit

    def __str__(self) -> str:
        sel = "from all"
        if self.fwmask:
            mask = "" if self.fwmask == 0xFFFFFFFF else f"/{self.fwmask:#x}"
            sel += f" fwmark {self.fwmark:#x}{mask}"
        if self.invert:
            sel = "not " + sel
        action = ACTIONS.get(self.action, f"action {self.action}")
        text = f"{self.priority}: {sel} {action}"
        if self.action == 1:
            text += f" {table_name(self.table)}"
        if self.suppress_prefixlength >= 0:
            text += f" suppress_prefixlength {self.suppress_prefixlength}"
        return text


@dataclass(frozen=True, slots=True)
class Flow:
    """A transport flow exactly as WireGuard sends it (UDP, uid 0, no source address)."""

    dst: IPAddress
    mark: int
    sport: int
    dport: int
    oif: int = 0  # only for IPv6 link-local endpoints (scope id)


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
        return not self.error and self.route_type == 1


@dataclass(frozen=True, slots=True)
class DefaultRoute:
    """A default route of the main table: the underlay a fix can point at."""

    family: int
    oif: int
    gateway: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read from one host at one moment."""

    taken_at: float
    devices: tuple[Device, ...] = ()
    links: tuple[Link, ...] = ()
    rules: tuple[Rule, ...] = ()
    defaults: tuple[DefaultRoute, ...] = ()
    lookups: dict[Flow, RouteAnswer] = field(default_factory=dict)
    # collector name -> (reason, message) for sources that failed (success when absent)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


TABLE_NAMES = {253: "default", 254: "main", 255: "local"}


def peer_index(snap: Snapshot) -> dict[tuple[str, str], tuple[Device, Peer]]:
    """(device name, public key) -> (device, peer), for looking peers up by a path's labels."""
    return {(d.name, p.public_key): (d, p) for d in snap.devices for p in d.peers}


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))
