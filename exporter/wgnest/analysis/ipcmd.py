"""The hook lines `wgnest lint` can evaluate: exactly one plain `ip rule add` or
`ip route add|replace` command, as iproute2 parses it. Anything else (another program,
shell syntax, an option not listed here) is not guessed at: it is reported as unknown.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from wgnest.model.host import GOTO, LOOKUP, NOP, RTN_UNICAST, IPNetwork, PortRange, Rule
from wgnest.model.routing import RT_TABLE_MAIN, Route

SHELL = re.compile(r"[;&|$`<>(){}\[\]*?!~'\"\\\n#=]")
RULE_TYPES = {"blackhole": 6, "unreachable": 7, "prohibit": 8}
ROUTE_TYPES = {"unicast": 1, "local": 2, "blackhole": 6, "unreachable": 7, "prohibit": 8,
               "throw": 9}
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132}
DEFAULT_METRIC = {4: 0, 6: 1024}  # what `ip route add` without a metric gets
BUILTIN_TABLES = {"default": 253, "main": 254, "local": 255}
LINT_HOOK = re.compile(r"(^|[\s/])wgnest(\.runtime\.cli)?\s+lint(\s|$)")


@dataclass(frozen=True, slots=True)
class RuleAdd:
    rule: Rule  # priority -1: none given, the kernel picks one when it is added


@dataclass(frozen=True, slots=True)
class RouteAdd:
    route: Route  # oif 0 here: the device is resolved by name when it is applied
    dev: str  # "" : the device of the gateway's connected route
    replace: bool


HookOp = RuleAdd | RouteAdd


def is_lint_hook(command: str) -> bool:
    """`wgnest lint ...` itself (e.g. `PreUp = wgnest lint --refuse %i`): changes nothing."""
    return bool(LINT_HOOK.search(command))


def _number(text: str) -> int | None:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def _table(text: str, tables: Mapping[str, int]) -> int | None:
    number = _number(text)
    return number if number is not None else tables.get(text, BUILTIN_TABLES.get(text))


def _prefix(text: str, family: int) -> IPNetwork | None:
    """`all`/`default` (None), an address or a prefix."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net if not family or net.version == family else None


def _ports(text: str) -> PortRange | None:
    low, _, high = text.partition("-")
    a, b = _number(low), _number(high) if high else _number(low)
    if a is None or b is None or not 0 <= a <= b <= 65535:
        return None
    return a, b


def parse_ip_command(command: str, tables: Mapping[str, int]) -> HookOp | None:
    if SHELL.search(command):
        return None
    words = command.split()
    if not words or words[0] not in ("ip", "/sbin/ip", "/usr/sbin/ip", "/bin/ip",
                                     "/usr/bin/ip"):
        return None
    words, family = words[1:], 0
    while words and words[0] in ("-4", "-6"):
        family = 4 if words[0] == "-4" else 6
        words = words[1:]
    if len(words) < 2:
        return None
    obj, verb, args = words[0], words[1], words[2:]
    if obj == "rule" and verb == "add":
        return _rule(args, family, tables)
    if obj == "route" and verb in ("add", "replace"):
        return _route(args, family, tables, verb == "replace")
    return None


def _rule(args: list[str], family: int, tables: Mapping[str, int]) -> RuleAdd | None:
    fields: dict[str, object] = {}
    action, table, goto, prio, invert = LOOKUP, RT_TABLE_MAIN, 0, -1, False
    nets: dict[str, IPNetwork | None] = {"src": None, "dst": None}
    i = 0
    while i < len(args):
        word = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        i += 1
        if word == "not":
            invert = True
            continue
        if word == "l3mdev":
            fields["l3mdev"] = True
            continue
        if word == "nop":
            action = NOP
            continue
        if word in RULE_TYPES:
            action = RULE_TYPES[word]
            continue
        if value is None:
            return None
        i += 1
        if word in ("from", "to"):
            key = "src" if word == "from" else "dst"
            if value == "all":
                continue
            net = _prefix(value, family)
            if net is None:
                return None
            family = family or net.version
            nets[key] = net if net.prefixlen else None
        elif word in ("pref", "priority", "preference", "order"):
            number = _number(value)
            if number is None:
                return None
            prio = number
        elif word in ("table", "lookup"):
            found = _table(value, tables)
            if found is None:
                return None
            table = found
        elif word == "goto":
            number = _number(value)
            if number is None:
                return None
            action, goto = GOTO, number
        elif word == "fwmark":
            mark_text, _, mask_text = value.partition("/")
            mark = _number(mark_text)
            mask = _number(mask_text) if mask_text else (0xFFFFFFFF if mark else 0)
            if mark is None or mask is None:
                return None
            fields["fwmark"], fields["fwmask"] = mark, mask
        elif word in ("iif", "dev"):
            fields["iif"] = value
        elif word == "oif":
            fields["oif"] = value
        elif word == "ipproto":
            proto = PROTOCOLS.get(value, _number(value))
            if proto is None:
                return None
            fields["ipproto"] = proto
        elif word in ("sport", "dport", "uidrange"):
            ports = _ports(value)
            if ports is None:
                return None
            fields["uid" if word == "uidrange" else word] = ports
        elif word == "suppress_prefixlength":
            number = _number(value)
            if number is None:
                return None
            fields["suppress_prefixlength"] = number
        elif word in ("protocol", "proto"):
            continue
        else:
            return None
    rule = Rule(family or 4, prio, table if action == LOOKUP else 0, action, invert=invert,
                goto=goto, src=nets["src"], dst=nets["dst"], **fields)  # type: ignore[arg-type]
    return RuleAdd(rule)


def _route(args: list[str], family: int, tables: Mapping[str, int], replace: bool
           ) -> RouteAdd | None:
    rtype = RTN_UNICAST
    if args and args[0] in ROUTE_TYPES:
        rtype, args = ROUTE_TYPES[args[0]], args[1:]
    if not args:
        return None
    if args[0] == "default":
        dst: IPNetwork | None = ipaddress.ip_network("::/0" if family == 6 else "0.0.0.0/0")
    else:
        dst = _prefix(args[0], family)
    if dst is None:
        return None
    family = dst.version
    table, metric, gateway, dev, src, mtu = RT_TABLE_MAIN, DEFAULT_METRIC[family], "", "", "", 0
    i = 1
    while i < len(args):
        word = args[i]
        if word == "onlink":
            i += 1
            continue
        if i + 1 >= len(args):
            return None
        value = args[i + 1]
        i += 2
        if word == "via":
            if value in ("inet", "inet6") and i < len(args):
                value, i = args[i], i + 1
            try:
                gateway = str(ipaddress.ip_address(value))
            except ValueError:
                return None
        elif word in ("dev", "oif"):
            dev = value
        elif word == "table":
            found = _table(value, tables)
            if found is None:
                return None
            table = found
        elif word in ("metric", "priority", "preference"):
            number = _number(value)
            if number is None:
                return None
            metric = number
        elif word == "src":
            src = value
        elif word == "mtu":
            if value == "lock" and i < len(args):
                value, i = args[i], i + 1
            number = _number(value)
            if number is None:
                return None
            mtu = number
        elif word in ("proto", "protocol", "scope"):
            continue
        else:
            return None
    if rtype == RTN_UNICAST and not dev and not gateway:
        return None
    route = Route(table, dst, 0, gateway, rtype, metric, 0, src, mtu)
    return RouteAdd(route, dev, replace)
