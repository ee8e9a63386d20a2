"""The prober as `wgnest check` and `wgnest serve` run it: targets from the newest
snapshot, and a one-shot measurement for `check`."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence

from wgnest.analysis.latency import PeerLatency, anomalous_peers, peer_latencies
from wgnest.analysis.paths import PeerPath
from wgnest.model.host import Snapshot
from wgnest.model.probes import ProbeSnapshot, ProbeTarget
from wgnest.probe.prober import Prober
from wgnest.probe.targets import Selection, TargetCache, TargetPlan, probe_targets

log = logging.getLogger(__name__)
Current = tuple[Snapshot, Sequence[PeerPath], ProbeSnapshot | None]


def make_prober(args: argparse.Namespace,
                state: Callable[[], Current | None]) -> Prober:
    """`state()` gives the newest snapshot, its paths and the probe state it was rendered
    with (None: take the prober's own)."""
    explicit = dict(args.probe_targets)
    selection = Selection(args.probe_device, frozenset(args.probe_peers))
    last: list[tuple[Snapshot, TargetPlan]] = []  # the plan of the newest snapshot
    kept: TargetCache = {}  # the targets of each peer, for those that did not change
    # a direct path that is the transport's flow is one series, unless every path's detail
    # is asked for (each path's histogram)
    merge = not getattr(args, "probe_histograms", False)

    def plan() -> TargetPlan | None:
        """Derived once per snapshot, not once per probe round; anomalous peers (by the
        prober's own series so far) go first with the nested ones."""
        current = state()
        if current is None:
            return None
        if not last or last[0][0] is not current[0]:
            snap, paths, probes = current
            urgent = anomalous_peers(probes if probes is not None else prober.snapshot(),
                                     args.anomaly_ratio, args.anomaly_min_excess)
            last[:] = [(snap, probe_targets(snap, paths, explicit, selection, urgent, kept,
                                            merge))]
        return last[0][1]

    def targets() -> list[ProbeTarget]:
        current = plan()
        return current.targets if current is not None else []

    def skipped() -> dict[str, int]:
        return dict(last[0][1].skipped) if last else {}

    prober = Prober(targets, interval=args.probe_interval, timeout=args.probe_timeout,
                    max_rate=args.probe_max_rate, skipped=skipped,
                    histograms=getattr(args, "probe_histograms", False))
    return prober


def measure_latency(args: argparse.Namespace, snap: Snapshot, paths: list[PeerPath]
                    ) -> tuple[dict[tuple[str, str], PeerLatency] | None, ProbeSnapshot | None]:
    """Probe every path `--probe.count` times, then judge each peer's latency."""
    prober = make_prober(args, lambda: (snap, paths, None))
    if prober.disabled_reason:
        log.warning("latency not measured: %s", prober.disabled_reason)
        return None, None
    try:
        for i in range(max(1, args.probe_count)):
            if i:
                time.sleep(args.probe_interval)
            prober.run_once()
        probes = prober.snapshot()
    finally:
        prober.stop()
    if not probes.series:
        return None, probes
    return peer_latencies(probes, [(p.device, p.public_key) for p in paths],
                          args.anomaly_ratio, args.anomaly_min_excess), probes
