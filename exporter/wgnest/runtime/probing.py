"""The prober as `wgnest check` and `wgnest serve` run it: targets from the newest
snapshot, and a one-shot measurement for `check`."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence

from wgnest.analysis.latency import PeerLatency, peer_latencies
from wgnest.analysis.paths import PeerPath
from wgnest.model.host import Snapshot
from wgnest.model.probes import ProbeSnapshot, ProbeTarget
from wgnest.probe.prober import Prober
from wgnest.probe.targets import probe_targets

log = logging.getLogger(__name__)


def make_prober(args: argparse.Namespace,
                state: Callable[[], tuple[Snapshot, Sequence[PeerPath]] | None]) -> Prober:
    explicit = dict(args.probe_targets)
    last: list[tuple[Snapshot, list[ProbeTarget]]] = []  # targets of the newest snapshot

    def targets() -> list[ProbeTarget]:
        """Derived once per snapshot, not once per probe round."""
        current = state()
        if current is None:
            return []
        if not last or last[0][0] is not current[0]:
            last[:] = [(current[0], probe_targets(current[0], current[1], explicit))]
        return last[0][1]

    return Prober(targets, interval=args.probe_interval, timeout=args.probe_timeout)


def measure_latency(args: argparse.Namespace, snap: Snapshot, paths: list[PeerPath]
                    ) -> tuple[dict[tuple[str, str], PeerLatency] | None, ProbeSnapshot | None]:
    """Probe every path `--probe.count` times, then judge each peer's latency."""
    prober = make_prober(args, lambda: (snap, paths))
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
