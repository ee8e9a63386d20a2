"""The one background loop: call a function every `interval` seconds on a daemon thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `work()` now (or after `start(delay)`) and then every `interval` seconds
    (measured start to start) until stopped. An exception in one run is handed to
    `on_error` (default: logged) and the loop goes on: one failing run never ends the
    thread."""

    def __init__(self, name: str, interval: float, work: Callable[[], object],
                 on_error: Callable[[Exception], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.interval, self._work, self._clock = name, interval, work, clock
        self._on_error = on_error or self._log
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _log(self, exc: Exception) -> None:
        log.error("%s failed: %s: %s", self.name, type(exc).__name__, exc)

    def _loop(self, delay: float) -> None:
        if delay > 0 and self.stopping.wait(delay):
            return
        while not self.stopping.is_set():
            began = self._clock()
            try:
                self._work()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one run
                self._on_error(exc)
            self.stopping.wait(max(0.0, self.interval - (self._clock() - began)))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_this_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def start(self, delay: float = 0.0) -> None:
        """`delay`: seconds before the first run (the caller has just done one)."""
        if not self.running:
            self.stopping.clear()
            self._thread = threading.Thread(target=self._loop, args=(delay,), name=self.name,
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the loop to stop and wait up to `timeout`; True when it has ended."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True
