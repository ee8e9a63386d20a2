"""Fault-test harness: a thread that scrapes `/metrics` every ~50 ms from inside the lab's
client namespace and records every status, parse result and latency; the running exporter
(its python pid, RSS, log); and fake UAPI servers bound inside the client namespace."""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.lab.lab import UAPI_DIR, Lab, in_netns, run

PORT = 9586
FAKE_UAPI = Path(__file__).with_name("fake_uapi.py")
PROBE_FAMILIES = ("wireguard_probe_", "wireguard_peer_latency_")
COLLECTORS = ("links", "rules", "wireguard_kernel", "wireguard_uapi", "route_lookup")


@dataclass(frozen=True)
class Samples:
    """Every sample of one exposition: (name, labels, value)."""

    items: tuple[tuple[str, dict[str, str], float], ...]

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(ls, v) for n, ls, v in self.items
                if n == name and labels.items() <= ls.items()]

    def get(self, name: str, **labels: str) -> list[float]:
        return [v for _, v in self.series(name, **labels)]

    def one(self, name: str, **labels: str) -> float:
        hits = self.get(name, **labels)
        assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
        return hits[0]

    def devices(self, probes: bool = True) -> set[str]:
        """Every device label value of any wireguard_* series; with probes=False, of the
        series built from the snapshot only (the prober's series follow on its own round)."""
        return {ls["device"] for n, ls, _ in self.items
                if n.startswith("wireguard_") and "device" in ls
                and (probes or not n.startswith(PROBE_FAMILIES))}

    def success(self) -> dict[str, float]:
        return {ls["collector"]: v for ls, v in self.series("wgnest_collector_success")}

    def errors(self) -> dict[str, float]:
        return {ls["reason"]: v for ls, v in self.series("wgnest_errors_total")}

    @property
    def taken_at(self) -> float:
        return self.one("wgnest_snapshot_timestamp_seconds")


def parse(text: str) -> Samples:
    items = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            items.append((s.name, dict(s.labels), float(s.value)))
    return Samples(tuple(items))


@dataclass(frozen=True)
class Scrape:
    started: float  # time.monotonic() when the request was sent
    elapsed: float
    status: int | None  # None: no HTTP answer at all (see error)
    error: str  # "" when the answer was a 200 whose body parsed
    samples: Samples | None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.samples is not None

    @property
    def parsed(self) -> Samples:
        assert self.samples is not None, f"scrape failed: {self.status} {self.error}"
        return self.samples


class Scraper:
    """Scrapes continuously on its own thread, which lives in the lab's client netns."""

    def __init__(self, ns: str, port: int = PORT, interval: float = 0.05) -> None:
        self.ns, self.port, self.interval = ns, port, interval
        self.scrapes: list[Scrape] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        with in_netns(self.ns):
            while not self._stop.is_set():
                scrape = self._once()
                with self._lock:
                    self.scrapes.append(scrape)
                self._stop.wait(self.interval)

    def _once(self) -> Scrape:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return Scrape(started, time.monotonic() - started, None,
                          f"{type(exc).__name__}: {exc}", None)
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        if status != 200:
            return Scrape(started, elapsed, status, f"HTTP {status}", None)
        try:
            samples = parse(body.decode())
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # parser or UTF-8
            return Scrape(started, elapsed, status, f"parse: {exc!r}", None)
        return Scrape(started, elapsed, status, "", samples)

    def all(self) -> list[Scrape]:
        with self._lock:
            return list(self.scrapes)

    def since(self, t: float) -> list[Scrape]:
        return [s for s in self.all() if s.started >= t]

    def latest_ok(self) -> Scrape | None:
        return next((s for s in reversed(self.all()) if s.ok), None)

    def wait_for(self, predicate: Callable[[Samples], bool], timeout: float,
                 after: float | None = None, what: str = "condition") -> Scrape:
        """The first good scrape sent at or after `after` (default: now) whose samples
        satisfy `predicate`; AssertionError when none comes within `timeout`."""
        after = time.monotonic() if after is None else after
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            scrapes = self.since(after)
            for s in scrapes[seen:]:
                if s.ok and s.samples is not None and predicate(s.samples):
                    return s
            seen = len(scrapes)
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen within {timeout} s "
                                     f"({seen} scrapes since)")
            time.sleep(0.01)


def serve_pid(proc: subprocess.Popen[str]) -> int:
    """`ip netns exec` execs its command: the Popen's pid is the python running wgnest."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"wgnest" in cmdline, cmdline
    assert b"serve" in cmdline, cmdline
    exe = Path(f"/proc/{proc.pid}/exe").resolve()
    assert exe == Path(sys.executable).resolve(), exe
    return proc.pid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Exporter:
    """A running `wgnest serve` of a lab and the scraper watching it."""

    lab: Lab
    proc: subprocess.Popen[str]
    pid: int
    scraper: Scraper

    def log(self) -> str:
        return self.lab.serve_log.read_text() if self.lab.serve_log else ""

    def finish(self, check: Callable[[Samples], None] | None = None, *,
               max_elapsed: float = 2.0, min_scrapes: int = 10) -> list[Scrape]:
        """Stop scraping and assert the common invariants of every fault test: the process
        is alive, every scrape was a 200 whose body parsed, none was slow, and `check`
        holds for every scrape. Returns the scrapes."""
        self.scraper.stop()
        assert self.proc.poll() is None, (
            f"serve exited {self.proc.returncode}: {self.log()[-3000:]}")
        done = self.scraper.all()
        assert_scrapes(done, check, max_elapsed=max_elapsed, min_scrapes=min_scrapes)
        return done


def assert_scrapes(done: list[Scrape], check: Callable[[Samples], None] | None = None, *,
                   max_elapsed: float = 2.0, min_scrapes: int = 10) -> None:
    """Every scrape was a 200 whose body parsed, none took `max_elapsed`, `check` held."""
    assert len(done) >= min_scrapes, f"only {len(done)} scrapes"
    bad = [(round(s.started, 3), s.status, s.error) for s in done if not s.ok]
    assert not bad, f"{len(bad)} of {len(done)} scrapes failed: {bad[:5]}"
    slow = max(s.elapsed for s in done)
    assert slow < max_elapsed, f"slowest scrape took {slow:.3f} s"
    if check is None:
        return
    failures = []
    for s in done:
        try:
            check(s.parsed)
        except AssertionError as exc:
            failures.append(f"@{s.started:.3f}: {exc}")
    assert not failures, f"{len(failures)} of {len(done)} scrapes wrong: {failures[:5]}"


def failing_snapshots(scrapes: Iterable[Scrape]) -> dict[float, set[str]]:
    """Snapshot timestamp -> collectors that failed in it, for every snapshot with a failure."""
    out: dict[float, set[str]] = {}
    for s in scrapes:
        if s.samples is None:
            continue
        failed = {c for c, v in s.samples.success().items() if v != 1}
        if failed:
            out.setdefault(s.samples.taken_at, set()).update(failed)
    return out


def total_errors(samples: Samples) -> float:
    return sum(samples.errors().values())


@dataclass
class FakeUapi:
    """A TUN link in the client namespace plus a misbehaving UAPI server for its name."""

    lab: Lab
    name: str
    proc: subprocess.Popen[str]
    accepts: list[float] = field(default_factory=list)  # monotonic times of each accept

    @property
    def path(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "accepted":
                self.accepts.append(time.monotonic())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)

    def delete_link(self) -> None:
        run("ip", "link", "del", self.name, ns=self.lab.client.ns)


def fake_uapi(lab: Lab, mode: str, name: str) -> FakeUapi:
    """Make TUN link `name` in the client netns and serve `mode` on its UAPI socket from
    a process inside that netns. Cleanup (process, socket) is registered with the lab."""
    assert len(name) <= 15
    lab.interfaces.append(name)  # lab.close() removes the socket file
    run("ip", "tuntap", "add", "name", name, "mode", "tun", ns=lab.client.ns)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.client.ns, sys.executable, str(FAKE_UAPI),
         str(UAPI_DIR / f"{name}.sock"), mode],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lab.extra_procs.append(proc)  # lab.close() terminates it even if the test fails
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    if not ready or proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"fake UAPI server for {name} did not start")
    fake = FakeUapi(lab, name, proc)
    threading.Thread(target=fake._follow, daemon=True).start()
    return fake
