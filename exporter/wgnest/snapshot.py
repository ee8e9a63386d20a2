"""Build one Snapshot: read every source, then ask the kernel's route lookup for each
transport flow and for each candidate fix. A failing source is recorded, never raised."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wgnest.analysis.paths import fix_flows, transport_flows
from wgnest.model import Device, Flow, RouteAnswer, Snapshot
from wgnest.sources.errors import SourceError
from wgnest.sources.netstate import NetState
from wgnest.sources.route_lookup import CachedRouteLookup
from wgnest.sources.wg_kernel import kernel_devices, open_wireguard
from wgnest.sources.wg_uapi import uapi_devices

log = logging.getLogger(__name__)
T = TypeVar("T")
COLLECTORS = ("links", "rules", "wireguard_kernel", "wireguard_uapi", "route_lookup")


@dataclass
class Reader:
    """The host's sources, kept open between refreshes."""

    uapi_dir: Path = Path("/var/run/wireguard")
    uapi_timeout: float = 1.0
    netstate: NetState = field(default_factory=NetState)
    lookup: CachedRouteLookup = field(default_factory=CachedRouteLookup)
    open_wg: Callable[[], Any] = open_wireguard

    def close(self) -> None:
        self.netstate.close()
        self.lookup.close()


class _Run:
    def __init__(self) -> None:
        self.errors: dict[str, tuple[str, str]] = {}
        self.durations: dict[str, float] = {}

    def timed(self, collector: str, fn: Callable[[], T]) -> T | None:
        start = time.monotonic()
        try:
            return fn()
        except SourceError as exc:
            self.fail(collector, exc.reason, str(exc))
            return None
        finally:
            self.durations[collector] = self.durations.get(collector, 0.0) + (
                time.monotonic() - start)

    def fail(self, collector: str, reason: str, message: str) -> None:
        if collector not in self.errors:
            self.errors[collector] = (reason, message)

    def device_errors(self, collector: str, errors: dict[str, str]) -> None:
        for name, text in errors.items():
            reason, _, message = text.partition(": ")
            self.fail(collector, reason, f"{name}: {message}")


def take(reader: Reader, now: Callable[[], float] = time.time) -> Snapshot:
    run = _Run()
    links = run.timed("links", reader.netstate.links) or []
    rules = run.timed("rules", reader.netstate.rules) or []
    defaults = run.timed("rules", reader.netstate.defaults) or []
    kdevs, kerr = run.timed(
        "wireguard_kernel", lambda: kernel_devices(links, reader.open_wg)) or ([], {})
    run.device_errors("wireguard_kernel", kerr)
    skip = {d.name for d in kdevs} | set(kerr)
    udevs, uerr = run.timed("wireguard_uapi", lambda: uapi_devices(
        links, reader.uapi_dir, reader.uapi_timeout, skip=skip)) or ([], {})
    run.device_errors("wireguard_uapi", uerr)
    devices: tuple[Device, ...] = tuple(sorted(kdevs + udevs, key=lambda d: d.name))
    lookups: dict[Flow, RouteAnswer] = run.timed(
        "route_lookup", lambda: reader.lookup.lookup(transport_flows(devices))) or {}
    snap = Snapshot(now(), devices, tuple(links), tuple(rules), tuple(defaults), lookups)
    # A fix is only a fix if the kernel agrees: ask it again with each candidate mark.
    fixes = run.timed("route_lookup", lambda: reader.lookup.lookup(fix_flows(snap))) or {}
    for collector, (reason, message) in run.errors.items():
        log.debug("source %s failed (%s): %s", collector, reason, message)
    return dataclasses.replace(snap, lookups={**lookups, **fixes}, errors=run.errors,
                               durations=run.durations)
