"""Churn under a running exporter: policy rules flapping, a peer roaming 1,000 times."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import Seed
from tests.faults.harness import Exporter, Samples, rss_kib
from tests.lab.lab import Lab, run, uapi_set

pytestmark = pytest.mark.lab


def _wg_quick_rule(lab: Lab) -> list[str]:
    """The `not fwmark 51820 table 51820` rule wg-quick added, as `ip rule` arguments."""
    rules = json.loads(run("ip", "-j", "rule", ns=lab.client.ns).stdout)
    hits = [r for r in rules if "not" in r and r.get("table") == "51820"]
    assert len(hits) == 1, rules
    r = hits[0]
    return ["priority", str(r["priority"]), "not", "fwmark", r["fwmark"], "table", r["table"]]


def test_policy_rule_flapping(lab: Lab, seed: Seed,
                              start_exporter: Callable[..., Exporter]) -> None:
    underlay = lab.client.dev

    def verdict(s: Samples) -> tuple[float, str, str]:
        """(nested, egress, table) of w1's only peer in this exposition."""
        (nested,) = s.get("wireguard_peer_nested", device=seed.w1)
        (route,) = [ls for ls, _ in s.series("wireguard_peer_endpoint_route_info",
                                             device=seed.w1)]
        return nested, route["egress_device"], route["table"]

    with_rule, without_rule = (1.0, seed.w0, "51820"), (0.0, underlay, "main")
    exp = start_exporter()
    exp.scraper.wait_for(lambda s: verdict(s) == with_rule, 5.0, what="seed diagnosis")
    rule = _wg_quick_rule(lab)
    lags = []
    for _ in range(10):
        for action, want in (("del", without_rule), ("add", with_rule)):
            changed = time.monotonic()
            run("ip", "rule", action, *rule, ns=lab.client.ns)
            seen = exp.scraper.wait_for(lambda s, want=want: verdict(s) == want, 1.0,
                                        after=changed, what=f"w1 after `ip rule {action}`")
            lags.append(seen.started - changed)
    assert _wg_quick_rule(lab) == rule

    def check(s: Samples) -> None:
        seed.check_w0(s)
        seed.check_w1(s)
        seed.check_exporter(s)
        assert verdict(s) in (with_rule, without_rule), verdict(s)
        assert set(s.success().values()) == {1.0}, s.success()

    scrapes = exp.finish(check, max_elapsed=0.5)
    print(f"{len(lags)} rule changes followed in {min(lags):.3f}..{max(lags):.3f} s "
          f"(mean {sum(lags) / len(lags):.3f}); {len(scrapes)} scrapes")


def _endpoints(n: int, port0: int) -> list[str]:
    """n different endpoints, every tenth an IPv6 one."""
    return [f"[2001:db8::{i + 1:x}]:{port0 + i}" if i % 10 == 9
            else f"203.0.113.{i % 250 + 1}:{port0 + i}" for i in range(n)]


def test_peer_roams_1000_endpoints(lab: Lab, seed: Seed,
                                   start_exporter: Callable[..., Exporter]) -> None:
    peer = base64.b64decode(seed.s2.public).hex()
    exp = start_exporter()
    exp.scraper.wait_for(lambda s: bool(s.get("wireguard_peer_nested", device=seed.w1)), 5.0,
                         what="seed diagnosis")

    def roam(endpoints: list[str], pause: float) -> None:
        for endpoint in endpoints:
            uapi_set(seed.w1, f"public_key={peer}\nendpoint={endpoint}\n", timeout=2.0)
            time.sleep(pause)

    roam(_endpoints(100, 2000), 0.003)  # warm-up: caches and allocator reach steady state
    time.sleep(1.0)
    rss_before = rss_kib(exp.pid)
    roaming = time.monotonic()
    endpoints = _endpoints(1000, 10000)
    roam(endpoints, 0.003)
    roamed = time.monotonic() - roaming
    last = endpoints[-1]

    def at_last(s: Samples) -> bool:
        return [ls["endpoint"] for ls, _ in s.series("wireguard_peer_info",
                                                      device=seed.w1)] == [last]

    exp.scraper.wait_for(at_last, 2.0, what="the last endpoint exported")
    time.sleep(1.0)  # a few more refreshes after the roaming stopped
    rss_after = rss_kib(exp.pid)

    def check(s: Samples) -> None:
        seed.check_w0(s)
        seed.check_w1(s)  # exactly one wireguard_peer_info series at any time
        seed.check_exporter(s)
        assert len(s.series("wireguard_peer_endpoint_route_info", device=seed.w1)) <= 1
        assert set(s.success().values()) == {1.0}, s.success()

    scrapes = exp.finish(check, max_elapsed=0.5)
    final = scrapes[-1].parsed
    assert at_last(final)
    (info,) = final.series("wireguard_peer_info", device=seed.w1, public_key=seed.s2.public)
    assert info[0]["endpoint"] == last
    routes = final.series("wireguard_peer_endpoint_route_info", device=seed.w1)
    assert [ls["endpoint"] for ls, _ in routes] == [last], routes
    assert routes[0][0]["egress_device"] == lab.client.dev  # IPv6: not into w0 (IPv4 only)
    seen = {ls["endpoint"] for s in scrapes if s.started >= roaming
            for ls, _ in s.parsed.series("wireguard_peer_info", device=seed.w1)}
    assert len(seen & set(endpoints)) >= 5, "the roaming was hardly visible in the scrapes"
    grew = rss_after - rss_before
    assert grew < 10 * 1024, f"RSS grew {grew} KiB over 1,000 endpoints"
    print(f"1000 roams in {roamed:.2f} s; {len(seen)} endpoints seen in {len(scrapes)} scrapes; "
          f"RSS {rss_before} -> {rss_after} KiB ({grew:+d})")
