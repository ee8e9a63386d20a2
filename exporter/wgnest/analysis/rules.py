"""Policy rules as the kernel evaluates them for a locally sent transport packet
(fib_rules_lookup): priority order, every selector, `not` over all of them, goto and nop.

The packet is WireGuard's own: UDP from the listen port to the endpoint's port, the device's
mark, uid 0, input interface `lo` (locally generated), no output interface unless an IPv6
link-local scope pins one, and the source address the kernel picked (`prefsrc`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from wgnest.model.host import GOTO, LOOKUP, NOP, Flow, IPAddress, Rule

IPPROTO_UDP = 17
RT_TABLE_MAIN = 254


@dataclass(frozen=True, slots=True)
class Packet:
    flow: Flow
    src: IPAddress | None  # None: unknown (the lookup had no answer)
    oif: str = ""  # the output interface a bound socket pins; "" for none
    iif: str = "lo"  # locally sent; a forwarded packet's link of arrival


def _selectors_match(rule: Rule, pkt: Packet) -> bool:
    flow = pkt.flow
    if rule.iif and rule.iif != pkt.iif:
        return False
    if rule.oif and rule.oif != pkt.oif:
        return False
    if (rule.fwmark ^ flow.mark) & rule.fwmask:
        return False
    if rule.l3mdev:  # VRF rules: WireGuard's transport socket is not in a VRF
        return False
    if rule.uid is not None and not rule.uid[0] <= 0 <= rule.uid[1]:
        return False
    if rule.tos:
        return False
    if rule.src is not None and (pkt.src is None or pkt.src.version != rule.src.version
                                 or pkt.src not in rule.src):
        return False
    if rule.dst is not None and (flow.dst.version != rule.dst.version or flow.dst not in rule.dst):
        return False
    if rule.ipproto and rule.ipproto != IPPROTO_UDP:
        return False
    if rule.sport is not None and not rule.sport[0] <= flow.sport <= rule.sport[1]:
        return False
    return rule.dport is None or rule.dport[0] <= flow.dport <= rule.dport[1]


def matches(rule: Rule, pkt: Packet) -> bool:
    """Whether the rule selects the packet (`not` inverts all selectors together)."""
    hit = _selectors_match(rule, pkt)
    return not hit if rule.invert else hit


def consulted(rules: Sequence[Rule], pkt: Packet) -> Iterator[Rule]:
    """The rules of the packet's family that select it, in the order the kernel acts on them:
    nop rules are passed over, a goto jumps to the first rule at or after its target."""
    family = pkt.flow.dst.version
    ordered = sorted((r for r in rules if r.family == family), key=lambda r: r.priority)
    i = 0
    while i < len(ordered):
        rule = ordered[i]
        i += 1
        if not matches(rule, pkt) or rule.action == NOP:
            continue
        if rule.action == GOTO:
            i = next((j for j, r in enumerate(ordered) if r.priority >= rule.goto and j >= i),
                     len(ordered))
            continue
        yield rule


def suppresses(rule: Rule, prefixlen: int) -> bool:
    """`suppress_prefixlength N` discards a result whose prefix is N bits or shorter."""
    return rule.suppress_prefixlength >= 0 and prefixlen <= rule.suppress_prefixlength


def capturing_rule(rules: Sequence[Rule], pkt: Packet, table: int, error: bool,
                   main_prefixlen: int | None) -> Rule | None:
    """The rule whose action decided the kernel's answer: the first consulted rule that
    looks up the table the answer came from (and, for main, is not suppressed for the
    route main holds), or the first terminal rule when the answer was an error."""
    for rule in consulted(rules, pkt):
        if rule.action != LOOKUP:
            if error:
                return rule  # blackhole, unreachable, prohibit
            continue
        if rule.table != table:
            continue
        if rule.table == RT_TABLE_MAIN and main_prefixlen is not None and suppresses(
                rule, main_prefixlen):
            continue
        return rule
    return None


def first_main_lookup_before(rules: Sequence[Rule], pkt: Packet, capture: Rule
                             ) -> Rule | None:
    """The first consulted rule, up to and including the capturing one, that looks up main
    without suppressing a host route: a host route in main wins there. Rules consulted
    before the capturing one found nothing (else they would have decided), and a route
    added to main changes no other table, so the order alone proves it."""
    host = pkt.flow.dst.max_prefixlen
    for rule in consulted(rules, pkt):
        if rule.action == LOOKUP and rule.table == RT_TABLE_MAIN and not suppresses(rule, host):
            return rule
        if rule is capture or rule == capture:
            return None
    return None


def free_priority_below(rules: Sequence[Rule], family: int, priority: int) -> int | None:
    """The highest priority below `priority` no rule of this family uses (1 at the least)."""
    used = {r.priority for r in rules if r.family == family}
    return next((p for p in range(priority - 1, 0, -1) if p not in used), None)
