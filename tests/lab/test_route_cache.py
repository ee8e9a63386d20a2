"""The route lookup cache never serves a stale answer: rule, route and link changes are
announced by the kernel and drop the cache before the next lookup."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.lab.lab import in_netns, run
from wgnest.model.host import Flow
from wgnest.sources.route_lookup import CachedRouteLookup, RouteLookup

pytestmark = pytest.mark.lab
EP = ipaddress.ip_address("198.51.100.7")


class CountingLookup(RouteLookup):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def lookup(self, flows):  # type: ignore[no-untyped-def]
        flows = list(flows)
        self.asked += len(flows)
        return super().lookup(flows)


@pytest.fixture
def ns() -> Iterator[str]:
    name = "rc" + secrets.token_hex(2)
    run("ip", "netns", "add", name)
    try:
        for a, b in (("ua", "ub"), ("va", "vb")):
            run("ip", "link", "add", a, "type", "veth", "peer", b, ns=name)
            run("ip", "link", "set", a, "up", ns=name)
            run("ip", "link", "set", b, "up", ns=name)
        run("ip", "addr", "add", "192.0.2.1/24", "dev", "ua", ns=name)
        run("ip", "route", "add", "default", "via", "192.0.2.254", "dev", "ua", ns=name)
        run("ip", "route", "add", "default", "dev", "va", "table", "77", ns=name)
        yield name
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None
    finally:
        run("ip", "netns", "del", name, check=False)


def test_cache_follows_rule_route_and_link_changes(ns: str) -> None:
    flow = Flow(EP, 0, 40000, 51820)
    with in_netns(ns):
        inner = CountingLookup()
        cache = CachedRouteLookup(inner, ttl=3600)
        try:
            index = {name: socket.if_nametoindex(name) for name in ("ua", "va")}

            def egress() -> int:
                return cache.lookup([flow])[flow].oif

            assert egress() == index["ua"]
            assert egress() == index["ua"]
            assert inner.asked == 1  # the second answer came from the cache
            run("ip", "rule", "add", "not", "fwmark", "51820", "table", "77", ns=ns)
            assert egress() == index["va"]  # a new rule: next lookup asks the kernel again
            run("ip", "rule", "del", "not", "fwmark", "51820", "table", "77", ns=ns)
            assert egress() == index["ua"]
            run("ip", "route", "add", f"{EP}/32", "dev", "va", ns=ns)
            assert egress() == index["va"]  # a more specific route
            run("ip", "link", "set", "va", "down", ns=ns)
            assert egress() == index["ua"]  # the link went down, its route is gone
            asked = inner.asked
            for _ in range(5):
                egress()
            assert inner.asked == asked  # quiet again: cached
        finally:
            cache.close()
