"""The fix for a nested or looping transport, and how it is known to work.

An FwMark fix is asked of the kernel again (the snapshot holds its answer for every
candidate mark, see fix_flows). A route or rule fix cannot be asked without applying it, so
it is proven from the rule order: which rule captured the packet, and whether a host route
in `main` would be reached before it; when it would not, the fix is a rule placed before the
capturing one. A fix that neither proves is marked unproven, never presented as sure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from wgnest.analysis.flows import transport_flow
from wgnest.analysis.rules import (
    RT_TABLE_MAIN,
    Packet,
    capturing_rule,
    first_main_lookup_before,
    free_priority_below,
)
from wgnest.analysis.view import HostView
from wgnest.model.host import LOOKUP, Device, Flow, RouteAnswer, Rule, Snapshot, table_name


class FixKind(StrEnum):
    FWMARK = "fwmark"  # set the device's fwmark
    ROUTE = "route"  # a host route to the endpoint in main, via the underlay
    RULE = "rule"  # a rule before the capturing one that sends the transport to main


class Proof(StrEnum):
    KERNEL = "kernel"  # the kernel was asked again with the fix and routed it to the underlay
    RULE_ORDER = "rule_order"  # the rule order and the main table prove the fix wins
    NONE = "none"  # not proven: placeholders to fill in, or the capturing rule is unknown


@dataclass(frozen=True, slots=True)
class Fix:
    kind: FixKind
    fwmark: int  # 0 unless kind is fwmark
    proof: Proof
    config_lines: tuple[str, ...]  # for the device's [Interface] section (wg-quick)
    commands: tuple[str, ...]  # the runtime commands that apply it now
    explanation: str
    resulting_egress: str = ""

    @property
    def verified(self) -> bool:
        return self.proof == Proof.KERNEL


def fix_candidates(view: HostView, device: Device, answer: RouteAnswer, family: int) -> list[int]:
    """Marks worth trying, best first: the mark of the `not fwmark` rule that sent the packet
    to the table it was routed by, then every other rule's mark, in priority order."""
    rules = [r for r in view.snap.rules if r.family == family and r.fwmask and r.action == LOOKUP]
    first = [r.fwmark for r in rules if r.invert and r.table == answer.table]
    marks = [m for m in dict.fromkeys(first + [r.fwmark for r in rules]) if m]
    return [m for m in marks if m != device.fwmark]


def self_policy_routed(view: HostView, device: Device) -> bool:
    """The device's own mark is the key of a `not fwmark` rule: it is a policy-routed full
    tunnel (wg-quick, NetworkManager). Changing its mark would break its own routing and
    wg-quick's teardown, so only a route or a rule can fix it."""
    full = any(n.prefixlen == 0 for p in device.peers for n in p.allowed_ips)
    return full and bool(device.fwmark) and any(
        r.invert and r.fwmask and r.fwmark == device.fwmark for r in view.snap.rules)


def fix_flows(snap: Snapshot, devices: Sequence[Device] | None = None) -> list[Flow]:
    """Flows to look up so an FwMark fix can be verified by the kernel (the caller asks), for
    the snapshot's devices or the given ones (devices of another namespace whose sockets
    this one holds)."""
    view = HostView(snap)
    out: list[Flow] = []
    # (a first look over the distinct egress links: the peers are checked one by one below)
    if not any(view.is_tunnel(oif) for oif in {a.oif for a in snap.lookups.values()}):
        return out  # no transport is routed into a tunnel: no fix to verify (the usual case)
    for device in snap.devices if devices is None else devices:
        if self_policy_routed(view, device):
            continue
        for peer in device.peers:
            flow = transport_flow(device, peer)
            ans = view.answer(flow)
            if flow is None or ans is None or not ans.ok or not view.is_tunnel(ans.oif):
                continue
            for mark in fix_candidates(view, device, ans, flow.dst.version):
                out.append(dataclasses.replace(flow, mark=mark))
    return out


def packet(view: HostView, flow: Flow, ans: RouteAnswer) -> Packet:
    if flow.iif:  # forwarded into this namespace: its own source, arriving on flow.iif
        return Packet(flow, flow.src, "", view.name(flow.iif))
    src = ipaddress.ip_address(ans.prefsrc) if ans.prefsrc else None
    return Packet(flow, src, view.name(flow.oif) if flow.oif else "")


def capture_of(view: HostView, flow: Flow, ans: RouteAnswer) -> Rule | None:
    """The rule that decided where the transport goes."""
    main = view.main_match(flow.dst) if ans.table == RT_TABLE_MAIN else None
    return capturing_rule(view.snap.rules, packet(view, flow, ans), ans.table,
                          not ans.ok, main.dst.prefixlen if main is not None else None)


def _ip(family: int) -> str:
    return "ip -6" if family == 6 else "ip"


def _host_route(view: HostView, flow: Flow) -> tuple[str, str]:
    """(`ip route add EP/len via GW dev DEV`, the underlay device or "" when unknown)."""
    default = view.underlay_default(flow.dst.version)
    dst = f"{flow.dst}/{flow.dst.max_prefixlen}"
    if default is None:
        return f"{_ip(flow.dst.version)} route add {dst} via <underlay gateway> dev " \
               "<underlay device>", ""
    via = f"via {default.gateway} " if default.gateway else ""
    dev = view.name(default.oif)
    return f"{_ip(flow.dst.version)} route add {dst} {via}dev {dev}", dev


def _hooks(commands: tuple[str, ...]) -> tuple[str, ...]:
    """wg-quick PostUp lines that apply the commands and PostDown lines that undo them."""
    ups = tuple(f"PostUp = {c}" for c in commands)
    downs = tuple(f"PostDown = {c.replace(' add ', ' del ', 1)}" for c in reversed(commands))
    return ups + downs


def _fwmark_fix(view: HostView, device: Device, flow: Flow, ans: RouteAnswer) -> Fix | None:
    for mark in fix_candidates(view, device, ans, flow.dst.version):
        alt = view.answer(dataclasses.replace(flow, mark=mark))
        if alt is not None and alt.ok and not view.is_tunnel(alt.oif):
            egress = view.name(alt.oif)
            return Fix(FixKind.FWMARK, mark, Proof.KERNEL, (f"FwMark = {mark}",),
                       (f"wg set {device.name} fwmark {mark}",),
                       f"with fwmark {mark} the kernel routes it via {egress} "
                       f"(table {table_name(alt.table)})", egress)
    return None


def derive_fix(view: HostView, device: Device, flow: Flow, ans: RouteAnswer,
               capture: Rule | None) -> Fix:
    why_mark = ""
    if self_policy_routed(view, device):
        why_mark = (f"{device.name} is itself a policy-routed full tunnel (fwmark "
                    f"{device.fwmark}): its mark must stay")
    elif (found := _fwmark_fix(view, device, flow, ans)) is not None:
        return found
    elif ans.table == RT_TABLE_MAIN:
        why_mark = "no fwmark avoids a main-table route"
    else:
        why_mark = (f"no fwmark the rules offer routes {flow.dst} around table "
                    f"{table_name(ans.table)}")
    return route_or_rule_fix(view, flow, ans, capture, why_mark)


def route_or_rule_fix(view: HostView, flow: Flow, ans: RouteAnswer, capture: Rule | None,
                      why_mark: str) -> Fix:
    """A host route in main when the rule order lets it win, else a rule before the
    capturing one (for a forwarded transport too: no mark of the sender's reaches here)."""
    route, underlay = _host_route(view, flow)
    if capture is None:
        return Fix(FixKind.ROUTE, 0, Proof.NONE, _hooks((route,)), (route,),
                   f"{why_mark}; the rule that captured the packet is unknown, so a host "
                   "route in main is not proven to win", underlay)
    winner = first_main_lookup_before(view.snap.rules, packet(view, flow, ans), capture)
    if winner is not None:
        proof = Proof.RULE_ORDER if underlay else Proof.NONE
        outer = view.name(ans.oif)
        where = (f"a route in the main table sends {flow.dst} into {outer} (or narrow "
                 f"{outer}'s AllowedIPs)"
                 if capture.table == RT_TABLE_MAIN and capture.action == LOOKUP
                 else f"rule `{capture}` sends it into {outer}")
        return Fix(FixKind.ROUTE, 0, proof, _hooks((route,)), (route,),
                   f"{where}; {why_mark}: a host route via the underlay wins at rule "
                   f"`{winner}`", underlay)
    return _rule_fix(view, flow, capture, why_mark, route, underlay)


def _rule_fix(view: HostView, flow: Flow, capture: Rule, why_mark: str, route: str,
              underlay: str) -> Fix:
    family = flow.dst.version
    pref = free_priority_below(view.snap.rules, family, capture.priority)
    reach = f"rule `{capture}` captures it before any `lookup main` rule"
    if pref is None:
        return Fix(FixKind.RULE, 0, Proof.NONE, (), (),
                   f"{why_mark}; {reach}, and no free rule priority is below it")
    rule = (f"{_ip(family)} rule add pref {pref} to {flow.dst}/{flow.dst.max_prefixlen} "
            f"ipproto udp dport {flow.dport} lookup main")
    main = view.main_match(flow.dst)
    if main is not None and main.oif and not view.is_tunnel(main.oif):
        commands: tuple[str, ...] = (rule,)
        proof, egress = Proof.RULE_ORDER, view.name(main.oif)
        tail = f"main routes it via {egress}"
    else:
        commands, egress = (rule, route), underlay
        proof = Proof.RULE_ORDER if underlay else Proof.NONE
        tail = "with a host route via the underlay in main"
    return Fix(FixKind.RULE, 0, proof, _hooks(commands), commands,
               f"{reach}; {why_mark}: a rule at priority {pref} sends the transport "
               f"(UDP to port {flow.dport}) to main first, {tail}", egress)
