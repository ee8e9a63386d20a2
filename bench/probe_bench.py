"""Cost and accuracy of wgnest's ICMP prober with N targets at one round per second.

    python bench/probe_bench.py [--targets 10,100,1000] [--seconds 10] [--interval 1]

Builds two network namespaces joined by a veth pair: a client and a far host that owns
10.77.0.0/16 on its loopback (so it answers echo requests to every address in it). For each
N a fresh process inside the client namespace (`ip netns exec`) runs a real `Prober` with N
targets for ~`seconds`, while `ping -c 10` runs against a few of the same addresses, and
reports:

* CPU per probe: process_time() delta of the whole process / probes sent, and the share of
  one core (process_time / wall time);
* loss, and the prober's median RTT against ping's (median difference per address);
* timer drift: each round's actual start against the schedule t0 + k * interval, and the
  spread of the gaps between consecutive rounds;
* the time to render the probe families for one scrape (as `wgnest serve` does per scrape).

Everything is removed in `finally` (namespaces, ping processes).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# WGNEST_BENCH_EXPORTER: measure another copy of the package (e.g. an older commit's)
EXPORTER = os.environ.get("WGNEST_BENCH_EXPORTER", str(REPO / "exporter"))
sys.path[:0] = [EXPORTER, str(REPO)]

from tests.lab.lab import run  # noqa: E402

FAR_NET = ipaddress.IPv4Network("10.77.0.0/16")
DEAD_NET = ipaddress.IPv4Network("10.78.0.0/16")  # routed to the far host, which drops it
GOAL_CORE_SHARE = 0.15  # of one core, at 1000 targets and 1 round/s
PING_COUNT = 10


@dataclass
class ProbeLab:
    tag: str = field(default_factory=lambda: "wgpb" + secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.tag}c"

    @property
    def far(self) -> str:
        return f"{self.tag}f"

    def build(self) -> ProbeLab:
        for ns in (self.client, self.far):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        c, f = f"{self.tag}c", f"{self.tag}f"
        run("ip", "link", "add", c, "netns", self.client, "type", "veth", "peer", f,
            "netns", self.far)
        run("ip", "addr", "add", "198.18.0.1/24", "dev", c, ns=self.client)
        run("ip", "addr", "add", "198.18.0.2/24", "dev", f, ns=self.far)
        run("ip", "link", "set", c, "up", ns=self.client)
        run("ip", "link", "set", f, "up", ns=self.far)
        # A prefix on lo makes every address in it local: the far host answers them all.
        run("ip", "addr", "add", f"{FAR_NET.network_address + 1}/{FAR_NET.prefixlen}",
            "dev", "lo", ns=self.far)
        run("ip", "route", "add", str(FAR_NET), "via", "198.18.0.2", ns=self.client)
        run("ip", "route", "add", str(DEAD_NET), "via", "198.18.0.2", ns=self.client)
        run("ip", "route", "add", "blackhole", str(DEAD_NET), ns=self.far)  # silent: a dead peer
        if run("ping", "-c", "1", "-W", "2", str(FAR_NET.network_address + 1000),
               ns=self.client, check=False).returncode != 0:
            raise RuntimeError("the far namespace does not answer pings")
        return self

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)

    def leftovers(self) -> list[str]:
        names = run("ip", "netns", "list", check=False).stdout.split()
        return [ns for ns in self.namespaces if ns in names]


# ---- measurement (inside the client namespace, one process per N) -------------------------

def addresses(n: int, dead: int) -> list[ipaddress.IPv4Address]:
    """n targets of which the last `dead` never answer."""
    live = min(dead, n)
    return ([FAR_NET.network_address + 1 + i for i in range(n - live)]
            + [DEAD_NET.network_address + 1 + i for i in range(live)])


def ping_rtts(text: str) -> list[float]:
    """RTTs in seconds from ping's per-reply lines (`time=0.052 ms`)."""
    return [float(m[1]) / 1000 for m in re.finditer(r"time=([0-9.]+) ms", text)]


def measure(n: int, seconds: float, interval: float, pings: int, dead: int,
            fill: int) -> dict[str, Any]:
    from wgnest.model.probes import ProbeTarget
    from wgnest.probe.prober import Prober
    from wgnest.surfaces.probe_metrics import probe_families

    rounds = max(1, round(seconds / interval))

    class TimedProber(Prober):
        """A real Prober that notes when each round starts (its loop calls run_once) and,
        once `rounds` rounds are complete, the CPU time and counters of those alone."""

        starts: list[float]
        done: threading.Event
        at_done: tuple[float, float, Any]

        def run_once(self) -> None:
            self.starts.append(self._clock())
            super().run_once()
            if len(self.starts) == rounds:
                self.at_done = (time.process_time(), time.monotonic(), self.snapshot())
                self.done.set()

    addrs = addresses(n, dead)
    targets = [ProbeTarget("bench0", f"peer{i}", "tunnel", a, 0) for i, a in enumerate(addrs)]
    prober = TimedProber(lambda: targets, interval=interval, timeout=1.0)
    prober.starts, prober.done = [], threading.Event()
    if prober.disabled_reason:
        raise RuntimeError(f"prober disabled: {prober.disabled_reason}")
    live = [a for a in addrs if a in FAR_NET]
    picks = sorted({live[0], live[len(live) // 2], live[-1]})[:pings] if live else []
    procs = [subprocess.Popen(["ping", "-n", "-c", str(PING_COUNT), "-i", "1", str(a)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for a in picks]
    try:
        cpu0, wall0 = time.process_time(), time.monotonic()
        prober.start()
        prober.done.wait(rounds * interval + 30)
        # counters of complete rounds only: stop() may cut the next one short (counted lost)
        cpu1, wall1, snap = prober.at_done
        cpu, wall, starts = cpu1 - cpu0, wall1 - wall0, prober.starts[:rounds]
        prober.stop(timeout=3.0)
        outputs = [p.communicate(timeout=PING_COUNT + 5)[0] for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
    sent = sum(s.sent for s in snap.series.values())
    received = sum(s.received for s in snap.series.values())
    by_address: dict[str, list[float]] = {}
    for s in snap.series.values():
        # every RTT of the run: the window holds the last 30, more than ~10 rounds
        by_address.setdefault(str(s.target.address), []).extend(s.recent)
    accuracy = []
    for address, text in zip(picks, outputs, strict=True):
        ours, theirs = by_address.get(str(address), []), ping_rtts(text)
        if ours and theirs:
            accuracy.append({"address": str(address), "prober_ms": statistics.median(ours) * 1e3,
                             "ping_ms": statistics.median(theirs) * 1e3,
                             "diff_ms": (statistics.median(ours) - statistics.median(theirs))
                             * 1e3, "ping_replies": len(theirs)})
    t0 = starts[0]
    drift = [s - (t0 + k * interval) for k, s in enumerate(starts)]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    try:
        from wgnest.surfaces.exposition import exposition
    except ImportError:  # an older checkout (--exporter) without the fast writer
        exposition = None  # type: ignore[assignment]

    class Probes(Collector):
        def collect(self) -> Iterator[Any]:
            return probe_families(snap)

    def with_generate_latest() -> bytes:  # what _Pages.metrics() did on every scrape
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Probes())
        return generate_latest(registry)

    at_end = [timed(with_generate_latest)[0] for _ in range(5)]
    # A long-running prober holds full windows (30) and baselines (the medians of 30 blocks
    # of 10 answered probes) per series:
    # run rounds back to back (short timeout) until then, and measure a scrape again.
    prober.timeout = 0.05
    for _ in range(fill):
        prober.run_once()
    snap = prober.snapshot()
    families = [timed(lambda: list(probe_families(snap)))[0] for _ in range(5)]
    copies = [timed(prober.snapshot)[0] for _ in range(5)]
    scrape = [timed(with_generate_latest)[0] for _ in range(5)]
    body = with_generate_latest()
    fast = [float("nan")]
    if exposition is not None:
        fast = [timed(lambda: exposition(probe_families(snap)))[0] for _ in range(5)]
        if exposition(probe_families(snap)) != body:
            raise RuntimeError("exposition() differs from generate_latest() on probe families")
    return {
        "targets": n, "rounds": len(starts), "sent": sent, "received": received,
        "cpu": cpu, "wall": wall, "cpu_per_probe_us": cpu / sent * 1e6 if sent else 0.0,
        "core_share": cpu / wall, "accuracy": accuracy,
        "drift_end_ms": drift[-1] * 1e3, "drift_max_ms": max(drift) * 1e3,
        "gap_mean_ms": statistics.mean(gaps) * 1e3 if gaps else 0.0,
        "gap_max_ms": max(gaps) * 1e3 if gaps else 0.0,
        "gap_min_ms": min(gaps) * 1e3 if gaps else 0.0,
        "round_seconds": snap.round_seconds, "status": [snap.ok, snap.reason, snap.message],
        "families_ms": statistics.median(families) * 1e3,
        "end_render_ms": statistics.median(at_end) * 1e3,
        "snapshot_ms": statistics.median(copies) * 1e3, "fill": fill,
        "baseline_len": max((len(s.baseline) for s in snap.series.values()), default=0),
        "scrape_render_ms": statistics.median(scrape) * 1e3,
        "fast_render_ms": statistics.median(fast) * 1e3, "scrape_bytes": len(body),
        "rss_mib": rss_mib(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def rss_mib() -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m[1]) / 1024 if m else 0.0


# ---- driver --------------------------------------------------------------------------------

def child(lab: ProbeLab, n: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(n),
            "--seconds", str(args.seconds), "--interval", str(args.interval),
            "--pings", str(args.pings), "--dead", str(args.dead), "--fill", str(args.fill)]
    res = run(*argv, ns=lab.client, timeout=args.seconds + args.fill * 0.5 + 120)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def serve_ms(r: dict[str, Any]) -> float:
    """Render time of the probe metrics as serve does it now: exposition() when present."""
    fast = float(r["fast_render_ms"])
    return float(r["scrape_render_ms"]) if fast != fast else fast  # NaN: no exposition()


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n~{args.seconds:g} s per N at interval {args.interval:g} s, timeout 1 s, "
          f"{args.dead} dead target(s) per N; CPU = process_time of the whole prober process; "
          "scrape render = probe families + text at steady state (see below)")
    head = ("targets", "rounds", "sent", "loss %", "CPU s", "core %", "us/probe",
            "drift end ms", "gap mean ms", "gap min..max ms", "scrape render ms", "RSS MiB")
    cells = [list(head)]
    for r in rows:
        loss = 100 * (1 - r["received"] / r["sent"]) if r["sent"] else 0.0
        cells.append([str(r["targets"]), str(r["rounds"]), str(r["sent"]), f"{loss:.2f}",
                      f"{r['cpu']:.3f}", f"{100 * r['core_share']:.2f}",
                      f"{r['cpu_per_probe_us']:.1f}", f"{r['drift_end_ms']:+.1f}",
                      f"{r['gap_mean_ms']:.1f}",
                      f"{r['gap_min_ms']:.1f}..{r['gap_max_ms']:.1f}",
                      f"{serve_ms(r):.1f}", f"{r['rss_mib']:.1f}"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    print("\nRTT accuracy: median prober RTT vs median `ping -c 10` RTT to the same address")
    for r in rows:
        for a in r["accuracy"]:
            print(f"  N={r['targets']:>5} {a['address']:>12}: prober {a['prober_ms']:.3f} ms, "
                  f"ping {a['ping_ms']:.3f} ms ({a['ping_replies']} replies), "
                  f"diff {a['diff_ms'] * 1000:+.0f} us")
        print(f"  N={r['targets']:>5} last round {r['round_seconds'] * 1000:.1f} ms, "
              f"status {r['status']}")
    print("\nprobe metrics render (serve renders them once per refresh, not per scrape):")
    for r in rows:
        print(f"  N={r['targets']:>5}: after {r['fill']} more rounds (baselines of "
              f"{r['baseline_len']} block medians): Prober.snapshot() "
              f"{r['snapshot_ms']:.1f} ms, then "
              f"families {r['families_ms']:.1f} ms; families + text: exposition() "
              f"{r['fast_render_ms']:.1f} ms, generate_latest() {r['scrape_render_ms']:.1f} ms "
              f"(right after the run: {r['end_render_ms']:.1f} ms); "
              f"{r['scrape_bytes'] / 1e3:.0f} kB")
    big = max(rows, key=lambda r: r["targets"])
    share = big["core_share"]
    print(f"\ngoal: {big['targets']} targets at 1/s under {GOAL_CORE_SHARE:.0%} of one core: "
          f"{share:.1%} -> {'met' if share < GOAL_CORE_SHARE else 'MISSED'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="10,100,1000")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--pings", type=int, default=3, help="addresses also pinged with ping")
    p.add_argument("--dead", type=int, default=0,
                   help="targets (of each N) that never answer, like a peer that is down")
    p.add_argument("--fill", type=int, default=300,
                   help="extra back-to-back rounds before measuring a steady-state scrape")
    p.add_argument("--exporter", metavar="DIR", help="measure the wgnest package in DIR "
                   "(e.g. an extracted older commit's exporter/) instead of this checkout's")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.seconds, args.interval, args.pings,
                                 args.dead, args.fill)))
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("probe_bench needs root (network namespaces, raw ICMP)\n")
        return 2
    if args.exporter:  # inherited by the measuring processes (ip netns exec keeps it)
        os.environ["WGNEST_BENCH_EXPORTER"] = str(Path(args.exporter).resolve())
        print(f"measuring the wgnest package in {os.environ['WGNEST_BENCH_EXPORTER']}")
    lab = ProbeLab()
    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up
    try:
        lab.build()
        print(f"lab: client {lab.client}, far host {lab.far} answering {FAR_NET}")
        for n in (int(x) for x in args.targets.split(",")):
            print(f"  {n} targets: probing for {args.seconds:g} s ...", flush=True)
            rows.append(child(lab, n, args))
    finally:
        lab.close()
        left = lab.leftovers()
        print("cleanup: " + (f"left {left}" if left else f"namespaces {lab.namespaces} removed"))
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
