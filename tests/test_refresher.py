"""The refresher's health surfaces: a failing refresh, the prober beside the snapshot, the
status page banner (no I/O: hand-built snapshots and probe states)."""

from __future__ import annotations

import logging
import time

import pytest

from tests.test_analysis import KB, seed
from tests.test_prober import series
from wgnest.analysis.latency import peer_latencies
from wgnest.analysis.paths import diagnose
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Snapshot
from wgnest.model.probes import ProbeSnapshot
from wgnest.runtime.refresher import Refresher
from wgnest.surfaces import status_page
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.probe_metrics import probe_families
from wgnest.surfaces.report import render_text


def fixed_seed() -> Snapshot:
    from tests.test_analysis import fixed

    return fixed()


def test_a_refresh_that_raises_is_visible_and_logged_once(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    calls = {"n": 0}

    def take() -> Snapshot:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return fixed_seed()

    r = Refresher(take, interval=0.02)
    good = r.refresh_once().exposition.decode()
    assert 'wgnest_collector_success{collector="refresh"} 1.0' in good
    with caplog.at_level(logging.DEBUG, logger="wgnest"):
        r.start()
        deadline = time.monotonic() + 5
        while calls["n"] < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        r.stop()
    state = r.state
    assert state is not None
    text = state.exposition.decode()
    assert 'wgnest_collector_success{collector="refresh"} 0.0' in text
    assert "wgnest_snapshot_timestamp_seconds 1.7e+09" in text  # stopped at the last good one
    assert 'wireguard_peer_nested{device="wg1"' in text  # the last good families stay
    other = 'wgnest_errors_total{reason="other"}'
    errors = [line for line in text.splitlines() if line.startswith(other)]
    assert float(errors[0].split()[1]) >= 5
    warned = [rec for rec in caplog.records if "refresh failed" in rec.getMessage()
              and rec.levelno >= logging.WARNING]
    assert len(warned) == 1  # one line when it starts, not one per interval
    assert not any(rec.exc_info for rec in caplog.records if rec.levelno >= logging.WARNING)


def test_prober_status_travels_beside_the_snapshot() -> None:
    probes = ProbeSnapshot({}, SourceFailure("probe", "disabled", "no CAP_NET_RAW"), 0.0, 0)
    snap = fixed_seed()
    r = Refresher(lambda: snap, 1.0, probes=lambda: probes,
                  probe_metrics=lambda p, _ns: exposition(probe_families(p)))
    state = r.refresh_once()
    assert state.snapshot is snap
    assert snap.failures == ()  # the snapshot is what was read, the prober is beside it
    text = state.exposition.decode()
    assert 'wgnest_collector_success{collector="probe"} 0.0' in text
    assert 'wgnest_errors_total{reason="disabled"} 1.0' in text  # exported, not only counted


def test_one_filtered_target_keeps_the_prober_healthy() -> None:
    probes = ProbeSnapshot({}, None, 0.01, 3, {"eperm": 3})
    r = Refresher(fixed_seed, 1.0, probes=lambda: probes,
                  probe_metrics=lambda p, _ns: exposition(probe_families(p)))
    text = r.refresh_once().exposition.decode()
    assert 'wgnest_collector_success{collector="probe"} 1.0' in text
    assert 'wgnest_probe_send_errors_total{reason="eperm"} 3.0' in text  # counted, visible
    page = status_page.render(fixed_seed(), diagnose(fixed_seed()), {}, "/metrics", {},
                              probes.failure)
    assert '<div class="banner b0">OK' in page
    assert "CAP_NET_ADMIN" not in page


def test_status_page_banner_counts_latency_anomalies(tmp_path: object) -> None:
    snap = seed()
    paths = diagnose(snap, {("wg1", "wg0")})  # nesting allowed: only latency is left
    probes = ProbeSnapshot({
        ("wg1", KB, "tunnel"): series("tunnel", [0.04] * 5, 5, key=KB),
        ("wg1", KB, "direct"): series("direct", [0.0003] * 5, 5, key=KB),
    })
    latency = peer_latencies(probes, [(p.device, p.public_key) for p in paths])
    page = status_page.render(snap, paths, {}, "/metrics", latency)
    assert '<div class="banner b1">WARNING: 1 latency anomalies' in page
    from pathlib import Path

    text = render_text(snap, paths, Path("/nonexistent"), latency)
    assert text.startswith("WGNEST WARNING - 1 latency anomalies")


def test_status_page_of_a_10000_peer_gateway_puts_problems_first_and_folds() -> None:
    """Under a second for 10,000 peers; the nested ones on top; the healthy ones folded
    and counted per device; a filter box that needs no framework nor external asset."""
    import dataclasses
    import ipaddress

    from tests.test_analysis import EP1, KA, dev, flow, into, peer, snap
    from wgnest.model.host import Peer

    many = tuple(Peer(f"{i:043d}=", None, (ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.1"),),
                      0.0, 0, 0, 0) for i in range(10_000))
    gateway = dataclasses.replace(dev(5, 51822, 0, peer(KA, EP1, "10.250.0.0/24")),
                                  peers=(*many, peer(KA, EP1, "10.250.0.0/24")))
    s = snap((gateway,), (), {flow(EP1, 0, 51822): into(3, 254)})  # KA's transport into wg0
    paths = diagnose(s)
    began = time.monotonic()
    page = status_page.render(s, paths, {}, "/metrics")
    took = time.monotonic() - began
    assert took < 1.0, took
    problems = page.index("<h2>Problems (1)</h2>")
    assert problems < page.index(KA) < page.index('<h2 id="dev-wg2">')
    assert "<details><summary>10000 healthy peers</summary>" in page  # folded
    assert "10001 peers: 1 nested, 10000 no endpoint" in page
    assert 'oninput="' in page
    assert "<script src" not in page
    assert "http" not in page.split("</style>", 1)[1].split("<a href", 1)[0]


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_refresh_freezes_what_it_kept_and_a_full_collection_comes_in_turn() -> None:
    """After each refresh its objects are out of the cyclic GC's walks (frozen); a cycle
    made meanwhile is freed by the full collection every FULL_COLLECTION_EVERY refreshes."""
    import gc
    import weakref

    from wgnest.runtime import refresher

    r = Refresher(fixed_seed, 1.0)
    gc.disable()  # no automatic collection meanwhile: only the refresher's own
    try:
        r.refresh_once()
        assert gc.get_freeze_count() > 0
        garbage = _Cycle()
        gone = weakref.ref(garbage)
        del garbage
        r.refresh_once()  # the cycle is frozen with the rest: kept for now
        gc.collect()
        assert gone() is not None
        for _ in range(refresher.FULL_COLLECTION_EVERY - 2):
            r.refresh_once()
        assert gone() is None  # the full collection of refresh number FULL_COLLECTION_EVERY
    finally:
        gc.enable()
        gc.unfreeze()


_FREED_BLOCK = """
import sys
from wgnest.runtime.malloc import tune_malloc
if sys.argv[1] == "tuned":
    print(tune_malloc())
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
big = b"x" * (8 << 20); del big  # freed: glibc raises its mmap threshold to this
before = rss()
block = b"y" * (4 << 20); del block  # smaller: from the heap unless the threshold is fixed
print(rss() - before)
"""


def test_serve_tunes_malloc_so_freed_blocks_go_back() -> None:
    """tune_malloc (as serve starts): glibc takes both settings, and a 4 MiB block freed
    after an 8 MiB one goes back to the system (without it, it stays: the control)."""
    import ctypes.util

    from tests.fresh_python import run_fresh

    if ctypes.util.find_library("c") != "libc.so.6":
        pytest.skip("not glibc: no mallopt to ask")
    tuned = run_fresh(_FREED_BLOCK, "tuned").stdout.split()
    assert tuned[0] == "True"
    assert int(tuned[1]) < 1
    assert int(run_fresh(_FREED_BLOCK, "plain").stdout.split()[0]) >= 3  # the control


def test_flows_are_kept_while_the_endpoint_is() -> None:
    """A peer whose counters moved (a new Peer, the same endpoint) keeps its Flow object
    (its hash made once); one whose endpoint moved gets a new one; an unchanged device
    gives the same flows at once."""
    import dataclasses
    from ipaddress import ip_address

    from wgnest.model.host import Endpoint
    from wgnest.snapshot import Reader, _flows

    snap = fixed_seed()
    device = next(d for d in snap.devices if len(d.peers) >= 1 and d.peers[0].endpoint)
    reader = Reader()
    try:
        first = _flows(reader, (device,))
        assert _flows(reader, (device,)) == first
        busy = dataclasses.replace(device.peers[0], rx_bytes=device.peers[0].rx_bytes + 1)
        again = _flows(reader, (dataclasses.replace(device, peers=(busy, *device.peers[1:])),))
        assert again[0] is first[0]
        moved = dataclasses.replace(busy, endpoint=Endpoint(ip_address("198.51.100.99"), 4242))
        third = _flows(reader, (dataclasses.replace(device, peers=(moved, *device.peers[1:])),))
        assert third[0] is not first[0]
        assert (str(third[0].dst), third[0].dport) == ("198.51.100.99", 4242)
        # an equal endpoint (another object, as the kernel's are) keeps it; a port moved alone
        # does not, nor does a link-local address's zone
        copy = dataclasses.replace(moved, endpoint=Endpoint(ip_address("198.51.100.99"), 4242))
        assert _flows(reader, (dataclasses.replace(
            device, peers=(copy, *device.peers[1:])),))[0] is third[0]
        port = dataclasses.replace(moved, endpoint=Endpoint(ip_address("198.51.100.99"), 4243))
        assert _flows(reader, (dataclasses.replace(
            device, peers=(port, *device.peers[1:])),))[0].dport == 4243
        zones = [dataclasses.replace(moved, endpoint=Endpoint(ip_address("fe80::1"), 4243, z))
                 for z in (2, 3)]
        assert [_flows(reader, (dataclasses.replace(device, peers=(z, *device.peers[1:])),))[0]
                .oif for z in zones] == [2, 3]
    finally:
        reader.close()
