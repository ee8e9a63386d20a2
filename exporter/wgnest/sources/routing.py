"""Every route of every table, the interface addresses and the link groups, read over
rtnetlink: what `wgnest lint` walks the rules over for a state the kernel does not hold
yet."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from wgnest.model.routing import Address, Route, Routing
from wgnest.sources.errors import SourceError, netlink_errors, reason_for_errno
from wgnest.sources.rtnetlink import RtNetlink

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
RTM_F_CLONED = 0x200
IFA_F_SECONDARY = 0x01


def _open_default() -> Any:
    return RtNetlink()


def read_routing(open_ipr: Callable[[], Any] = _open_default) -> Routing:
    try:
        ipr = open_ipr()
    except OSError as exc:
        raise SourceError(f"rtnetlink: {exc}", reason_for_errno(exc.errno)) from None
    try:
        routes: list[Route] = []
        for version, family in FAMILIES.items():
            for msg in ipr.get_routes(family=family):
                route = route_from_msg(version, msg)
                if route is not None:
                    routes.append(route)
        addresses = [a for msg in ipr.get_addr() if (a := address_from_msg(msg)) is not None]
        groups = {int(msg["index"]): int(msg.get_attr("IFLA_GROUP") or 0)
                  for msg in ipr.get_links()}
    except netlink_errors() as exc:
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        raise SourceError(f"netlink route dump failed: {exc}", reason_for_errno(code)) from None
    finally:
        ipr.close()
    return Routing(tuple(routes), tuple(addresses), groups)


def route_from_msg(version: int, msg: Any) -> Route | None:
    if msg["flags"] & RTM_F_CLONED:
        return None
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if version == 4 else "::")
    try:
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
    except ValueError:
        return None
    oif, gateway = msg.get_attr("RTA_OIF") or 0, msg.get_attr("RTA_GATEWAY") or ""
    hops = msg.get_attr("RTA_MULTIPATH") or []
    if not oif and hops:
        first = hops[0]
        oif = first.get("oif", 0) or 0
        gateway = first.get_attr("RTA_GATEWAY") or ""
    metrics = msg.get_attr("RTA_METRICS")
    mtu = (metrics.get_attr("RTAX_MTU") or 0) if metrics is not None else 0
    return Route(
        table=int(msg.get_attr("RTA_TABLE") or msg["table"]), dst=net, oif=int(oif),
        gateway=str(gateway), route_type=int(msg["type"]),
        metric=int(msg.get_attr("RTA_PRIORITY") or 0), tos=int(msg["tos"] or 0),
        prefsrc=str(msg.get_attr("RTA_PREFSRC") or ""), mtu=int(mtu),
        multipath=len(hops) > 1)


def address_from_msg(msg: Any) -> Address | None:
    if msg["flags"] & IFA_F_SECONDARY and msg["family"] == socket.AF_INET:
        return None  # a secondary address adds no prefix route and is not picked as source
    text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    try:
        address = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    return Address(int(msg["index"]), address, int(msg["prefixlen"]))
