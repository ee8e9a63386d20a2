"""What the prober measured: targets, per-path series and the prober's own health."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from wgnest.model.failures import SourceFailure

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5)
PATHS = ("tunnel", "transport", "direct")
SeriesKey = tuple[str, str, str]  # (device, public_key, path)
_RANK = {p: i for i, p in enumerate(PATHS)}


def series_order(key: SeriesKey) -> tuple[str, str, int]:
    """The order series are listed and grouped in: by peer, then path as in PATHS."""
    return key[0], key[1], _RANK.get(key[2], len(_RANK))


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    device: str
    public_key: str
    path: str  # "tunnel", "transport" or "direct"
    address: IPv4Address | IPv6Address
    mark: int  # SO_MARK on the probe socket; 0 = none
    bind_device: str = ""  # SO_BINDTODEVICE: the underlay a route fix would use; "" = none
    urgent: bool = False  # nested, looping or anomalous: probed every round, budget or not


@dataclass(frozen=True, slots=True)
class SeriesSnapshot:
    target: ProbeTarget
    sent: int
    received: int
    buckets: Sequence[int]  # cumulative counts, one per BUCKETS bound; () without histograms
    rtt_sum: float  # seconds
    # RTTs of the last `window` probes, NaN for those unanswered, in no particular order:
    # the prober's own array, shared until the series is probed again (no copy per series)
    window: Sequence[float]
    # RTTs of the last `baseline` answered probes, in no particular order (a compact array;
    # none kept for the direct path, whose baseline no verdict reads)
    baseline: Sequence[float]
    error: str = ""  # why the last probe to this target failed to send; silence is no error

    @property
    def recent(self) -> list[float]:
        """RTTs of the window's answered probes, in no particular order."""
        return [x for x in self.window if x == x]  # (NaN != NaN: lost)

    @property
    def recent_sent(self) -> int:
        """Probes in the window, answered or not."""
        return len(self.window)

    @property
    def loss(self) -> float | None:
        """Lost fraction of the recent window; None when nothing was sent."""
        window = self.window
        return 1 - sum(x == x for x in window) / len(window) if window else None


@dataclass(frozen=True, slots=True)
class ProbeSnapshot:
    """The prober's series and health. `failure` is set only when the prober as a whole
    cannot work (no permission to open ICMP sockets, a round that raised); one target that
    cannot be reached or is filtered is that target's fact, in its series' `error`."""

    series: Mapping[SeriesKey, SeriesSnapshot] = field(default_factory=dict)
    failure: SourceFailure | None = None
    round_seconds: float = 0.0
    rounds: int = 0
    send_errors: Mapping[str, int] = field(default_factory=dict)  # reason -> count, since start
    flows: int = 0  # distinct (address, mark, device) flows among the targets
    flows_per_round: int = 0  # how many of them a round probes (the --probe.max-rate budget)
    skipped: Mapping[str, int] = field(default_factory=dict)  # reason -> targets not probed
