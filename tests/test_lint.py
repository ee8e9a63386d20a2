"""`wgnest lint` on hand-built hosts (no I/O): what wg-quick would do (analysis/wgquick.py),
the rule walk over every table (analysis/fib.py), the hook lines it can read
(analysis/ipcmd.py), and the prediction in `wgnest check`'s vocabulary (analysis/predict.py).

The host: lo 1, eth0 2 (192.0.2.10/24, gw 192.0.2.1), wg0 3 (a wg-quick full tunnel,
mark/table 51820, when present), wg1 4 (when present), tun8 8 (down); a new device gets
index 9. `kernel_now` is the evaluation of the state that exists, as the
kernel would answer it, unless a test makes the kernel disagree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from tests.test_analysis import GW4, GW6, KA, KB, LINKS, WG0, base_rules, peer, wg_quick
from wgnest.analysis.fib import Fib, agrees
from wgnest.analysis.fixes import FixKind
from wgnest.analysis.ipcmd import RouteAdd, RuleAdd, is_lint_hook, parse_ip_command
from wgnest.analysis.nagios import Nagios
from wgnest.analysis.paths import PathVerdict
from wgnest.analysis.predict import Host, Lint, lint, with_lines
from wgnest.analysis.wgquick import State, plan
from wgnest.model.host import (
    LOOKUP,
    RTN_LOCAL,
    Device,
    Endpoint,
    Flow,
    Link,
    RouteAnswer,
    Rule,
    Snapshot,
)
from wgnest.model.routing import RTN_BLACKHOLE, RTN_THROW, Address, Route, Routing
from wgnest.model.wgquick import ConfigFailure, ConfigPeer, Hook, WgQuickConfig
from wgnest.surfaces.lint_report import render_lint_json, render_lint_text

N = ipaddress.ip_network
A = ipaddress.ip_address
ETH, NEW = 2, 9
EP0, EP1 = Endpoint(A("203.0.113.1"), 51820), Endpoint(A("198.51.100.7"), 51820)
BASE_ROUTES = (
    Route(254, N("0.0.0.0/0"), ETH, GW4), Route(254, N("192.0.2.0/24"), ETH,
                                                prefsrc="192.0.2.10"),
    Route(255, N("192.0.2.10/32"), ETH, route_type=RTN_LOCAL),
    Route(254, N("::/0"), ETH, GW6, metric=1024),
)
ADDRESSES = (Address(ETH, A("192.0.2.10"), 24), Address(ETH, A("2001:db8:ff::10"), 64))
WG0_FULL = Device("wg0", WG0, "kernel", "P" * 43 + "=", 51820, 51820, 1420,
                  (peer(KA, "203.0.113.1:51820", "0.0.0.0/0"),))
WG1_SITE = Device("wg1", 4, "kernel", "P" * 43 + "=", 40000, 0, 1420,
                  (peer(KB, "198.51.100.7:51820", "10.1.0.0/24"),))
FULL_ROUTES = (Route(51820, N("0.0.0.0/0"), WG0),)


def config(name: str, endpoint: Endpoint | None, *allowed: str, **kw: object) -> WgQuickConfig:
    cp = ConfigPeer(KB if name == "wg1" else KA, endpoint, str(endpoint or ""),
                    tuple(N(a) for a in allowed))
    fields: dict[str, object] = {"addresses": (("10.9.0.2", 24),), "peers": (cp,), **kw}
    return WgQuickConfig(name, f"/etc/wireguard/{name}.conf", **fields)  # type: ignore[arg-type]


def host(devices: tuple[Device, ...] = (), rules: tuple[Rule, ...] = (),
         routes: tuple[Route, ...] = ()) -> tuple[Host, dict[Flow, RouteAnswer]]:
    """The host and what its kernel answers now (the evaluation of the state it holds)."""
    names = {d.name for d in devices}
    # lo, eth0, the tunnels present and a down tun8: a new device gets index 9
    links = (*(link for link in LINKS if link.index <= ETH or link.name in names),
             Link(8, "tun8", "tun", 1400, False))
    rules = tuple(sorted(base_rules(4) + base_rules(6) + rules,
                         key=lambda r: (r.family, r.priority)))
    routing = Routing(BASE_ROUTES + routes, ADDRESSES)
    fib = Fib(rules, routing.routes, links, routing.addresses)
    snap = Snapshot(taken_at=1.0, devices=devices, links=links, rules=rules)
    h = Host(snap, routing, {"main": 254}, "kernel")
    return h, Kernel(fib)


class Kernel(dict[Flow, RouteAnswer]):
    """kernel_now that answers every flow it is asked, as the kernel would now."""

    def __init__(self, fib: Fib) -> None:
        super().__init__()
        self.fib = fib

    def get(self, flow: Flow, default: RouteAnswer | None = None) -> RouteAnswer | None:
        return self.fib.lookup(flow)


def seed() -> tuple[Host, dict[Flow, RouteAnswer]]:
    return host((WG0_FULL,), wg_quick(51820), FULL_ROUTES)


def path(result: Lint, device: str):  # type: ignore[no-untyped-def]
    (found,) = [p for p in result.paths if p.device == device]
    return found


# ---- what wg-quick would do ---------------------------------------------------------

def now_state(h: Host) -> State:
    return h.state()


def test_full_tunnel_takes_the_first_free_table_and_rules_below_the_second() -> None:
    h, _ = host(routes=(Route(51820, N("10.0.0.0/8"), ETH), Route(51821, N("::/0"), ETH)))
    p = plan(config("wg5", EP0, "0.0.0.0/0"), now_state(h), (), "kernel", {})
    assert (p.table, p.device.fwmark) == (51822, 51822)
    added = [r for r in p.state.rules if r not in h.snap.rules]
    assert [str(r) for r in added] == [
        "32764: from all lookup main suppress_prefixlength 0",
        "32765: not from all fwmark 0xca6e lookup 51822"]
    assert Route(51822, N("0.0.0.0/0"), NEW) in p.state.routes
    assert "wg set wg5 fwmark 51822" in [s.command for s in p.steps]


def test_rules_land_below_a_low_priority_rule() -> None:
    h, _ = host(rules=(Rule(4, 10, 1000, LOOKUP, 0x8888, 0xFFFFFFFF, invert=True),))
    p = plan(config("wg5", EP0, "0.0.0.0/0"), now_state(h), (), "kernel", {})
    added = sorted(r.priority for r in p.state.rules if r not in h.snap.rules)
    assert added == [8, 9]


def test_fwmark_is_the_table_and_site_prefixes_go_to_main() -> None:
    h, _ = host()
    p = plan(config("wg5", EP0, "0.0.0.0/0", "10.7.0.0/16", "::/0", fwmark=0x1234),
             now_state(h), (), "kernel", {})
    assert p.table == 0x1234
    assert Route(0x1234, N("::/0"), NEW, metric=1024) in p.state.routes
    assert Route(254, N("10.7.0.0/16"), NEW) in p.state.routes
    assert {r.family for r in p.state.rules if r.table == 0x1234} == {4, 6}


def test_a_prefix_the_address_route_covers_is_not_added_again() -> None:
    h, _ = host()
    p = plan(config("wg5", EP0, "10.9.0.0/25"), now_state(h), (), "kernel", {})
    step = next(s for s in p.steps if "10.9.0.0/25" in s.command)
    assert step.outcome == "skipped"
    assert Route(254, N("10.9.0.0/24"), NEW, prefsrc="10.9.0.2") in p.state.routes


def test_table_off_and_custom_table() -> None:
    h, _ = host()
    off = plan(config("wg5", EP0, "0.0.0.0/0", "10.7.0.0/16", table="off"), now_state(h), (),
               "kernel", {})
    assert not [r for r in off.state.routes if r.oif == NEW and r.table != 255
                and r.dst.prefixlen != 24]
    assert off.state.rules == list(h.snap.rules)
    custom = plan(config("wg5", EP0, "0.0.0.0/0", table="1234", table_id=1234), now_state(h),
                  (), "kernel", {})
    assert Route(1234, N("0.0.0.0/0"), NEW) in custom.state.routes
    assert custom.state.rules == list(h.snap.rules)
    assert custom.device.fwmark == 0


def test_mtu_as_set_mtu_up_computes_it() -> None:
    h, _ = seed()
    through = plan(config("wg1", EP1, "10.1.0.0/24"), now_state(h), (), "kernel", {})
    assert through.device.mtu == 1420 - 80  # `ip route get EP1` goes via wg0
    assert "via wg0, mtu 1420" in through.mtu_reason
    given = plan(config("wg1", EP1, "10.1.0.0/24", mtu=1280), now_state(h), (), "kernel", {})
    assert given.device.mtu == 1280
    scoped = Endpoint(A("fe80::1"), 51820, ETH)  # fails wg-quick's regex: the default route
    h2, _ = host()
    fallback = plan(config("wg1", scoped, "fd00::/64"), now_state(h2), (), "kernel", {})
    assert fallback.device.mtu == 1500 - 80
    assert "ip route show default" in fallback.mtu_reason


def test_a_route_that_exists_fails_up_and_its_cleanup_deletes_the_others_rules() -> None:
    h, _ = seed()
    p = plan(config("wg5", EP1, "0.0.0.0/0", fwmark=51820), now_state(h), (WG0_FULL,),
             "kernel", {})
    assert "File exists" in p.failure
    assert p.cleanup == ("32764: from all lookup main suppress_prefixlength 0",
                         "32765: not from all fwmark 0xca6c lookup 51820")
    assert any("already the mark of the full tunnel wg0" in c for c in p.collisions)
    assert all(link.index != NEW for link in p.state.links)


def test_hooks_are_evaluated_when_plain_ip_lines_else_unknown() -> None:
    h, _ = host()
    hooks = (Hook("PreUp", "wgnest lint --refuse %i", 1),
             Hook("PostUp", "ip rule add pref 100 to 198.51.100.7/32 lookup main", 2),
             Hook("PostUp", "ip route add 10.50.0.0/16 dev %i table 77", 3),
             Hook("PostUp", "iptables -A FORWARD -i %i -j ACCEPT", 4),
             Hook("PostUp", "ip route add 10.60.0.0/16 dev $(cat /tmp/x)", 5))
    p = plan(config("wg5", EP0, "10.7.0.0/16", hooks=hooks), now_state(h), (), "kernel", {})
    assert [hk.line for hk in p.unknown] == [4, 5]
    assert Route(77, N("10.50.0.0/16"), NEW) in p.state.routes
    assert any(r.priority == 100 and r.dst == N("198.51.100.7/32") for r in p.state.rules)
    assert [s.outcome for s in p.steps if "=" in s.command][:1] == ["ignored"]


# ---- the hook lines wgnest can read -------------------------------------------------

def test_ip_commands() -> None:
    op = parse_ip_command("ip -6 rule add pref 9 not fwmark 0x10/0xff to 2001:db8::/32 "
                          "ipproto udp dport 51820-51830 lookup 200", {})
    assert isinstance(op, RuleAdd)
    assert op.rule == Rule(6, 9, 200, LOOKUP, 0x10, 0xFF, invert=True, dst=N("2001:db8::/32"),
                           ipproto=17, dport=(51820, 51830))
    assert str(op.rule) == ("9: not from all to 2001:db8::/32 fwmark 0x10/0xff ipproto udp "
                            "dport 51820-51830 lookup 200")
    route = parse_ip_command("ip route add 198.51.100.7/32 via 192.0.2.1 dev eth0 metric 5", {})
    assert isinstance(route, RouteAdd)
    assert (route.route.dst, route.route.gateway, route.dev, route.route.metric) == (
        N("198.51.100.7/32"), "192.0.2.1", "eth0", 5)
    six = parse_ip_command("ip -6 route add default dev wg0 table main", {"main": 254})
    assert isinstance(six, RouteAdd)
    assert (six.route.dst, six.route.metric) == (N("::/0"), 1024)
    throw = parse_ip_command("ip route add throw 10.0.0.0/8 table 100", {})
    assert isinstance(throw, RouteAdd)
    assert throw.route.route_type == RTN_THROW
    for line in ("ip route add 1.2.3.0/24 dev wg0; reboot", "ip rule add fwmark $M lookup 5",
                 "ip route del 1.2.3.0/24", "ip rule add frobnicate 1", "sysctl -w a=1",
                 "ip route add 1.2.3.0/24 nexthop via 192.0.2.1", "ip route add 1.2.3.0/24"):
        assert parse_ip_command(line, {}) is None, line
    assert is_lint_hook("/usr/bin/python3 -m wgnest lint --refuse wg0")
    assert is_lint_hook("wgnest lint %i")
    assert not is_lint_hook("wgnest check")


# ---- the rule walk over every table -------------------------------------------------

def test_fib_semantics() -> None:
    links = (Link(1, "lo", "", 65536, True), Link(ETH, "eth0", "", 1500, True),
             Link(WG0, "wg0", "wireguard", 1420, True))
    rules = (Rule(4, 0, 255, LOOKUP), Rule(4, 5, 100, LOOKUP),
             Rule(4, 6, 0, 7, ipproto=6),  # tcp only: unreachable
             Rule(4, 7, 254, LOOKUP, suppress_prefixlength=0), Rule(4, 8, 200, LOOKUP),
             Rule(4, 32766, 254, LOOKUP))
    routes = (Route(100, N("10.0.0.0/8"), route_type=RTN_THROW),
              Route(100, N("192.0.2.0/24"), route_type=RTN_BLACKHOLE),
              Route(100, N("203.0.113.0/24"), WG0, metric=10),
              Route(100, N("203.0.113.0/24"), ETH, GW4, metric=5),
              Route(100, N("203.0.113.0/24"), WG0, tos=0x10),
              Route(200, N("0.0.0.0/0"), WG0), Route(254, N("0.0.0.0/0"), ETH, GW4),
              Route(254, N("10.1.0.0/16"), ETH, GW4), Route(255, N("198.18.0.1/32"), ETH,
                                                            route_type=RTN_LOCAL))
    fib = Fib(rules, routes, links, (Address(ETH, A("198.18.0.1"), 24),))

    def ask(dst: str) -> RouteAnswer:
        return fib.lookup(Flow(A(dst), 0, 40000, 51820))

    assert ask("192.0.2.7").error == "EINVAL"  # blackhole route in table 100
    assert (ask("203.0.113.9").oif, ask("203.0.113.9").table) == (ETH, 100)  # lowest metric
    assert (ask("10.1.2.3").oif, ask("10.1.2.3").table) == (ETH, 254)  # throw, then main /16
    assert (ask("10.2.0.1").oif, ask("10.2.0.1").table) == (WG0, 200)  # main /0 suppressed
    assert ask("198.18.0.1").route_type == RTN_LOCAL
    assert ask("198.18.0.1").oif == 1
    assert fib.mtu_towards(A("203.0.113.9")) == (1500, "eth0")
    assert agrees(ask("203.0.113.9"), RouteAnswer(oif=ETH, gateway="x", table=100))
    assert not agrees(ask("203.0.113.9"), RouteAnswer(oif=WG0, table=100))
    assert agrees(RouteAnswer(error="EINVAL"), RouteAnswer(error="EACCES"))


# ---- the prediction -----------------------------------------------------------------

def test_site_tunnel_beside_a_full_tunnel_is_nested_and_fwmark_fixes_it() -> None:
    h, kernel = seed()
    result = lint(h, config("wg1", EP1, "10.1.0.0/24"), kernel)
    own = path(result, "wg1")
    assert (own.verdict, own.outer, own.table) == (PathVerdict.NESTED, "wg0", "51820")
    assert own.captured_by == "32765: not from all fwmark 0xca6c lookup 51820"
    assert own.fix is not None
    assert (own.fix.kind, own.fix.fwmark) == (FixKind.FWMARK, 51820)
    assert own.mtu is not None
    assert (own.mtu.device_mtu, own.mtu.usable_mtu) == (1340, 1360)
    assert result.result.code == Nagios.CRITICAL
    assert result.refuse
    assert result.lines == ("FwMark = 51820",)
    (fix,) = result.fixes
    assert (fix.verdict, fix.egress, fix.checked) == (PathVerdict.DIRECT, "eth0", True)
    assert result.with_lines is not None
    assert result.with_lines.code == Nagios.OK
    fixed = lint(h, with_lines(config("wg1", EP1, "10.1.0.0/24"), result.lines), kernel)
    assert path(fixed, "wg1").verdict == PathVerdict.DIRECT
    assert not fixed.refuse


def test_a_full_tunnel_brought_up_second_captures_the_running_site_tunnel() -> None:
    h, kernel = host((WG1_SITE,))
    result = lint(h, config("wg0", EP0, "0.0.0.0/0"), kernel)
    assert path(result, "wg0").verdict == PathVerdict.DIRECT
    caught = path(result, "wg1")
    assert (caught.verdict, caught.outer) == (PathVerdict.NESTED, "wg0")
    assert result.captured == (caught,)
    assert result.refuse
    assert "1 of them running tunnels' transports it captures" in result.result.summary
    assert caught.fix is not None
    assert caught.fix.fwmark == 51820
    rule = "ip rule add pref 32763 to 198.51.100.7/32 ipproto udp dport 51820 lookup main"
    assert result.lines == (f"PostUp = {rule}", f"PostDown = {rule.replace(' add ', ' del ')}")
    assert result.fixes[0].checked
    assert result.with_lines is not None
    assert result.with_lines.code == Nagios.OK


def test_a_site_tunnel_covering_another_endpoint_captures_it_in_main() -> None:
    h, kernel = host((WG1_SITE,))
    result = lint(h, config("wg0", EP0, "198.51.100.0/24"), kernel)
    caught = path(result, "wg1")
    assert (caught.verdict, caught.outer, caught.table) == (PathVerdict.NESTED, "wg0", "main")
    assert caught.fix is not None
    assert caught.fix.kind == FixKind.ROUTE
    assert result.lines[0] == "PostUp = ip route add 198.51.100.7/32 via 192.0.2.1 dev eth0"
    assert result.fixes[0].checked


def test_split_default_loops_into_itself() -> None:
    h, kernel = host()
    result = lint(h, config("wg0", EP0, "0.0.0.0/1", "128.0.0.0/1"), kernel)
    own = path(result, "wg0")
    assert (own.verdict, own.chain) == (PathVerdict.LOOP, ("wg0", "wg0"))
    assert "0 nested, 1 routing loops" in result.result.summary
    assert result.fixes[0].checked


def test_declared_nesting_is_not_refused() -> None:
    h, kernel = seed()
    result = lint(h, config("wg1", EP1, "10.1.0.0/24"), kernel, {("wg1", "wg0")})
    assert path(result, "wg1").allowed
    assert result.result.code == Nagios.OK
    assert not result.refuse
    assert "1 nested as allowed" in result.result.summary


def test_table_off_captures_nothing() -> None:
    h, kernel = host((WG1_SITE,))
    result = lint(h, config("wg0", EP0, "0.0.0.0/0", table="off"), kernel)
    assert {p.verdict for p in result.paths} == {PathVerdict.DIRECT}
    assert result.result.code == Nagios.OK


def test_an_unknown_hook_is_a_warning_and_assumed_to_change_nothing() -> None:
    h, kernel = host()
    hooks = (Hook("PostUp", "/usr/local/bin/vpn-up %i", 7),)
    result = lint(h, config("wg0", EP0, "10.7.0.0/16", hooks=hooks), kernel)
    assert result.result.code == Nagios.WARNING
    assert "1 hook lines not evaluated" in result.result.summary
    text = render_lint_text([result], "")
    assert "[?] PostUp = /usr/local/bin/vpn-up %i" in text
    assert "unknown: PostUp = /usr/local/bin/vpn-up %i (line 7)" in text


def test_where_the_model_disagrees_with_the_kernel_nothing_is_guessed() -> None:
    h, kernel = seed()
    flow = Flow(EP1.address, 0, 0, EP1.port)
    lying = Kernel(kernel.fib)  # type: ignore[attr-defined]
    lying.get = lambda f, d=None: RouteAnswer(oif=ETH, table=7) if f == flow else (  # type: ignore[method-assign]
        kernel.get(f))
    result = lint(h, config("wg1", EP1, "10.1.0.0/24"), lying)
    own = path(result, "wg1")
    assert own.verdict == PathVerdict.UNKNOWN
    assert "the kernel routes this flow via eth0 (table 7) now" in own.error
    assert result.result.code == Nagios.WARNING
    assert not result.refuse


def test_flows_the_kernel_has_not_answered_are_asked_for() -> None:
    h, _kernel = seed()
    result = lint(h, config("wg1", EP1, "10.1.0.0/24"), {})
    assert Flow(EP1.address, 0, 0, EP1.port) in result.missing
    assert path(result, "wg1").verdict == PathVerdict.UNKNOWN


def test_already_up() -> None:
    h, kernel = seed()
    result = lint(h, config("wg0", EP0, "0.0.0.0/0"), kernel)
    assert result.plan is None
    assert result.result.code == Nagios.UNKNOWN
    assert "already up" in result.result.summary


def test_json_has_check_shape_and_what_lint_adds() -> None:
    h, kernel = seed()
    result = lint(h, config("wg1", EP1, "10.1.0.0/24"), kernel)
    doc = json.loads(render_lint_json([result, ConfigFailure("/x/bad.conf", "cannot read")],
                                      "", 1.0))
    assert (doc["status"], doc["exit_code"]) == ("critical", 2)
    first, second = doc["configs"]
    assert {"status", "exit_code", "summary", "devices", "peers", "errors"} <= set(first)
    (wg1,) = [p for p in first["peers"] if p["device"] == "wg1"]
    assert wg1["fix"]["proof"] == "lint"
    assert wg1["fix"]["proof_once_up"] == "kernel"
    assert wg1["fix"]["verified"] is True
    assert first["before_up"]["lines"] == ["FwMark = 51820"]
    assert first["before_up"]["status"] == "ok"
    assert [d["predicted"] for d in first["devices"]] == [False, True]
    assert first["wg_quick"]["mtu"] == 1340
    assert second["status"] == "unknown"


def test_with_lines() -> None:
    c = config("wg1", EP1, "10.1.0.0/24")
    after = with_lines(c, ("FwMark = 0x1234", "PostUp = ip rule add lookup main"))
    assert after.fwmark == 0x1234
    assert after.hooks[-1] == Hook("PostUp", "ip rule add lookup main", 0)
    assert dataclasses.replace(after, fwmark=0, hooks=()) == c


@pytest.mark.parametrize("hook_line", ["ip rule add pref 9 lookup main",
                                       "ip -6 route add ::/0 dev eth0 table 5"])
def test_plain_ip_hooks_are_evaluated_not_unknown(hook_line: str) -> None:
    h, kernel = host()
    result = lint(h, config("wg0", EP0, "10.7.0.0/16", hooks=(Hook("PostUp", hook_line, 3),)),
                  kernel)
    assert result.result.code == Nagios.OK, result.result


def test_readme_and_runbook_document_the_hook_line() -> None:
    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/runbook.md"):
        assert "PreUp = wgnest lint --refuse %i" in (root / doc).read_text(), doc


def test_a_failing_preup_line_stops_before_the_device_exists() -> None:
    h, kernel = host()
    hooks = (Hook("PreUp", "ip route add 10.50.0.0/16 dev %i", 1),)
    result = lint(h, config("wg0", EP0, "0.0.0.0/0", hooks=hooks), kernel)
    assert result.plan is not None
    assert 'Cannot find device "wg0"' in result.plan.failure
    assert [s.outcome for s in result.plan.steps] == ["fails"]
    assert result.plan.cleanup == ()
    assert result.result.code == Nagios.WARNING
    assert not result.paths


def test_a_tunnel_already_nested_elsewhere_moved_into_the_new_one_is_captured() -> None:
    nested_now = Device("wg1", 4, "kernel", "P" * 43 + "=", 40000, 0, 1420,
                 (peer(KB, "198.51.100.7:51820", "10.1.0.0/24"),))
    h, kernel = host((WG0_FULL, nested_now), wg_quick(51820), FULL_ROUTES)
    result = lint(h, config("wg5", EP1, "198.51.100.0/24", fwmark=51820), kernel)
    caught = path(result, "wg1")
    assert (caught.outer, caught.table) == ("wg5", "main")
    assert result.captured == (caught,)
