"""What the prober measured: targets, per-path series and the prober's own health."""

from __future__ import annotations

import bisect
import math
from array import array
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


# An RTT is kept as a uint16 code on a log scale (2 bytes, where a float in an array is 8):
# 0 is a ring slot not filled yet, 1 a probe without an answer, 2..65535 the RTTs from
# 100 ns (and below) to 100 s (and above), 0.032 % a step, so a decoded RTT is within
# 0.016 % of the measured one.
RTT_EMPTY, RTT_LOST = 0, 1
_RTT_FLOOR = 1e-7  # seconds: code 2
_RTT_TOP = 100.0  # seconds: code 65535
_RTT_SCALE = 65533 / math.log(_RTT_TOP / _RTT_FLOOR)  # codes per e-fold


def rtt_code(rtt: float) -> int:
    """The code of an RTT in seconds (see RTT_EMPTY); RTT_LOST for NaN."""
    if rtt != rtt:
        return RTT_LOST
    if not rtt > _RTT_FLOOR:
        return 2
    if rtt >= _RTT_TOP:  # (and inf)
        return 65535
    return min(65535, 2 + round(math.log(rtt / _RTT_FLOOR) * _RTT_SCALE))


def code_rtt(code: int) -> float:
    """The RTT in seconds of a code; NaN for RTT_LOST (and RTT_EMPTY)."""
    return _RTT_FLOOR * math.exp((code - 2) / _RTT_SCALE) if code > RTT_LOST else math.nan


def _significant(rtt: float) -> float:
    """`rtt` to 3 significant digits, as ping shows it: a median of 40 ms reads 0.04, not
    0.039998879292838185 (a code's step hides below the 4th digit, and a median moves by
    more than 0.5 % from one probe to the next)."""
    return round(rtt, 2 - math.floor(math.log10(rtt)))


def median_of_codes(codes: Sequence[int]) -> tuple[float | None, int]:
    """The median RTT (seconds) of the answered probes among `codes`, and their count:
    sorted as codes (which sort as their RTTs), only the middle decoded."""
    xs = sorted(codes)
    skip = bisect.bisect_right(xs, RTT_LOST)  # the empty slots and lost probes sort first
    n = len(xs) - skip
    if not n:
        return None, 0
    low, high = xs[skip + (n - 1) // 2], xs[skip + n // 2]
    middle = code_rtt(low) if low == high else code_rtt(low) / 2 + code_rtt(high) / 2
    return _significant(middle), n


@dataclass(frozen=True, slots=True)
class SeriesSnapshot:
    """One target's counts and rings. `codes` is an array of RTT codes the prober never
    changes (a probe makes a new snapshot with a new array): its first `window_size`
    slots are the last probes, RTT_LOST for the unanswered; from `baseline_from` on, the
    baseline: each the median of a block of answered probes (a remedian: the median of
    those is the median of the hundreds of RTTs they stand for, within the spread of a
    block), none for the direct path, whose baseline no verdict reads. The slots between
    are the prober's block in progress. Slots are in no particular order; RTT_EMPTY ones
    are not filled yet."""

    target: ProbeTarget
    sent: int
    received: int
    buckets: Sequence[int]  # cumulative counts, one per BUCKETS bound; () without histograms
    rtt_sum: float  # seconds
    codes: Sequence[int]  # () until the first probe
    window_size: int
    baseline_from: int
    error: str = ""  # why the last probe to this target failed to send; silence is no error
    # the prober's places in `codes` (it keeps a series as this snapshot alone): where the
    # next probe's code goes, the answered probes in the block in progress, where the next
    # block's median goes, and how many block medians the baseline keeps (0: no baseline)
    window_at: int = 0
    pending: int = 0
    blocks_at: int = 0
    blocks: int = 0

    @classmethod
    def of(cls, target: ProbeTarget, sent: int, received: int, buckets: Sequence[int],
           rtt_sum: float, window: Sequence[float], baseline: Sequence[float] = (),
           error: str = "") -> SeriesSnapshot:
        """A snapshot of these RTTs (seconds; NaN in `window` for a lost probe), coded."""
        codes = array("H", map(rtt_code, window))  # (NaN: RTT_LOST)
        codes.extend(rtt_code(x) for x in baseline if x == x)
        return cls(target, sent, received, buckets, rtt_sum, codes, len(window), len(window),
                   error)

    @property
    def window(self) -> tuple[float, ...]:
        """RTTs (seconds) of the last probes, NaN for those unanswered."""
        return tuple(code_rtt(c) for c in self.codes[:self.window_size] if c)

    @property
    def baseline(self) -> tuple[float, ...]:
        """The baseline's RTTs (seconds): medians of blocks of answered probes."""
        return tuple(code_rtt(c) for c in self.codes[self.baseline_from:] if c)

    @property
    def recent_median(self) -> tuple[float | None, int]:
        """The median RTT (seconds) of the window's answered probes, and their count."""
        return median_of_codes(self.codes[:self.window_size])

    @property
    def baseline_median(self) -> tuple[float | None, int]:
        """The baseline's median RTT (seconds), and how many entries it is of: blocks of
        answered probes (the verdict counts a baseline from its third: 30 answered probes,
        half a minute on a client probed every second, 20-30 min on a gateway whose series
        are probed every 40-60 s)."""
        return median_of_codes(self.codes[self.baseline_from:])

    @property
    def recent(self) -> list[float]:
        """RTTs of the window's answered probes, in no particular order."""
        return [code_rtt(c) for c in self.codes[:self.window_size] if c > RTT_LOST]

    @property
    def recent_sent(self) -> int:
        """Probes in the window, answered or not."""
        window = self.codes[:self.window_size]
        return len(window) - window.count(RTT_EMPTY)

    @property
    def loss(self) -> float | None:
        """Lost fraction of the recent window; None when nothing was sent."""
        window = self.codes[:self.window_size]
        sent = len(window) - window.count(RTT_EMPTY)
        return window.count(RTT_LOST) / sent if sent else None


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
