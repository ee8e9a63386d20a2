"""A WireGuard device vanishing under a running exporter: link deleted, daemon SIGKILLed."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import Seed
from tests.faults.harness import (
    COLLECTORS,
    Exporter,
    Samples,
    Scrape,
    failing_snapshots,
    total_errors,
)
from tests.lab.lab import UAPI_DIR, Lab, daemon_pids, run

pytestmark = pytest.mark.lab


def _nested(seed: Seed) -> Callable[[Samples], bool]:
    return lambda s: s.get("wireguard_peer_nested", device=seed.w1, outer_device=seed.w0) == [1]


def _check_gone(seed: Seed, exp: Exporter, fault_at: float, warm: Scrape) -> Scrape:
    """w1's series disappear for good; w0 and the exporter's own series never waver; at
    most one refresh saw an error (the race between reading links and reading the
    device), and the collectors are all healthy again at the end."""
    snap_gone = exp.scraper.wait_for(lambda s: seed.w1 not in s.devices(probes=False), 1.0,
                                     after=fault_at, what=f"{seed.w1} snapshot series gone")
    gone = exp.scraper.wait_for(lambda s: seed.w1 not in s.devices(), 2.5, after=fault_at,
                                what=f"{seed.w1} probe series gone")
    time.sleep(1.5)  # several more refreshes

    def check(s: Samples) -> None:
        seed.check_w0(s)
        seed.check_exporter(s)

    scrapes = exp.finish(check, max_elapsed=0.5)
    for s in scrapes:
        if s.started < fault_at:
            seed.check_w1(s.parsed)
        if s.started >= snap_gone.started:
            assert seed.w1 not in s.parsed.devices(probes=False), "a deleted device came back"
        if s.started >= gone.started:
            assert seed.w1 not in s.parsed.devices(), "probe series of a deleted device came back"
    failing = failing_snapshots(scrapes)
    assert len(failing) <= 1, f"errors in {len(failing)} refreshes: {failing}"
    last = scrapes[-1].parsed
    assert set(COLLECTORS) <= set(last.success())
    assert set(last.success().values()) == {1.0}, last.success()
    spike = total_errors(last) - total_errors(warm.parsed)
    assert spike <= max((len(c) for c in failing.values()), default=0), (spike, failing)
    assert time.time() - last.taken_at < 1.0, "refreshes stopped"
    print(f"series gone {snap_gone.started - fault_at:.3f} s after the fault "
          f"(probe series {gone.started - fault_at:.3f} s); "
          f"{len(scrapes)} scrapes, failing refreshes {failing}, error spike {spike}")
    return gone


def test_link_deleted_while_scraping(lab: Lab, seed: Seed,
                                     start_exporter: Callable[..., Exporter]) -> None:
    exp = start_exporter()
    warm = exp.scraper.wait_for(_nested(seed), 5.0, what="seed diagnosis")
    time.sleep(0.5)
    fault_at = time.monotonic()
    run("ip", "link", "del", seed.w1, ns=lab.client.ns)
    _check_gone(seed, exp, fault_at, warm)


def test_wireguard_go_sigkilled_leaves_stale_socket(
        lab: Lab, seed: Seed, start_exporter: Callable[..., Exporter]) -> None:
    sock = UAPI_DIR / f"{seed.w1}.sock"
    pids = daemon_pids(seed.w1)
    assert pids, f"no wireguard-go for {seed.w1}"
    exp = start_exporter()
    try:
        warm = exp.scraper.wait_for(_nested(seed), 5.0, what="seed diagnosis")
        time.sleep(0.5)
        fault_at = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _check_gone(seed, exp, fault_at, warm)
        assert stat.S_ISSOCK(sock.lstat().st_mode), "the exporter removed a daemon's socket"
    finally:
        sock.unlink(missing_ok=True)
