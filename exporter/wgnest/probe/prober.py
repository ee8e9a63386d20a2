"""The background prober: ICMP echo to each peer's tunnel, transport and direct paths.

Scrapes read snapshot(), a copy taken under a lock; they never wait for a probe. A round
sends one echo per unique (address, mark, device) flow, then collects replies with select()
until every flow answered or the timeout. A reply counts only if its id, sequence, source
and random payload token all match (raw sockets see every echo reply on the host).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import random
import select
import socket
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

from wgnest.model.failures import SourceFailure
from wgnest.model.probes import (
    BUCKETS,
    RTT_LOST,
    ProbeSnapshot,
    ProbeTarget,
    SeriesKey,
    SeriesSnapshot,
    code_rtt,
    rtt_code,
    series_order,
)
from wgnest.periodic import Periodic
from wgnest.probe.icmp import Channel, ChannelKey, IcmpChannel, Reply, system_probe_mode

DRAIN_EVERY = 64  # sends between reads of the replies that arrived meanwhile
PACE_STEP = 0.01  # seconds: paced sends go out together within this step
SEQUENCES = 1 << 16  # ICMP sequence numbers: a round sends at most this many at once
_TOKEN = 16  # random bytes leading each payload; the payload is 56 bytes like ping's
HINTS = {"eperm": " (needs CAP_NET_RAW, or a gid inside net.ipv4.ping_group_range)"}


def _reason(err: OSError) -> str:
    """Why one probe could not go out: "eperm" (e.g. a netfilter OUTPUT drop), "unreachable"
    (no route), "error"."""
    if err.errno in (errno.EPERM, errno.EACCES):
        return "eperm"
    if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL):
        return "unreachable"
    return "error"


_NO_COUNTS = array("q", bytes(8 * len(BUCKETS)))  # (shared: a series' counts never change)


def new_series(target: ProbeTarget, window_size: int, block_size: int, blocks: int,
               histograms: bool) -> SeriesSnapshot:
    """A target's series before its first probe: no RTT codes yet (a gateway's series not
    probed yet hold no array); `blocks` baseline entries of `block_size` answered probes
    each (0: no baseline, the direct path's)."""
    return SeriesSnapshot(target, 0, 0, _NO_COUNTS if histograms else (), 0.0, (),
                          window_size, window_size + block_size, blocks=blocks)


def probed(s: SeriesSnapshot, rtt: float | None, error: str) -> SeriesSnapshot:
    """`s` after one more probe (`rtt` None: lost), as a new snapshot. The store holds a
    series as its snapshot alone (a gateway's 10,000 series: no second object each); the
    new one has its own array of codes, made at its full size at the first probe, so a
    snapshot a reader holds never changes: the window's ring, then the block in progress
    and the baseline's ring of block medians (see SeriesSnapshot)."""
    block_size, blocks = s.baseline_from - s.window_size, s.blocks
    codes = array("H", s.codes or bytes(
        2 * (s.baseline_from + blocks if blocks else s.window_size)))
    code = RTT_LOST if rtt is None else rtt_code(rtt)
    window_at, pending, blocks_at = s.window_at, s.pending, s.blocks_at
    if s.window_size:
        codes[window_at] = code
        window_at = (window_at + 1) % s.window_size
    received, rtt_sum, buckets = s.received, s.rtt_sum, s.buckets
    if rtt is not None:
        received, rtt_sum = received + 1, rtt_sum + rtt
    if rtt is not None and buckets:  # cumulative: one more in each from the RTT's own on
        buckets = array("q", buckets)
        for i in range(bisect.bisect_left(BUCKETS, rtt), len(buckets)):
            buckets[i] += 1
    if rtt is not None and blocks:
        at = s.window_size
        codes[at + pending] = code
        pending += 1
        if pending == block_size:
            block = sorted(codes[at:at + block_size])  # (codes sort as RTTs)
            low, high = block[(block_size - 1) // 2], block[block_size // 2]
            codes[s.baseline_from + blocks_at] = (
                low if low == high else rtt_code(code_rtt(low) / 2 + code_rtt(high) / 2))
            blocks_at, pending = (blocks_at + 1) % blocks, 0
    return SeriesSnapshot(s.target, s.sent + 1, received, buckets, rtt_sum, codes,
                          s.window_size, s.baseline_from, error, window_at, pending,
                          blocks_at, blocks)


def with_baseline(s: SeriesSnapshot, block_size: int, blocks: int) -> SeriesSnapshot:
    """`s` keeping a baseline from now on (its tunnel path went: the verdict reads this one
    now); the window so far stays."""
    window = s.codes[:s.window_size]
    codes: Sequence[int] = (
        array("H", window) + array("H", bytes(2 * (block_size + blocks))) if window else ())
    return replace(s, codes=codes, baseline_from=s.window_size + block_size, pending=0,
                   blocks_at=0, blocks=blocks)


ProbeFlow = tuple[IPv4Address | IPv6Address, int, str]  # (address, mark, device)
FlowKeys: TypeAlias = "SeriesKey | tuple[SeriesKey, ...]"  # one key, or the keys of several
Result = tuple[float | None, str]  # (rtt or None when lost, error)


def keys_of(keys: FlowKeys) -> tuple[SeriesKey, ...]:
    """The keys of a flow's series (a SeriesKey's first item is a string; a tuple of keys'
    is a key)."""
    return (keys,) if keys and isinstance(keys[0], str) else keys


@dataclass(slots=True)
class _Pending:
    flow: ProbeFlow
    ident: int
    token: bytes
    wall: int | None  # time.time_ns() at send, against kernel receive stamps
    mono: float  # clock() at send
    note: str = ""


def _key(flow: ProbeFlow) -> ChannelKey:
    return flow[0].version, flow[1], flow[2]


class Prober:
    def __init__(self, targets: Callable[[], Sequence[ProbeTarget]], interval: float = 1.0,
                 timeout: float = 1.0, privileged: bool | None = None, window: int = 30,
                 baseline: int = 300, baseline_block: int = 10,
                 clock: Callable[[], float] = time.monotonic,
                 max_rate: float | None = None,
                 skipped: Callable[[], Mapping[str, int]] = dict,
                 histograms: bool = True) -> None:
        """`targets()` returns the current plan; a new plan must be a new list (it is
        indexed once, when it first appears). `max_rate`: probes per second across all
        targets (None: every flow each round); a round then probes the urgent flows and
        the next ones in turn, sent evenly. `histograms`: count RTTs per bucket (off, a
        series' snapshot has no buckets)."""
        self._histograms = histograms
        self._targets, self.timeout, self.max_rate, self._skipped = (
            targets, timeout, max_rate, skipped)
        self._cursor = 0
        self._flows = self._per_round = 0
        self._source: Sequence[ProbeTarget] | None = None  # the target list last adopted
        # every flow, in target order: its series' key, or keys when several share it
        self._by_flow: dict[ProbeFlow, FlowKeys] = {}
        self._urgent: set[ProbeFlow] = set()  # the nested, looping and anomalous ones
        # the urgent flows and the others, in that order: made once per plan
        self._split: tuple[list[ProbeFlow], list[ProbeFlow]] | None = None
        self.window, self.baseline, self._clock = window, baseline, clock
        # the baseline stands for the last `baseline` answered probes: the medians of
        # blocks of `baseline_block` of them
        self.baseline_block = max(1, baseline_block)
        self._blocks = -(-baseline // self.baseline_block) if baseline > 0 else 0
        self._raw, self.disabled_reason = system_probe_mode(privileged)
        self._ident = random.getrandbits(16)  # ours alone: concurrent Probers never collide
        self._seq = random.getrandbits(16)
        self._lock, self._round_lock = threading.Lock(), threading.Lock()
        self._loop = Periodic("wgnest-prober", interval, self.run_once, self._round_failed,
                              clock)
        self._channels: dict[ChannelKey, Channel] = {}
        # every series as its latest snapshot, by peer then path (series_order): a snapshot
        # of the prober copies this dict, never the 20,000 series one by one
        self._store: dict[SeriesKey, SeriesSnapshot] = {}
        self._failure: SourceFailure | None = None
        self._round_seconds = 0.0
        self._rounds = 0
        self._send_errors: Counter[str] = Counter()

    @property
    def interval(self) -> float:
        return self._loop.interval

    @interval.setter
    def interval(self, value: float) -> None:
        self._loop.interval = value

    def _open_channel(self, family: int, mark: int, device: str) -> Channel:
        return IcmpChannel(family, mark, device, self._raw)

    def snapshot(self) -> ProbeSnapshot:
        with self._lock:
            series = dict(self._store)
            return ProbeSnapshot(series, self._failure, self._round_seconds, self._rounds,
                                 dict(self._send_errors), self._flows, self._per_round,
                                 dict(self._skipped()))

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 2.0) -> None:
        if not self._loop.stop(timeout):
            return  # still in a round: leave its sockets alone
        with self._round_lock:
            self._close_channels(keep=())

    def _round_failed(self, exc: Exception) -> None:
        with self._lock:
            self._failure = SourceFailure("probe", "other", f"{type(exc).__name__}: {exc}")

    def _close_channels(self, keep: Iterable[ChannelKey]) -> None:
        for key in set(self._channels) - set(keep):
            self._channels.pop(key).close()

    def run_once(self) -> None:
        """One round: probe this round's flows once, then fold the results into the store."""
        with self._round_lock:
            began = self._clock()
            source = self._targets()
            with self._lock:
                if self.disabled_reason:
                    self._store.clear()
                    self._failure = SourceFailure("probe", "disabled", self.disabled_reason)
                    return
                if source is not self._source:  # a new plan (once per snapshot)
                    self._adopt(source)
            flows = self._this_round()
            results: dict[ProbeFlow, Result] = {}
            unopened: list[str] = []
            used: set[ChannelKey] = set()
            for start in range(0, len(flows), SEQUENCES):  # sequence numbers never repeat
                self._probe(flows[start:start + SEQUENCES], results, unopened, used,
                            began + start / self.max_rate if self.max_rate else None)
            self._close_channels(keep=used)
            with self._lock:
                store = self._store
                for flow, result in results.items():
                    for key in keys_of(self._by_flow.get(flow, ())):
                        if (series := store.get(key)) is not None:
                            store[key] = probed(series, *result)
                self._failure = SourceFailure(
                    "probe", "eperm", "; ".join(unopened[:3]) + HINTS["eperm"]) if unopened \
                    else None
                self._round_seconds = self._clock() - began
                self._rounds += 1

    def _adopt(self, source: Sequence[ProbeTarget]) -> None:
        """Take a new target list: series of vanished targets go, new ones start at zero,
        and the flows (urgent first) are indexed once, not every round. Under the lock."""
        if source == self._source:  # the same targets (unchanged peers keep the very objects)
            self._source = source
            return
        targets = {(t.device, t.public_key, t.path): t for t in source}
        old, fresh = self._store, {}
        by_flow: dict[ProbeFlow, list[SeriesKey]] = {}
        urgent: set[ProbeFlow] = set()
        tunnelled = {(t.device, t.public_key) for t in source if t.path == "tunnel"}
        for key, t in targets.items():  # new ones appear at zero before the probe
            s = old.get(key)
            # a baseline only where the latency verdict reads one: the tunnel path, else
            # the transport (as analysis.latency picks the "real" path)
            keep = t.path == "tunnel" or (t.path == "transport" and key[:2] not in tunnelled)
            if s is None:
                s = new_series(t, self.window, self.baseline_block, self._blocks if keep else 0,
                               self._histograms)
            elif keep and not s.blocks and self._blocks:  # its tunnel path went
                s = with_baseline(s, self.baseline_block, self._blocks)
            if s.target != t:
                s = replace(s, target=t)
            fresh[key] = s  # vanished targets: their series disappear
            flow = (t.address, t.mark, t.bind_device)
            by_flow.setdefault(flow, []).append(key)  # the store's own key object
            if t.urgent:
                urgent.add(flow)
        self._source, self._urgent = source, urgent
        # a flow's one key alone (a tuple of one is 48 bytes, for most of 10,000 flows)
        self._by_flow = {flow: keys[0] if len(keys) == 1 else tuple(keys)
                         for flow, keys in by_flow.items()}
        self._split = None
        # the snapshot's series in one order (by peer, then path), whatever the plan's
        # (urgent peers first): every reader groups them the same way, and a peer's verdict
        # is found again by the very same series in the same order (a series' snapshot is
        # kept until it changes: only new, probed or changed series are new objects)
        self._store = {k: fresh[k] for k in sorted(fresh, key=series_order)}

    def _this_round(self) -> list[ProbeFlow]:
        """The flows of this round: all of them, or within the budget the urgent ones and
        the next others in turn, so every flow is reached within flows / budget rounds."""
        ordered = self._by_flow
        budget = len(ordered)
        if self.max_rate is not None:
            budget = min(budget, max(1, int(self.max_rate * self.interval)))
        self._flows, self._per_round = len(ordered), budget
        if budget == len(ordered):
            chosen = list(ordered)
        else:
            if self._split is None:  # (once per plan, not per round)
                self._split = ([f for f in ordered if f in self._urgent],
                               [f for f in ordered if f not in self._urgent])
            urgent_flows, rest = self._split
            first = urgent_flows[:budget]
            take = budget - len(first)
            start = self._cursor % len(rest) if rest else 0
            end = start + min(take, len(rest))
            chosen = first + rest[start:end] + rest[:max(0, end - len(rest))]
            self._cursor = start + take
        return sorted(chosen, key=lambda f: (f[0].version, int(f[0]), f[1], f[2]))

    def _probe(self, flows: Sequence[ProbeFlow], results: dict[ProbeFlow, Result],
               unopened: list[str], used: set[ChannelKey], paced_from: float | None) -> None:
        """One echo per flow, then replies until all answered or timeout. A socket that
        cannot be opened fails the prober (`unopened`); a send that fails is that flow's.
        With `paced_from`, the sends are spread at --probe.max-rate from that time on."""
        pending: dict[tuple[ChannelKey, int], _Pending] = {}
        stop = self._loop.stopping if self._loop.on_this_thread() else None
        # a few sends together every PACE_STEP, not one wake-up per send (500/s: 100)
        burst = max(1, int((self.max_rate or 0) * PACE_STEP))
        tokens = os.urandom(_TOKEN * len(flows))  # one read of the system's randomness
        for count, flow in enumerate(flows, 1):
            if paced_from is not None and self.max_rate:
                due = paced_from + (count - 1) // burst * burst / self.max_rate
                while (left := due - self._clock()) > 0 and not (stop and stop.is_set()):
                    self._wait_replies(used, pending, results, left)
            elif count % DRAIN_EVERY == 0:  # read what came back so far: the buffer never fills
                for k in used:
                    self._receive(k, pending, results)
            key = _key(flow)
            try:
                ch = self._channels.get(key) or self._open_channel(*key)
            except OSError as e:  # not sent: no socket for this family, mark and device
                where = f" dev {flow[2]}" if flow[2] else ""
                unopened.append(f"socket for {flow[0]} mark {flow[1]:#x}{where}: "
                                f"{e.strerror or e}")
                continue
            self._channels[key] = ch
            used.add(key)
            self._seq = (self._seq + 1) & 0xFFFF
            token, mono = tokens[(count - 1) * _TOKEN:count * _TOKEN], self._clock()
            try:
                wall = ch.send(str(flow[0]), self._ident, self._seq, token + bytes(56 - _TOKEN))
            except OSError as e:  # unreachable or filtered: sent and lost, this target's fact
                reason = _reason(e)
                self._send_errors[reason] += 1
                results[flow] = (None, f"{reason}: send to {flow[0]} mark {flow[1]:#x}: "
                                       f"{e.strerror or e}")
                continue
            pending[key, self._seq] = _Pending(flow, ch.ident(self._ident), token, wall, mono)
        deadline = self._clock() + self.timeout
        while pending and not (stop and stop.is_set()) and (left := deadline - self._clock()) > 0:
            self._wait_replies(used, pending, results, min(left, 0.1))
        results.update({p.flow: (None, p.note) for p in pending.values()})

    def _wait_replies(self, used: set[ChannelKey],
                      pending: dict[tuple[ChannelKey, int], _Pending],
                      results: dict[ProbeFlow, Result], seconds: float) -> None:
        """Up to `seconds` of waiting, reading every reply that arrives meanwhile."""
        chans = {self._channels[k].fileno(): k for k in used}
        if not chans:
            time.sleep(seconds)
            return
        for fd in select.select(list(chans), [], [], seconds)[0]:
            self._receive(chans[fd], pending, results)

    def _receive(self, key: ChannelKey, pending: dict[tuple[ChannelKey, int], _Pending],
                 results: dict[ProbeFlow, Result]) -> None:
        replies, _err = self._channels[key].receive()  # an ICMP error on the socket: a loss
        for r in replies:
            self._match(key, r, pending, results)

    def _match(self, key: ChannelKey, r: Reply, pending: dict[tuple[ChannelKey, int], _Pending],
               results: dict[ProbeFlow, Result]) -> None:
        now, p = self._clock(), pending.get((key, r.sequence))
        if p is None or r.ident != p.ident:
            return  # not ours, or a duplicate of an answered probe
        if not r.echo:
            p.note = f"unreachable: ICMP error from {r.source}"  # still lost
            return
        family = socket.AF_INET if p.flow[0].version == 4 else socket.AF_INET6
        with contextlib.suppress(OSError):
            if (socket.inet_pton(family, r.source.split("%")[0]) == p.flow[0].packed
                    and r.payload[:_TOKEN] == p.token):  # else foreign or forged: never accept
                rtt = now - p.mono
                if r.stamp and p.wall and 0 <= r.stamp - p.wall <= rtt * 1e9:
                    rtt = (r.stamp - p.wall) / 1e9  # the kernel's receive time: no userspace delay
                results[p.flow] = (rtt, "")
                del pending[key, r.sequence]
