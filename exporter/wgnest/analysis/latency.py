"""Is a tunnel slower than its underlay? Medians of probe RTTs (seconds), no I/O.

"real" is the path the tunnel's packets really take (the tunnel path when it is probed,
else the transport path); "direct" is the same endpoint reached over the underlay. Medians
make single spikes and noise harmless; loss (missing samples) never flags anything alone.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from wgnest.model.probes import ProbeSnapshot, SeriesKey, SeriesSnapshot, series_order


def _finite(values: Sequence[float]) -> list[float]:
    return sorted(filter(math.isfinite, values))


def _middle(xs: list[float]) -> float | None:
    """Median of sorted finite values; None when there are none."""
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else xs[mid - 1] / 2 + xs[mid] / 2  # no overflow


def median(values: Sequence[float]) -> float | None:
    """Median of the finite values; None when there are none."""
    return _middle(_finite(values))


def overhead_ratio(real: Sequence[float], direct: Sequence[float]) -> float | None:
    """median(real) / median(direct); None if either is empty or the direct median <= 0."""
    return _ratio(median(real), median(direct))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


# (median RTT or None, how many values it is of: answered probes, or a baseline's entries,
# each the median of a block of them)
Summary = tuple["float | None", int]


def summary(values: Sequence[float]) -> Summary:
    """The median of the finite values and how many there are."""
    xs = _finite(values)
    return _middle(xs), len(xs)


def latency_anomaly(real: Sequence[float], direct: Sequence[float], baseline: Sequence[float],
                    *, ratio: float = 1.5, min_excess: float = 0.005, jump_ratio: float = 3.0,
                    min_samples: int = 3) -> tuple[bool, str]:
    """judge() over RTT lists (seconds; NaN for a lost probe)."""
    return judge(summary(real), summary(direct), summary(baseline), ratio=ratio,
                 min_excess=min_excess, jump_ratio=jump_ratio, min_samples=min_samples)


def judge(real: Summary, direct: Summary, baseline: Summary, *, ratio: float = 1.5,
          min_excess: float = 0.005, jump_ratio: float = 3.0,
          min_samples: int = 3) -> tuple[bool, str]:
    """(anomaly, one-line reason) from the medians of the real path's recent RTTs, the
    direct path's, and the real path's longer baseline.

    Anomaly when the real path is at least `ratio` times and `min_excess` seconds slower than
    direct, or its recent median jumped `jump_ratio` times (and `min_excess`) above its own
    baseline. Each median needs `min_samples` samples to count.
    """
    real_med, n = real
    if real_med is None or n < min_samples:
        # one string for every peer in this state (most of a gateway's, between probes)
        return False, sys.intern(f"not enough samples on the real path ({n} < {min_samples})")
    notes: list[str] = []
    direct_med, direct_n = direct
    if direct_med is not None and direct_n >= min_samples:
        excess = real_med - direct_med
        if direct_med > 0 and real_med / direct_med >= ratio and excess >= min_excess:
            return True, (f"real path {_ms(real_med)} is {real_med / direct_med:.1f}x direct "
                          f"{_ms(direct_med)} (+{_ms(excess)})")
        rel = f"{real_med / direct_med:.2f}x" if direct_med > 0 else "n/a"
        notes.append(f"real {_ms(real_med)} vs direct {_ms(direct_med)} ({rel})")
    else:
        notes.append(f"real {_ms(real_med)}, direct path has too few samples")
    base_med, base_n = baseline
    if base_med is not None and base_n >= min_samples:
        excess = real_med - base_med
        if base_med > 0 and real_med >= jump_ratio * base_med and excess >= min_excess:
            return True, (f"real path {_ms(real_med)} jumped {real_med / base_med:.1f}x above "
                          f"its baseline {_ms(base_med)} (+{_ms(excess)})")
        notes.append(f"baseline {_ms(base_med)}")
    return False, "ok: " + ", ".join(notes)


def _ratio(real: float | None, direct: float | None) -> float | None:
    return None if real is None or direct is None or direct <= 0 else real / direct


@dataclass(frozen=True, slots=True)
class PeerLatency:
    device: str
    public_key: str
    paths: tuple[str, ...]  # the probed paths, as the prober lists them (one tuple shared)
    series: tuple[SeriesSnapshot, ...]  # their series, in that order (the prober's own)
    real_path: str  # "tunnel" when probed, else "transport"; "" if neither is
    ratio: float | None  # median(real) / median(direct)
    anomaly: bool
    reason: str

    # Medians and losses are worked out when read (a report, the status page, a changed
    # peer's metric line): a gateway's 10,000 verdicts would otherwise keep two dicts each.
    # A snapshot's windows never change (the prober copies a shared array before its next
    # probe), so they are the ones the verdict was made from.
    def _listed(self) -> list[tuple[str, SeriesSnapshot]]:
        """The paths sorted by name, "direct" included where the prober's plan left it out
        as the transport's own flow (direct_of: the same probes)."""
        listed = dict(zip(self.paths, self.series, strict=True))
        direct = direct_of(listed)
        if "direct" not in listed and direct is not None:
            listed["direct"] = direct
        return sorted(listed.items())

    @property
    def median(self) -> dict[str, float | None]:
        """path -> median recent RTT (seconds); probed paths only."""
        return {p: s.recent_median[0] for p, s in self._listed()}

    @property
    def loss(self) -> dict[str, float | None]:
        """path -> lost fraction of the recent window."""
        return {p: s.loss for p, s in self._listed()}


def _peer_of(item: tuple[SeriesKey, SeriesSnapshot]) -> tuple[str, str]:
    return item[0][0], item[0][1]


def peers_series(snap: ProbeSnapshot) -> Iterator[tuple[str, str, dict[str, SeriesSnapshot]]]:
    """Each peer's series: (device, public key, path -> series), peers sorted and each
    peer's paths in PATHS order, one peer at a time (a dict for each of 10,000 peers at
    once was 2 MiB more at every refresh)."""
    ordered = sorted(snap.series.items(), key=lambda kv: series_order(kv[0]))
    for (device, public_key), group in itertools.groupby(ordered, key=_peer_of):
        yield device, public_key, {key[2]: s for key, s in group}


def anomalous_peers(snap: ProbeSnapshot, ratio: float = 1.5,
                    min_excess: float = 0.005) -> set[tuple[str, str]]:
    """(device, public key) of each peer whose latency verdict is an anomaly."""
    return {(device, public_key) for device, public_key, paths in peers_series(snap)
            if peer_verdict(device, public_key, paths, ratio, min_excess).anomaly}


def peer_latencies(snap: ProbeSnapshot, peers: Iterable[tuple[str, str]], ratio: float = 1.5,
                   min_excess: float = 0.005) -> dict[tuple[str, str], PeerLatency]:
    """Medians, loss and the anomaly verdict of each (device, public_key), for `wgnest
    check` and the status page. The series are grouped by peer once (scanning them per
    peer would be quadratic in the peers)."""
    grouped = {(device, public_key): paths for device, public_key, paths in peers_series(snap)}
    return {(device, public_key): peer_verdict(device, public_key,
                                           grouped.get((device, public_key), {}), ratio,
                                           min_excess)
            for device, public_key in peers}


# The last verdict of each peer, by public key (its device is checked): the prober keeps a
# series' snapshot until it is probed again, so most peers come back with the very same
# objects and their verdict (a pure function of them, held in it) is not computed again
# (10,000 peers: 80 ms, twice a refresh). Checked by identity, never by id(): the verdict
# holds the series.
# One dict per (ratio, min_excess) judged with (serve has one pair; each caller reads the
# dict of its own, so a verdict is never handed to a caller with other thresholds).
_VERDICTS: dict[tuple[float, float], dict[str, PeerLatency]] = {}
_VERDICTS_MAX = 1 << 17
_THRESHOLDS_MAX = 4
# one tuple of path names for every peer probed on the same paths (a few combinations)
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}


def path_names(names: Iterable[str]) -> tuple[str, ...]:
    """Path names as one tuple shared by every peer with the same ones."""
    named = tuple(names)
    return _NAMES.setdefault(named, named) if len(_NAMES) < 64 else named


def same_series(names: tuple[str, ...], series: tuple[SeriesSnapshot, ...],
                paths: Mapping[str, SeriesSnapshot]) -> bool:
    """`paths` are the very series (`names`, `series`) kept from before, in that order:
    the prober keeps a series' snapshot until it changes, so identity says unchanged."""
    return (len(series) == len(paths) and all(map(operator.eq, names, paths))
            and all(map(operator.is_, series, paths.values())))


def peer_verdict(device: str, public_key: str, paths: Mapping[str, SeriesSnapshot], ratio: float,
                 min_excess: float) -> PeerLatency:
    kept = _VERDICTS.get((ratio, min_excess))
    if kept is None:
        if len(_VERDICTS) >= _THRESHOLDS_MAX:
            _VERDICTS.clear()
        kept = _VERDICTS.setdefault((ratio, min_excess), {})
    hit = kept.get(public_key)
    if hit is not None and hit.device == device and same_series(hit.paths, hit.series, paths):
        return hit
    verdict = _peer_verdict(device, public_key, paths, ratio, min_excess)
    if len(kept) >= _VERDICTS_MAX:
        kept.clear()
    kept[public_key] = verdict
    return verdict


def direct_of(paths: Mapping[str, SeriesSnapshot]) -> SeriesSnapshot | None:
    """The peer's direct series; the transport's when the prober's plan left out a direct
    path that is the transport's own flow (probe_targets(merge=True): the same probes)."""
    return paths.get("direct") or paths.get("transport")


def _peer_verdict(device: str, public_key: str, paths: Mapping[str, SeriesSnapshot],
                  ratio: float, min_excess: float) -> PeerLatency:
    transport = paths.get("transport")
    direct = direct_of(paths)
    real = paths.get("tunnel") or transport
    if real is None:
        flag, reason = False, "no tunnel or transport probe"
        value = None
    else:
        # (medians of the windows' answered probes: a lost one is left out there)
        real_med = real.recent_median
        direct_med = direct.recent_median if direct else (None, 0)
        flag, reason = judge(real_med, direct_med, real.baseline_median, ratio=ratio,
                             min_excess=min_excess)
        value = _ratio(real_med[0], direct_med[0])
    return PeerLatency(device, public_key, path_names(paths), tuple(paths.values()),
                       real.target.path if real else "", value, flag, reason)
