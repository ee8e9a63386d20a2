"""The one-line verdict of `wgnest check` and the status page, with Nagios exit codes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from wgnest.analysis.latency import PeerLatency
from wgnest.analysis.paths import PathVerdict, PeerPath
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Snapshot


class Nagios(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


# Without these the diagnosis cannot be trusted at all.
ESSENTIAL = ("links", "route_lookup")
# What lets a source be read when permission was denied.
PERMISSION_HINTS = {
    "wireguard_uapi": "needs root: wireguard-go's UAPI sockets are root-only (or "
                      "CAP_DAC_OVERRIDE)",
    "wireguard_kernel": "needs CAP_NET_ADMIN",
}
Latency = Mapping[tuple[str, str], PeerLatency]


@dataclass(frozen=True)
class CheckResult:
    code: Nagios
    summary: str


def check_result(snap: Snapshot, paths: Sequence[PeerPath], latency: Latency | None = None,
                 prober: SourceFailure | None = None) -> CheckResult:
    """CRITICAL for undeclared nesting and loops, UNKNOWN when an essential source or a
    permission failed, WARNING for unroutable or unknown paths, latency anomalies and any
    other failure (the prober's included), else OK."""
    count = path_counts(paths)
    counts = f"{len(snap.devices)} tunnels, {len(paths)} peers"
    if count.nested or count.loops:
        return CheckResult(Nagios.CRITICAL,
                           f"{count.nested} nested, {count.loops} routing loops ({counts})")
    broken = [f for f in snap.failures if f.collector in ESSENTIAL or f.reason == "eperm"]
    if broken:  # every one of them: each device's error, not the first
        return CheckResult(Nagios.UNKNOWN, "; ".join(_cannot(f) for f in broken))
    if not snap.devices and not snap.failures:
        return CheckResult(Nagios.OK, "no WireGuard devices found")
    problems = []
    if count.no_route:
        problems.append(f"{count.no_route} endpoints without a route")
    if count.unknown:
        problems.append(f"{count.unknown} endpoints whose route is unknown")
    anomalies = sum(lat.anomaly for lat in (latency or {}).values())
    if anomalies:
        problems.append(f"{anomalies} latency anomalies")
    problems += [str(f) for f in (*snap.failures, *([prober] if prober else []))]
    if problems:
        return CheckResult(Nagios.WARNING, "; ".join(problems) + f" ({counts})")
    tail = f", {count.allowed} nested as allowed" if count.allowed else ""
    return CheckResult(Nagios.OK, f"no nesting ({counts}{tail})")


def _cannot(f: SourceFailure) -> str:
    hint = PERMISSION_HINTS.get(f.collector, "") if f.reason == "eperm" else ""
    return f"cannot read {f.collector} ({f.reason}): {f.message}" + (f" ({hint})" if hint else "")


@dataclass(frozen=True)
class Counts:
    nested: int
    loops: int
    allowed: int
    no_route: int
    unknown: int


def path_counts(paths: Sequence[PeerPath]) -> Counts:
    return Counts(
        nested=sum(p.verdict == PathVerdict.NESTED and not p.allowed for p in paths),
        loops=sum(p.verdict == PathVerdict.LOOP for p in paths),
        allowed=sum(p.verdict == PathVerdict.NESTED and p.allowed for p in paths),
        no_route=sum(p.verdict == PathVerdict.NO_ROUTE for p in paths),
        unknown=sum(p.verdict == PathVerdict.UNKNOWN for p in paths),
    )
