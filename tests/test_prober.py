"""The latency prober: (a) with a fake socket layer, (b) for real, between namespaces we make."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from wgnest.analysis.latency import PeerLatency, peer_latencies
from wgnest.model.probes import BUCKETS, ProbeSnapshot, ProbeTarget, SeriesSnapshot
from wgnest.probe.icmp import Channel, Reply, probe_mode
from wgnest.probe.prober import Prober
from wgnest.surfaces.exposition import as_metrics
from wgnest.surfaces.probe_metrics import probe_families

A = ip_address


def peer_latency(snap: ProbeSnapshot, device: str, key: str, ratio: float,
                 min_excess: float) -> PeerLatency:
    return peer_latencies(snap, [(device, key)], ratio, min_excess)[device, key]


def target(addr: str, path: str = "direct", mark: int = 0, key: str = "k1") -> ProbeTarget:
    return ProbeTarget("wg0", key, path, A(addr), mark)


# --------------------------------------------------------------------------- fake socket layer

class FakeChannel:
    """Answers at once according to `net`: address -> "ok", "silent", "eperm", "foreign",
    "dup", "badtoken", "badid"."""

    def __init__(self, net: dict[str, str], family: int, mark: int) -> None:
        self.net, self.family, self.mark = net, family, mark
        self.rx, self.tx = socket.socketpair()
        self.queue: list[Reply] = []
        self.sent: list[tuple[str, int]] = []
        self.on_send: Callable[[], None] = lambda: None

    def fileno(self) -> int:
        return self.rx.fileno()

    def ident(self, chosen: int) -> int:
        return chosen

    def send(self, address: str, ident: int, sequence: int, payload: bytes) -> int | None:
        self.on_send()
        self.sent.append((address, self.mark))
        how = self.net.get(address, "ok")
        if how == "eperm":
            raise PermissionError(1, "Operation not permitted")
        replies = {
            "ok": [Reply(address, ident, sequence, True, payload, None)],
            "dup": [Reply(address, ident, sequence, True, payload, None)] * 3,
            "foreign": [Reply("198.18.9.9", ident, sequence, True, payload, None)],
            "badtoken": [Reply(address, ident, sequence, True, bytes(len(payload)), None)],
            "badid": [Reply(address, ident ^ 1, sequence, True, payload, None)],
            "unreach": [Reply("198.18.0.254", ident, sequence, False, b"", None)],
        }.get(how, [])
        signal = replies and not self.queue  # one byte while anything is queued
        self.queue += replies
        if signal:
            self.tx.send(b"x")
        return None

    def receive(self) -> tuple[list[Reply], OSError | None]:
        with contextlib.suppress(BlockingIOError):
            self.rx.recv(4096, socket.MSG_DONTWAIT)
        out, self.queue = self.queue, []
        return out, None

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


class FakeProber(Prober):
    def __init__(self, targets: Callable[[], Sequence[ProbeTarget]], net: dict[str, str],
                 no_socket_marks: tuple[int, ...] = (), histograms: bool = True,
                 baseline_block: int = 1) -> None:
        super().__init__(targets, timeout=0.2, privileged=True, window=5, baseline=20,
                         baseline_block=baseline_block, histograms=histograms)
        self.disabled_reason = ""  # the fake needs no privilege
        self.net, self.no_socket_marks = net, no_socket_marks
        self.opened: list[FakeChannel] = []

    def _open_channel(self, family: int, mark: int, device: str) -> Channel:
        if mark in self.no_socket_marks:
            raise PermissionError(1, "Operation not permitted")
        ch = FakeChannel(self.net, family, mark)
        self.opened.append(ch)
        return ch


CODED = 2e-4  # an RTT decoded from its code is within 0.016 % of the measured one


def coded(rtts: list[float]) -> Any:
    """`rtts` as they read back from the prober's codes."""
    return pytest.approx(rtts, rel=CODED)


def sent_flows(p: FakeProber) -> list[tuple[str, int]]:
    return [f for ch in p.opened for f in ch.sent]


def test_flows_are_deduplicated_and_results_shared() -> None:
    ts = [target("198.18.0.2", "direct"), target("198.18.0.2", "transport"),
          target("198.18.0.2", "transport", mark=0x77, key="k2"), target("fd00::2", "tunnel")]
    p = FakeProber(lambda: ts, {})
    p.run_once()
    assert sorted(sent_flows(p)) == [("198.18.0.2", 0), ("198.18.0.2", 0x77), ("fd00::2", 0)]
    snap = p.snapshot()
    assert snap.failure is None
    assert snap.rounds == 1
    assert {(s.sent, s.received) for s in snap.series.values()} == {(1, 1)}
    direct, transport = snap.series["wg0", "k1", "direct"], snap.series["wg0", "k1", "transport"]
    assert direct.recent == transport.recent
    assert 0 < direct.recent[0] < 0.2


def test_silent_eperm_unreachable_and_foreign_replies_are_losses() -> None:
    net = {"198.18.0.3": "silent", "198.18.0.4": "eperm", "198.18.0.5": "foreign",
           "198.18.0.6": "badtoken", "198.18.0.7": "badid", "198.18.0.8": "dup",
           "198.18.0.9": "unreach"}
    ts = [target(f"198.18.0.{i}", key=f"k{i}") for i in range(2, 10)]
    p = FakeProber(lambda: ts, net)
    for _ in range(2):
        p.run_once()
    snap = p.snapshot()
    got = {k[1]: (s.sent, s.received) for k, s in snap.series.items()}
    assert got == {"k2": (2, 2), "k3": (2, 0), "k4": (2, 0), "k5": (2, 0), "k6": (2, 0),
                   "k7": (2, 0), "k8": (2, 2), "k9": (2, 0)}
    assert snap.series["wg0", "k3", "direct"].error == ""  # silence is loss, not an error
    assert snap.series["wg0", "k4", "direct"].error.startswith("eperm: send to 198.18.0.4")
    assert snap.series["wg0", "k9", "direct"].error == "unreachable: ICMP error from 198.18.0.254"
    assert snap.series["wg0", "k3", "direct"].loss == 1.0
    assert snap.series["wg0", "k2", "direct"].loss == 0.0
    # one filtered target (sendto EPERM: a netfilter OUTPUT drop) is that target's fact,
    # never a failure of the prober as a whole
    assert snap.failure is None
    assert snap.send_errors == {"eperm": 2}


def test_unopenable_socket_is_not_counted_as_sent() -> None:
    ts = [target("198.18.0.2"), target("198.18.0.2", "transport", mark=0x77)]
    p = FakeProber(lambda: ts, {}, no_socket_marks=(0x77,))
    p.run_once()
    snap = p.snapshot()
    assert snap.series["wg0", "k1", "transport"].sent == 0
    assert snap.series["wg0", "k1", "transport"].loss is None  # never "0 % loss" of nothing
    assert snap.series["wg0", "k1", "direct"].received == 1
    assert snap.failure is not None
    assert snap.failure.reason == "eperm"  # no socket at all: the prober cannot work
    assert "socket for 198.18.0.2 mark 0x77" in snap.failure.message
    assert "CAP_NET_RAW" in snap.failure.message


def test_targets_appear_at_zero_and_vanish() -> None:
    plan = [[target("198.18.0.2")]]
    p = FakeProber(lambda: plan[0], {})
    p.run_once()
    plan[0] = [target("198.18.0.2", key="new")]  # a new plan is a new list
    seen: list[ProbeSnapshot] = []
    p.opened[0].on_send = lambda: seen.append(p.snapshot())  # mid-round: must not block
    p.run_once()
    assert set(seen[0].series) == {("wg0", "new", "direct")}
    assert seen[0].series["wg0", "new", "direct"].sent == 0
    assert set(p.snapshot().series) == {("wg0", "new", "direct")}


def test_window_and_histogram() -> None:
    p = FakeProber(lambda: [target("198.18.0.2", "transport"), target("198.18.0.3")], {})
    for _ in range(7):
        p.run_once()
    s = p.snapshot().series["wg0", "k1", "transport"]
    assert (s.sent, s.received, s.recent_sent, len(s.recent), len(s.baseline)) == (7, 7, 5, 5, 7)
    assert len(s.buckets) == len(BUCKETS)
    assert s.buckets[-1] == 7
    assert list(s.buckets) == sorted(s.buckets)
    assert s.rtt_sum == pytest.approx(sum(s.baseline), rel=CODED)
    direct = p.snapshot().series["wg0", "k1", "direct"]  # no verdict reads its baseline
    assert (direct.received, len(direct.recent), len(direct.baseline)) == (7, 5, 0)


def test_baseline_only_on_the_real_path() -> None:
    """The tunnel path keeps a baseline, its transport then none; when the tunnel target
    goes (no recent handshake), the transport is the real path and gets one; the window
    and the baseline keep only their last values, oldest first, lost probes left out."""
    plan = [target("198.18.0.2", "tunnel"), target("198.18.0.3", "transport")]
    p = FakeProber(lambda: plan, {})
    for _ in range(3):
        p.run_once()
    series = p.snapshot().series
    assert len(series["wg0", "k1", "tunnel"].baseline) == 3
    assert len(series["wg0", "k1", "transport"].baseline) == 0
    plan = [target("198.18.0.3", "transport")]  # a new list: a new plan
    for _ in range(25):
        p.run_once()
    s = p.snapshot().series["wg0", "k1", "transport"]
    assert (len(s.baseline), len(s.recent)) == (20, 5)  # FakeProber: baseline 20, window 5
    assert all(0 < x < 1 for x in s.baseline)


def probe_all(s: SeriesSnapshot, rtts: Iterable[float | None]) -> SeriesSnapshot:
    from wgnest.probe.prober import probed
    for rtt in rtts:
        s = probed(s, rtt, "")
    return s


def test_ring_keeps_the_last_values_and_a_probe_never_changes_a_snapshot() -> None:
    """A series keeps its last `window` values; a probe makes a new snapshot with a new
    array, so a snapshot a reader holds never moves."""
    from wgnest.probe.prober import new_series, probed
    fresh = new_series(target("198.18.0.2", "tunnel"), 4, 1, 3, histograms=False)
    assert (fresh.codes, fresh.window) == ((), ())  # no array until a value comes
    given = probe_all(fresh, [float(x) for x in range(1, 7)])
    assert (len(given.window), sorted(given.window)) == (4, coded([3.0, 4.0, 5.0, 6.0]))
    assert sorted(given.baseline) == coded([4.0, 5.0, 6.0])
    after = probed(given, 7.0, "")
    assert sorted(given.window) == coded([3.0, 4.0, 5.0, 6.0])  # the snapshot's values stay
    assert sorted(given.baseline) == coded([4.0, 5.0, 6.0])
    assert sorted(after.window) == coded([4.0, 5.0, 6.0, 7.0])
    assert sorted(after.baseline) == coded([5.0, 6.0, 7.0])
    assert after.codes is not given.codes
    lost = probed(after, None, "")  # lost: the window moves, the baseline does not
    assert (sorted(lost.baseline), lost.loss, lost.sent, lost.received) == (
        coded([5.0, 6.0, 7.0]), 0.25, 8, 7)
    last = probed(lost, 8.0, "")
    assert sorted(after.baseline) == coded([5.0, 6.0, 7.0])
    assert sorted(last.baseline) == coded([6.0, 7.0, 8.0])
    assert len(last.codes) == 4 + 1 + 3  # made whole at the first probe, never grown
    empty = probe_all(new_series(target("198.18.0.2", "direct"), 0, 1, 0, False), [1.0])
    assert (empty.window, empty.baseline, empty.received) == ((), (), 1)


def test_histogram_counts_are_cumulative_and_never_shared_changed() -> None:
    """With histograms, a probe adds one to every bucket from its RTT's bound on (an RTT
    above the last bound to none); a snapshot taken before keeps its counts."""
    from wgnest.model.probes import BUCKETS
    from wgnest.probe.prober import new_series, probed
    fresh = new_series(target("198.18.0.2", "transport"), 30, 10, 30, histograms=True)
    first = probed(fresh, 0.003, "")  # 2.5 ms < 3 ms <= 5 ms
    both = probe_all(first, [0.0002, None, 9.0])
    assert list(fresh.buckets) == [0] * len(BUCKETS)
    assert list(first.buckets) == [0] * BUCKETS.index(0.005) + [1] * (
        len(BUCKETS) - BUCKETS.index(0.005))
    assert both.buckets[BUCKETS.index(0.00025)] == 1
    assert (both.buckets[-1], both.received, both.sent) == (2, 3, 4)
    assert both.rtt_sum == pytest.approx(9.0032)


def test_baseline_is_the_medians_of_blocks() -> None:
    """With blocks of 10, the baseline keeps one median per 10 answered probes (lost ones
    left out), the last `baseline // 10` of them; the block in progress is not in it yet.
    Its median is the median of all those RTTs (a remedian) within the code's rounding."""
    from wgnest.probe.prober import new_series, probed
    s = new_series(target("198.18.0.2", "tunnel"), 30, 10, 3, histograms=False)
    for i in range(45):  # block k holds k+1 ms .. k+10 ms, in a shuffled order
        s = probed(s, 0.001 * (i // 10 + 1 + (7 * i) % 10), "")
        if i % 4 == 0:
            s = probed(s, None, "")  # lost: counted in the window only
    # four blocks done, the first (median 5.5 ms) overwritten; five probes in progress
    assert sorted(s.baseline) == coded([0.0065, 0.0075, 0.0085])
    assert s.baseline_median == (0.0075, 3)
    assert (s.received, s.sent, len(s.window)) == (45, 57, 30)
    drift = new_series(target("198.18.0.2", "tunnel"), 30, 10, 30, histograms=False)
    # a slow drift: the blocks' medians follow it
    base = sorted(probe_all(drift, (0.010 + 0.0001 * i for i in range(300))).baseline)
    assert len(base) == 30
    assert base[0] == pytest.approx(0.01045, rel=CODED)
    assert base[-1] == pytest.approx(0.03945, rel=CODED)


def test_a_jump_is_judged_against_the_blocks_from_the_third_on() -> None:
    """The verdict counts a baseline from its third block (30 answered probes); then a
    tunnel that went from 10 to 40 ms is flagged against it, with no direct path."""
    from wgnest.analysis.latency import judge
    from wgnest.probe.prober import new_series
    start = new_series(target("10.0.0.1", "tunnel"), 30, 10, 30, histograms=False)
    early = probe_all(start, [0.010] * 29)
    assert early.baseline_median == (0.01, 2)
    assert judge(early.recent_median, (None, 0), early.baseline_median) == (
        False, "ok: real 10 ms, direct path has too few samples")
    s = probe_all(early, [0.010] * 271 + [0.040] * 30)
    assert (s.recent_median, s.baseline_median) == ((0.04, 30), (0.01, 30))
    flag, reason = judge(s.recent_median, (None, 0), s.baseline_median)
    assert flag
    assert reason == "real path 40 ms jumped 4.0x above its baseline 10 ms (+30 ms)"


def test_a_prober_keeps_blocks_and_a_new_baseline_keeps_the_window() -> None:
    """Through the prober, blocks of 5 of a 20-RTT baseline: 4 entries kept. When the
    tunnel target goes, the transport gets a baseline, and its window so far stays."""
    plan = [target("198.18.0.2", "tunnel"), target("198.18.0.3", "transport")]
    p = FakeProber(lambda: plan, {}, baseline_block=5)
    for _ in range(27):
        p.run_once()
    series = p.snapshot().series
    assert len(series["wg0", "k1", "tunnel"].baseline) == 4  # 5 blocks done, 2 in progress
    transport = series["wg0", "k1", "transport"]
    assert (len(transport.recent), transport.baseline) == (5, ())
    plan = [target("198.18.0.3", "transport")]  # a new list: a new plan
    p._adopt(plan)
    moved = p.snapshot().series["wg0", "k1", "transport"]
    assert sorted(moved.recent) == sorted(transport.recent)
    assert (moved.baseline, moved.sent) == ((), 27)
    for _ in range(5):
        p.run_once()
    assert len(p.snapshot().series["wg0", "k1", "transport"].baseline) == 1


def test_rtt_codes_round_trip_within_their_step() -> None:
    from wgnest.model.probes import RTT_LOST, code_rtt, median_of_codes, rtt_code
    for rtt in (1.2e-7, 2.5e-5, 0.0001, 0.0123, 0.5, 3.0, 99.0):
        assert code_rtt(rtt_code(rtt)) == pytest.approx(rtt, rel=CODED)
    assert rtt_code(0.0) == rtt_code(1e-9) == 2  # below 100 ns: the floor
    assert rtt_code(1e6) == 65535  # above 100 s: the top
    assert math.isnan(code_rtt(RTT_LOST))
    assert (rtt_code(math.nan), rtt_code(math.inf), rtt_code(-1.0)) == (RTT_LOST, 65535, 2)
    assert rtt_code(0.0101) > rtt_code(0.0100)  # monotonic: medians of codes are medians
    # a median reads to 3 significant digits, as ping shows it: the code's step is hidden
    assert median_of_codes([rtt_code(0.04)] * 3 + [RTT_LOST, 0]) == (0.04, 3)
    assert median_of_codes([rtt_code(x) for x in (0.0123456, 0.02, 0.09)]) == (0.02, 3)
    assert median_of_codes([rtt_code(0.001), rtt_code(0.002)]) == (0.0015, 2)
    assert median_of_codes([RTT_LOST, 0]) == (None, 0)


def test_a_new_plan_indexes_the_stores_own_keys() -> None:
    """A plan adopted again (its targets new objects, one changed) indexes each flow by the
    very key objects the store holds, not equal copies of them (64 bytes a series)."""
    import dataclasses

    first = [target("198.18.0.2", "transport"), target("198.18.0.3", "tunnel")]
    p = FakeProber(lambda: first, {})
    p._adopt(first)
    later = [dataclasses.replace(first[0], urgent=True), dataclasses.replace(first[1]),
             target("198.18.0.4", "transport", key="k2")]
    p._adopt(later)
    from wgnest.probe.prober import keys_of
    stored = {id(k) for k in p._store}
    indexed = [k for keys in p._by_flow.values() for k in keys_of(keys)]
    assert sorted(indexed) == sorted(p._store)
    assert all(id(k) in stored for k in indexed)


def test_unprobed_series_and_no_histograms_keep_no_arrays() -> None:
    """Without histograms a series counts no buckets; a series not probed yet, and the
    direct path's baseline, are empty tuples (a gateway's 20,000 series: no arrays)."""
    plan = [target("198.18.0.2", "transport"), target("198.18.0.3")]
    p = FakeProber(lambda: plan, {}, histograms=False)
    p._adopt(plan)  # the series exist, none probed yet
    fresh = p.snapshot().series["wg0", "k1", "transport"]
    assert (fresh.buckets, fresh.window, fresh.baseline) == ((), (), ())
    for _ in range(3):
        p.run_once()
    s = p.snapshot().series["wg0", "k1", "transport"]
    assert (s.buckets, s.received, len(s.recent), len(s.baseline)) == ((), 3, 3, 3)
    assert s.rtt_sum == pytest.approx(sum(s.baseline), rel=CODED)
    assert p.snapshot().series["wg0", "k1", "direct"].baseline == ()


def test_a_series_snapshot_holds_the_rings_arrays_not_copies() -> None:
    """Between two probes a series' window and baseline exist once, in its ring and its
    snapshot alike; a probe then leaves the snapshot taken before as it was."""
    plan = [target("198.18.0.2", "tunnel"), target("198.18.0.3", "direct")]
    p = FakeProber(lambda: plan, {"198.18.0.3": "silent"})
    for _ in range(3):
        p.run_once()
    key = ("wg0", "k1", "tunnel")
    s = p.snapshot().series[key]
    assert p._store[key] is s  # the store holds the series as this snapshot
    before = list(s.window)
    lost = p.snapshot().series["wg0", "k1", "direct"]
    assert (lost.recent, lost.recent_sent, lost.loss) == ([], 3, 1.0)
    p.run_once()
    assert list(s.window) == before
    after = p.snapshot().series[key]
    assert after.codes is not s.codes
    assert (after.recent_sent, len(after.recent), after.loss) == (4, 4, 0.0)


def test_start_stop_fake() -> None:
    p = FakeProber(lambda: [target("198.18.0.2")], {"198.18.0.2": "silent"})
    p.interval = 0.05
    p.start()
    time.sleep(0.1)
    began = time.monotonic()
    p.stop()
    assert time.monotonic() - began < 2.0
    assert not any(t.name == "wgnest-prober" for t in threading.enumerate())
    assert p.snapshot().rounds >= 1


def test_probe_mode_detection() -> None:
    assert probe_mode(None, True, "1 0", [0]) == (True, "")
    assert probe_mode(None, False, "0 2147483647", [1000]) == (False, "")
    assert probe_mode(None, False, "100\t200\n", [1000, 150]) == (False, "")
    use_raw, why = probe_mode(None, False, "1\t0\n", [0])
    assert not use_raw
    assert why == "no CAP_NET_RAW and net.ipv4.ping_group_range '1 0' excludes gid 0"
    assert probe_mode(False, True, "1 0", [0])[1].startswith("no CAP_NET_RAW and net.ipv4.ping")
    assert probe_mode(True, False, "0 65535", [0])[1] != ""
    assert "unreadable" in probe_mode(None, False, None, [0])[1]


def test_disabled_prober_reports_and_exports_nothing() -> None:
    p = Prober(lambda: [target("198.18.0.2")], privileged=False)
    p.disabled_reason = "no CAP_NET_RAW and net.ipv4.ping_group_range '1 0' excludes gid 0"
    p.run_once()
    snap = p.snapshot()
    assert snap.failure is not None
    assert (snap.failure.reason, snap.failure.message) == ("disabled", p.disabled_reason)
    assert not snap.series


# --------------------------------------------------------------------------- metrics

def series(path: str, rtts: Sequence[float], sent: int, key: str = "k1") -> SeriesSnapshot:
    buckets = tuple(sum(r <= b for r in rtts) for b in BUCKETS)
    window = (*rtts, *[math.nan] * (sent - len(rtts)))  # the lost ones: NaN
    return SeriesSnapshot.of(target(f"198.18.0.{len(path)}", path, key=key), sent, len(rtts),
                             buckets, sum(rtts), window, tuple(rtts))


def render(snap: ProbeSnapshot) -> str:
    class Collector:
        def collect(self) -> Iterator[Metric]:
            return iter(as_metrics(list(probe_families(snap, 1.5, 0.005))))

    reg = CollectorRegistry()
    reg.register(Collector())
    return generate_latest(reg).decode()


def test_probe_families() -> None:
    snap = ProbeSnapshot({
        ("wg0", "k1", "tunnel"): series("tunnel", [0.04] * 5, 5),
        ("wg0", "k1", "direct"): series("direct", [0.0003] * 4, 5),
        ("wg0", "k2", "transport"): series("transport", [], 0, key="k2"),
    })
    text = render(snap)
    assert 'wireguard_probe_packets_sent_total{device="wg0",path="transport",public_key="k2"} 0.0'\
        in text
    assert 'wireguard_probe_rtt_seconds_bucket{device="wg0",le="0.05",path="tunnel",' \
        'public_key="k1"} 5.0' in text
    assert 'wireguard_probe_rtt_seconds_bucket{device="wg0",le="+Inf",path="direct",' \
        'public_key="k1"} 4.0' in text
    assert re.search(r'overhead_ratio\{device="wg0",public_key="k1"\} 133\.3', text)
    assert 'overhead_ratio{device="wg0",public_key="k2"}' not in text  # unknown: absent
    assert 'wireguard_peer_latency_anomaly{device="wg0",public_key="k1"} 1.0' in text
    assert 'wireguard_peer_latency_anomaly{device="wg0",public_key="k2"} 0.0' in text
    v = peer_latency(snap, "wg0", "k1", 1.5, 0.005)
    assert (v.real_path, v.anomaly, v.median["tunnel"]) == ("tunnel", True, 0.04)
    assert v.loss["direct"] == pytest.approx(0.2)
    assert peer_latency(snap, "wg0", "nobody", 1.5, 0.005).reason == \
        "no tunnel or transport probe"


# --------------------------------------------------------------------------- real namespaces

CLONE_NEWNET = 0x40000000
lab = pytest.mark.lab
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"),
    reason="needs root (CAP_NET_ADMIN, CAP_NET_RAW) and iproute2 to build network namespaces")


def sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread in namespace `ns` (sockets and threads made meanwhile stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")


class Lab:
    """pbXXXXa probes; pbXXXXb answers (198.18.0.2, fd00:77::2, anyip 198.18.1.0/24; 198.18.0.3
    silent; 198.18.3.2 by way of router pbXXXXr); pbXXXXc is a dead end that mark 0x77 routes
    to; sends to 198.18.0.4 are refused."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.a, self.b, self.c, self.r = (f"pb{tag}{r}" for r in "abcr")
        self.made: list[str] = []

    def build(self) -> None:
        for ns in (self.a, self.b, self.c, self.r):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b, c, r = self.a, self.b, self.c, self.r
        for ns, dev, peer, there, mine, theirs in (
                (a, "a2", "r0", r, "198.18.2.1/30", "198.18.2.2/30"),
                (b, "b2", "r1", r, "198.18.3.2/30", "198.18.3.1/30")):
            sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer,
               "netns", there)
            sh("ip", "-n", ns, "addr", "add", mine, "dev", dev)
            sh("ip", "-n", there, "addr", "add", theirs, "dev", peer)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", there, "link", "set", peer, "up")
        sh("ip", "-n", a, "route", "add", "198.18.3.0/30", "via", "198.18.2.2")
        sh("ip", "-n", b, "route", "add", "198.18.2.0/30", "via", "198.18.3.1")
        sh("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", b)
        sh("ip", "-n", a, "link", "add", "a1", "type", "veth", "peer", "name", "c1", "netns", c)
        for ns, dev, v4, v6 in ((a, "a0", "198.18.0.1/29", "fd00:77::1/64"),
                                (b, "b0", "198.18.0.2/29", "fd00:77::2/64")):
            sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", b, "addr", "add", "198.18.0.3/29", "dev", "b0")
        sh("ip", "-n", b, "route", "add", "local", "198.18.1.0/24", "dev", "lo")
        sh("ip", "-n", a, "route", "add", "198.18.1.0/24", "via", "198.18.0.2")
        sh("ip", "-n", a, "link", "set", "a1", "up")
        sh("ip", "-n", c, "link", "set", "c1", "up")
        sh("ip", "-n", a, "route", "add", "198.18.0.0/29", "dev", "a1", "table", "77")
        sh("ip", "-n", a, "neigh", "add", "198.18.0.2", "lladdr", "02:00:00:00:00:77", "dev",
           "a1", "nud", "permanent")
        sh("ip", "-n", a, "rule", "add", "fwmark", "0x77", "lookup", "77")
        sh("ip", "netns", "exec", b, "nft", "add table inet pb; add chain inet pb in { type "
           "filter hook input priority 0; }; add rule inet pb in ip daddr 198.18.0.3 icmp type "
           "echo-request drop")
        sh("ip", "netns", "exec", a, "nft", "add table inet pb; add chain inet pb out { type "
           "filter hook output priority 0; }; add rule inet pb out ip daddr 198.18.0.4 drop")

    def close(self) -> None:
        for ns in self.made:
            sh("ip", "netns", "del", ns, check=False)
        listed = sh("ip", "netns", "list")
        assert not any(ns in listed for ns in self.made), listed


@pytest.fixture
def netlab() -> Iterator[Lab]:
    built = Lab()
    try:
        built.build()
        yield built
    finally:
        built.close()


def ping(ns: str, addr: str, count: int = 5) -> list[float]:
    out = sh("ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.2", addr)
    return [float(x) / 1000 for x in re.findall(r"time=([\d.]+) ms", out)]


def rounds(p: Prober, n: int, gap: float = 0.0) -> ProbeSnapshot:
    for _ in range(n):
        p.run_once()
        time.sleep(gap)
    return p.snapshot()


@lab
@needs_root
def test_rtt_close_to_ping(netlab: Lab) -> None:
    ts = [target("198.18.0.2"), target("fd00:77::2", "tunnel")]
    with inside(netlab.a):
        p = Prober(lambda: ts, timeout=0.5)
        rounds(p, 1)  # neighbours resolved, as for ping's first packet
        snap = rounds(p, 10, gap=0.2)  # spaced like ping's: a CPU woken from idle is slower
    for t in ts:
        ours = snap.series[t.device, t.public_key, t.path]
        assert (ours.sent, ours.received) == (11, 11)
        theirs = ping(netlab.a, str(t.address), 6)[1:]
        assert len(theirs) == 5
        mine, ping_med = statistics.median(ours.recent), statistics.median(theirs)
        print(f"{t.address}: prober median {mine * 1e6:.0f} us, ping {ping_med * 1e6:.0f} us")
        assert abs(mine - ping_med) < 0.0002


@lab
@needs_root
def test_delayed_path_close_to_ping_and_flagged(netlab: Lab) -> None:
    try:
        from tests.lab.delayline import delayed
    except ImportError as e:
        pytest.skip(f"no delay line (tests/lab/delayline.py): {e}")
    ts = [target("198.18.0.2", "direct"), target("198.18.3.2", "tunnel")]  # 2 x 5 ms via r
    with delayed(netlab.r, "pbdl", 5.0, ("r0", "r1"), ipv6=False):
        with inside(netlab.a):
            snap = rounds(Prober(lambda: ts, timeout=1.0), 10, gap=0.1)
        theirs = ping(netlab.a, "198.18.3.2", 6)[1:]
    tunnel = snap.series["wg0", "k1", "tunnel"]
    assert (tunnel.sent, tunnel.received) == (10, 10)
    mine, ping_med = statistics.median(tunnel.recent), statistics.median(theirs)
    print(f"delayed: prober median {mine * 1e3:.2f} ms, ping {ping_med * 1e3:.2f} ms")
    assert 0.010 <= mine < 0.015
    assert abs(mine - ping_med) < 0.1 * ping_med
    verdict = peer_latency(snap, "wg0", "k1", 1.5, 0.005)
    assert verdict.anomaly, verdict.reason
    assert verdict.ratio is not None
    assert verdict.ratio > 20


@lab
@needs_root
def test_silent_refused_and_unrouted_targets_leave_others_intact(netlab: Lab) -> None:
    ts = [target("198.18.0.2", key="live"), target("198.18.0.3", key="silent"),
          target("198.18.0.4", key="refused"), target("192.0.2.1", key="noroute"),
          target("fd00:77::2", key="live6")]
    with inside(netlab.a):
        snap = rounds(Prober(lambda: ts, timeout=0.3), 3)
    got = {k[1]: (s.sent, s.received, s.error.split(":")[0]) for k, s in snap.series.items()}
    assert got == {"live": (3, 3, ""), "silent": (3, 0, ""), "refused": (3, 0, "eperm"),
                   "noroute": (3, 0, "unreachable"), "live6": (3, 3, "")}
    assert snap.failure is None  # a filtered or unrouted target is that target's fact
    assert snap.send_errors == {"eperm": 3, "unreachable": 3}


@lab
@needs_root
def test_so_mark_routes(netlab: Lab) -> None:
    ts = [target("198.18.0.2", "direct"), target("198.18.0.2", "transport", mark=0x77)]
    with inside(netlab.a):
        snap = rounds(Prober(lambda: ts, timeout=0.3), 3)
    assert (snap.series["wg0", "k1", "direct"].received, snap.series["wg0", "k1", "direct"].sent) \
        == (3, 3)
    marked = snap.series["wg0", "k1", "transport"]
    assert (marked.sent, marked.received, marked.error) == (3, 0, "")
    assert snap.failure is None


class Counting(Prober):
    rejected = 0

    def _match(self, key: tuple[int, int, str], r: Reply, pending: dict,  # type: ignore[type-arg]
               results: dict) -> None:  # type: ignore[type-arg]
        before = len(pending)
        super()._match(key, r, pending, results)
        self.rejected += len(pending) == before


@lab
@needs_root
def test_concurrent_probers_no_crosstalk(netlab: Lab) -> None:
    # a silent target keeps every round open for the whole timeout: the rounds overlap
    ts = [target(f"198.18.1.{i}", key=f"k{i}") for i in range(1, 21)]
    ts.append(target("198.18.0.3", key="silent"))
    with inside(netlab.a):
        one, two = Counting(lambda: ts, timeout=0.5), Counting(lambda: ts, timeout=0.5)
        two._ident = one._ident ^ 0x5A5A
        threads = [threading.Thread(target=rounds, args=(p, 3)) for p in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # worst case: same id and sequence. `four` probes the same address over the dead
        # mark while `three` probes it directly: the only reply `four`'s socket sees is
        # `three`'s, same source, id and sequence; only the payload token tells them apart
        three = Counting(lambda: [target("198.18.0.2")], timeout=0.3)
        four = Counting(lambda: [target("198.18.0.2", mark=0x77)], timeout=0.5)
        four._ident, four._seq = three._ident, three._seq
        for _ in range(3):
            waiting = threading.Thread(target=four.run_once)
            waiting.start()
            time.sleep(0.1)
            three.run_once()
            waiting.join(5)
    for p in (one, two):
        got = {k[1]: (s.sent, s.received) for k, s in p.snapshot().series.items()}
        assert got == {**{f"k{i}": (3, 3) for i in range(1, 21)}, "silent": (3, 0)}
        assert p.rejected >= 20  # each saw the other's replies, and refused them
    assert three.snapshot().series["wg0", "k1", "direct"].received == 3
    assert four.snapshot().series["wg0", "k1", "direct"].received == 0
    assert four.rejected == 3


UNPRIV = """
import ipaddress, json
from wgnest.model.probes import ProbeTarget
from wgnest.probe.prober import Prober
ts = [ProbeTarget("wg0", k, "direct", ipaddress.ip_address(a), m)
      for k, a, m in (("a", "198.18.0.2", 0), ("b", "fd00:77::2", 0), ("c", "198.18.0.2", 0x77))]
p = Prober(lambda: ts, timeout=0.5)
p.run_once()
p.run_once()
s = p.snapshot()
print(json.dumps({"why": p.disabled_reason, "reason": s.failure and s.failure.reason,
                  "got": sorted([t.target.mark, t.sent, t.received] for t in s.series.values())}))
"""


@lab
@needs_root
def test_unprivileged_mode(netlab: Lab) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop to an unprivileged user")

    def run_as_nobody() -> dict[str, object]:
        env = {"PYTHONPATH": str(Path(__file__).parents[1] / "exporter"), "PATH": "/usr/bin"}
        out = subprocess.run(
            ["ip", "netns", "exec", netlab.a, "setpriv", "--reuid=65534", "--regid=65534",
             "--clear-groups", "--inh-caps=-all", sys.executable, "-c", UNPRIV],
            capture_output=True, text=True, check=True, env=env, timeout=30).stdout
        return dict(json.loads(out))

    sh("ip", "netns", "exec", netlab.a, "sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
    off = run_as_nobody()
    assert off["why"] == "no CAP_NET_RAW and net.ipv4.ping_group_range '1 0' excludes gid 65534"
    assert (off["reason"], off["got"]) == ("disabled", [])
    sh("ip", "netns", "exec", netlab.a, "sysctl", "-qw",
       "net.ipv4.ping_group_range=0 2147483647")
    on = run_as_nobody()
    assert on["why"] == ""
    # ping sockets work for v4 and v6; SO_MARK needs CAP_NET_ADMIN: not sent, reported
    assert on["got"] == [[0, 2, 2], [0, 2, 2], [0x77, 0, 0]]
    assert on["reason"] == "eperm"


@lab
@needs_root
def test_start_stop_real(netlab: Lab) -> None:
    with inside(netlab.a):
        p = Prober(lambda: [target("198.18.0.3")], interval=0.2, timeout=1.0)  # silent
        p.start()  # the thread inherits this thread's namespace
    time.sleep(0.5)
    began = time.monotonic()
    p.stop()
    assert time.monotonic() - began < 2.0
    assert not any(t.name == "wgnest-prober" for t in threading.enumerate())
    assert p.snapshot().series["wg0", "k1", "direct"].sent >= 1


@lab
@needs_root
def test_cpu_time_per_probe(netlab: Lab) -> None:
    ts = [target(f"198.18.1.{i}", key=f"k{i}") for i in range(1, 201)]
    with inside(netlab.a):
        p = Prober(lambda: ts, timeout=1)
        p.run_once()
        cpu, wall = time.process_time(), time.monotonic()
        snap = rounds(p, 5)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert {(s.sent, s.received) for s in snap.series.values()} == {(6, 6)}
    per_probe = cpu / (5 * len(ts))
    print(f"200 targets: {cpu / 5 * 1000:.1f} ms CPU, {wall / 5 * 1000:.1f} ms wall per round; "
          f"{per_probe * 1e6:.0f} us CPU per probe")
    assert per_probe < 0.001


def test_more_flows_than_sequence_numbers_in_one_round(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """70,000 flows in a round: sequence numbers would wrap past 65,536 and a reply could
    be matched to another probe; every flow must still get its own answer, even when no
    reply is read before the last request is sent."""
    from wgnest.probe import prober as prober_module

    monkeypatch.setattr(prober_module, "DRAIN_EVERY", 10**9)
    ts = [ProbeTarget("wg0", f"k{i}", "direct",
                      ip_address(int(ip_address("10.0.0.0")) + i), 0) for i in range(70_000)]
    p = FakeProber(lambda: ts, {})
    p.run_once()
    snap = p.snapshot()
    assert {(s.sent, s.received) for s in snap.series.values()} == {(1, 1)}


def test_probe_budget_takes_urgent_flows_first_and_the_rest_in_turn() -> None:
    """--probe.max-rate x --probe.interval flows a round: the urgent ones every round, the
    others in turn, so each is reached within flows / budget rounds; sends are paced."""
    urgent = [ProbeTarget("wg0", "u", "transport", ip_address("10.9.0.1"), 0, "", True)]
    rest = [ProbeTarget("wg0", f"k{i}", "transport", ip_address(f"10.9.1.{i}"), 0)
            for i in range(10)]
    p = FakeProber(lambda: urgent + rest, {})
    p.interval, p.max_rate = 0.04, 100.0  # a budget of 4 flows a round
    for _ in range(6):
        p.run_once()
    snap = p.snapshot()
    assert (snap.flows, snap.flows_per_round) == (11, 4)
    assert snap.series["wg0", "u", "transport"].sent == 6  # every round
    sent = sorted(snap.series["wg0", f"k{i}", "transport"].sent for i in range(10))
    assert sent == [1, 1, 2, 2, 2, 2, 2, 2, 2, 2]  # 18 = 6 rounds x 3, spread evenly
    began = time.monotonic()
    p.run_once()
    assert time.monotonic() - began >= 0.03  # 4 sends at 100/s: paced over the interval


def test_without_a_budget_every_flow_goes_every_round() -> None:
    ts = [ProbeTarget("wg0", f"k{i}", "transport", ip_address(f"10.9.1.{i}"), 0)
          for i in range(10)]
    p = FakeProber(lambda: ts, {})
    p.run_once()
    assert {s.sent for s in p.snapshot().series.values()} == {1}


def test_lean_probe_families_hold_at_most_two_rtt_series_a_peer() -> None:
    """Without --probe.histograms: the real path's median and, only when its flow differs
    (a nested peer with a fix), the direct one; plus the anomaly verdict."""
    import dataclasses

    def at(target_: ProbeTarget, rtts: list[float]) -> SeriesSnapshot:
        return dataclasses.replace(series(target_.path, rtts, 5), target=target_)

    # k1 is direct: its direct flow is its transport flow; k2 is nested, fixed by a mark
    direct_same = at(target("198.18.0.9", "direct"), [0.02] * 5)
    transport = at(target("198.18.0.9", "transport"), [0.02] * 5)
    fixed = at(target("198.18.0.9", "direct", mark=51820, key="k2"), [0.001] * 5)
    nested = at(target("198.18.0.9", "transport", key="k2"), [0.04] * 5)
    snap = ProbeSnapshot({("wg0", "k1", "direct"): direct_same,
                          ("wg0", "k1", "transport"): transport,
                          ("wg0", "k2", "direct"): fixed, ("wg0", "k2", "transport"): nested})

    class Lean:
        def collect(self) -> Iterator[Metric]:
            return iter(as_metrics(list(probe_families(snap, 1.5, 0.005, detail=False))))

    reg = CollectorRegistry()
    reg.register(Lean())
    text = generate_latest(reg).decode()
    rtt = [line for line in text.splitlines() if line.startswith("wireguard_peer_rtt_seconds{")]
    assert sorted(rtt) == [
        'wireguard_peer_rtt_seconds{device="wg0",path="direct",public_key="k2"} 0.001',
        'wireguard_peer_rtt_seconds{device="wg0",path="transport",public_key="k1"} 0.02',
        'wireguard_peer_rtt_seconds{device="wg0",path="transport",public_key="k2"} 0.04']
    assert "wireguard_probe_rtt_seconds" not in text
    assert 'wireguard_peer_latency_anomaly{device="wg0",public_key="k2"} 1.0' in text


def test_a_merged_direct_path_is_judged_and_written_as_the_transport_series() -> None:
    """A plan without the direct path that is the transport's own flow (merge=True) gives
    the same verdicts, medians and lean exposition as one with both series, equal."""
    import dataclasses

    from wgnest.analysis.latency import peer_latencies
    from wgnest.surfaces.exposition import exposition

    def at(target_: ProbeTarget, rtts: list[float]) -> SeriesSnapshot:
        return dataclasses.replace(series(target_.path, rtts, 5), target=target_)

    both = {  # k1: a tunnel 4x its underlay; k2: no tunnel probe, transport only
        ("wg0", "k1", "tunnel"): at(target("10.0.0.1", "tunnel"), [0.04] * 5),
        ("wg0", "k1", "transport"): at(target("198.18.0.9", "transport"), [0.01] * 5),
        ("wg0", "k1", "direct"): at(target("198.18.0.9", "direct"), [0.01] * 5),
        ("wg0", "k2", "transport"): at(target("198.18.0.8", "transport", key="k2"), [0.02] * 4),
        ("wg0", "k2", "direct"): at(target("198.18.0.8", "direct", key="k2"), [0.02] * 4),
    }
    merged = {k: v for k, v in both.items() if k[2] != "direct"}
    peers = [("wg0", "k1"), ("wg0", "k2")]
    full, lean = (peer_latencies(ProbeSnapshot(s), peers) for s in (both, merged))
    for key in peers:
        a, b = full[key], lean[key]
        assert (dict(a.median), dict(a.loss), a.real_path, a.ratio, a.anomaly, a.reason) == (
            dict(b.median), dict(b.loss), b.real_path, b.ratio, b.anomaly, b.reason)
    assert lean["wg0", "k1"].anomaly
    assert lean["wg0", "k1"].median["direct"] == 0.01
    text = exposition(probe_families(ProbeSnapshot(merged), 1.5, 0.005, detail=False))
    assert text == exposition(probe_families(ProbeSnapshot(both), 1.5, 0.005, detail=False))
    assert b'path="direct",public_key="k1"} 0.01' in text


def test_probe_text_is_the_exposition_of_the_lean_families() -> None:
    """probe_text (the defaults' render, unchanged peers' lines reused) writes exactly what
    exposition(probe_families(detail=False)) writes: cold, warm, after a series was probed
    again, a peer went and one came, and with a special character in a label."""
    import dataclasses

    from wgnest.surfaces.exposition import exposition
    from wgnest.surfaces.probe_metrics import ProbeLines, probe_text

    def at(target_: ProbeTarget, rtts: list[float]) -> SeriesSnapshot:
        return dataclasses.replace(series(target_.path, rtts, 5), target=target_)

    base = {
        ("wg0", "k1", "direct"): at(target("198.18.0.9", "direct"), [0.02] * 5),
        ("wg0", "k1", "transport"): at(target("198.18.0.9", "transport"), [0.02] * 5),
        ("wg0", "k2", "direct"): at(target("198.18.0.8", "direct", 51820, "k2"), [0.001] * 5),
        ("wg0", "k2", "transport"): at(target("198.18.0.8", "transport", key="k2"), [0.04] * 5),
        ("wg0", "k3", "tunnel"): at(target("10.0.0.3", "tunnel", key="k3"), [0.003] * 4),
        ('w"g', "k4", "transport"): at(target("198.18.0.7", "transport", key="k4"), []),
    }
    cache = ProbeLines()

    def same(snap: ProbeSnapshot) -> bytes:
        got = probe_text(snap, 1.5, 0.005, cache)
        assert got == exposition(probe_families(snap, 1.5, 0.005, detail=False))
        return got

    snap = ProbeSnapshot(base, send_errors={"eperm": 2}, flows=5, flows_per_round=5)
    cold = same(snap)
    kept = dict(cache.peers)
    assert same(snap) == cold
    assert all(cache.peers[k][1] is kept[k][1] for k in kept)  # the lines themselves, reused
    probed = {**base, ("wg0", "k1", "transport"): at(target("198.18.0.9", "transport"),
                                                     [0.09] * 5)}
    del probed["wg0", "k3", "tunnel"]
    probed["wg1", "k5", "transport"] = at(target("198.18.0.5", "transport", key="k5"), [0.2])
    got = same(ProbeSnapshot(probed, skipped={"no_recent_handshake": 3}))
    assert b'public_key="k3"' not in got
    assert b'wireguard_peer_rtt_seconds{device="wg0",path="transport",public_key="k1"} 0.09' \
        in got
    assert cache.peers["k2"][1] is kept["k2"][1]


def test_peers_series_groups_each_peer_once_and_anomalous_peers_are_the_flagged() -> None:
    """Series in any order come out one peer at a time, peers sorted and paths in PATHS
    order; anomalous_peers() is the peers whose verdict flags them (what peer_latencies
    says), for the probe plan's urgent ones."""
    from wgnest.analysis.latency import anomalous_peers, peers_series

    def series(addr: str, path: str, key: str, rtt: float) -> SeriesSnapshot:
        return SeriesSnapshot.of(target(addr, path, key=key), 30, 30, (), 30 * rtt, [rtt] * 30)

    snap = ProbeSnapshot({
        ("wg1", "kb", "direct"): series("198.18.0.9", "direct", "kb", 0.010),
        ("wg0", "kz", "transport"): series("198.18.0.3", "transport", "kz", 0.010),
        ("wg1", "kb", "tunnel"): series("10.0.0.9", "tunnel", "kb", 0.060),
        ("wg0", "ka", "tunnel"): series("10.0.0.2", "tunnel", "ka", 0.011),
        ("wg0", "ka", "direct"): series("198.18.0.2", "direct", "ka", 0.010),
    })
    grouped = [(d, k, list(paths)) for d, k, paths in peers_series(snap)]
    assert grouped == [("wg0", "ka", ["tunnel", "direct"]), ("wg0", "kz", ["transport"]),
                       ("wg1", "kb", ["tunnel", "direct"])]
    assert anomalous_peers(snap) == {("wg1", "kb")}
    every = peer_latencies(snap, [(d, k) for d, k, _ in grouped])
    assert {p for p, v in every.items() if v.anomaly} == anomalous_peers(snap)
