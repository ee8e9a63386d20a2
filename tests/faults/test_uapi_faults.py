"""Misbehaving UAPI sockets (garbage answers, accepted-but-silent) and SIGTERM mid-refresh."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import Seed
from tests.faults.harness import (
    COLLECTORS,
    PORT,
    Exporter,
    Samples,
    assert_scrapes,
    fake_uapi,
    parse,
)
from tests.lab.lab import Lab, http_get, in_netns

pytestmark = pytest.mark.lab
UAPI = "wireguard_uapi"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


@pytest.mark.parametrize(("mode", "reason", "other"), [("garbage", "parse", "timeout"),
                                                       ("hang", "timeout", "parse")])
def test_bad_uapi_socket(lab: Lab, seed: Seed, start_exporter: Callable[..., Exporter],
                         mode: str, reason: str, other: str) -> None:
    exp = start_exporter()  # default --wireguard.uapi-timeout 1
    warm = exp.scraper.wait_for(lambda s: s.success().get(UAPI) == 1
                                and bool(s.get("wireguard_peer_nested", device=seed.w1)), 5.0,
                                what="healthy start")
    fake = fake_uapi(lab, mode, f"{lab.tag}f{mode[0]}")
    failed = exp.scraper.wait_for(lambda s: s.success().get(UAPI) == 0, 3.0,
                                  what=f"{UAPI} failing on the {mode} socket")
    time.sleep(3.5)
    during = exp.scraper.latest_ok()
    assert during is not None
    fault_end = time.monotonic()
    grew = during.parsed.errors()[reason] - warm.parsed.errors()[reason]
    assert grew >= 3, f"errors_total{{reason={reason!r}}} grew by {grew} only"
    assert during.parsed.errors()[other] == warm.parsed.errors()[other]
    assert fake.accepts, "the exporter never connected to the fake socket"

    fake.kill()
    fake.delete_link()
    healed = exp.scraper.wait_for(lambda s: s.success().get(UAPI) == 1, 3.0,
                                  what=f"{UAPI} back to 1")
    time.sleep(0.3)

    def check(s: Samples) -> None:  # every scrape, before, during and after the fault
        seed.check_w0(s)
        seed.check_w1(s)
        seed.check_exporter(s)
        assert s.one("wireguard_peer_nested", device=seed.w1, outer_device=seed.w0) == 1
        assert fake.name not in s.devices()
        for collector in COLLECTORS:
            if collector != UAPI:
                assert s.one("wgnest_collector_success", collector=collector) == 1

    scrapes = exp.finish(check, max_elapsed=0.5)
    for s in scrapes:
        if failed.started <= s.started < fault_end:
            assert s.parsed.one("wgnest_collector_success", collector=UAPI) == 0
        if s.started >= healed.started:
            assert s.parsed.one("wgnest_collector_success", collector=UAPI) == 1
    if mode == "hang":  # scrapes kept being answered while a refresh sat in the read
        waiting = [s for s in scrapes for t in fake.accepts if t + 0.1 < s.started < t + 0.9]
        assert len(waiting) >= 10, f"only {len(waiting)} scrapes during the hung reads"
    logged = exp.log()
    assert "Traceback" not in logged
    for needle in ("banana", "not utf-8", "this is not uapi", "198.51.100.1"):
        assert needle not in logged, "a log line echoes the socket's answer"
    print(f"{mode}: {len(scrapes)} scrapes, slowest {max(s.elapsed for s in scrapes):.3f} s, "
          f"{len(fake.accepts)} connections, {reason} errors +{grew:.0f}, failing after "
          f"{failed.started - fake.accepts[0]:.3f} s, healed "
          f"{healed.started - fault_end:.3f} s after the fix")


def test_sigterm_during_slow_refresh(lab: Lab, seed: Seed,
                                     start_exporter: Callable[..., Exporter]) -> None:
    fake = fake_uapi(lab, "hang", f"{lab.tag}fs")
    exp = start_exporter("--wireguard.uapi-timeout", "1.5")
    exp.scraper.wait_for(lambda s: s.success().get(UAPI) == 0, 5.0, what="refresh blocked")
    accepted = len(fake.accepts)
    _wait(lambda: len(fake.accepts) > accepted, 4.0, "a refresh connecting to the socket")
    time.sleep(0.3)  # the refresh thread is now inside a 1.5 s read on the silent socket
    signalled = time.monotonic()
    exp.proc.send_signal(signal.SIGTERM)
    try:
        code = exp.proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 2 s after SIGTERM: {exp.log()[-2000:]}") from None
    took = time.monotonic() - signalled
    assert code == 0, exp.log()[-2000:]
    with in_netns(lab.client.ns), socket.socket() as probe:  # the port is free at once
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", PORT))
        probe.listen()
    exp.scraper.stop()
    logged = exp.log()
    assert "Traceback" not in logged, logged[-3000:]

    def check(s: Samples) -> None:
        seed.check_w0(s)
        seed.check_w1(s)
        seed.check_exporter(s)
        assert s.one("wgnest_collector_success", collector=UAPI) == 0

    # Every scrape that got an answer got a full, good one; after the signal the only
    # other outcome is a connection the stopping server refuses, resets (one that was
    # still in the listen backlog when the listening socket closed) or closes unanswered
    # (accepted in the instant before the stop closed every connection).
    scrapes = exp.scraper.all()
    answered = [s for s in scrapes if s.status is not None]
    assert_scrapes(answered, check, max_elapsed=0.5, min_scrapes=3)  # a short window
    late = [s for s in scrapes if s.status is None]
    assert all(s.started + s.elapsed >= signalled for s in late), late[:3]
    assert all(s.error.startswith(("ConnectionRefusedError", "ConnectionResetError",
                                   "RemoteDisconnected")) for s in late), late[:3]

    restarted = time.monotonic()
    lab.serve("--wireguard.uapi-timeout", "1.5")  # raises if it cannot bind the port
    status, body = http_get(lab.client.ns, f"http://127.0.0.1:{PORT}/metrics")
    assert status == 200
    assert parse(body.decode()).one("wireguard_device_fwmark", device=seed.w0) == 51820
    print(f"exit {code} {took:.3f} s after SIGTERM; new server answered "
          f"{time.monotonic() - restarted:.3f} s later; {len(answered)} scrapes answered, "
          f"{len(late)} refused or reset after the signal")
