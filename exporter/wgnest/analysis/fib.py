"""The kernel's route lookup of a locally sent packet, evaluated over the rules and every
table's routes: for a routing state that does not exist yet (what `wg-quick up` would make),
where the kernel cannot be asked.

The rule walk is analysis/rules.py's (priority order, every selector, `not`, goto, nop). A
`lookup` rule takes its table's most specific route (tos 0, then the lowest metric; an IPv6
link-local endpoint's scope pins the device); an empty table or a `throw` route goes on to
the next rule, `suppress_prefixlength` / `suppress_ifgroup` discard the result, a
blackhole / unreachable / prohibit rule or route ends the walk with the kernel's error, and
no rule at all is ENETUNREACH. `agrees` compares this evaluation with the kernel's own
answer for the state that does exist: the prediction trusts it only where they agree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wgnest.analysis.rules import IPPROTO_UDP, Packet, consulted, suppresses
from wgnest.model.host import LOOKUP, RTN_LOCAL, Flow, IPAddress, Link, RouteAnswer, Rule
from wgnest.model.routing import (
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    RTN_PROHIBIT,
    RTN_THROW,
    RTN_UNREACHABLE,
    Address,
    Route,
)

RULE_ERRORS = {6: "EINVAL", 7: "ENETUNREACH", 8: "EACCES"}  # blackhole, unreachable, prohibit
ROUTE_ERRORS = {RTN_BLACKHOLE: "EINVAL", RTN_UNREACHABLE: "EHOSTUNREACH",
                RTN_PROHIBIT: "EACCES"}
NO_SELECTORS = {"invert": False, "src": None, "dst": None, "fwmark": 0, "fwmask": 0,
                "iif": "", "oif": "", "tos": 0, "ipproto": 0, "sport": None, "dport": None,
                "uid": None, "l3mdev": False}


@dataclass(frozen=True, slots=True)
class Resolved:
    answer: RouteAnswer
    route: Route | None  # the route that decided it; None for an error or no route


def _without_proto(rules: Sequence[Rule]) -> list[Rule]:
    """The rules as a packet without a protocol (plain `ip route get`) meets them: a rule on
    `ipproto` never selects it, so `not` such a rule selects everything."""
    out = []
    for rule in rules:
        if not rule.ipproto:
            out.append(rule)
        elif rule.invert:
            out.append(dataclasses.replace(rule, **NO_SELECTORS))  # type: ignore[arg-type]
    return out


class Fib:
    def __init__(self, rules: Iterable[Rule], routes: Iterable[Route], links: Iterable[Link],
                 addresses: Iterable[Address] = (), groups: dict[int, int] | None = None
                 ) -> None:
        self.rules = tuple(rules)
        self.links = {link.index: link for link in links}
        self.addresses = tuple(addresses)
        self.groups = groups or {}
        self.lo = next((i for i, link in self.links.items() if link.name == "lo"), 1)
        # (family, table) -> prefix length -> network as int -> routes by metric
        self._tables: dict[tuple[int, int], dict[int, dict[int, list[Route]]]] = {}
        for route in routes:
            by_len = self._tables.setdefault((route.family, route.table), {})
            by_len.setdefault(route.dst.prefixlen, {}).setdefault(
                int(route.dst.network_address), []).append(route)
        self._lengths: dict[tuple[int, int], list[int]] = {}
        for key, by_len in self._tables.items():
            for buckets in by_len.values():
                for bucket in buckets.values():
                    bucket.sort(key=lambda r: r.metric)
            self._lengths[key] = sorted(by_len, reverse=True)

    def table_route(self, family: int, table: int, dst: IPAddress, oif: int = 0
                    ) -> Route | None:
        """The table's most specific route holding dst, as fib_table_lookup picks it."""
        by_len = self._tables.get((family, table))
        if not by_len:
            return None
        value, width = int(dst), dst.max_prefixlen
        for plen in self._lengths[(family, table)]:
            mask = ((1 << plen) - 1) << (width - plen) if plen else 0
            for route in by_len[plen].get(value & mask, ()):
                if route.tos or (oif and route.oif and route.oif != oif):
                    continue
                return route
        return None

    def routes_of(self, family: int, table: int) -> list[Route]:
        by_len = self._tables.get((family, table), {})
        return [r for buckets in by_len.values() for bucket in buckets.values() for r in bucket]

    def resolve(self, flow: Flow, proto: int = IPPROTO_UDP) -> Resolved:
        rules = self.rules if proto == IPPROTO_UDP else _without_proto(self.rules)
        link = self.links.get(flow.oif)
        pkt = Packet(flow, None, link.name if flow.oif and link else "")
        family = flow.dst.version
        for rule in consulted(rules, pkt):
            if rule.action != LOOKUP:
                return Resolved(RouteAnswer(error=RULE_ERRORS.get(rule.action, "EINVAL")), None)
            route = self.table_route(family, rule.table, flow.dst, flow.oif)
            if route is None or route.route_type == RTN_THROW:
                continue
            if suppresses(rule, route.dst.prefixlen):
                continue
            if rule.suppress_ifgroup >= 0 and self.groups.get(route.oif, 0) == (
                    rule.suppress_ifgroup):
                continue
            error = ROUTE_ERRORS.get(route.route_type)
            if error:
                return Resolved(RouteAnswer(table=rule.table, route_type=route.route_type,
                                            error=error), route)
            return Resolved(self._answer(flow.dst, route, rule.table), route)
        return Resolved(RouteAnswer(error="ENETUNREACH"), None)

    def lookup(self, flow: Flow) -> RouteAnswer:
        return self.resolve(flow).answer

    def _answer(self, dst: IPAddress, route: Route, table: int) -> RouteAnswer:
        if route.route_type == RTN_LOCAL:
            return RouteAnswer(oif=self.lo, prefsrc=str(dst), table=table, route_type=RTN_LOCAL)
        return RouteAnswer(oif=route.oif, gateway=route.gateway,
                           prefsrc=route.prefsrc or self._source(route),
                           table=table, route_type=route.route_type)

    def _source(self, route: Route) -> str:
        """The source address the kernel would pick: an address of the egress device (one
        whose subnet holds the gateway first), IPv6 preferring a global one."""
        mine = [a for a in self.addresses if a.ifindex == route.oif
                and a.address.version == route.family]
        if route.gateway:
            gw = ipaddress.ip_address(route.gateway)
            near = [a for a in mine if gw in a.network]
            mine = near + [a for a in mine if a not in near]
        if route.family == 6:
            mine = sorted(mine, key=lambda a: a.address.is_link_local)
        return str(mine[0].address) if mine else ""

    def mtu_towards(self, dst: IPAddress) -> tuple[int, str] | None:
        """What wg-quick's set_mtu_up reads from `ip route get DST` (no mark, no protocol):
        the route's own mtu, else its device's. (mtu, device name), or None without a route."""
        found = self.resolve(Flow(dst, 0, 0, 0), proto=0)
        if not found.answer.ok or found.route is None:
            return None
        link = self.links.get(found.answer.oif)
        name = link.name if link else f"if{found.answer.oif}"
        if found.route.mtu:
            return found.route.mtu, name
        return (link.mtu, name) if link else None

    def main_default(self, family: int = 4) -> Route | None:
        """The first line of `ip route show default`: main's default with the lowest metric."""
        found = [r for r in self.routes_of(family, RT_TABLE_MAIN) if r.dst.prefixlen == 0]
        return min(found, key=lambda r: r.metric) if found else None


def agrees(model: RouteAnswer, kernel: RouteAnswer) -> bool:
    """Whether the evaluation routes the flow where the kernel does: both an error, or the
    same device, route type and (when the kernel names it) table."""
    if bool(model.error) or bool(kernel.error):
        return bool(model.error) and bool(kernel.error)
    return (model.oif == kernel.oif and model.route_type == kernel.route_type
            and (not kernel.table or model.table == kernel.table))


def describe(answer: RouteAnswer, links: dict[int, Link]) -> str:
    if answer.error:
        return answer.error
    link = links.get(answer.oif)
    name = link.name if link else f"if{answer.oif}"
    return f"via {name} (table {answer.table})"
