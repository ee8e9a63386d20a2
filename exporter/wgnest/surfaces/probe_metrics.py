"""Metric families and per-peer verdicts from one ProbeSnapshot (no I/O, never waits)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    HistogramMetricFamily,
    Metric,
)

from wgnest.analysis.latency import peer_verdict
from wgnest.model.probes import BUCKETS, PATHS, ProbeSnapshot, SeriesSnapshot
from wgnest.surfaces.exposition import Family, counter, gauge

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
    rtt = HistogramMetricFamily("wireguard_probe_rtt_seconds",
                                "ICMP echo round-trip time per peer and path.", labels=DPP)
    sent = counter("wireguard_probe_packets_sent", "Echo requests sent per peer and path.",
                    *DPP)
    received = counter("wireguard_probe_packets_received",
                        "Matching echo replies received per peer and path.", *DPP)
    median = gauge("wireguard_peer_rtt_seconds",
                    "Median ICMP round-trip time of the last probes: of the path the tunnel "
                    "really takes (tunnel, else transport) and, when it differs, of the "
                    "direct path.", *DPP)
    over = gauge("wireguard_peer_latency_overhead_ratio",
                  "Median RTT of the path the tunnel really takes over the direct path's; "
                  "absent if unknown.", *DP)
    anomaly = gauge("wireguard_peer_latency_anomaly",
                     "1 if the tunnel is markedly slower than the direct path or than its own "
                     "baseline.", *DP)
    rank = {p: i for i, p in enumerate(PATHS)}
    peers: dict[tuple[str, str], dict[str, SeriesSnapshot]] = {}
    for key, s in sorted(snap.series.items(), key=lambda kv: (kv[0][:2], rank.get(kv[0][2], 9))):
        peers.setdefault((key[0], key[1]), {})[key[2]] = s
        if detail:
            buckets = [(repr(float(b)), c) for b, c in zip(BUCKETS, s.buckets, strict=True)]
            rtt.add_metric(list(key), [*buckets, ("+Inf", s.received)], s.rtt_sum)
            sent.add(key, s.sent)
            received.add(key, s.received)
    for (device, public_key), paths in peers.items():
        verdict = peer_verdict(device, public_key, paths, ratio, min_excess)
        if detail and verdict.ratio is not None:
            over.add((device, public_key), verdict.ratio)
        anomaly.add((device, public_key), int(verdict.anomaly))
        if verdict.real_path:
            real, direct = paths[verdict.real_path], paths.get("direct")
            for path, series in ((verdict.real_path, real), ("direct", direct)):
                if series is None or (path == "direct" and _same_flow(series, real)):
                    continue
                value = verdict.median.get(path)
                if value is not None:
                    median.add((device, public_key, path), value)
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
    per_peer: tuple[Metric | Family, ...] = (
        (rtt, sent, received, over, median, anomaly) if detail else (median, anomaly))
    yield from (*per_peer, send_errors, flows, per_round, skipped)
