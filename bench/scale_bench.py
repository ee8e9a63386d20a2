"""Scale benchmark of `wgnest serve` against one wireguard-go device with N peers.

    python bench/scale_bench.py [--peers 100,1000,10000] [--runs 5] [--profile]

Builds its own network namespace (a veth pair so the endpoints have a route, one wireguard-go
device configured over its UAPI socket), then measures each N in a fresh subprocess that runs
inside the namespace (`ip netns exec`), so RSS figures are per N and not cumulative:

* `wg show all dump` alone (the floor of exporters that parse it) and `wg show DEV dump`;
* wgnest's refresh (`take()` + `diagnose()`), cold (new Reader: empty route cache, sockets to
  open) and warm (route cache hit);
* render of the exposition (the families written whole) and an HTTP GET of /metrics against a real
  `wgnest.runtime.web.serve` on 127.0.0.1 serving the pre-rendered bytes (what a scrape costs);
* VmRSS / VmHWM of a separate serve-like process (its imports, a Refresher, the HTTP server)
  after a few refreshes and scrapes, and the number of series.

Everything it makes (namespace, wireguard-go by pid, UAPI socket) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import gc
import http.client
import io
import ipaddress
import json
import os
import pstats
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# WGNEST_BENCH_EXPORTER: measure another copy of the package (e.g. an older commit's)
EXPORTER = os.environ.get("WGNEST_BENCH_EXPORTER", str(REPO / "exporter"))
sys.path[:0] = [EXPORTER, str(REPO)]

from tests.lab.lab import UAPI_DIR, daemon_pids, run, stop_process, uapi_set  # noqa: E402

GOALS = {"refresh_vs_dump": 1.5, "scrape_ms": 100.0, "rss_mib": 60.0}
CHURN = 0.1  # share of the peers whose endpoint moves before each refresh of the busy measure
MDLAYHER = {2000: 0.045, 10000: 0.29}  # its CPU per scrape on this machine (the runs)
CORE_SHARE = {2000: 0.05, 10000: 0.10}  # the defaults' goal, share of one core
UAPI_BATCH = 2000  # peers per `set=1` operation
# The endpoints, routed via one gateway on the veth (as a gateway's peers are reached via
# its uplink's router): a connected /15 would make every probe to an endpoint an ARP request
# of its own, 10,000 neighbour entries the kernel churns through (system time that is the
# lab's, not the exporter's).
EP_NET = ipaddress.IPv4Network("198.18.0.0/15")
GATEWAY, GATEWAY_MAC = "192.0.2.2", "02:00:00:00:00:02"
LISTEN_PORT = 51820


# ---- lab -------------------------------------------------------------------------------

@dataclass
class ScaleLab:
    tag: str = field(default_factory=lambda: "wgnb" + secrets.token_hex(3))
    ns: str = ""
    dev: str = ""
    proc: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)

    def build(self) -> ScaleLab:
        self.ns = self.tag
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "set", "lo", "up", ns=self.ns)
        a, b = f"{self.tag}a", f"{self.tag}b"
        run("ip", "link", "add", a, "netns", self.ns, "type", "veth", "peer", b, "netns", self.ns)
        run("ip", "addr", "add", "192.0.2.1/24", "dev", a, ns=self.ns)
        run("ip", "link", "set", a, "up", ns=self.ns)
        run("ip", "link", "set", b, "up", ns=self.ns)
        run("ip", "neigh", "add", GATEWAY, "lladdr", GATEWAY_MAC, "dev", a, "nud", "permanent",
            ns=self.ns)
        run("ip", "route", "add", str(EP_NET), "via", GATEWAY, "dev", a, ns=self.ns)
        self.dev = self.tag  # 10 characters, well under IFNAMSIZ
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "wireguard-go", "-f", self.dev],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
        self.pids.add(self.proc.pid)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"wireguard-go {self.dev} did not start")
            time.sleep(0.02)
        self.pids.update(daemon_pids(self.dev))
        private = bytearray(secrets.token_bytes(32))
        private[0] &= 248
        private[31] = (private[31] & 127) | 64
        uapi_set(self.dev, f"private_key={private.hex()}\nlisten_port={LISTEN_PORT}\n")
        run("ip", "link", "set", self.dev, "up", ns=self.ns)
        # the peers' allowed IPs via the device: a packet to one makes wireguard-go send
        # that peer a handshake initiation (its tx_bytes move: a busy gateway's refresh)
        run("ip", "route", "add", "10.0.0.0/8", "dev", self.dev, ns=self.ns)
        return self

    @property
    def sock(self) -> Path:
        return UAPI_DIR / f"{self.dev}.sock"

    def set_peers(self, n: int) -> float:
        """Replace every peer by `n` peers with distinct endpoints; returns seconds taken."""
        started = time.monotonic()
        uapi_set(self.dev, "replace_peers=true\n")
        hosts = EP_NET.num_addresses - 2
        for start in range(0, n, UAPI_BATCH):
            lines = []
            for i in range(start, min(n, start + UAPI_BATCH)):
                ep = EP_NET.network_address + 2 + (i % hosts)
                lines.append(
                    f"public_key={secrets.token_bytes(32).hex()}\n"
                    f"endpoint={ep}:{LISTEN_PORT + i % 1000}\n"
                    f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n"
                    f"allowed_ip=fd00::{i >> 16 & 0xFFFF:x}:{i & 0xFFFF:x}/128\n")
            uapi_set(self.dev, "".join(lines), timeout=120)
        return time.monotonic() - started

    def close(self) -> None:
        if self.dev:
            self.pids.update(daemon_pids(self.dev))
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.ns:
            run("ip", "netns", "del", self.ns, check=False)
        if self.dev:
            for suffix in (".sock", ".name"):
                with contextlib.suppress(FileNotFoundError):
                    (UAPI_DIR / f"{self.dev}{suffix}").unlink()


def leftovers(lab: ScaleLab) -> list[str]:
    """What of this lab is still there (should be nothing)."""
    found = []
    names = run("ip", "netns", "list", check=False).stdout.split()
    if lab.ns and lab.ns in names:
        found.append(f"netns {lab.ns}")
    for pid in lab.pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                found.append(f"wireguard-go pid {pid}")
    if lab.dev and daemon_pids(lab.dev):
        found.append(f"wireguard-go for {lab.dev}")
    if lab.dev and lab.sock.exists():
        found.append(str(lab.sock))
    return found


# ---- measurement (runs inside the namespace, one process per N) --------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def cpu_timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def vm_status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


class _Pages:
    """What `wgnest serve` serves without a prober, to a plain scrape (no gzip): the
    refresher's compressed exposition, inflated (what a gzip scrape gets is its bytes)."""

    def __init__(self, state: Callable[[], Any]) -> None:
        self._state = state

    def metrics(self) -> bytes:
        current = self._state()
        return current.exposition if current is not None else b""

    def status_page(self) -> str:
        return ""


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def measure(dev: str, runs: int, profile: bool) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    import wgnest
    from wgnest.analysis.paths import PeerPath, diagnose
    from wgnest.model.host import Snapshot
    from wgnest.runtime import refresher as refresher_module
    from wgnest.runtime.refresher import Refresher
    from wgnest.runtime.web import serve
    from wgnest.snapshot import Reader, take
    from wgnest.sources.netstate import _open_default
    from wgnest.surfaces.exposition import as_metrics, exposition
    from wgnest.surfaces.metrics import wireguard_families

    def render(snap: Any, paths: Any, names: Any) -> bytes:  # the families, written whole
        return exposition(wireguard_families(snap, paths, names))

    _open_default().close()  # pyroute2's lazy import is a one-time cost, not a refresh's
    out: dict[str, Any] = {"rss_start": vm_status()["VmRSS"],
                           "package": str(Path(wgnest.__file__).parent)}
    dumps = [timed(lambda: run("wg", "show", "all", "dump"))[0] for _ in range(runs)]
    out["dump_all"] = statistics.median(dumps)
    text = run("wg", "show", "all", "dump").stdout
    out["dump_devices"] = sorted({line.split("\t")[0] for line in text.splitlines()})
    out["dump_dev"] = statistics.median(
        timed(lambda: run("wg", "show", dev, "dump"))[0] for _ in range(runs))

    def refresh(reader: Reader) -> tuple[Snapshot, list[PeerPath]]:
        snap = take(reader)
        return snap, diagnose(snap)

    cold, cold_lookup = [], []
    for _ in range(runs):
        fresh = Reader()
        try:
            seconds, (snap, _paths) = timed(lambda: refresh(fresh))  # noqa: B023
            cold.append(seconds)
            cold_lookup.append(snap.durations.get("route_lookup", 0.0))
        finally:
            fresh.close()
    out["cold"], out["cold_lookup"] = statistics.median(cold), statistics.median(cold_lookup)

    reader = Reader()
    try:
        snap = take(reader)
        if snap.failures:
            raise RuntimeError(f"take() failed: {snap.failures}")
        peers = sum(len(d.peers) for d in snap.devices if d.name == dev)
        invalidations = reader.lookup.invalidations
        warm, parts = [], []
        for _ in range(runs):
            seconds, (snap, paths) = timed(lambda: refresh(reader))
            warm.append(seconds)
            parts.append(snap.durations)
        out["warm"], out["warm_min"] = statistics.median(warm), min(warm)
        out["warm_parts"] = {k: statistics.median(p.get(k, 0.0) for p in parts)
                             for k in parts[0]}
        # as `wgnest serve` runs it: Refresher.refresh_once pauses the cyclic GC (if it can)
        paused = getattr(refresher_module, "_gc_paused", contextlib.nullcontext)
        warm_serve = []
        for _ in range(runs):
            with paused():
                warm_serve.append(timed(lambda: refresh(reader))[0])
            gc.collect()  # what the pause put off, outside the measurement (as in serve)
        out["warm_serve"] = statistics.median(warm_serve)
        out["diagnose"] = statistics.median(timed(lambda: diagnose(snap))[0]
                                            for _ in range(runs))
        out["cache_hit"] = reader.lookup.invalidations == invalidations
        out["peers"] = peers
        out["verdicts"] = dict(Counter(p.verdict for p in paths))
        out["render"] = statistics.median(
            timed(lambda: render(snap, paths, {}))[0] for _ in range(runs))
        body = render(snap, paths, {})
        registry = CollectorRegistry(auto_describe=False)
        metrics = as_metrics(wireguard_families(snap, paths, {}))

        class Fixed:
            def collect(self) -> Any:
                return iter(metrics)

        registry.register(Fixed())  # type: ignore[arg-type]
        if generate_latest(registry) != body:
            raise RuntimeError("render() differs from prometheus_client's generate_latest()")
        out["series"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        out["bytes"] = len(body)

        refresher = Refresher(lambda: take(reader), 3600.0)
        refresher.refresh_once()
        # what serve spends per refresh (take, diagnose, render, its GC handling): CPU of
        # this process, against the wall time of `wg show all dump`
        once = [cpu_timed(refresher.refresh_once) for _ in range(max(runs, 5))]
        out["refresh_once_cpu"] = statistics.median(c for c, _ in once)
        out["refresh_once"] = statistics.median(w for _, w in once)
        # a busy gateway: before each refresh CHURN of the peers get a new endpoint (new
        # Peer objects, flows and route lookups; the change is made outside the measure)
        keys = [p.public_key for d in snap.devices if d.name == dev for p in d.peers]
        churned = []
        for run_no in range(max(runs, 5)):
            moved = keys[run_no::int(1 / CHURN)]
            uapi_set(dev, "".join(
                f"public_key={base64.b64decode(k).hex()}\nendpoint="
                f"{EP_NET.network_address + 2 + (i * 7919 + run_no) % 100000}:{LISTEN_PORT}\n"
                for i, k in enumerate(moved)), timeout=60)
            churned.append(cpu_timed(refresher.refresh_once)[0])
        out["churn_cpu"] = statistics.median(churned)
        # counters moving (handshake initiations to CHURN of the peers, a different share
        # each time, 0.3 s before the refresh): what most changes on a busy gateway are
        # counters and handshakes, not endpoints
        inner = {p.public_key: next(str(n.network_address) for n in p.allowed_ips
                                    if n.version == 4)
                 for d in snap.devices if d.name == dev for p in d.peers}
        counted, moved_counters = [], []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for run_no in range(max(runs, 5)):
                before = {p.public_key: p.tx_bytes for p in _peers(refresher, dev)}
                for k in keys[run_no + 5::int(1 / CHURN)]:
                    udp.sendto(b"wgnest bench", (inner[k], 9))
                time.sleep(0.3)
                counted.append(cpu_timed(refresher.refresh_once)[0])
                moved_counters.append(sum(1 for p in _peers(refresher, dev)
                                          if p.tx_bytes != before.get(p.public_key)))
        out["counters_cpu"] = statistics.median(counted)
        out["counters_moved"] = statistics.median(moved_counters)
        every = getattr(refresher_module, "FULL_COLLECTION_EVERY", 0)
        if every:  # the full collection serve runs once every `every` refreshes
            out["full_gc"] = cpu_timed(lambda: refresher_module._out_of_the_collector(every))[0]
            out["full_gc_every"] = every
        out["refresh_cpu"] = out["refresh_once_cpu"] + (
            out["full_gc"] / every if every else 0.0)
        server = serve("127.0.0.1:0", _Pages(lambda: refresher.state))
        try:
            status, got = http_get(server.port, "/metrics")
            if status != 200 or refresher.state is None or got != refresher.state.exposition:
                raise RuntimeError(f"GET /metrics: {status}, {len(got)} bytes")
            gets = [timed(lambda: http_get(server.port, "/metrics"))[0] for _ in range(runs * 4)]
            out["scrape"] = statistics.median(gets)
            out["scrape_max"] = max(gets)
        finally:
            server.shutdown()
        out.update(vm_status())
        if profile:
            out["profile"] = profile_text(lambda: render(*refresh(reader), {}))
    finally:
        reader.close()
    return out


def _peers(refresher: Any, dev: str) -> list[Any]:
    state = refresher.state
    return [p for d in state.snapshot.devices if d.name == dev for p in d.peers]


def measure_rss(dev: str, refreshes: int = 6) -> dict[str, Any]:
    """Memory as `wgnest serve` (no prober) holds it, in a process that does nothing else:
    its imports, a Reader and a Refresher, refreshes, a listening server and a few scrapes."""
    import wgnest.runtime.serve  # noqa: F401  (everything serve imports)
    from wgnest.runtime.malloc import tune_malloc
    from wgnest.runtime.refresher import Refresher
    from wgnest.runtime.web import serve
    from wgnest.snapshot import Reader, take

    out: dict[str, Any] = {"rss_imports": vm_status()["VmRSS"]}
    tune_malloc()  # as serve does
    reader = Reader()
    refresher = Refresher(lambda: take(reader), 3600.0)
    try:
        state = refresher.refresh_once()
        if state.snapshot.failures or not any(d.name == dev for d in state.snapshot.devices):
            raise RuntimeError(f"refresh failed: {state.snapshot.failures}")
        out["rss_first"] = vm_status()["VmRSS"]
        server = serve("127.0.0.1:0", _Pages(lambda: refresher.state))
        try:
            for _ in range(refreshes - 1):
                refresher.refresh_once()
                http_get(server.port, "/metrics")
        finally:
            server.shutdown()
        vm = vm_status()
        out["rss"], out["hwm"] = vm["VmRSS"], vm["VmHWM"]
    finally:
        reader.close()
    return out


def measure_store(peers: int) -> dict[str, Any]:
    """The prober's memory once every peer has a handshake and the prober has run for hours,
    over what it holds in the defaults run above (the bench's peers never handshake: one
    transport series a peer, each probed once or twice). Then every peer gets a tunnel series
    too, and every window and baseline is full (at --probe.max-rate 500 and 20,000 flows, each
    is probed every 40 s: 300 RTTs take 3 h 20 min), with a snapshot taken between two probes
    of a series as serve's refreshes take them (each copies what the next probe changes). A
    direct peer's direct path is its transport's flow, left out of the defaults' plan. Filled
    through the prober's own bookkeeping (no packets)."""
    from wgnest.model.probes import ProbeTarget
    from wgnest.probe.prober import Prober, probed
    from wgnest.runtime.malloc import tune_malloc

    tune_malloc()  # as serve does
    prober = Prober(list, max_rate=500.0, histograms=False)  # the defaults
    transports, tunnels = [], []
    for i in range(peers):
        key = secrets.token_bytes(32).hex()
        ep = EP_NET.network_address + 2 + i
        inner = ipaddress.ip_address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        tunnels.append(ProbeTarget("wg0", key, "tunnel", inner, 0))
        transports.append(ProbeTarget("wg0", key, "transport", ep, 0))
    rtt = 0.0123

    def probe_all() -> None:
        nonlocal rtt
        store = prober._store
        for key, s in store.items():  # in turns, as rounds probe them
            store[key] = probed(s, rtt, "")
            rtt = 0.01 + (rtt * 7.31) % 0.01  # distinct floats, as real RTTs are
        prober.snapshot()  # a refresh between two probes of a series, as in serve

    prober._adopt(transports)  # the defaults run: no handshakes, a transport series a peer
    probe_all()
    gc.collect()
    start = vm_status()["VmRSS"]
    prober._adopt([t for pair in zip(tunnels, transports, strict=True) for t in pair])
    for _ in range(prober.window + prober.baseline):
        probe_all()
    gc.collect()
    after = vm_status()["VmRSS"]
    return {"store_peers": peers, "store_series": len(prober.snapshot().series),
            "store_mib": after - start, "store_window": prober.window,
            "store_baseline": prober.baseline}


def profile_text(fn: Callable[[], Any], top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ---- driver --------------------------------------------------------------------------------

def child(lab: ScaleLab, runs: int, profile: bool, env: list[str]) -> dict[str, Any]:
    argv = ["env", *env, sys.executable, str(Path(__file__).resolve()), "--child", lab.dev,
            "--runs", str(runs)] + (["--profile"] if profile else [])
    res = run(*argv, ns=lab.ns, timeout=900)
    row = dict(json.loads(res.stdout.strip().splitlines()[-1]))
    argv = ["env", *env, sys.executable, str(Path(__file__).resolve()), "--child-rss", lab.dev]
    res = run(*argv, ns=lab.ns, timeout=900)
    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
    argv = ["env", *env, sys.executable, str(Path(__file__).resolve()), "--child-store",
            str(row["peers"])]
    res = run(*argv, timeout=900)
    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return row


SCRAPE_INTERVAL = 5.0  # seconds between the Prometheus-like scrapes of the share measure
SCRAPER = r"""
import gzip, http.client, json, statistics, sys, time
port, seconds, pause = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
encodings = sys.argv[4].split(",")
times, raw, packed = {e: [] for e in encodings}, b"", b""
end = time.monotonic() + seconds
while time.monotonic() < end:
    for enc in encodings:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        began = time.monotonic()
        conn.request("GET", "/metrics", headers={"Accept-Encoding": enc})
        body = conn.getresponse().read()
        times[enc].append(time.monotonic() - began)
        conn.close()
        if enc == "gzip":
            packed = body
        else:
            raw = body
    time.sleep(pause)
def p(xs, q):
    xs = sorted(xs)
    return xs[max(0, -(-q * len(xs) // 100) - 1)] if xs else float("nan")
gz, plain = times.get("gzip", []), times.get("identity", [])
print(json.dumps({"p50": p(gz, 50), "p99": p(gz, 99), "p50_plain": p(plain, 50),
                  "p99_plain": p(plain, 99), "scrapes": len(gz) + len(plain),
                  "raw": len(raw), "gzip": len(packed),
                  "series": sum(1 for l in raw.splitlines() if l and not l.startswith(b"#")),
                  "same": gzip.decompress(packed).startswith(b"# HELP")}))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm_of(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
            if line.startswith(("VmRSS", "VmHWM"))}


def serve_run(lab: ScaleLab, warmup: float = 12.0, seconds: float = 20.0,
              args: tuple[str, ...] = ()) -> dict[str, Any]:
    """`wgnest serve` with its defaults (probes on, 5 s refresh) on the lab's device: its
    share of one core and RSS over `seconds` after `warmup`, and /metrics from a client in
    the same namespace (median, p99, bytes raw and gzip, series)."""
    port = 19586
    env = {**os.environ, "PYTHONPATH": EXPORTER}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns, sys.executable, "-m", "wgnest", "serve",
         "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"wgnest serve exited with {proc.returncode}")
        # the share of one core as Prometheus scrapes it: one gzip scrape every
        # SCRAPE_INTERVAL (Prometheus' default is 1m; 15s is common)
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        run("ip", "netns", "exec", lab.ns, sys.executable, "-c", SCRAPER, str(port),
            str(seconds), str(SCRAPE_INTERVAL), "gzip", timeout=seconds + 60)
        cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        quiet = _vm_of(proc.pid)  # as Prometheus scrapes it
        # then /metrics latency under a client scraping as fast as it can (gzip and plain)
        cpu2, wall2 = cpu_seconds(proc.pid), time.monotonic()
        scrape = run("ip", "netns", "exec", lab.ns, sys.executable, "-c", SCRAPER, str(port),
                     str(seconds), "0.25", "gzip,identity", timeout=seconds + 60)
        cpu3, wall3 = cpu_seconds(proc.pid), time.monotonic()
        storm = _vm_of(proc.pid)  # right after the storm of scrapes
        out: dict[str, Any] = json.loads(scrape.stdout.strip().splitlines()[-1])
        out.update(core=(cpu1 - cpu0) / (wall1 - wall0),
                   core_busy=(cpu3 - cpu2) / (wall3 - wall2), rss=quiet["VmRSS"],
                   rss_storm=storm["VmRSS"], hwm=storm["VmHWM"])
        return out
    finally:
        stop_process(proc, grace=10.0)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(rows: list[dict[str, Any]]) -> Iterator[str]:
    cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("peers", lambda r: str(r["peers"])),
        ("series", lambda r: str(r["series"])),
        ("dump_all ms", lambda r: ms(r["dump_all"])),
        ("dump_dev ms", lambda r: ms(r["dump_dev"])),
        ("cold ms", lambda r: ms(r["cold"])),
        ("warm ms", lambda r: ms(r["warm"])),
        ("warm* ms", lambda r: ms(r["warm_serve"])),
        ("warm/dump", lambda r: f"{r['warm'] / r['dump_all']:.2f}"),
        ("refresh CPU ms", lambda r: ms(r["refresh_cpu"])),
        ("CPU/dump", lambda r: f"{r['refresh_cpu'] / r['dump_all']:.2f}"),
        ("cold/dump", lambda r: f"{r['cold'] / r['dump_all']:.2f}"),
        ("render ms", lambda r: ms(r["render"])),
        ("GET ms", lambda r: ms(r["scrape"])),
        ("RSS MiB", lambda r: f"{r['rss']:.1f}"),
        ("HWM MiB", lambda r: f"{r['hwm']:.1f}"),
    ]
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for line in cells:
        yield "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))


def report(rows: list[dict[str, Any]], runs: int) -> None:
    print(f"\nwgnest from {rows[0]['package']}; median of {runs} runs each (GET: {runs * 4}); "
          "refresh = take() + diagnose()")
    for line in table(rows):
        print(line)
    print("warm = wall time of take() + diagnose(); warm* = the same with the cyclic GC paused "
          "as Refresher.refresh_once does; refresh CPU = this process's CPU time per "
          "Refresher.refresh_once (take, diagnose, render, GC handling, as serve runs it); "
          "RSS/HWM: a separate serve-like process after 6 refreshes and 5 scrapes")
    print("\nbreakdown of the warm refresh (ms): collector durations from Snapshot.durations")
    for r in rows:
        parts = ", ".join(f"{k} {ms(v)}" for k, v in r["warm_parts"].items())
        print(f"  {r['peers']:>6}: {parts}, diagnose {ms(r['diagnose'])}; warm min "
              f"{ms(r['warm_min'])} (dev dump ratio {r['warm'] / r['dump_dev']:.2f}); "
              f"cold route_lookup {ms(r['cold_lookup'])}; refresh_once (take+diagnose+render) "
              f"{ms(r['refresh_once'])} wall, {ms(r['refresh_once_cpu'])} CPU; "
              f"exposition {r['bytes'] / 1e6:.2f} MB; "
              f"GET max {ms(r['scrape_max'])}; serve-like process: RSS after imports "
              f"{r['rss_imports']:.1f} MiB, after the first refresh {r['rss_first']:.1f} MiB "
              f"(the measuring process: RSS {r['VmRSS']:.1f}, HWM {r['VmHWM']:.1f}); "
              f"cache hit {r['cache_hit']}; verdicts {r['verdicts']}")
        extra = [d for d in r["dump_devices"] if d]
        if len(extra) > 1:
            print(f"          note: `wg show all dump` also listed {len(extra) - 1} other "
                  "device(s) of this host's UAPI directory")
    if all("defaults" in r for r in rows):
        print("\n`wgnest serve` with its defaults (probes on, refresh 5s), after 12 s of "
              f"warm-up: share of one core over 20 s of one gzip scrape every "
              f"{SCRAPE_INTERVAL:g} s (busy: over 20 s of scrapes as fast as a client "
              "can, gzip and plain, which also give /metrics p50 and p99):")
        for r in rows:
            d = r["defaults"]
            print(f"  {r['peers']:>6} peers: {d['core'] * 100:.1f} % of one core "
                  f"(busy {d['core_busy'] * 100:.1f} %), RSS "
                  f"{d['rss']:.1f} MiB (after the busy scrapes {d['rss_storm']:.1f}, peak "
                  f"{d['hwm']:.1f}); /metrics gzip (as Prometheus asks) p50 {ms(d['p50'])} "
                  f"ms, p99 {ms(d['p99'])} ms; plain (inflated per scrape) p50 "
                  f"{ms(d['p50_plain'])} ms, p99 {ms(d['p99_plain'])} ms "
                  f"({d['scrapes']} scrapes); {d['series']} series = "
                  f"{d['series'] / r['peers']:.1f} per peer; {d['raw'] / 1e6:.2f} MB raw, "
                  f"{d['gzip'] / 1e6:.2f} MB gzip")
    for r in rows:
        goals(r)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def goals(r: dict[str, Any]) -> None:
    """The issue's goals at this size, each with its figure."""
    n = r["peers"]
    print(f"\ngoals at {n} peers:")
    cpu, dump = r["refresh_cpu"], r["dump_all"]
    if len([d for d in r["dump_devices"] if d]) > 1:  # other namespaces' devices listed too
        dump = r["dump_dev"]
    gc_note = (f", a full GC of {ms(r['full_gc'])} ms every {r['full_gc_every']} refreshes "
               "included" if "full_gc" in r else "")
    print(f"  CPU per refresh (as serve: take, diagnose, render{gc_note}): {ms(cpu)} ms = "
          f"{cpu / dump:.2f}x `wg show {'all' if dump == r['dump_all'] else 'DEV'} dump` "
          f"({ms(dump)} ms) -> "
          f"{verdict(cpu <= GOALS['refresh_vs_dump'] * dump)} (<= {GOALS['refresh_vs_dump']}x)")
    print(f"  the same with {CHURN:.0%} of the peers moving their endpoint before each "
          f"refresh: {ms(r['churn_cpu'])} ms = {r['churn_cpu'] / dump:.2f}x -> "
          f"{verdict(r['churn_cpu'] <= GOALS['refresh_vs_dump'] * dump)}")
    print(f"  the same with the counters of {r['counters_moved']:.0f} peers moving before each "
          f"refresh (handshake initiations): {ms(r['counters_cpu'])} ms = "
          f"{r['counters_cpu'] / dump:.2f}x -> "
          f"{verdict(r['counters_cpu'] <= GOALS['refresh_vs_dump'] * dump)}")
    if n in MDLAYHER:
        print(f"  below mdlayher/wireguard_exporter's {ms(MDLAYHER[n])} ms per scrape: "
              f"{verdict(cpu < MDLAYHER[n])}")
    print(f"  /metrics (no prober, in-process) {ms(r['scrape'])} ms")
    if "defaults" in r:
        d = r["defaults"]
        share = CORE_SHARE.get(n)
        if share is not None:
            print(f"  defaults at most {share:.0%} of one core: {d['core']:.1%} -> "
                  f"{verdict(d['core'] <= share)}")
        print(f"  /metrics p50 < 20 ms: {ms(d['p50'])} ms -> {verdict(d['p50'] < 0.020)}")
        print(f"  at most 12 series per peer: {d['series'] / n:.1f} -> "
              f"{verdict(d['series'] / n <= 12)}")
        print(f"  RSS <= {GOALS['rss_mib']:.0f} MiB (defaults, as Prometheus scrapes): "
              f"{d['rss']:.1f} MiB -> {verdict(d['rss'] <= GOALS['rss_mib'])} (right after "
              f"the busy scrapes: {d['rss_storm']:.1f} MiB)")
    print(f"  RSS <= {GOALS['rss_mib']:.0f} MiB (no prober): {r['rss']:.1f} MiB (peak "
          f"{r['hwm']:.1f}) -> {verdict(r['rss'] <= GOALS['rss_mib'])}")
    print(f"  the prober after hours ({r['store_series']} series, windows of "
          f"{r['store_window']} and baselines of {r['store_baseline']} full): "
          f"+{r['store_mib']:.1f} MiB on top of the defaults' RSS above, once every peer "
          "has a handshake (a tunnel series more a peer)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="100,1000,10000")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one refresh + render")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the measuring process, e.g. MALLOC_MMAP_THRESHOLD_=131072")
    p.add_argument("--exporter", metavar="DIR", help="measure the wgnest package in DIR "
                   "(e.g. an extracted older commit's exporter/) instead of this checkout's")
    p.add_argument("--no-serve", action="store_true",
                   help="skip the run of `wgnest serve` with its defaults (probes on)")
    p.add_argument("--child", metavar="DEV", help=argparse.SUPPRESS)
    p.add_argument("--child-rss", metavar="DEV", help=argparse.SUPPRESS)
    p.add_argument("--child-store", type=int, metavar="N", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.runs, args.profile)))
        return 0
    if args.child_rss:
        print(json.dumps(measure_rss(args.child_rss)))
        return 0
    if args.child_store:
        print(json.dumps(measure_store(args.child_store)))
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("scale_bench needs root (network namespace, TUN)\n")
        return 2
    counts = [int(x) for x in args.peers.split(",")]
    if args.exporter:
        args.env.append(f"WGNEST_BENCH_EXPORTER={Path(args.exporter).resolve()}")
    lab = ScaleLab()
    rows: list[dict[str, Any]] = []
    try:
        lab.build()
        print(f"lab: netns {lab.ns}, wireguard-go {lab.dev} (pids {sorted(lab.pids)})")
        for n in counts:
            took = lab.set_peers(n)
            print(f"  {n} peers configured over UAPI in {took:.2f} s; measuring ...", flush=True)
            row = child(lab, args.runs, args.profile, args.env)
            if not args.no_serve:
                row["defaults"] = serve_run(lab)
            rows.append(row)
            if args.profile:
                print(row.pop("profile"))
    finally:
        lab.close()
        left = leftovers(lab)
        print("cleanup: " + ("left " + ", ".join(left) if left else
                             f"netns {lab.ns} and wireguard-go {lab.dev} removed"))
    if args.env:
        print("measuring process environment: " + " ".join(args.env))
    report(rows, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
