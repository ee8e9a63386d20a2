"""Metric families and per-peer verdicts from one ProbeSnapshot (no I/O, never waits)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from wgnest.analysis.latency import peer_verdict
from wgnest.model.probes import BUCKETS, PATHS, ProbeSnapshot, SeriesSnapshot

DP = ["device", "public_key"]
SEND_ERRORS = ("eperm", "unreachable", "error")  # the prober's per-target send failures
SKIP_REASONS = ("not_selected", "no_recent_handshake")
DPP = [*DP, "path"]


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
        verdict = peer_verdict(device, public_key, paths, ratio, min_excess)
        if verdict.ratio is not None:
            over.add_metric([device, public_key], verdict.ratio)
        anomaly.add_metric([device, public_key], int(verdict.anomaly))
    send_errors = CounterMetricFamily(
        "wgnest_probe_send_errors",
        "Echo requests the kernel refused to send, by reason (eperm: filtered, e.g. a "
        "netfilter OUTPUT drop; unreachable: no route; error: other), since start.",
        labels=["reason"])
    for reason in SEND_ERRORS:
        send_errors.add_metric([reason], snap.send_errors.get(reason, 0))
    flows = GaugeMetricFamily("wgnest_probe_flows",
                              "Distinct (address, mark, device) flows the prober cycles through.")
    flows.add_metric([], snap.flows)
    per_round = GaugeMetricFamily(
        "wgnest_probe_flows_per_round",
        "Flows one round probes (--probe.max-rate x --probe.interval, or all of them).")
    per_round.add_metric([], snap.flows_per_round)
    skipped = GaugeMetricFamily(
        "wgnest_probe_targets_skipped",
        "Probe targets left out, by reason (not_selected: --probe.device/--probe.peer; "
        "no_recent_handshake: no tunnel probe to a peer without a handshake for 3 minutes).",
        labels=["reason"])
    for reason in SKIP_REASONS:
        skipped.add_metric([reason], snap.skipped.get(reason, 0))
    yield from (rtt, sent, received, over, anomaly, send_errors, flows, per_round, skipped)
