"""Fixes that the rule order proves, on the real kernel: another manager's rule captures a
wg-quick full tunnel's transport before any `lookup main`, so a host route in main changes
nothing (the kernel shows it) and the suggested rule does fix it (the kernel shows that too).

Layouts as the managers document them: systemd-networkd's full tunnel
(`10: not fwmark 0x8888 lookup 1000`, its device marked 0x8888) and Tailscale's
(`5210/5230/5250: fwmark 0x80000/0xff0000 ...`, `5270: lookup 52`, table 52 holding an exit
node's default; a TUN device stands in for tailscale0).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab.lab import Lab, run

pytestmark = pytest.mark.lab


def _peer(doc: dict[str, Any], device: str) -> dict[str, Any]:
    (peer,) = [p for p in doc["peers"] if p["device"] == device]
    return peer


def test_networkd_style_rule_needs_a_rule_fix_not_a_route(lab: Lab) -> None:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    ns, gw, dev = lab.client.ns, lab.client.router_v4, lab.client.dev
    # wg-quick first (mark 51820, rules 32764/5: a rule added without a priority would get
    # one below the lowest, before rule 10, where a host route in main does win)
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    # the networkd full tunnel: marked 0x8888, its own table 1000 and rule 10; its endpoint
    # reaches main through a host route (mark 0x8888 skips rule 10)
    nd = lab.client_tunnel(1, s2, "0.0.0.0/0", extra="Table = off\nFwMark = 0x8888")
    run("ip", "route", "add", f"{s2.host.v4}/32", "via", gw, "dev", dev, ns=ns)
    run("ip", "route", "add", "default", "dev", nd, "table", "1000", ns=ns)
    run("ip", "rule", "add", "pref", "10", "not", "fwmark", "0x8888", "lookup", "1000", ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert code == 2, doc
    inner = _peer(doc, w0)
    assert (inner["verdict"], inner["outer"]) == ("nested", nd)
    assert inner["captured_by"] == "10: not from all fwmark 0x8888 lookup 1000"
    assert _peer(doc, nd)["verdict"] == "direct"
    fix = inner["fix"]
    assert (fix["kind"], fix["proof"], fix["verified"]) == ("rule", "rule_order", False), inner
    rule = f"ip rule add pref 9 to {s1.host.v4}/32 ipproto udp dport {s1.port} lookup main"
    assert fix["commands"] == [rule]
    assert f"PostUp = {rule}" in fix["config_lines"]
    assert f"PostDown = {rule.replace(' add ', ' del ')}" in fix["config_lines"]
    # what the landed code suggested, a host route in main, changes nothing: rule 10 wins
    run("ip", "route", "add", f"{s1.host.v4}/32", "via", gw, "dev", dev, ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert _peer(doc, w0)["verdict"] == "nested"
    run(*rule.split(), ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert code == 0, doc
    assert _peer(doc, w0)["verdict"] == "direct"
    assert _peer(doc, w0)["egress"] == dev


def test_tailscale_style_layout(lab: Lab) -> None:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    ns, dev = lab.client.ns, lab.client.dev
    ts = f"{lab.tag}ts"
    run("ip", "tuntap", "add", "mode", "tun", "name", ts, ns=ns)
    run("ip", "link", "set", ts, "up", ns=ns)
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")  # wg-quick full tunnel, mark 51820
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")  # a site tunnel without a mark
    run("ip", "route", "add", "default", "dev", ts, "table", "52", ns=ns)
    for pref, action in (("5210", "lookup main"), ("5230", "lookup default"),
                         ("5250", "unreachable")):
        run("ip", "rule", "add", "pref", pref, "fwmark", "0x80000/0xff0000", *action.split(),
            ns=ns)
    run("ip", "rule", "add", "pref", "5270", "lookup", "52", ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert code == 2, doc
    site, full = _peer(doc, w1), _peer(doc, w0)
    for p in (site, full):
        assert (p["verdict"], p["outer"], p["egress_kind"]) == ("nested", ts, "tun")
        assert p["captured_by"] == "5270: from all lookup 52"
    # the site tunnel takes Tailscale's own bypass mark, asked of the kernel
    assert (site["fix"]["kind"], site["fix"]["fwmark"], site["fix"]["proof"]) == (
        "fwmark", 0x80000, "kernel")
    # the wg-quick full tunnel keeps its mark: a rule before 5270
    assert full["fix"]["kind"] == "rule"
    assert full["fix"]["commands"][0].startswith(f"ip rule add pref 5269 to {s1.host.v4}/32 ")
    run(*site["fix"]["commands"][0].split(), ns=ns)
    run(*full["fix"]["commands"][0].split(), ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert code == 0, doc
    assert {_peer(doc, w)["egress"] for w in (w0, w1)} == {dev}


def test_host_route_is_suggested_when_the_rule_order_lets_it_win(lab: Lab) -> None:
    """The same rules in the other order: rule 10 first, then wg-quick, whose rules (added
    without a priority) land at 9 and 8, before it. wg-quick's `lookup main
    suppress_prefixlength 0` is then consulted first, and a host route in main wins."""
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    ns, gw, dev = lab.client.ns, lab.client.router_v4, lab.client.dev
    nd = lab.client_tunnel(1, s2, "0.0.0.0/0", extra="Table = off\nFwMark = 0x8888")
    run("ip", "route", "add", f"{s2.host.v4}/32", "via", gw, "dev", dev, ns=ns)
    run("ip", "route", "add", "default", "dev", nd, "table", "1000", ns=ns)
    run("ip", "rule", "add", "pref", "10", "not", "fwmark", "0x8888", "lookup", "1000", ns=ns)
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    code, doc = lab.check_json("--no-probe.enabled")
    inner = _peer(doc, w0)
    assert (code, inner["verdict"], inner["outer"]) == (2, "nested", nd)
    fix = inner["fix"]
    assert (fix["kind"], fix["proof"]) == ("route", "rule_order")
    assert "8: from all lookup main suppress_prefixlength 0" in fix["explanation"]
    run(*fix["commands"][0].split(), ns=ns)
    code, doc = lab.check_json("--no-probe.enabled")
    assert _peer(doc, w0)["verdict"] == "direct"
