"""Metric families and per-peer verdicts from one ProbeSnapshot (no I/O, never waits)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from wgnest.analysis.latency import PeerLatency, direct_of, peer_verdict, peers_series
from wgnest.model.probes import BUCKETS, ProbeSnapshot, SeriesSnapshot
from wgnest.surfaces.exposition import (
    Family,
    counter,
    exposition,
    gauge,
    key_format,
    light_format,
    needs_escape,
    sample_value,
)

if TYPE_CHECKING:  # prometheus_client is imported only for --probe.histograms
    from prometheus_client.core import Metric

DP = ["device", "public_key"]
SEND_ERRORS = ("eperm", "unreachable", "error")  # the prober's per-target send failures
SKIP_REASONS = ("not_selected", "no_recent_handshake")
DPP = [*DP, "path"]


def _same_flow(a: SeriesSnapshot, b: SeriesSnapshot) -> bool:
    x, y = a.target, b.target
    return (x.address, x.mark, x.bind_device) == (y.address, y.mark, y.bind_device)


def probe_families(snap: ProbeSnapshot, ratio: float = 1.5, min_excess: float = 0.005,
                   detail: bool = True) -> Iterator[Metric | Family]:
    """Always the median RTT of the path the tunnel really takes and, when its flow differs
    (a nested peer), of the direct path: at most 2 series a peer, and the anomaly verdict.
    With `detail` (--probe.histograms) also a histogram and sent/received counters on every
    path and the overhead ratio (about 60 series a peer)."""
    from prometheus_client.core import HistogramMetricFamily  # (only --probe.histograms)

    rtt = HistogramMetricFamily("wireguard_probe_rtt_seconds",
                                "ICMP echo round-trip time per peer and path.", labels=DPP)
    sent = counter("wireguard_probe_packets_sent", "Echo requests sent per peer and path.",
                    *DPP)
    received = counter("wireguard_probe_packets_received",
                        "Matching echo replies received per peer and path.", *DPP)
    median, anomaly = _median_and_anomaly()
    over = gauge("wireguard_peer_latency_overhead_ratio",
                 "Median RTT of the path the tunnel really takes over the direct path's; "
                 "absent if unknown.", *DP)
    peers = {(device, key): paths for device, key, paths in peers_series(snap)}
    if detail:
        for (device, public_key), paths in peers.items():
            for path, s in paths.items():
                key = (device, public_key, path)
                buckets = [(repr(float(b)), c) for b, c in zip(BUCKETS, s.buckets, strict=True)]
                rtt.add_metric(list(key), [*buckets, ("+Inf", s.received)], s.rtt_sum)
                sent.add(key, s.sent)
                received.add(key, s.received)
    for (device, public_key), paths in peers.items():
        verdict = peer_verdict(device, public_key, paths, ratio, min_excess)
        samples = _peer_samples(device, public_key, paths, verdict)
        if detail and verdict.ratio is not None:
            over.add((device, public_key), verdict.ratio)
        anomaly.add((device, public_key), int(verdict.anomaly))
        for values, value in samples:
            median.add(values, value)
    per_peer: tuple[Metric | Family, ...] = (
        (rtt, sent, received, over, median, anomaly) if detail else (median, anomaly))
    yield from (*per_peer, *_prober_families(snap))


def _median_and_anomaly() -> tuple[Family, Family]:
    median = gauge("wireguard_peer_rtt_seconds",
                   "Median ICMP round-trip time of the last probes: of the path the tunnel "
                   "really takes (tunnel, else transport) and, when it differs, of the "
                   "direct path.", *DPP)
    anomaly = gauge("wireguard_peer_latency_anomaly",
                    "1 if the tunnel is markedly slower than the direct path or than its own "
                    "baseline.", *DP)
    return median, anomaly


def _prober_families(snap: ProbeSnapshot) -> tuple[Family, ...]:
    """The prober's own counters and gauges (not per peer)."""
    send_errors = counter(
        "wgnest_probe_send_errors",
        "Echo requests the kernel refused to send, by reason (eperm: filtered, e.g. a "
        "netfilter OUTPUT drop; unreachable: no route; error: other), since start.", "reason")
    for reason in SEND_ERRORS:
        send_errors.add((reason,), snap.send_errors.get(reason, 0))
    flows = gauge("wgnest_probe_flows",
                   "Distinct (address, mark, device) flows the prober cycles through.")
    flows.add((), snap.flows)
    per_round = gauge(
        "wgnest_probe_flows_per_round",
        "Flows one round probes (--probe.max-rate x --probe.interval, or all of them).")
    per_round.add((), snap.flows_per_round)
    skipped = gauge(
        "wgnest_probe_targets_skipped",
        "Probe targets left out, by reason (not_selected: --probe.device/--probe.peer; "
        "no_recent_handshake: no tunnel probe to a peer without a handshake for 3 minutes).",
        "reason")
    for reason in SKIP_REASONS:
        skipped.add((reason,), snap.skipped.get(reason, 0))
    return send_errors, flows, per_round, skipped


def _peer_samples(device: str, public_key: str, paths: dict[str, SeriesSnapshot],
                  verdict: PeerLatency) -> list[tuple[tuple[str, str, str], float]]:
    """The peer's median samples: the real path and, when its flow differs (a nested
    peer), the direct one."""
    medians: list[tuple[tuple[str, str, str], float]] = []
    if verdict.real_path:
        real, direct = paths[verdict.real_path], direct_of(paths)
        medians_of = verdict.median
        for path, series in ((verdict.real_path, real), ("direct", direct)):
            if series is None or (path == "direct" and _same_flow(series, real)):
                continue
            value = medians_of.get(path)
            if value is not None:
                medians.append(((device, public_key, path), value))
    return medians


class ProbeLines:
    """Each peer's median lines as last written, with the verdict they were written from:
    the prober keeps a series' snapshot until it is probed again, so most peers come back
    with the very same series, peer_verdict() with the very same verdict, and their lines
    are reused. (Anomaly lines are written each time, through one %-format per device:
    keeping 10,000 of them took 1.5 MB.)"""

    def __init__(self) -> None:
        # by public key: the verdict, which is the same object only for the same peer, names
        # the device (a key on two devices only misses; no tuple key for 10,000 peers)
        self.peers: dict[str, tuple[PeerLatency, str]] = {}


def probe_text(snap: ProbeSnapshot, ratio: float, min_excess: float, cache: ProbeLines) -> bytes:
    """exposition(probe_families(snap, ratio, min_excess, detail=False)), byte for byte,
    reusing from `cache` (which then holds this render's) the lines of unchanged peers."""
    median, anomaly = _median_and_anomaly()
    median_form, anomaly_form = light_format(median), light_format(anomaly)
    if median_form is None or anomaly_form is None:  # (every name here is valid: never taken)
        raise ValueError("a probe family cannot be written by the fast path")
    median_line, anomaly_line = median_form[1], anomaly_form[1]
    old, fresh = cache.peers, {}
    medians: list[str] = []
    anomalies: list[str] = []
    formats: dict[str, str | None] = {}  # device -> key_format of the anomaly family
    for device, public_key, paths in peers_series(snap):
        verdict = peer_verdict(device, public_key, paths, ratio, min_excess)
        hit = old.get(public_key)
        if hit is not None and hit[0] is verdict:
            lines = hit[1]
        else:
            samples = _peer_samples(device, public_key, paths, verdict)
            lines = "".join([median_line(values, value) for values, value in samples])
        fresh[public_key] = (verdict, lines)
        medians.append(lines)
        if device not in formats:
            formats[device] = key_format(anomaly, device)
        fmt, flag = formats[device], int(verdict.anomaly)
        anomalies.append(fmt % (public_key, sample_value(flag))
                         if fmt is not None and not needs_escape(public_key)
                         else anomaly_line((device, public_key), flag))
    cache.peers = fresh
    return b"".join([(median_form[0] + "".join(medians)).encode(),
                     (anomaly_form[0] + "".join(anomalies)).encode(),
                     exposition(_prober_families(snap))])
