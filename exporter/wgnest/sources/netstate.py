"""Links, policy rules and main-table default routes, read with pyroute2."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from wgnest.model import DefaultRoute, Link, Rule
from wgnest.sources.errors import SourceError, reason_for_errno

IFF_UP = 0x1
FIB_RULE_INVERT = 0x2
RT_TABLE_MAIN = 254
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _open_default() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


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
        except (OSError, NetlinkError) as exc:
            self.close()  # a broken socket is reopened on the next refresh
            code = getattr(exc, "code", None) or exc.errno
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

    def defaults(self) -> list[DefaultRoute]:
        out = []
        for version, family in FAMILIES.items():
            msgs = self._dump("route", functools.partial(_get_main_routes, family=family))
            for msg in msgs:
                if msg["dst_len"] != 0 or msg["type"] != 1:
                    continue
                out.append(DefaultRoute(version, msg.get_attr("RTA_OIF") or 0,
                                        msg.get_attr("RTA_GATEWAY") or ""))
        return out


def _get_rules(ipr: Any, family: int) -> Any:
    return ipr.get_rules(family=family)


def _get_main_routes(ipr: Any, family: int) -> Any:
    return ipr.get_routes(family=family, table=RT_TABLE_MAIN)


def rule_from_msg(version: int, msg: Any) -> Rule:
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    return Rule(
        family=version,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=msg.get_attr("FRA_TABLE") or msg["table"],
        action=msg["action"],
        fwmark=msg.get_attr("FRA_FWMARK") or 0,
        fwmask=msg.get_attr("FRA_FWMASK") or 0,
        invert=bool(msg["flags"] & FIB_RULE_INVERT),
        suppress_prefixlength=-1 if suppress in (None, 0xFFFFFFFF) else suppress,
    )
