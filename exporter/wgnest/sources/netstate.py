"""Links, policy rules (every selector) and the main table, read over rtnetlink."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from wgnest.model.host import IPNetwork, Link, MainRoute, Rule
from wgnest.sources.errors import SourceError, netlink_errors, reason_for_errno
from wgnest.sources.routing import route_from_msg
from wgnest.sources.rtnetlink import RtNetlink

IFF_UP = 0x1
FIB_RULE_INVERT = 0x2
RT_TABLE_MAIN = 254
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _open_default() -> Any:
    return RtNetlink()


class NetState:
    """One rtnetlink socket, reused across refreshes."""

    def __init__(self, open_ipr: Callable[[], Any] = _open_default) -> None:
        self._open = open_ipr
        self._ipr: Any = None

    def _sock(self) -> Any:
        if self._ipr is None:
            self._ipr = self._open()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _dump(self, what: str, call: Callable[[Any], Any]) -> list[Any]:
        try:
            return list(call(self._sock()))
        except netlink_errors() as exc:
            self.close()  # a broken socket is reopened on the next refresh
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            msg = f"netlink {what} dump failed: {exc}"
            raise SourceError(msg, reason_for_errno(code)) from None

    def links(self) -> list[Link]:
        out = []
        for msg in self._dump("link", lambda s: s.get_links()):
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
            out.append(Link(
                index=msg["index"], name=msg.get_attr("IFLA_IFNAME") or "", kind=kind,
                mtu=msg.get_attr("IFLA_MTU") or 0, up=bool(msg["flags"] & IFF_UP),
            ))
        return out

    def rules(self) -> list[Rule]:
        out: list[Rule] = []
        for version, family in FAMILIES.items():
            msgs = self._dump("rule", functools.partial(_get_rules, family=family))
            out.extend(rule_from_msg(version, msg) for msg in msgs)
        return sorted(out, key=lambda r: (r.family, r.priority))

    def main_routes(self) -> list[MainRoute]:
        out: list[MainRoute] = []
        for version, family in FAMILIES.items():
            msgs = self._dump("route", functools.partial(_get_main_routes, family=family))
            out.extend(r for msg in msgs if (r := main_route_from_msg(version, msg)) is not None)
        return out

    def addresses(self) -> list[tuple[int, str]]:
        """(ifindex, address) of every local address (IFA_LOCAL, else IFA_ADDRESS)."""
        out = []
        for msg in self._dump("address", lambda s: s.get_addr()):
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append((int(msg["index"]), str(addr)))
        return out


def _get_rules(ipr: Any, family: int) -> Any:
    return ipr.get_rules(family=family)


def _get_main_routes(ipr: Any, family: int) -> Any:
    return ipr.get_routes(family=family, table=RT_TABLE_MAIN)


def main_route_from_msg(version: int, msg: Any) -> MainRoute | None:
    """A main-table route; a multipath one by its first next hop (RTA_MULTIPATH)."""
    route = route_from_msg(version, msg)
    if route is None:
        return None
    return MainRoute(route.dst, route.oif, route.gateway, route.route_type)


def _range(value: Any) -> tuple[int, int] | None:
    """A port or uid range: {"start", "end"}, or "low:high" as some pyroute2 versions
    decode it."""
    if not value:
        return None
    if isinstance(value, str):
        low, _, high = value.partition(":")
        try:
            return int(low), int(high or low)
        except ValueError:
            return None
    low, high = value.get("start"), value.get("end")
    return (int(low), int(high)) if low is not None and high is not None else None


def _selector_net(msg: Any, attr: str, length: int, version: int) -> IPNetwork | None:
    addr = msg.get_attr(attr)
    if not length or addr is None:
        return None
    try:
        return ipaddress.ip_network(f"{addr}/{length}", strict=False)
    except ValueError:
        return None


def rule_from_msg(version: int, msg: Any) -> Rule:
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    ifgroup = msg.get_attr("FRA_SUPPRESS_IFGROUP")
    return Rule(
        family=version,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=msg.get_attr("FRA_TABLE") or msg["table"],
        action=msg["action"],
        fwmark=msg.get_attr("FRA_FWMARK") or 0,
        fwmask=msg.get_attr("FRA_FWMASK") or 0,
        invert=bool(msg["flags"] & FIB_RULE_INVERT),
        suppress_prefixlength=-1 if suppress in (None, 0xFFFFFFFF) else suppress,
        suppress_ifgroup=-1 if ifgroup in (None, 0xFFFFFFFF) else ifgroup,
        src=_selector_net(msg, "FRA_SRC", msg["src_len"], version),
        dst=_selector_net(msg, "FRA_DST", msg["dst_len"], version),
        iif=msg.get_attr("FRA_IIFNAME") or "",
        oif=msg.get_attr("FRA_OIFNAME") or "",
        tos=msg["tos"] or 0,
        ipproto=msg.get_attr("FRA_IP_PROTO") or 0,
        sport=_range(msg.get_attr("FRA_SPORT_RANGE")),
        dport=_range(msg.get_attr("FRA_DPORT_RANGE")),
        uid=_range(msg.get_attr("FRA_UID_RANGE")),
        l3mdev=bool(msg.get_attr("FRA_L3MDEV")),
        goto=msg.get_attr("FRA_GOTO") or 0,
    )
