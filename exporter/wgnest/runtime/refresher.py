"""The periodic scraper: refreshes the snapshot in the background and keeps the latest
diagnosis and its rendered exposition, so a scrape only copies bytes.

The exposition is the snapshot's families (kept from the last refresh that worked), the
prober's (rendered with each refresh), then the exporter's own health, rendered on every
attempt: a refresh that fails shows as `wgnest_collector_success{collector="refresh"} 0`
while the snapshot timestamp stops, never as a healthy exporter serving old data.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

from wgnest.analysis.paths import PeerPath, diagnose
from wgnest.analysis.selection import EVERYTHING, Reported, reported
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Snapshot
from wgnest.model.probes import ProbeSnapshot
from wgnest.periodic import Periodic
from wgnest.snapshot import COLLECTORS
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.metrics import Health, exporter_families, wireguard_families

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off (process-wide) during a refresh: it allocates about a dozen objects
    per peer, keeps most and makes no cycles, yet every 700 allocations started a collection,
    some over the whole heap (10k peers: 26 full collections in 12 refreshes instead of 1,
    ~8 % of their CPU). Reference counting frees as usual meanwhile; the first collection
    after the refresh covers what it allocated."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class State:
    snapshot: Snapshot
    paths: list[PeerPath]
    probes: ProbeSnapshot | None  # the prober's state when this was rendered; None: no prober
    body: bytes  # the WireGuard and probe families
    exposition: bytes  # body + the exporter's health families
    # every device and its path, reported or not: what the next diagnosis can reuse
    analysed: tuple[Snapshot, list[PeerPath]] | None = None
    _gzip: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def gzipped(self) -> bytes:
        """The exposition gzip-compressed, once per refresh (on the first scrape that asks:
        no cost when no scraper does)."""
        if not self._gzip:
            self._gzip.append(gzip.compress(self.exposition, compresslevel=6, mtime=0))
        return self._gzip[0]


def render(snap: Snapshot, paths: list[PeerPath], names: Mapping[str, str]) -> bytes:
    return exposition(wireguard_families(snap, paths, names))


def _return_free_memory() -> None:
    """Give the memory of the previous snapshot back to the system (glibc keeps it)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None

ProbeRender = Callable[[ProbeSnapshot], bytes]


class Refresher:
    """Calls `take()` every `interval` seconds on its own thread."""

    def __init__(self, take: Callable[[], Snapshot], interval: float,
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
        self._collectors = (*COLLECTORS, *(("probe",) if probes else ()), "refresh")

    @property
    def state(self) -> State | None:
        with self._lock:
            return self._state

    def refresh_once(self) -> State:
        with _gc_paused():
            state = self._build()
        with self._lock:
            self._state = state
        _return_free_memory()
        return state

    def _build(self) -> State:
        began = time.monotonic()
        full = self._take()
        with self._lock:
            old = self._state
        analysed = diagnose(full, self._allow, old.analysed if old is not None else None)
        snap, paths = reported(full, analysed, self._only)
        probes = self._probes() if self._probes is not None else None
        body = render(snap, paths, self._names())
        if probes is not None and self._probe_metrics is not None:
            body += self._probe_metrics(probes)
        failures = (*snap.failures, *([probes.failure] if probes and probes.failure else []))
        durations = dict(snap.durations)
        if probes is not None:
            durations["probe"] = probes.round_seconds
        log.debug("refresh: %d devices, %d peers, %d failures, %.0f ms", len(snap.devices),
                  len(paths), len(failures), (time.monotonic() - began) * 1000)
        if snap.stale_sockets != self._stale:
            for path in set(snap.stale_sockets) - set(self._stale):
                log.warning("%s: a UAPI socket named after a link that is no TUN device: "
                            "left over by a daemon gone, not read", path)
            self._stale = snap.stale_sockets
        return State(snap, paths, probes, body, body + self._health(snap, failures, durations),
                     (full, analysed))

    def _health(self, snap: Snapshot, failures: tuple[SourceFailure, ...],
                durations: Mapping[str, float]) -> bytes:
        self._note(failures)
        health = Health(self._collectors, failures, durations, self._errors_total,
                        self._interval, len(snap.stale_sockets))
        return exposition(exporter_families(snap.taken_at, health))

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
        health = self._health(snap, (failure,), {})
        state = State(snap, old.paths if old else [], old.probes if old else None,
                      old.body if old else b"", (old.body if old else b"") + health,
                      old.analysed if old else None)
        with self._lock:
            self._state = state

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._loop.stop(timeout)
