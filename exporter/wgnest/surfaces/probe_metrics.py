"""Metric families and per-peer verdicts from one ProbeSnapshot (no I/O, never waits)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from wgnest.analysis.latency import latency_anomaly, median, overhead_ratio
from wgnest.probe.prober import BUCKETS, PATHS, ProbeSnapshot, SeriesSnapshot

DP = ["device", "public_key"]
DPP = [*DP, "path"]


@dataclass(frozen=True, slots=True)
class PeerLatency:
    device: str
    public_key: str
    median: Mapping[str, float | None]  # path -> median recent RTT (seconds); probed paths only
    loss: Mapping[str, float | None]  # path -> lost fraction of the recent window
    real_path: str  # "tunnel" when probed, else "transport"; "" if neither is
    ratio: float | None  # median(real) / median(direct)
    anomaly: bool
    reason: str


def peer_latency(snap: ProbeSnapshot, device: str, public_key: str, ratio: float = 1.5,
                 min_excess: float = 0.005) -> PeerLatency:
    """Medians, loss and the anomaly verdict of one peer, for `wgnest check` and the status page."""
    paths = {k[2]: s for k, s in snap.series.items() if k[:2] == (device, public_key)}
    return _verdict(device, public_key, paths, ratio, min_excess)


def peer_latencies(snap: ProbeSnapshot, peers: Iterable[tuple[str, str]], ratio: float = 1.5,
                   min_excess: float = 0.005) -> dict[tuple[str, str], PeerLatency]:
    """peer_latency() of many (device, public_key) at once. The series are grouped by peer
    once: a peer_latency() call per peer scans every series, quadratic in the peers."""
    grouped: dict[tuple[str, str], dict[str, SeriesSnapshot]] = {}
    for key, s in snap.series.items():
        grouped.setdefault((key[0], key[1]), {})[key[2]] = s
    return {(device, public_key): _verdict(device, public_key,
                                           grouped.get((device, public_key), {}), ratio,
                                           min_excess)
            for device, public_key in peers}


def _verdict(device: str, public_key: str, paths: Mapping[str, SeriesSnapshot], ratio: float,
             min_excess: float) -> PeerLatency:
    real, direct = paths.get("tunnel") or paths.get("transport"), paths.get("direct")
    if real is None:
        flag, reason = False, "no tunnel or transport probe"
        value = None
    else:
        flag, reason = latency_anomaly(real.recent, direct.recent if direct else (),
                                       real.baseline, ratio=ratio, min_excess=min_excess)
        value = overhead_ratio(real.recent, direct.recent) if direct else None
    return PeerLatency(device, public_key,
                       {p: median(s.recent) for p, s in sorted(paths.items())},
                       {p: s.loss for p, s in sorted(paths.items())},
                       real.target.path if real else "", value, flag, reason)


def probe_families(snap: ProbeSnapshot, ratio: float = 1.5,
                   min_excess: float = 0.005) -> Iterator[Metric]:
    rtt = HistogramMetricFamily("wireguard_probe_rtt_seconds",
                                "ICMP echo round-trip time per peer and path.", labels=DPP)
    sent = CounterMetricFamily("wireguard_probe_packets_sent",
                               "Echo requests sent per peer and path.", labels=DPP)
    received = CounterMetricFamily("wireguard_probe_packets_received",
                                   "Matching echo replies received per peer and path.",
                                   labels=DPP)
    over = GaugeMetricFamily(
        "wireguard_peer_latency_overhead_ratio",
        "Median RTT of the path the tunnel really takes over the direct path's; absent if "
        "unknown.", labels=DP)
    anomaly = GaugeMetricFamily(
        "wireguard_peer_latency_anomaly",
        "1 if the tunnel is markedly slower than the direct path or than its own baseline.",
        labels=DP)
    rank = {p: i for i, p in enumerate(PATHS)}
    peers: dict[tuple[str, str], dict[str, SeriesSnapshot]] = {}
    for key, s in sorted(snap.series.items(), key=lambda kv: (kv[0][:2], rank.get(kv[0][2], 9))):
        labels = list(key)
        buckets = [(repr(float(b)), c) for b, c in zip(BUCKETS, s.buckets, strict=True)]
        rtt.add_metric(labels, [*buckets, ("+Inf", s.received)], s.rtt_sum)
        sent.add_metric(labels, s.sent)
        received.add_metric(labels, s.received)
        peers.setdefault((key[0], key[1]), {})[key[2]] = s
    for (device, public_key), paths in peers.items():
        verdict = _verdict(device, public_key, paths, ratio, min_excess)
        if verdict.ratio is not None:
            over.add_metric([device, public_key], verdict.ratio)
        anomaly.add_metric([device, public_key], int(verdict.anomaly))
    yield from (rtt, sent, received, over, anomaly)
