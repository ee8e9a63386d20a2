"""Benchmark of `wgnest --netns all` against many network namespaces with a few peers each.

    python bench/netns_bench.py [--namespaces 20] [--peers 50] [--runs 5] [--lab-only]

Builds N network namespaces, each with one wireguard-go device of P peers (configured over
its UAPI socket; device names are distinct because /var/run/wireguard is shared by every
namespace of this host) and a veth pair that gives the endpoints a connected route, then
measures:

* the floor: `wg show all dump` once from the host (it reaches every userspace device
  through the shared UAPI directory), the sum of `wg show DEV dump` timed inside one process
  per namespace (what N sidecars that parse `wg` pay), and the sum of
  `ip netns exec NS wg show DEV dump` from the host (a shell loop over the namespaces);
* wgnest's `--netns all` refresh through the Python API
  (`HostReader(NetnsSpec.parse("all")).take()`), cold (a new HostReader each time: every
  namespace to find, enter and open sockets in) and warm (one HostReader kept open), wall
  time and CPU (`time.process_time()` of this process plus its reaped children);
* the same for one namespace (`--netns NAME`), and wgnest's own-namespace refresh
  (`Reader()` + `take()`, `--netns self`) inside each namespace in its own process: the cost
  of one sidecar exporter per namespace.

CPU of the wireguard-go daemons answering the reads is shown separately (it is the same
work whoever asks). Every namespace, wireguard-go process (by pid) and UAPI socket it made is
removed in `finally`, also on Ctrl-C or SIGTERM; the last line says what, if anything, is
left. `--lab-only` builds the lab, measures the `wg` floor and cleans up (no wgnest API
needed).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# WGNEST_BENCH_EXPORTER: measure another copy of the package (e.g. an older commit's)
EXPORTER = os.environ.get("WGNEST_BENCH_EXPORTER", str(REPO / "exporter"))
sys.path[:0] = [EXPORTER, str(REPO)]

from tests.lab.lab import UAPI_DIR, daemon_pids, run, uapi_set  # noqa: E402

EP_NET = ipaddress.IPv4Network("198.18.0.0/15")  # connected route on the veth
LISTEN_PORT = 51820


# ---- lab -------------------------------------------------------------------------------

@dataclass
class NsLab:
    """N namespaces, one wireguard-go device of P peers in each."""

    tag: str = field(default_factory=lambda: "wgnn" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)  # namespace -> device
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)

    def build(self, count: int, peers: int) -> NsLab:
        for i in range(count):
            ns, dev = f"{self.tag}n{i:02d}", f"{self.tag}{i:02d}"  # 10 characters each
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
            # a veth pair inside the namespace (no dummy module everywhere)
            run("ip", "link", "add", "underlay", "type", "veth", "peer", "underlay1", ns=ns)
            run("ip", "addr", "add", f"{EP_NET.network_address + 1}/{EP_NET.prefixlen}",
                "dev", "underlay", ns=ns)
            run("ip", "link", "set", "underlay", "up", ns=ns)
            run("ip", "link", "set", "underlay1", "up", ns=ns)
            self.devices[ns] = dev
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, "wireguard-go", "-f", dev],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
            self.procs.append(proc)
            self.pids.add(proc.pid)
        for ns, dev in self.devices.items():
            self._configure(ns, dev, peers)
        return self

    def _configure(self, ns: str, dev: str, peers: int) -> None:
        sock = UAPI_DIR / f"{dev}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go {dev} did not start")
            time.sleep(0.02)
        self.pids.update(daemon_pids(dev))
        private = bytearray(secrets.token_bytes(32))
        private[0] &= 248
        private[31] = (private[31] & 127) | 64
        lines = [f"private_key={private.hex()}\nlisten_port={LISTEN_PORT}\n"]
        hosts = EP_NET.num_addresses - 2
        for i in range(peers):
            ep = EP_NET.network_address + 2 + (i % hosts)
            lines.append(f"public_key={secrets.token_bytes(32).hex()}\n"
                         f"endpoint={ep}:{LISTEN_PORT + i % 1000}\n"
                         f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n")
        uapi_set(dev, "".join(lines), timeout=60)
        run("ip", "link", "set", dev, "up", ns=ns)

    def daemon_pids(self) -> list[int]:
        """The wireguard-go pids of this lab that are alive."""
        alive = []
        for pid in sorted(self.pids):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                    alive.append(pid)
        return alive

    def close(self) -> None:
        for dev in self.devices.values():
            self.pids.update(daemon_pids(dev))
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        for dev in self.devices.values():
            for suffix in (".sock", ".name"):
                with contextlib.suppress(FileNotFoundError):
                    (UAPI_DIR / f"{dev}{suffix}").unlink()

    def leftovers(self) -> list[str]:
        """What of this lab is still there (should be nothing)."""
        names = set(run("ip", "netns", "list", check=False).stdout.split())
        found = [f"netns {ns}" for ns in self.namespaces if ns in names]
        found += [f"wireguard-go pid {pid}" for pid in self.daemon_pids()]
        for dev in self.devices.values():
            if daemon_pids(dev):
                found.append(f"wireguard-go for {dev}")
            if (UAPI_DIR / f"{dev}.sock").exists():
                found.append(str(UAPI_DIR / f"{dev}.sock"))
        return found


# ---- measurement -------------------------------------------------------------------------

def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_now() -> float:
    """CPU seconds of this process (every thread) and of its reaped children."""
    return time.process_time() + children_cpu()


def daemons_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Sample:
    wall: float
    cpu: float
    daemons: float = 0.0  # CPU of the wireguard-go daemons meanwhile


def sampled(fn: Callable[[], Any], daemons: Sequence[int] = ()) -> tuple[Sample, Any]:
    d0, c0, w0 = daemons_cpu(daemons), cpu_now(), time.perf_counter()
    result = fn()
    w1, c1, d1 = time.perf_counter(), cpu_now(), daemons_cpu(daemons)
    return Sample(w1 - w0, c1 - c0, d1 - d0), result


def median(samples: list[Sample]) -> dict[str, float]:
    return {"wall": statistics.median(s.wall for s in samples),
            "cpu": statistics.median(s.cpu for s in samples),
            "daemons": statistics.fmean(s.daemons for s in samples)}  # clock ticks: mean


def vm_rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def dump_lines(text: str, devices: set[str]) -> int:
    """Peer lines of `wg show ... dump` output that belong to `devices`."""
    n = 0
    for line in text.splitlines():
        cols = line.split("\t")
        # `all dump`: device + 8 columns for a peer; `DEV dump`: 8 columns for a peer
        if (len(cols) == 9 and cols[0] in devices) or (len(cols) == 8 and not devices):
            n += 1
    return n


def measure_child(dev: str, runs: int, pids: list[int]) -> dict[str, Any]:
    """Inside one namespace: `wg show DEV dump`, and wgnest's own-namespace refresh."""
    out: dict[str, Any] = {}
    dumps = [sampled(lambda: run("wg", "show", dev, "dump"), pids)[0] for _ in range(runs)]
    out["dump_dev"] = median(dumps)
    out["dump_peers"] = dump_lines(run("wg", "show", dev, "dump").stdout, set())
    try:
        from wgnest.snapshot import Reader, take
    except ImportError as exc:
        out["self_error"] = str(exc)
        return out
    from wgnest.sources.netstate import _open_default

    _open_default().close()  # pyroute2's lazy import is a one-time cost, not a refresh's
    cold = []
    for _ in range(runs):
        def once() -> Any:
            fresh = Reader()
            try:
                return take(fresh)
            finally:
                fresh.close()
        cold.append(sampled(once, pids)[0])
    out["self_cold"] = median(cold)
    reader = Reader()
    try:
        snap = take(reader)
        out["self_peers"] = sum(len(d.peers) for d in snap.devices if d.name == dev)
        out["self_failures"] = [str(f) for f in snap.failures]
        out["self_warm"] = median([sampled(lambda: take(reader), pids)[0]
                                   for _ in range(runs)])
    finally:
        reader.close()
    return out


def children(lab: NsLab, runs: int) -> list[dict[str, Any]]:
    rows = []
    for ns, dev in lab.devices.items():
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", dev,
                "--runs", str(runs), "--pids", ",".join(map(str, lab.daemon_pids()))]
        res = run(*argv, ns=ns, timeout=600)
        row = dict(json.loads(res.stdout.strip().splitlines()[-1]))
        row["ns"] = ns
        rows.append(row)
    return rows


def floor(lab: NsLab, runs: int) -> dict[str, Any]:
    """`wg` from the host: `show all dump` once, and a shell loop of `ip netns exec`."""
    pids = lab.daemon_pids()
    devices = set(lab.devices.values())
    text = run("wg", "show", "all", "dump").stdout
    out: dict[str, Any] = {
        "all_peers": dump_lines(text, devices),
        "all_devices": len({line.split("\t")[0] for line in text.splitlines()}),
        "dump_all": median([sampled(lambda: run("wg", "show", "all", "dump"), pids)[0]
                            for _ in range(runs)])}

    def loop() -> None:
        for ns, dev in lab.devices.items():
            run("ip", "netns", "exec", ns, "wg", "show", dev, "dump")

    out["exec_loop"] = median([sampled(loop, pids)[0] for _ in range(runs)])
    return out


def measure_wgnest(lab: NsLab, runs: int) -> dict[str, Any]:
    from wgnest.host_snapshot import HostReader
    from wgnest.sources.netns import NetnsSpec
    from wgnest.sources.netstate import _open_default

    _open_default().close()
    pids = lab.daemon_pids()
    out: dict[str, Any] = {}

    def reader_for(spec: str) -> Any:
        return HostReader(NetnsSpec.parse(spec), uapi_dir=UAPI_DIR, uapi_timeout=1.0)

    def cold_warm(spec: str, key: str) -> Any:
        cold = []
        for _ in range(runs):
            def once() -> Any:
                fresh = reader_for(spec)
                try:
                    return fresh.take()
                finally:
                    fresh.close()
            cold.append(sampled(once, pids)[0])
        out[f"{key}_cold"] = median(cold)
        time.sleep(0.5)  # a closed HostReader's workers close their sockets asynchronously
        fds0, rss0 = open_fds(), vm_rss()
        reader = reader_for(spec)
        try:
            first = reader.take()
            out[f"{key}_fds"] = open_fds() - fds0
            warm = []
            for _ in range(runs):
                sample, host = sampled(reader.take, pids)
                warm.append(sample)
            out[f"{key}_warm"] = median(warm)
            out[f"{key}_warm_min"] = min(s.wall for s in warm)
            out[f"{key}_rss"] = vm_rss() - rss0
            # the refresh's own durations, and each collector's summed over the namespaces
            # (they run in parallel, one worker thread per namespace)
            durations = {k: float(v) for k, v in host.durations.items()}
            for ns in host.namespaces:
                for k, v in ns.snapshot.durations.items():
                    durations[f"sum {k}"] = durations.get(f"sum {k}", 0.0) + float(v)
            out[f"{key}_durations"] = durations
        finally:
            reader.close()
        return first, host

    first, host = cold_warm("all", "all")
    mine = {ns.name: ns for ns in host.namespaces if ns.name in lab.devices}
    out["all_namespaces"] = len(host.namespaces)
    out["all_reported"] = sum(1 for ns in host.namespaces if ns.reported)
    out["all_mine"] = len(mine)
    out["all_peers_mine"] = sum(len(d.peers) for ns in mine.values()
                                for d in ns.snapshot.devices if d.name == lab.devices[ns.name])
    out["all_peers"] = sum(len(d.peers) for ns in host.namespaces for d in ns.snapshot.devices)
    out["all_failures"] = [str(f) for f in host.failures] + [
        f"{ns.name}: {f}" for ns in host.namespaces for f in ns.snapshot.failures]
    out["first_failures"] = len(first.failures)
    # the bench's namespaces by name: the same work whatever else runs on the host
    _, listed = cold_warm(",".join(lab.namespaces), "list")
    out["list_namespaces"] = len(listed.namespaces)
    out["list_peers"] = sum(len(d.peers) for ns in listed.namespaces for d in ns.snapshot.devices)
    one = lab.namespaces[0]
    _, single = cold_warm(one, "one")
    out["one_peers"] = sum(len(d.peers) for ns in single.namespaces
                           for d in ns.snapshot.devices)
    return out


# ---- report --------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(rows: list[tuple[str, str, dict[str, float]]]) -> Iterator[str]:
    cells = [["", "peers", "wall ms", "CPU ms", "wireguard-go CPU ms"]]
    cells += [[what, peers, ms(m["wall"]), ms(m["cpu"]), ms(m["daemons"])]
              for what, peers, m in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for line in cells:
        yield "  ".join([line[0].ljust(widths[0])] +
                        [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)])


def summed(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {k: sum(r[key][k] for r in rows) for k in ("wall", "cpu", "daemons")}


def report(lab: NsLab, floor_: dict[str, Any], kids: list[dict[str, Any]],
           wgn: dict[str, Any] | None, runs: int, peers: int) -> None:
    n = len(lab.namespaces)
    total = n * peers
    print(f"\n{n} namespaces x {peers} peers (wireguard-go); median of {runs} runs; "
          "CPU = this process + its reaped children")
    rows: list[tuple[str, str, dict[str, float]]] = [
        ("wg show all dump (host; shared UAPI dir)", str(floor_["all_peers"]),
         floor_["dump_all"]),
        (f"sum of wg show DEV dump, one process per ns ({n})",
         str(sum(k["dump_peers"] for k in kids)), summed(kids, "dump_dev")),
        (f"shell loop: ip netns exec NS wg show DEV dump ({n})", str(total),
         floor_["exec_loop"]),
    ]
    if all("self_warm" in k for k in kids):
        rows += [
            ("wgnest --netns self in one ns, cold", str(kids[0]["self_peers"]),
             kids[0]["self_cold"]),
            ("wgnest --netns self in one ns, warm", str(kids[0]["self_peers"]),
             kids[0]["self_warm"]),
            (f"sum of --netns self, one sidecar per ns ({n}), warm",
             str(sum(k["self_peers"] for k in kids)), summed(kids, "self_warm")),
        ]
    if wgn is not None:
        rows += [
            ("wgnest --netns NAME (one ns), cold", str(wgn["one_peers"]), wgn["one_cold"]),
            ("wgnest --netns NAME (one ns), warm", str(wgn["one_peers"]), wgn["one_warm"]),
            (f"wgnest --netns the bench's {wgn['list_namespaces']} by name, cold",
             str(wgn["list_peers"]), wgn["list_cold"]),
            (f"wgnest --netns the bench's {wgn['list_namespaces']} by name, warm",
             str(wgn["list_peers"]), wgn["list_warm"]),
            (f"wgnest --netns all ({wgn['all_namespaces']} ns), cold", str(wgn["all_peers"]),
             wgn["all_cold"]),
            (f"wgnest --netns all ({wgn['all_namespaces']} ns), warm", str(wgn["all_peers"]),
             wgn["all_warm"]),
        ]
    for line in table(rows):
        print(line)
    print(f"(`wg show all dump` from the host lists {floor_['all_devices']} device(s); "
          f"{floor_['all_peers']} of its peers are the bench's)")
    if wgn is None:
        return
    sidecars = summed(kids, "dump_dev")
    print(f"\n--netns all: {wgn['all_namespaces']} namespaces found ({wgn['all_reported']} "
          f"reported, {wgn['all_mine']} of the bench's, {wgn['all_peers_mine']} of its "
          f"{total} peers); warm min {ms(wgn['all_warm_min'])} ms; warm/sum of per-ns dumps: "
          f"wall {wgn['all_warm']['wall'] / sidecars['wall']:.2f}x, "
          f"CPU {wgn['all_warm']['cpu'] / max(sidecars['cpu'], 1e-9):.2f}x; "
          f"warm/`wg show all dump`: {wgn['all_warm']['wall'] / floor_['dump_all']['wall']:.2f}x;"
          f" per namespace {ms(wgn['all_warm']['wall'] / max(wgn['all_namespaces'], 1))} ms")
    if all("self_warm" in k for k in kids):
        side = summed(kids, "self_warm")
        for key, what in (("list", f"the bench's {n} by name"), ("all", "all")):
            print(f"  --netns {what} (warm) against {n} sidecars (--netns self per ns, warm): "
                  f"wall {wgn[f'{key}_warm']['wall'] / side['wall']:.2f}x, CPU "
                  f"{wgn[f'{key}_warm']['cpu'] / max(side['cpu'], 1e-9):.2f}x")
    print(f"  a kept HostReader holds {wgn['all_fds']} more fds and {wgn['all_rss']:.1f} MiB "
          f"more RSS (--netns NAME: {wgn['one_fds']} fds)")
    if wgn["all_durations"]:
        parts = ", ".join(f"{k} {ms(v)}" for k, v in wgn["all_durations"].items())
        print(f"  last warm refresh's durations (ms): {parts}")
    if wgn["all_failures"]:
        print(f"  failures: {wgn['all_failures'][:5]}")


# ---- driver --------------------------------------------------------------------------------

def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespaces", type=int, default=20)
    p.add_argument("--peers", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--lab-only", action="store_true",
                   help="build the lab, measure the `wg` floor and clean up (no wgnest)")
    p.add_argument("--child", metavar="DEV", help=argparse.SUPPRESS)
    p.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        pids = [int(x) for x in args.pids.split(",") if x]
        print(json.dumps(measure_child(args.child, args.runs, pids)))
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("netns_bench needs root (network namespaces, TUN)\n")
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    lab = NsLab()
    wgn: dict[str, Any] | None = None
    try:
        started = time.monotonic()
        lab.build(args.namespaces, args.peers)
        print(f"lab: {len(lab.namespaces)} namespaces {lab.tag}n00..; wireguard-go pids "
              f"{lab.daemon_pids()}; built in {time.monotonic() - started:.1f} s", flush=True)
        floor_ = floor(lab, args.runs)
        kids = children(lab, args.runs)
        if not args.lab_only:
            wgn = measure_wgnest(lab, args.runs)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
        lab.close()
        left = lab.leftovers()
        print("cleanup: " + ("left " + ", ".join(left) if left else
                             f"{len(lab.namespaces)} namespaces and their wireguard-go "
                             "removed"))
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report(lab, floor_, kids, wgn, args.runs, args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
