"""The one background loop (wgnest.periodic)."""

from __future__ import annotations

import threading
import time

from wgnest.periodic import Periodic


def _calls(delay: float, wait: float) -> tuple[list[float], float]:
    calls: list[float] = []
    ran = threading.Event()

    def work() -> None:
        calls.append(time.monotonic())
        ran.set()

    loop = Periodic("test-periodic", 60.0, work)
    began = time.monotonic()
    loop.start(delay)
    ran.wait(wait)
    assert loop.stop(2.0)
    return calls, began


def test_a_loop_runs_at_once_unless_told_to_wait() -> None:
    calls, began = _calls(0.0, 2.0)
    assert len(calls) == 1  # the next is 60 s away
    assert calls[0] - began < 0.5
    calls, began = _calls(0.4, 2.0)
    assert len(calls) == 1
    assert calls[0] - began >= 0.4


def test_a_loop_stopped_while_it_waits_never_runs() -> None:
    calls, _ = _calls(30.0, 0.2)
    assert calls == []
