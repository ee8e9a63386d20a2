"""Build one HostSnapshot: a Snapshot of each selected network namespace, read by a worker
thread inside it, then the cross-namespace facts the analysis needs.

- A kernel device moved into another namespace keeps its UDP socket where it was made
  (https://www.wireguard.com/netns/). Its birth namespace is the one with a UDP socket on
  the device's port and no device of its own there; the route lookups of its flows are
  asked in that namespace. This search runs with `--netns self` too, whenever a device
  here has no socket here.
- A transport whose next hop is a local address of another namespace read (a container
  whose default route is the host's bridge) is forwarded there: its input route lookup is
  asked in that namespace, which may route it into a tunnel of its own.

A namespace whose read is not done by the deadline keeps its previous read and is reported
as failed: a refresh never waits on one slow namespace.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from wgnest.analysis.fixes import fix_flows
from wgnest.analysis.flows import transport_flows
from wgnest.analysis.forwarding import forwarded_flows
from wgnest.analysis.view import HostView
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Device, Flow, RouteAnswer
from wgnest.model.netns import Guest, HostSnapshot, Moved, NetnsSnapshot, single
from wgnest.snapshot import Reader, take
from wgnest.sources.errors import SourceError
from wgnest.sources.netns import Key, Namespace, NetnsSpec, Worker, discover
from wgnest.sources.udp_sockets import udp_listen_ports

log = logging.getLogger(__name__)
T = TypeVar("T")
FORWARD_HOPS = 3  # namespaces a transport is followed through
READ_AT_ONCE = 4  # namespaces read at the same time


@dataclass
class _Found:
    """A namespace searched for the socket of a moved device."""

    ns: Namespace
    name: str  # as reported: the read's name ("" for our own with --netns self)
    read: NetnsSnapshot | None  # its snapshot, if read
    ports: frozenset[tuple[int, int]] | None = None  # its UDP sockets; None: unknown


@dataclass
class _Slot:
    ns: Namespace
    worker: Worker
    reader: Reader
    pending: Future[NetnsSnapshot] | None = None
    last: NetnsSnapshot | None = None


def _failure(ns: str, exc: BaseException) -> SourceFailure:
    if isinstance(exc, SourceError):
        return SourceFailure("netns", exc.reason, f"netns {ns}: {' '.join(str(exc).split())}",
                             ns)
    return SourceFailure("netns", "other", f"netns {ns}: {type(exc).__name__}: {exc}", ns)


class HostReader:
    """The host's namespaces, each with its reader kept open between refreshes."""

    def __init__(self, spec: NetnsSpec, uapi_dir: Path = Path("/var/run/wireguard"),
                 uapi_timeout: float = 1.0, deadline: float | None = None) -> None:
        self.spec = spec
        self._uapi_dir, self._uapi_timeout = uapi_dir, uapi_timeout
        # per-namespace reads run in parallel: the whole refresh waits at most this long
        # (one UAPI read's timeout and a second: a namespace with two stuck sockets, read
        # one after the other, is late, not everyone)
        self._deadline = deadline if deadline is not None else uapi_timeout + 1.0
        self.own = Reader(uapi_dir=uapi_dir, uapi_timeout=uapi_timeout)
        self._slots: dict[Key, _Slot] = {}
        self._searched: set[Key] = set()  # entered to search for a moved device's socket
        # Namespaces are read in parallel, but Python runs one thread at a time: more than a
        # few at once only adds switching (20 namespaces: 240 ms at once, 150 ms four at a
        # time). A namespace stuck on a UAPI socket holds one of these, never all.
        self._running = threading.BoundedSemaphore(READ_AT_ONCE)

    def close(self) -> None:
        self.own.close()
        for key in list(self._slots):
            self._drop(key)

    # -- namespaces and their workers

    def _drop(self, key: Key) -> None:
        slot = self._slots.pop(key)
        reader = slot.reader
        slot.worker.submit(reader.close)
        slot.worker.close()

    def _slot(self, ns: Namespace) -> _Slot:
        slot = self._slots.get(ns.key)
        if slot is not None and slot.ns != ns:
            # renamed, or its processes (and so its UAPI directories) changed: the worker
            # stays inside, the reader reads the directories found now
            dirs = ns.uapi_dirs or (self._uapi_dir,)
            slot.reader.uapi_dir, slot.reader.more_uapi_dirs = dirs[0], dirs[1:]
            slot.ns = ns
        if slot is None:
            dirs = ns.uapi_dirs or (self._uapi_dir,)
            reader = Reader(uapi_dir=dirs[0], uapi_timeout=self._uapi_timeout,
                            more_uapi_dirs=dirs[1:])
            slot = self._slots[ns.key] = _Slot(ns, Worker(ns), reader)
        return slot

    def _keep(self, keys: Iterable[Key]) -> None:
        """Drop the workers of namespaces gone or no longer wanted (this also lets the kernel
        free a deleted namespace: the worker thread was holding it)."""
        wanted = set(keys)
        for key in [k for k in self._slots if k not in wanted]:
            self._drop(key)

    def _read(self, slot: _Slot, labelled: bool) -> NetnsSnapshot:
        """On the namespace's worker: its snapshot, and its addresses if labelled."""
        ns, reader = slot.ns, slot.reader
        with self._running:
            return self._read_now(ns, reader, labelled)

    def _read_now(self, ns: Namespace, reader: Reader, labelled: bool) -> NetnsSnapshot:
        snap = take(reader)
        addresses: tuple[tuple[int, str], ...] = ()
        if labelled:
            try:
                addresses = tuple(reader.netstate.addresses())
            except SourceError as exc:
                snap = dataclasses.replace(snap, failures=(*snap.failures,
                                                           exc.failure("links")))
        return NetnsSnapshot(ns.name, snap, ns.path, True, ns.enter, (), addresses)

    def _gather(self, jobs: dict[Key, Future[T]], ends: float) -> dict[Key, T | BaseException]:
        wait_all(list(jobs.values()), timeout=max(0.0, ends - time.monotonic()))
        out: dict[Key, T | BaseException] = {}
        for key, fut in jobs.items():
            if not fut.done():
                out[key] = SourceError(f"no complete read within {self._deadline:g}s", "timeout")
                continue
            exc = fut.exception()
            out[key] = exc if exc is not None else fut.result()
        return out

    # -- the snapshot

    def take(self) -> HostSnapshot:
        began = time.monotonic()
        host = self._take_self(began) if self.spec.mode == "self" else self._take_many(began)
        host.durations["netns"] = time.monotonic() - began
        return host

    def _take_self(self, began: float) -> HostSnapshot:
        snap = take(self.own)
        view = HostView(snap)
        moved = [d for d in snap.devices if view.socket_elsewhere(d)]
        if not moved:
            self._keep(())
            self._searched = set()
            return single(snap)
        here = NetnsSnapshot("", snap)
        namespaces, moves, failures = self._births({"": here}, {"": moved}, began, labelled=False)
        return HostSnapshot(snap.taken_at, tuple(namespaces.values()), False, tuple(moves),
                            tuple(failures))

    def _take_many(self, began: float) -> HostSnapshot:
        found, errors = discover(self.spec, self._uapi_dir)
        failures = [dataclasses.replace(exc.failure("netns"), netns=ns) for ns, exc in errors]
        slots = {ns.key: self._slot(ns) for ns in found}
        self._keep(set(slots) | self._searched)
        jobs: dict[Key, Future[NetnsSnapshot]] = {}
        for key, slot in slots.items():
            if slot.pending is None:
                slot.pending = slot.worker.submit(functools.partial(self._read, slot, True))
            jobs[key] = slot.pending
        got = self._gather(jobs, began + self._deadline)
        namespaces: dict[str, NetnsSnapshot] = {}
        for key, result in got.items():
            slot = slots[key]
            if slot.pending is not None and slot.pending.done():
                slot.pending = None  # done: asked again next refresh; else still reading
            if isinstance(result, BaseException):
                failures.append(_failure(slot.ns.name, result))
                if slot.last is not None and slot.pending is not None:
                    namespaces[slot.ns.name] = slot.last  # still reading: the previous read
                continue
            slot.last = result
            namespaces[slot.ns.name] = result
        moved = {name: [d for d in ns.snapshot.devices if HostView(ns.snapshot).socket_elsewhere(d)]
                 for name, ns in namespaces.items()}
        moved = {k: v for k, v in moved.items() if v}
        moves: list[Moved] = []
        if not moved:
            self._searched = set()  # the namespaces only searched are let go next refresh
        if moved:
            namespaces, moves, more = self._births(namespaces, moved, began, labelled=True)
            failures += more
        namespaces = self._forward(namespaces, began)
        taken = max((ns.snapshot.taken_at for ns in namespaces.values()), default=time.time())
        return HostSnapshot(taken, tuple(namespaces.values()), True, tuple(moves),
                            tuple(failures))

    # -- moved kernel devices

    def _search(self, namespaces: dict[str, NetnsSnapshot], began: float
                ) -> tuple[dict[Key, _Found], list[SourceFailure]]:
        """Every namespace that can be found, with its UDP ports: from its read, or (entered
        for this alone) asked now. Keyed by namespace, named as read (our own is "" with
        --netns self)."""
        found, errors = discover(NetnsSpec("all"), self._uapi_dir, everything=True)
        failures = [dataclasses.replace(exc.failure("netns"), netns=ns) for ns, exc in errors]
        read = {s.ns.key: s.ns.name for s in self._slots.values() if s.ns.name in namespaces}
        if "" in namespaces:
            read.update({ns.key: "" for ns in found if ns.own})
        out: dict[Key, _Found] = {}
        jobs: dict[Key, Future[frozenset[tuple[int, int]]]] = {}
        for ns in found:
            name = read.get(ns.key, ns.name)
            known = namespaces.get(name) if ns.key in read else None
            out[ns.key] = _Found(ns, name, known)
            if known is not None and known.snapshot.udp_ports is not None:
                out[ns.key].ports = known.snapshot.udp_ports
            elif not (ns.own and name == ""):
                jobs[ns.key] = self._slot(ns).worker.submit(udp_listen_ports)
        for key, result in self._gather(jobs, began + self._deadline).items():
            if isinstance(result, BaseException):
                failures.append(_failure(out[key].name, result))
            else:
                out[key].ports = result
        # kept while moved devices are searched for; a namespace gone is let go now
        self._searched = set(out)
        self._keep(self._searched | {s.ns.key for s in self._slots.values()
                                     if s.ns.name in namespaces})
        return out, failures

    def _births(self, namespaces: dict[str, NetnsSnapshot], moved: dict[str, list[Device]],
                began: float, labelled: bool
                ) -> tuple[dict[str, NetnsSnapshot], list[Moved], list[SourceFailure]]:
        """The namespace holding each moved device's socket: one with a UDP socket on its
        port and no WireGuard device of its own on that port (a namespace only searched is
        read whole to know its devices, when its ports make it a candidate)."""
        everyone, failures = self._search(namespaces, began)

        def has_port(f: _Found, port: int) -> bool:
            return f.ports is not None and any(p == port for _family, p in f.ports)

        wanted = {d.listen_port for devices in moved.values() for d in devices}
        jobs: dict[Key, Future[NetnsSnapshot]] = {
            key: self._slot(f.ns).worker.submit(functools.partial(
                self._read, self._slot(f.ns), labelled))
            for key, f in everyone.items()
            if f.read is None and any(has_port(f, port) for port in wanted)}
        for key, result in self._gather(jobs, began + self._deadline).items():
            if isinstance(result, BaseException):
                failures.append(_failure(everyone[key].name, result))
                everyone[key].ports = None  # unknown: never a candidate, never a guess
            else:
                everyone[key].read = dataclasses.replace(result, reported=False)
        moves: list[Moved] = []
        guests: dict[Key, list[Guest]] = {}
        for home, devices in moved.items():
            for d in devices:
                births = [key for key, f in everyone.items() if f.name != home
                          and has_port(f, d.listen_port) and f.read is not None
                          and all(x.listen_port != d.listen_port
                                  for x in f.read.snapshot.devices)]
                if len(births) == 1:
                    moves.append(Moved(home, d.name, everyone[births[0]].name))
                    guests.setdefault(births[0], []).append(Guest(home, d))
                    continue
                names = ", ".join(everyone[k].name for k in births)
                why = (f"no UDP socket on port {d.listen_port} in this network namespace "
                       "(the device was made in another one, which routes its transport), "
                       + ("and none of the namespaces wgnest can enter has it"
                          if not births else f"and {len(births)} namespaces have one ({names})"))
                moves.append(Moved(home, d.name, "", why))
        hosting: dict[Key, Future[NetnsSnapshot]] = {}
        for key, guest_list in guests.items():
            f = everyone[key]
            if f.read is None:
                continue  # (a birth namespace is always read: see above)
            hosting[key] = self._slot(f.ns).worker.submit(functools.partial(
                self._host_guests, self._slot(f.ns), f.read, tuple(guest_list)))
        for key, result in self._gather(hosting, began + self._deadline).items():
            name = everyone[key].name
            if isinstance(result, BaseException):
                failures.append(_failure(name, result))
                moves = [Moved(m.netns, m.device, "", f"its socket's namespace {name} could "
                               f"not be read: {result}") if m.birth == name else m
                         for m in moves]
                continue
            namespaces[result.name] = result
        return namespaces, moves, failures

    def _host_guests(self, slot: _Slot, ns: NetnsSnapshot, guests: tuple[Guest, ...]
                     ) -> NetnsSnapshot:
        """On the birth namespace's worker: its snapshot with the lookups of its guests'
        flows and of their candidate fixes."""
        devices = [g.device for g in guests]
        lookups = slot.reader.lookup.lookup(transport_flows(devices))
        snap = dataclasses.replace(ns.snapshot, lookups={**ns.snapshot.lookups, **lookups})
        fixes = slot.reader.lookup.lookup(fix_flows(snap, devices))
        snap = dataclasses.replace(snap, lookups={**snap.lookups, **fixes})
        return dataclasses.replace(ns, snapshot=snap, guests=guests)

    # -- forwarding into another namespace

    def _forward(self, namespaces: dict[str, NetnsSnapshot], began: float
                 ) -> dict[str, NetnsSnapshot]:
        """Ask each namespace the input route lookups of the transports forwarded to it."""
        slots = {s.ns.name: s for s in self._slots.values()}
        for _hop in range(FORWARD_HOPS):
            wanted: dict[str, list[Flow]] = forwarded_flows(namespaces)
            jobs: dict[Key, Future[dict[Flow, RouteAnswer]]] = {}
            names_of: dict[Key, str] = {}
            for name, flows in wanted.items():
                slot = slots.get(name)
                if slot is None or not flows:
                    continue
                todo = [f for f in flows if f not in namespaces[name].snapshot.lookups]
                if not todo:
                    continue
                jobs[slot.ns.key] = slot.worker.submit(
                    functools.partial(slot.reader.lookup.lookup, todo))
                names_of[slot.ns.key] = name
            if not jobs:
                break
            for key, result in self._gather(jobs, began + self._deadline).items():
                name = names_of[key]
                if isinstance(result, BaseException):
                    log.debug("forwarded lookups in %s failed: %s", name, result)
                    continue
                ns = namespaces[name]
                snap = dataclasses.replace(ns.snapshot,
                                           lookups={**ns.snapshot.lookups, **result})
                namespaces[name] = dataclasses.replace(ns, snapshot=snap)
        return namespaces
