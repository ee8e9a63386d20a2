"""The periodic scraper: refreshes the snapshot in the background and keeps the latest
diagnosis and its rendered exposition, so a scrape only copies bytes.

The exposition is the snapshot's families (kept from the last refresh that worked), the
prober's (rendered with each refresh), then the exporter's own health, rendered on every
attempt: a refresh that fails shows as `wgnest_collector_success{collector="refresh"} 0`
while the snapshot timestamp stops, never as a healthy exporter serving old data.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from wgnest.analysis.host import diagnose_host
from wgnest.analysis.paths import PeerPath
from wgnest.analysis.selection import EVERYTHING, Reported, reported
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Snapshot
from wgnest.model.netns import HostSnapshot, single
from wgnest.model.probes import ProbeSnapshot
from wgnest.periodic import Periodic
from wgnest.runtime.malloc import return_free_memory
from wgnest.snapshot import COLLECTORS
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.gzipped import Member, Piece, inflate, member_of
from wgnest.surfaces.metrics import (
    Health,
    LineCache,
    exporter_families,
    netns_families,
    wireguard_pieces,
)
from wgnest.surfaces.report import netns_failures

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off (process-wide) during a refresh: it allocates about a dozen objects
    per peer, keeps most and makes no cycles, yet every 700 allocations started a collection,
    some over the whole heap (10k peers: 26 full collections in 12 refreshes instead of 1,
    ~8 % of their CPU). Reference counting frees as usual meanwhile; what the refresh kept
    is then frozen (see _out_of_the_collector) before the GC is on again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class NetnsView:
    """One reported namespace as the surfaces show it."""

    name: str  # "" with --netns self
    path: str
    snapshot: Snapshot
    paths: list[PeerPath]


@dataclass(frozen=True)
class State:
    snapshot: Snapshot  # wgnest's own namespace (what the prober probes)
    paths: list[PeerPath]
    probes: ProbeSnapshot | None  # the prober's state when this was rendered; None: no prober
    body: tuple[Piece, ...]  # the WireGuard and probe families, compressed
    # those, then the exporter's health families: the exposition as one gzip member, in
    # chunks that are the pieces' own bytes (sent one after the other, never joined)
    gzipped: Member
    # per namespace, every device and its path, reported or not: what the next diagnosis
    # can reuse
    analysed: dict[str, tuple[Snapshot, list[PeerPath]]] | None = None
    # every reported namespace (one, named "", with --netns self)
    views: tuple[NetnsView, ...] = ()
    labelled: bool = False  # --netns other than self

    @property
    def exposition(self) -> bytes:
        """The exposition's text, inflated from `gzipped` on each call (what a scraper
        without gzip gets; Prometheus always asks for gzip): only the compressed form is
        kept (a 10,000-peer gateway: 3 MB, where the text is 13 MB)."""
        return inflate(self.gzipped)


def render_views(views: Sequence[NetnsView], labelled: bool, names: Mapping[str, str],
                 cache: LineCache) -> list[Piece]:
    if not labelled:
        if not views:
            return []
        return wireguard_pieces(views[0].snapshot, views[0].paths, names, cache)
    return [cache.deflater.piece(exposition(netns_families(
        [(v.name, v.path, v.snapshot, v.paths) for v in views], names)))]


FULL_COLLECTION_EVERY = 60  # refreshes between full collections (5 min at the default 5s)


def _out_of_the_collector(refreshes: int) -> None:
    """After a refresh, what it kept is frozen (gc.freeze): the cyclic GC, started by any
    thread's allocations, then walks only objects made since, never the snapshot, paths and
    lines of thousands of peers (10k peers: ~250,000 objects, a full walk ~60 ms), which
    reference counting frees when the next refresh replaces them. A cycle among frozen
    objects would outlive that: every FULL_COLLECTION_EVERY refreshes, one full collection
    over everything frees such cycles."""
    if refreshes % FULL_COLLECTION_EVERY == 0:
        gc.unfreeze()
        gc.collect()
    gc.freeze()



# renders the prober's state; the second argument is the netns label (None: unlabelled)
ProbeRender = Callable[[ProbeSnapshot, str | None], bytes]


class Refresher:
    """Calls `take()` every `interval` seconds on its own thread."""

    def __init__(self, take: Callable[[], Snapshot | HostSnapshot], interval: float,
                 allow: Collection[tuple[str, str]] = (),
                 names: Callable[[], Mapping[str, str]] = dict,
                 probes: Callable[[], ProbeSnapshot] | None = None,
                 probe_metrics: ProbeRender | None = None,
                 only: Reported = EVERYTHING) -> None:
        """`probes` reads the prober's state (it runs beside, not inside, the snapshot);
        `probe_metrics` renders it, appended to each refresh's exposition."""
        self._take, self._interval, self._allow, self._names = take, interval, allow, names
        self._probes, self._probe_metrics, self._only = probes, probe_metrics, only
        self._loop = Periodic("wgnest-refresh", interval, self.refresh_once, self._failed)
        self._lock = threading.Lock()
        self._state: State | None = None
        self._errors_total: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], str] = {}  # (collector, message) -> reason
        self._stale: tuple[str, ...] = ()
        self._lines = LineCache()  # only the refresh thread renders
        self._collectors = (*COLLECTORS, *(("probe",) if probes else ()), "refresh")
        self._refreshes = 0

    @property
    def state(self) -> State | None:
        with self._lock:
            return self._state

    def refresh_once(self) -> State:
        with _gc_paused():
            state = self._build()
            with self._lock:
                self._state = state  # (the previous one is freed here)
            self._refreshes += 1
            # frozen before the GC is on again: the thousands of objects this refresh made
            # would otherwise start a collection over all of them at the next allocation
            _out_of_the_collector(self._refreshes)
        return_free_memory()
        return state

    def _build(self) -> State:
        began = time.monotonic()
        taken = self._take()
        host = single(taken) if isinstance(taken, Snapshot) else taken
        with self._lock:
            old = self._state
        analysed = diagnose_host(host, self._allow, old.analysed if old is not None else None)
        views = []
        for ns in host.reported():
            snap, paths = reported(ns.snapshot, analysed[ns.name], self._only)
            views.append(NetnsView(ns.name, ns.path, snap, paths))
        own = next((v for v in views if not v.path), None)
        probes = self._probes() if self._probes is not None else None
        parts = render_views(views, host.labelled, self._names(), self._lines)
        if probes is not None and self._probe_metrics is not None:
            parts.append(self._lines.deflater.piece(self._probe_metrics(
                probes, own.name if own and host.labelled else None)))
        failures = netns_failures([(v.name, v.path, v.snapshot, v.paths) for v in views],
                                  host.failures)
        if probes and probes.failure:
            failures.append(probes.failure)
        durations = dict(own.snapshot.durations) if own is not None else {}
        if probes is not None:
            durations["probe"] = probes.round_seconds
        stale = tuple(p for v in views for p in v.snapshot.stale_sockets)
        log.debug("refresh: %d devices, %d peers, %d failures, %.0f ms%s",
                  sum(len(v.snapshot.devices) for v in views),
                  sum(len(v.paths) for v in views), len(failures),
                  (time.monotonic() - began) * 1000,
                  f", {len(views)} namespaces" if host.labelled else "")
        if stale != self._stale:
            for path in set(stale) - set(self._stale):
                log.warning("%s: a UAPI socket named after a link that is no TUN device: "
                            "left over by a daemon gone, not read", path)
            self._stale = stale
        snap = own.snapshot if own is not None else Snapshot(host.taken_at)
        health = self._health(host.taken_at, tuple(failures), durations, len(stale),
                              views if host.labelled else ())
        return State(snap, own.paths if own is not None else [], probes, tuple(parts),
                     member_of([*parts, health], self._lines.deflater),
                     {ns.name: (ns.snapshot, analysed[ns.name]) for ns in host.namespaces},
                     tuple(views), host.labelled)

    def _health(self, taken_at: float, failures: tuple[SourceFailure, ...],
                durations: Mapping[str, float], stale: int = 0,
                views: Sequence[NetnsView] = ()) -> Piece:
        self._note(failures)
        health = Health(self._collectors, failures, durations, self._errors_total,
                        self._interval, stale, tuple(v.name for v in views),
                        {v.name: v.snapshot.durations for v in views})
        return self._lines.deflater.piece(exposition(exporter_families(taken_at, health)))

    def _note(self, failures: tuple[SourceFailure, ...]) -> None:
        """Count every failure; log one line when a failure starts or changes, one when it
        ends (never one per refresh while it lasts)."""
        now = {(f.collector, f.message): f.reason for f in failures}
        for f in failures:
            self._errors_total[f.reason] += 1
            if (f.collector, f.message) not in self._logged:
                log.warning("%s", f)
        for collector in {c for c, _ in self._logged} - {c for c, _ in now}:
            log.info("%s recovered", collector)
        self._logged = now

    def _failed(self, exc: Exception) -> None:
        """A refresh that raised (a defect, not a source failure): the previous snapshot's
        families stay, the health says the refresh failed and the timestamp stops."""
        failure = SourceFailure("refresh", "other", f"{type(exc).__name__}: {exc}")
        if ("refresh", failure.message) not in self._logged:
            log.debug("refresh failed", exc_info=exc)
        with self._lock:
            old = self._state
        snap = old.snapshot if old is not None else Snapshot(0.0)
        health = self._health(snap.taken_at, (failure,), {}, 0,
                              old.views if old is not None and old.labelled else ())
        state = State(snap, old.paths if old else [], old.probes if old else None,
                      old.body if old else (), member_of([*(old.body if old else ()), health],
                                                            self._lines.deflater),
                      old.analysed if old else None, old.views if old else (),
                      old.labelled if old else False)
        with self._lock:
            self._state = state

    def start(self, after_a_refresh: bool = False) -> None:
        """`after_a_refresh`: refresh_once() has just run, so the first periodic refresh
        waits an interval (serve refreshes before it listens)."""
        self._loop.start(self._interval if after_a_refresh else 0.0)

    def stop(self, timeout: float = 1.0) -> None:
        self._loop.stop(timeout)
