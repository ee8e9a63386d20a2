"""Every route of every table, the interface addresses and the link groups: what a rule walk
needs beyond the main table when the kernel cannot be asked (a state that does not exist
yet, see analysis/fib.py). No I/O here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from wgnest.model.host import RTN_UNICAST, IPAddress, IPNetwork

RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RTN_LOCAL, RTN_BROADCAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = (
    2, 3, 6, 7, 8, 9)
ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}


@dataclass(frozen=True, slots=True)
class Route:
    """One route of one table (a multipath route by its first next hop)."""

    table: int
    dst: IPNetwork
    oif: int = 0
    gateway: str = ""
    route_type: int = RTN_UNICAST
    metric: int = 0
    tos: int = 0
    prefsrc: str = ""
    mtu: int = 0  # the route's own mtu metric (RTAX_MTU); 0 = none
    multipath: bool = False

    @property
    def family(self) -> int:
        return self.dst.version

    def __str__(self) -> str:
        kind = "" if self.route_type == RTN_UNICAST else (
            ROUTE_TYPES.get(self.route_type, str(self.route_type)) + " ")
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev if{self.oif}" if self.oif else ""
        return f"{kind}{self.dst}{via}{dev} table {self.table} metric {self.metric}"


@dataclass(frozen=True, slots=True)
class Address:
    ifindex: int
    address: IPAddress
    prefixlen: int

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(f"{self.address}/{self.prefixlen}", strict=False)


@dataclass(frozen=True, slots=True)
class Routing:
    """Routes of every table and family, addresses, and each link's group (ifindex -> group,
    for `suppress_ifgroup`)."""

    routes: tuple[Route, ...] = ()
    addresses: tuple[Address, ...] = ()
    groups: dict[int, int] = field(default_factory=dict)
