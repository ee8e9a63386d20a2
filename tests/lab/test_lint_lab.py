"""`wgnest lint` against real labs: each config is predicted, then really brought up with
`wg-quick up`, then diagnosed by `wgnest check`; the prediction must equal the diagnosis
device by device (verdict, outer device, egress, table, chain, fix, MTU). The PreUp hook
`wgnest lint --refuse %i` stops a nesting `wg-quick up` before the interface exists."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.lab.lab import UAPI_DIR, Lab, daemon_pids, in_netns, run
from tests.lab.lint_lab import device_view, devices, hook, lint_json, up, write_config
from wgnest.analysis.fib import Fib, agrees
from wgnest.model.host import Flow
from wgnest.snapshot import Reader, take
from wgnest.sources.route_lookup import RouteLookup
from wgnest.sources.routing import read_routing

pytestmark = pytest.mark.lab
FULL, SITE = "0.0.0.0/0", "10.202.0.0/24, fd02::/64"


def _peer(doc: dict[str, Any], device: str) -> dict[str, Any]:
    (peer,) = [p for p in doc["peers"] if p["device"] == device]
    return peer


def _host_state(lab: Lab) -> str:
    """Everything lint must leave alone."""
    ns = lab.client.ns
    return "".join(run(*cmd.split(), ns=ns).stdout for cmd in (
        "ip rule", "ip -6 rule", "ip route show table all", "ip -6 route show table all",
        "ip -o link"))


@dataclass
class Case:
    """Running tunnels first, then the config to lint (its name is returned)."""

    setup: Callable[[Lab], str]
    lint_code: int  # lint's Nagios code
    check: Callable[[Lab, dict[str, Any], str], None]  # more about the prediction


def seed_nested(lab: Lab) -> str:
    lab.client_tunnel(0, lab.servers["s1"], FULL)
    return write_config(lab, 1, lab.servers["s2"], SITE)[0]


def check_seed_nested(lab: Lab, doc: dict[str, Any], name: str) -> None:
    p = _peer(doc, name)
    assert (p["verdict"], p["outer"], p["fix"]["fwmark"]) == ("nested", f"{lab.tag}w0", 51820)
    assert doc["before_up"]["lines"] == ["FwMark = 51820"]
    assert doc["before_up"]["status"] == "ok"


def seed_fwmark(lab: Lab) -> str:
    lab.client_tunnel(0, lab.servers["s1"], FULL)
    return write_config(lab, 1, lab.servers["s2"], SITE, extra="FwMark = 51820")[0]


def check_clean(lab: Lab, doc: dict[str, Any], name: str) -> None:
    assert {p["verdict"] for p in doc["peers"]} == {"direct"}
    assert doc["before_up"]["lines"] == []


def full_second(lab: Lab) -> str:
    lab.client_tunnel(1, lab.servers["s2"], SITE)
    return write_config(lab, 0, lab.servers["s1"], FULL)[0]


def check_captures(lab: Lab, doc: dict[str, Any], name: str) -> None:
    (caught,) = doc["captures"]
    assert (caught["device"], caught["outer"]) == (f"{lab.tag}w1", name)
    assert _peer(doc, name)["verdict"] == "direct"
    assert doc["before_up"]["status"] == "ok", doc["before_up"]


def custom_mark_running(lab: Lab) -> str:
    lab.client_tunnel(0, lab.servers["s1"], FULL, extra="FwMark = 0x1234")
    return write_config(lab, 1, lab.servers["s2"], SITE)[0]


def check_custom_mark(lab: Lab, doc: dict[str, Any], name: str) -> None:
    p = _peer(doc, name)
    assert (p["table"], p["fix"]["fwmark"]) == (str(0x1234), 0x1234)


def custom_table_second(lab: Lab) -> str:
    """Table = 1234 adds no rule: the PostUp lines do (wgnest evaluates plain `ip` lines)."""
    lab.client_tunnel(1, lab.servers["s2"], "10.202.0.0/24")
    return write_config(lab, 0, lab.servers["s1"], FULL, extra=(
        "FwMark = 0x1234\nTable = 1234\nPostUp = ip rule add not fwmark 0x1234 table 1234\n"
        "PostUp = ip rule add table main suppress_prefixlength 0"))[0]


def check_custom_table(lab: Lab, doc: dict[str, Any], name: str) -> None:
    (caught,) = doc["captures"]
    assert _peer(doc, caught["device"])["table"] == "1234"
    assert doc["wg_quick"]["table"] == 1234
    assert [s["outcome"] for s in doc["wg_quick"]["steps"]].count("evaluated") == 2


def ipv6(lab: Lab) -> str:
    lab.client_tunnel(0, lab.servers["s1"], "0.0.0.0/0, ::/0", v6=True)
    return write_config(lab, 1, lab.servers["s2"], SITE, v6=True)[0]


def check_ipv6(lab: Lab, doc: dict[str, Any], name: str) -> None:
    p = _peer(doc, name)
    assert p["endpoint"] == f"[{lab.servers['s2'].host.v6}]:51820"
    assert (p["verdict"], p["fix"]["fwmark"], p["mtu"]["usable_mtu"]) == ("nested", 51820, 1340)


def covers_endpoint(lab: Lab) -> str:
    lab.client_tunnel(1, lab.servers["s2"], "10.202.0.0/24")
    return write_config(lab, 0, lab.servers["s1"], "10.201.0.0/24, 198.18.3.0/24")[0]


def check_covers(lab: Lab, doc: dict[str, Any], name: str) -> None:
    (caught,) = doc["captures"]
    p = _peer(doc, caught["device"])
    assert (p["table"], p["fix"]["kind"]) == ("main", "route")
    gw, dev = lab.client.router_v4, lab.client.dev
    assert doc["before_up"]["lines"][0] == (
        f"PostUp = ip route add {lab.servers['s2'].host.v4}/32 via {gw} dev {dev}")


def table_off(lab: Lab) -> str:
    lab.client_tunnel(1, lab.servers["s2"], "10.202.0.0/24")
    return write_config(lab, 0, lab.servers["s1"], FULL, extra="Table = off")[0]


def unknown_postup(lab: Lab) -> str:
    lab.client_tunnel(0, lab.servers["s1"], FULL)
    return write_config(lab, 1, lab.servers["s2"], SITE, extra=(
        "FwMark = 51820\nPostUp = logger -t wgnest-lab %i is up || true"))[0]


def check_unknown(lab: Lab, doc: dict[str, Any], name: str) -> None:
    (unknown,) = doc["unknown"]
    assert unknown["command"] == "logger -t wgnest-lab %i is up || true"
    assert "1 hook lines not evaluated" in doc["summary"]
    assert _peer(doc, name)["verdict"] == "direct"


def split_default(lab: Lab) -> str:
    return write_config(lab, 0, lab.servers["s1"], "0.0.0.0/1, 128.0.0.0/1")[0]


def check_loop(lab: Lab, doc: dict[str, Any], name: str) -> None:
    assert _peer(doc, name)["verdict"] == "loop"
    assert doc["before_up"]["status"] == "ok"


CASES = {
    "seed_nested": Case(seed_nested, 2, check_seed_nested),
    "seed_with_fwmark": Case(seed_fwmark, 0, check_clean),
    "full_tunnel_second_captures": Case(full_second, 2, check_captures),
    "custom_fwmark_on_full_tunnel": Case(custom_mark_running, 2, check_custom_mark),
    "custom_table_on_full_tunnel": Case(custom_table_second, 2, check_custom_table),
    "ipv6_endpoints": Case(ipv6, 2, check_ipv6),
    "site_covers_endpoint": Case(covers_endpoint, 2, check_covers),
    "table_off": Case(table_off, 0, check_clean),
    "unknown_postup": Case(unknown_postup, 1, check_unknown),
    "split_default_loop": Case(split_default, 2, check_loop),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prediction_equals_diagnosis(lab: Lab, case: str) -> None:
    spec = CASES[case]
    name = spec.setup(lab)
    before = _host_state(lab)
    code, doc = lint_json(lab, name)
    assert _host_state(lab) == before  # linting changes nothing
    (pred,) = doc["configs"]
    assert (code, pred["exit_code"]) == (spec.lint_code, spec.lint_code), pred["summary"]
    spec.check(lab, pred, name)
    up(lab, name)
    _code, diag = lab.check_json("--no-probe.enabled")
    assert device_view(pred) == device_view(diag)
    assert devices(pred) == devices(diag)


@pytest.mark.parametrize("case", ["seed_nested", "full_tunnel_second_captures"])
def test_the_suggested_lines_fix_it(lab: Lab, case: str) -> None:
    name = CASES[case].setup(lab)
    _code, doc = lint_json(lab, name)
    lines = doc["configs"][0]["before_up"]["lines"]
    conf = lab.workdir / f"{name}.conf"
    conf.write_text(conf.read_text().replace("[Peer]", "\n".join(lines) + "\n\n[Peer]", 1))
    code, doc = lint_json(lab, name)
    assert code == 0, doc["summary"]
    up(lab, name)
    code, diag = lab.check_json("--no-probe.enabled")
    assert code == 0, diag["summary"]
    assert device_view(doc["configs"][0]) == device_view(diag)


def test_a_colliding_fwmark_fails_up_and_its_cleanup_is_predicted(lab: Lab) -> None:
    w0 = lab.client_tunnel(0, lab.servers["s1"], FULL)
    name, _ = write_config(lab, 1, lab.servers["s2"], FULL, extra="FwMark = 51820")
    code, doc = lint_json(lab, name)
    (pred,) = doc["configs"]
    assert code == 1
    assert "File exists" in pred["wg_quick"]["failure"]
    assert [d["name"] for d in pred["devices"]] == [w0]
    assert "its cleanup would delete rules of running tunnels" in pred["summary"]
    assert up(lab, name, check=False).returncode != 0
    rules = run("ip", "rule", ns=lab.client.ns).stdout
    assert "lookup 51820" not in rules
    assert "suppress_prefixlength" not in rules
    _code, diag = lab.check_json("--no-probe.enabled")
    assert device_view(pred) == device_view(diag)


def test_default_lints_every_config_that_is_not_up(lab: Lab) -> None:
    name = seed_nested(lab)
    res = lab.wgnest("lint", "--config-dir", str(lab.workdir))
    assert res.returncode == 2
    assert res.stdout.count(f"lint {lab.workdir}/") == 1
    assert f"what `wg-quick up {name}` would do now" in res.stdout
    named = lab.wgnest("lint", "--config-dir", str(lab.workdir), f"{lab.tag}w0")
    assert named.returncode == 3
    assert "already up" in named.stdout


def _gone(lab: Lab, name: str) -> bool:
    link = run("ip", "link", "show", name, ns=lab.client.ns, check=False)
    return (link.returncode != 0 and not daemon_pids(name)
            and not (UAPI_DIR / f"{name}.sock").exists())


def test_preup_hook_refuses_a_nesting_up_and_leaves_nothing(lab: Lab) -> None:
    lab.client_tunnel(0, lab.servers["s1"], FULL)
    name, _ = write_config(lab, 1, lab.servers["s2"], SITE, extra=hook(lab))
    res = up(lab, name, check=False)
    assert res.returncode != 0
    assert "refusing `wg-quick up`" in res.stderr
    assert "NESTED in" in res.stdout
    assert _gone(lab, name)


def test_preup_hook_lets_a_clean_or_declared_one_through(lab: Lab) -> None:
    w0 = lab.client_tunnel(0, lab.servers["s1"], FULL)
    name, _ = write_config(lab, 1, lab.servers["s2"], SITE,
                           extra=hook(lab) + "\nFwMark = 51820")
    up(lab, name)
    code, diag = lab.check_json("--no-probe.enabled")
    assert code == 0
    assert _peer(diag, name)["verdict"] == "direct"
    declared, _ = write_config(lab, 2, lab.servers["s2"], "10.202.0.128/25",
                               extra=hook(lab).replace("--refuse", f"--refuse --allow-nesting "
                                                                   f"%i:{w0}"))
    up(lab, declared)
    assert _peer(lab.check_json("--no-probe.enabled")[1], declared)["verdict"] == "nested"


def test_the_model_agrees_with_the_kernel_on_real_rules(lab: Lab) -> None:
    """The rule walk over every table (what lint trusts only where it agrees) against the
    kernel itself, on rules and routes of every kind."""
    s1, s2, ns = lab.servers["s1"], lab.servers["s2"], lab.client.ns
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0, ::/0")
    lab.client_tunnel(1, s2, SITE)
    for cmd in ("ip rule add pref 10 not fwmark 0x8888 lookup 1000",
                "ip rule add pref 11 fwmark 0x80000/0xff0000 unreachable",
                "ip rule add pref 12 to 198.18.3.0/24 ipproto udp dport 51820 lookup 300",
                "ip rule add pref 13 ipproto tcp lookup 301",
                "ip rule add pref 14 lookup 302 suppress_prefixlength 8",
                f"ip route add default dev {w0} table 1000",
                "ip route add throw 198.18.0.0/16 table 1000",
                "ip route add blackhole 198.18.3.99 table 300",
                "ip route add prohibit 198.18.3.98 table 300",
                "ip route add unreachable 10.99.0.0/16 table 302",
                "ip route add 10.98.0.0/24 dev lo table 302",
                "ip -6 route add throw fd00:3::/64 table 51820"):
        run(*cmd.split(), ns=ns)
    marks = (0, 51820, 0x8888, 0x80001, 0x1234)
    dsts = ("198.18.2.2", "198.18.3.2", "198.18.3.99", "198.18.3.98", "10.99.1.1",
            "10.98.0.5", "10.202.0.1", "198.18.1.2", "127.0.0.1", "fd00:3::2", "fd00:2::2",
            "fd02::1", "::1")
    flows = [Flow(ipaddress.ip_address(d), m, sport, dport)
             for d in dsts for m in marks for sport, dport in ((40000, 51820), (1, 2))]
    with in_netns(ns):
        reader, lookup = Reader(), RouteLookup()
        try:
            snap, routing = take(reader), read_routing()
            kernel = lookup.lookup(flows)
        finally:
            reader.close()
            lookup.close()
    fib = Fib(snap.rules, routing.routes, snap.links, routing.addresses, routing.groups)
    wrong = [(f, fib.lookup(f), kernel[f]) for f in flows if not agrees(fib.lookup(f), kernel[f])]
    assert not wrong, wrong
    assert len(flows) == len(kernel) == 130
    outcomes = {(a.oif, a.table, a.error) for a in kernel.values()}
    assert len(outcomes) >= 8, outcomes  # blackhole, prohibit, unreachable, local, tunnels...

