"""Latency per path on the seed lab with 10 ms each way on the first server's link."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from tests.lab.delayline import delayed
from tests.lab.lab import Lab, run

pytestmark = pytest.mark.lab


def delay_host(lab: Lab, role: str, ms: float) -> AbstractContextManager[int]:
    """Delay everything to and from one host by `ms` each way (in the router)."""
    host, link = lab.hosts[role], f"{lab.tag}{role}o"
    others = [f"{lab.tag}{r}o" for r in lab.hosts if r != role]
    selectors = {
        "-4": [("iif", link), *[("iif", o, "to", f"{host.v4}/32") for o in others]],
        "-6": [("iif", link), *[("iif", o, "to", f"{host.v6}/128") for o in others]],
    }
    return delayed(lab.router, f"{lab.tag}dl", ms, (link, others[0]), selectors=selectors)


def ping_median(lab: Lab, address: str, count: int = 10) -> float:
    out = run("ping", "-c", str(count), "-i", "0.2", address, ns=lab.client.ns).stdout
    rtts = [float(x) / 1000 for x in re.findall(r"time=([0-9.]+) ms", out)]
    assert len(rtts) == count, out
    return statistics.median(rtts)


def latency(doc: dict[str, Any], device: str) -> dict[str, Any]:
    (peer,) = [p for p in doc["peers"] if p["device"] == device]
    return dict(peer["latency"])


@pytest.fixture
def seed(lab: Lab) -> Iterator[tuple[Lab, str, str]]:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    with delay_host(lab, "s1", 10):
        assert lab.ping(lab.client.ns, s2.tunnel_v4, count=2)
        yield lab, w0, w1


def test_nested_tunnel_latency_flagged_then_cleared_by_fix(seed: tuple[Lab, str, str]) -> None:
    lab, w0, w1 = seed
    s2 = lab.servers["s2"]
    args = ("--probe.target", f"{w1}={s2.tunnel_v4}", "--probe.count", "7")
    code, doc = lab.check_json(*args)
    assert code == 2
    lat = latency(doc, w1)
    tunnel, direct = lat["median_seconds"]["tunnel"], lat["median_seconds"]["direct"]
    # nested: the inner packets cross the delayed link twice each way
    assert 0.038 < tunnel < 0.046, lat
    assert 0.038 < lat["median_seconds"]["transport"] < 0.046, lat
    assert direct < 0.005, lat
    assert lat["anomaly"] is True
    assert lat["overhead_ratio"] > 8
    # the exporter agrees with ping on the same path
    reference = ping_median(lab, s2.tunnel_v4)
    assert abs(tunnel - reference) <= max(0.1 * reference, 0.0005), (tunnel, reference)
    # w0's own transport is delayed too, but that is its direct path: no anomaly
    assert latency(doc, w0)["anomaly"] is False

    run("wg", "set", w1, "fwmark", "51820", ns=lab.client.ns)
    assert lab.ping(lab.client.ns, s2.tunnel_v4, count=3)
    code, doc = lab.check_json(*args)
    lat = latency(doc, w1)
    assert code == 0, doc["summary"]
    assert lat["median_seconds"]["tunnel"] < 0.005, lat
    assert lat["anomaly"] is False


def test_silent_target_is_loss_and_other_paths_stay(seed: tuple[Lab, str, str]) -> None:
    lab, w0, w1 = seed
    code, doc = lab.check_json("--probe.target", f"{w0}=10.201.0.99", "--probe.timeout", "0.3",
                               "--probe.count", "3")
    lat = latency(doc, w0)
    assert lat["loss"]["tunnel"] == 1.0
    assert lat["median_seconds"]["tunnel"] is None
    assert lat["loss"]["transport"] == 0.0
    assert 0.018 < lat["median_seconds"]["transport"] < 0.026
    assert latency(doc, w1)["loss"]["transport"] == 0.0
    assert code == 2  # the nesting still makes it critical
