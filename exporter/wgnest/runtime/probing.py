"""Probe flags and wiring shared by `wgnest check` and `wgnest serve`."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence

from wgnest.analysis.paths import PeerPath
from wgnest.model import IPAddress, Snapshot
from wgnest.probe.prober import Prober, ProbeSnapshot, ProbeTarget
from wgnest.probe.targets import parse_probe_target, probe_targets
from wgnest.runtime.refresher import Status

UNITS = {"ms": 0.001, "s": 1.0, "": 1.0}


def duration(value: str) -> float:
    """`5ms`, `1.5s` or `0.005` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|)\s*", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (e.g. 5ms, 1s)")
    return float(m[1]) * UNITS[m[2]]


def _target(value: str) -> tuple[tuple[str, str], IPAddress]:
    try:
        return parse_probe_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_probe_arguments(p: argparse.ArgumentParser, interval: float) -> None:
    p.add_argument("--probe.enabled", dest="probe", action=argparse.BooleanOptionalAction,
                   default=True, help="measure latency per tunnel with ICMP echo")
    p.add_argument("--probe.interval", dest="probe_interval", type=duration, default=interval)
    p.add_argument("--probe.timeout", dest="probe_timeout", type=duration, default=1.0)
    p.add_argument("--probe.target", dest="probe_targets", action="append", type=_target,
                   default=[], metavar="DEVICE[:PUBKEY]=IP",
                   help="address inside the tunnel to probe (default: the peer's single-host "
                        "allowed IP, when it has one)")
    p.add_argument("--anomaly.ratio", dest="anomaly_ratio", type=float, default=1.5,
                   help="flag a peer whose tunnel RTT is this many times the direct RTT")
    p.add_argument("--anomaly.min-excess", dest="anomaly_min_excess", type=duration,
                   default=0.005, help="... and at least this much slower (default 5ms)")


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


def probe_status(snap: ProbeSnapshot) -> Status:
    """Failure of the prober as a whole; an unreachable endpoint is the peer's problem."""
    if snap.ok or snap.reason in ("", "unreachable") or (snap.rounds == 0 and not snap.reason):
        return Status("", "", snap.round_seconds)
    return Status(snap.reason, snap.message, snap.round_seconds)
