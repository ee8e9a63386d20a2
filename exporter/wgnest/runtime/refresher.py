"""The periodic scraper: refreshes the snapshot in the background and keeps the latest
diagnosis and its rendered exposition, so a scrape only copies bytes."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from wgnest.analysis.paths import PeerPath, diagnose
from wgnest.model import Snapshot
from wgnest.snapshot import COLLECTORS
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.metrics import SnapshotCollector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    """How a collector that runs elsewhere did: reason "" means it works."""

    reason: str = ""
    message: str = ""
    duration: float = 0.0


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
    exposition: bytes


def render(snap: Snapshot, paths: list[PeerPath], names: Mapping[str, str],
           errors_total: Mapping[str, int], collectors: Sequence[str] = COLLECTORS) -> bytes:
    return exposition(SnapshotCollector(snap, paths, names, errors_total, collectors).collect())


def _return_free_memory() -> None:
    """Give the memory of the previous snapshot back to the system (glibc keeps it)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


class Refresher:
    """Calls `take()` every `interval` seconds on its own thread."""

    def __init__(self, take: Callable[[], Snapshot], interval: float,
                 allow: Collection[tuple[str, str]] = (),
                 names: Callable[[], Mapping[str, str]] = dict,
                 extra: Callable[[], Mapping[str, Status]] | None = None,
                 extra_metrics: Callable[[], bytes] | None = None) -> None:
        """`extra` reports collectors that run elsewhere (the prober): name -> status;
        `extra_metrics` renders their metrics, appended to each refresh's exposition."""
        self._take, self._interval, self._allow, self._names = take, interval, allow, names
        self._extra, self._extra_metrics = extra, extra_metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state: State | None = None
        self._errors_total: Counter[str] = Counter()
        self._logged: dict[str, tuple[str, str]] = {}

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
        snap = self._take()
        collectors = list(COLLECTORS)
        if self._extra is not None:
            errors, durations = dict(snap.errors), dict(snap.durations)
            for name, status in self._extra().items():
                collectors.append(name)
                durations[name] = status.duration
                if status.reason:
                    errors[name] = (status.reason, status.message)
            snap = dataclasses.replace(snap, errors=errors, durations=durations)
        paths = diagnose(snap, self._allow)
        self._note_errors(snap)
        exposition = render(snap, paths, self._names(), self._errors_total, collectors)
        if self._extra_metrics is not None:
            try:
                exposition += self._extra_metrics()
            except Exception:  # their bug must not cost the other metrics
                log.exception("rendering extra metrics failed")
        return State(snap, paths, exposition)

    def _note_errors(self, snap: Snapshot) -> None:
        for collector, (reason, message) in snap.errors.items():
            self._errors_total[reason] += 1
            if self._logged.get(collector) != (reason, message):
                log.warning("source %s failed (%s): %s", collector, reason, message)
        for collector in set(self._logged) - set(snap.errors):
            log.info("source %s recovered", collector)
        self._logged = dict(snap.errors)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh_once()
            except Exception:
                log.exception("refresh failed")
                self._errors_total["other"] += 1
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wgnest-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
