from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.faults.harness import Exporter, Samples, Scraper, serve_pid
from tests.lab.lab import Lab, Server


@dataclass(frozen=True)
class Seed:
    """The seed lab: w0 a full tunnel to s1 (FwMark 51820, policy rules), w1 a site tunnel
    to s2 without FwMark, so w1's transport is nested in w0."""

    w0: str
    w1: str
    s1: Server
    s2: Server

    def check_w0(self, s: Samples) -> None:
        """w0 is exported, and correctly, in this exposition."""
        assert s.one("wireguard_device_fwmark", device=self.w0) == 51820
        assert s.one("wireguard_peer_nested", device=self.w0, outer_device="") == 0
        assert s.one("wireguard_peer_info", device=self.w0, public_key=self.s1.public,
                     endpoint=f"{self.s1.host.v4}:51820", allowed_ips="0.0.0.0/0") == 1

    def check_w1(self, s: Samples) -> None:
        assert s.one("wireguard_device_fwmark", device=self.w1) == 0
        assert s.one("wireguard_peer_info", device=self.w1, public_key=self.s2.public,
                     allowed_ips="10.202.0.0/24") == 1

    @staticmethod
    def check_exporter(s: Samples) -> None:
        assert len(s.get("wgnest_build_info")) == 1
        assert s.one("wgnest_build_info") == 1


@pytest.fixture
def seed(lab: Lab) -> Seed:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    return Seed(w0, w1, s1, s2)


@pytest.fixture
def start_exporter(lab: Lab) -> Iterator[Callable[..., Exporter]]:
    """start_exporter(*args): `wgnest serve --refresh.interval 0.2 *args` in the client
    namespace, scraped every ~50 ms until the test ends."""
    started: list[Exporter] = []

    def start(*args: str) -> Exporter:
        proc = lab.serve("--refresh.interval", "0.2", *args)
        exporter = Exporter(lab, proc, serve_pid(proc), Scraper(lab.client.ns).start())
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.scraper.stop()
