"""`--netns` on real namespaces (issue 13): wireguard-go devices in several named and
process-only namespaces, one nested in another namespace's full tunnel, read by a wgnest that
runs in the host's root namespace. The first tests prove the lab itself (no wgnest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import UAPI_DIR, Host, built, run
from tests.lab.netns_lab import Device, Hidden, NetnsLab, Sample, netns_inode, select

pytestmark = pytest.mark.lab
PROMTOOL = "/usr/bin/promtool"


@pytest.fixture
def nlab() -> Iterator[NetnsLab]:
    """The seed lab (router, client, two wireguard-go servers) to add namespaces to; removed
    afterwards, always, with every namespace, process and socket the test added."""
    with built(NetnsLab()) as made:
        yield made


@dataclass
class Nesting:
    a: Host  # the client: wg-quick full tunnel `w0` to s1
    b: Host  # behind A: its device `inner` (to s2) is nested in A's w0
    c: Host  # on the router: its device `direct` (to s2) goes direct
    w0: str
    inner: Device
    direct: Device


def build_nesting(lab: NetnsLab) -> Nesting:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    b = lab.behind(lab.client, "b", 10, w0)
    inner = lab.quick_device(b, 2, s2, "10.202.0.0/24")
    c = lab.plain("x", 4)
    direct = lab.quick_device(c, 3, s2, "10.202.0.0/24")
    assert lab.ping(b.ns, s2.tunnel_v4, count=2), "no traffic from B through A's tunnel"
    assert lab.ping(c.ns, s2.tunnel_v4, count=2), "no traffic through C's tunnel"
    return Nesting(lab.client, b, c, w0, inner, direct)


def peercred_pid(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        pid: int = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        return pid


def named_namespace_inodes() -> set[int]:
    out = set()
    for path in Path("/run/netns").iterdir():
        with contextlib.suppress(OSError):  # another lab's, deleted meanwhile
            out.add(netns_inode(str(path)))
    return out


# ---- the lab itself ------------------------------------------------------------------------

def test_lab_b_transport_is_routed_into_a_tunnel(nlab: NetnsLab) -> None:
    """B's default route is A; A's `not fwmark 51820 table 51820` rule sends B's forwarded
    transport into A's full tunnel, C's goes straight to the router."""
    n = build_nesting(nlab)
    s1, s2 = nlab.servers["s1"], nlab.servers["s2"]
    seen = nlab.server_view(s2)
    # s2 sees B's transport come from s1 (which masquerades what leaves its tunnel), so it
    # crossed A's tunnel; C's comes from C itself
    assert seen[n.inner.public].startswith(s1.host.v4 + ":"), seen
    assert seen[n.direct.public].startswith(n.c.v4 + ":"), seen
    # and A's tunnel carries it: its counters grow with B's traffic only
    ping_bytes = 5 * (84 + 60)  # five echo requests, each in a WireGuard packet of B's
    before = nlab.transfer(n.a.ns, n.w0)
    assert nlab.ping(n.b.ns, s2.tunnel_v4, count=5)
    after = nlab.transfer(n.a.ns, n.w0)
    assert after[1] - before[1] >= ping_bytes, (before, after)
    assert nlab.ping(n.c.ns, s2.tunnel_v4, count=5)
    assert nlab.transfer(n.a.ns, n.w0)[1] - after[1] < ping_bytes
    # the kernel's own route lookup in A for B's transport, as it arrives from B
    route = run("ip", "route", "get", s2.host.v4, "from", n.b.v4, "iif", f"{nlab.tag}bo",
                "ipproto", "udp", "dport", "51820", ns=n.a.ns).stdout
    assert f"dev {n.w0}" in route, route
    assert "table 51820" in route, route


def test_lab_uapi_peercred_of_a_wg_quick_device_names_its_exited_parent(nlab: NetnsLab) -> None:
    """What a reader of the shared /var/run/wireguard can learn of a socket's namespace:
    wg-quick daemonizes wireguard-go, whose parent listens on the socket and exits, so
    SO_PEERCRED names a dead pid; the namespace's own /proc/net/unix lists the socket."""
    n = build_nesting(nlab)
    path = UAPI_DIR / f"{n.inner.name}.sock"
    pid = peercred_pid(path)
    assert n.inner.pids
    assert pid not in n.inner.pids
    assert not Path(f"/proc/{pid}").exists(), "SO_PEERCRED names a live process now"
    for dev, host in ((n.inner, n.b), (n.direct, n.c)):
        (daemon,) = dev.pids
        assert netns_inode(f"/proc/{daemon}/ns/net") == netns_inode(f"/run/netns/{host.ns}")
        listed = run("cat", "/proc/net/unix", ns=host.ns).stdout
        assert f"{UAPI_DIR}/{dev.name}.sock" in listed
        assert f"{UAPI_DIR}/{dev.name}.sock" not in run("cat", "/proc/net/unix").stdout
    # a foreground wireguard-go (the servers) listens itself: SO_PEERCRED names it
    s2 = nlab.servers["s2"]
    assert peercred_pid(UAPI_DIR / f"{s2.name}.sock") == s2.pid


def test_lab_hidden_namespace_keeps_its_uapi_socket_private(nlab: NetnsLab) -> None:
    s1 = nlab.servers["s1"]
    h = nlab.hidden("h", 5)
    dev = nlab.hidden_device(h, f"{nlab.tag}h", s1, 21)
    assert nlab.hping(h, s1.tunnel_v4, count=2), "no traffic through the hidden device"
    assert nlab.server_view(s1)[dev.public].startswith(h.v4 + ":")
    # no /run/netns name, not the host's namespace, its own mount namespace
    assert h.inode() not in named_namespace_inodes()
    assert h.inode() != netns_inode("/proc/self/ns/net")
    assert os.readlink(f"/proc/{h.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert Path(f"/proc/{h.pid}/comm").read_text().strip() == h.comm
    (wg_pid,) = dev.pids
    assert netns_inode(f"/proc/{wg_pid}/ns/net") == h.inode()
    assert wg_pid > h.pid  # the holder is the namespace's lowest pid: its comm names it
    # its socket: only through /proc/PID/root, and there SO_PEERCRED names wireguard-go
    sock = h.uapi_dir / f"{dev.name}.sock"
    assert sock.is_socket()
    assert not (UAPI_DIR / f"{dev.name}.sock").exists()
    # /proc/PID/root/var/run/... is not the way in: the absolute symlink /var/run -> /run
    # resolves in the reader's root, so that path shows the host's directory
    assert Path("/var/run").is_symlink()
    assert not Path(f"/proc/{wg_pid}/root/var/run/wireguard/{dev.name}.sock").exists()
    assert Path(f"/proc/{wg_pid}/root/run/wireguard/{dev.name}.sock").is_socket()
    assert peercred_pid(sock) == wg_pid
    dump = nlab.hrun(h, "wg", "show", dev.name, "dump").stdout
    assert s1.public in dump
    assert dev.name not in run("wg", "show", "interfaces").stdout.split()  # not from the host


def two_containers(lab: NetnsLab, count: int = 1) -> list[tuple[Hidden, Device]]:
    """Two "containers" (process-only namespaces, private mounts and hostnames), each with a
    wireguard-go device of the same name, to s1 and to s2, both answering pings."""
    name = f"{lab.tag}d"
    out = []
    for i, srv in enumerate((lab.servers["s1"], lab.servers["s2"]), 1):
        h = lab.hidden(f"k{i}", 5 + i, hostname=f"{lab.tag}-box{i}")
        out.append((h, lab.hidden_device(h, name, srv, 30 + i)))
        assert lab.hping(h, srv.tunnel_v4, count=count)
    return out


def test_lab_same_device_name_in_two_containers(nlab: NetnsLab) -> None:
    (h1, d1), (h2, d2) = two_containers(nlab, count=2)
    name = d1.name
    for h, d in ((h1, d1), (h2, d2)):
        assert nlab.hrun(h, "hostname").stdout.strip() == h.hostname
        root = Path(f"/proc/{h.pid}/root")
        assert (root / "etc/hostname").read_text().strip() == h.hostname
        assert os.readlink(f"/proc/{h.pid}/ns/uts") != os.readlink("/proc/self/ns/uts")
        assert nlab.hrun(h, "wg", "show", name, "public-key").stdout.strip() == d.public
    assert (Path("/etc/hostname").read_text().strip()
            not in (h1.hostname, h2.hostname))
    # two files of the same path on two tmpfs: only (st_dev, st_ino) tells them apart
    st1, st2 = ((h.uapi_dir / f"{name}.sock").stat() for h in (h1, h2))
    assert (st1.st_dev, st1.st_ino) != (st2.st_dev, st2.st_ino)
    assert not (UAPI_DIR / f"{name}.sock").exists()
    assert d1.public != d2.public


# ---- wgnest --netns --------------------------------------------------------------------------

def by_netns(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert "namespaces" in doc, sorted(doc)
    entries = {e["netns"]: e for e in doc["namespaces"]}
    assert len(entries) == len(doc["namespaces"]), "a netns label twice"
    return entries


def holders(doc: dict[str, Any], device: str) -> list[str]:
    """The namespaces whose entry lists `device`."""
    return [e["netns"] for e in doc["namespaces"]
            if device in {d["name"] for d in e["devices"]}]


def peer_of(entry: dict[str, Any], device: str) -> dict[str, Any]:
    peers: list[dict[str, Any]] = [p for p in entry["peers"] if p["device"] == device]
    assert len(peers) == 1, (device, peers)
    return peers[0]


def test_check_netns_all_finds_three_namespaces_and_the_nesting(nlab: NetnsLab) -> None:
    n = build_nesting(nlab)
    s1, s2 = nlab.servers["s1"], nlab.servers["s2"]
    code, doc = nlab.host_check("--netns", "all")
    entries = by_netns(doc)
    for host in (n.a, n.b, n.c, s1.host, s2.host):
        assert host.ns in entries, sorted(entries)
    # every device of the lab once, in its own namespace (the shared /var/run/wireguard holds
    # the sockets of all five)
    for device, ns in ((n.w0, n.a.ns), (n.inner.name, n.b.ns), (n.direct.name, n.c.ns),
                       (s1.name, s1.host.ns), (s2.name, s2.host.ns)):
        assert holders(doc, device) == [ns], device
    inner = peer_of(entries[n.b.ns], n.inner.name)
    assert inner["public_key"] == s2.public
    assert inner["netns"] == n.b.ns
    assert inner["verdict"] == "nested", inner
    assert inner["outer"] == n.w0
    assert inner["outer_netns"] == n.a.ns
    assert inner["transport_netns"] == ""
    outer = peer_of(entries[n.a.ns], n.w0)
    assert outer["verdict"] == "direct", outer
    assert outer["outer_netns"] == ""
    direct = peer_of(entries[n.c.ns], n.direct.name)
    assert direct["verdict"] == "direct", direct
    assert direct["egress"] == n.c.dev
    assert direct["outer_netns"] == ""
    assert code == 2, doc["summary"]
    assert doc["exit_code"] == 2
    assert doc["status"] == "critical"
    nlab.assert_no_private_key(repr(doc))

    # a list of names: only those namespaces, and B's nesting in A still seen
    _code, doc = nlab.host_check("--netns", f"{n.a.ns},{n.b.ns}")
    assert sorted(by_netns(doc)) == sorted([n.a.ns, n.b.ns])
    inner = peer_of(by_netns(doc)[n.b.ns], n.inner.name)
    assert inner["verdict"] == "nested", inner
    assert inner["outer_netns"] == n.a.ns

    text = nlab.host_wgnest("check", "--netns", "all", "--config-dir", str(nlab.workdir),
                            "--no-probe.enabled")
    assert text.returncode == 2, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    headers = [line.split()[1] for line in lines if line.startswith("netns ")]
    for host in (n.a, n.b, n.c):
        assert headers.count(host.ns) == 1, text.stdout
    block = lines[[line.split()[:2] for line in lines].index(["netns", n.b.ns]) + 1:]
    block = block[:next((i for i, line in enumerate(block) if line.startswith("netns ")),
                        len(block))]
    assert any("NESTED" in line and n.w0 in line for line in block), "\n".join(block)


def test_check_cross_namespace_nesting_names_the_carrying_peer(nlab: NetnsLab) -> None:
    """B's transport is carried by A's only peer (s1): s2 sees it come from s1."""
    n = build_nesting(nlab)
    s1, s2 = nlab.servers["s1"], nlab.servers["s2"]
    assert nlab.server_view(s2)[n.inner.public].startswith(s1.host.v4 + ":")
    _code, doc = nlab.host_check("--netns", "all")
    inner = peer_of(by_netns(doc)[n.b.ns], n.inner.name)
    assert inner["verdict"] == "nested", inner
    assert inner["outer_peer"] == s1.public, inner


def test_check_fix_for_cross_namespace_nesting_works(nlab: NetnsLab) -> None:
    """The fix wgnest gives for B's nesting in A is run verbatim (it names A's namespace);
    B's next transport flow then leaves A by its underlay, wgnest says direct, and s2 sees
    it come from A (A masquerades what it forwards) instead of s1."""
    n = build_nesting(nlab)
    s2 = nlab.servers["s2"]
    _code, doc = nlab.host_check("--netns", "all")
    fix = peer_of(by_netns(doc)[n.b.ns], n.inner.name)["fix"]
    assert fix is not None
    for command in fix["commands"]:
        run(*command.split())  # from the host's root namespace, as printed
    # a new flow (new source port): A's conntrack keeps the old one on its old route
    run("wg", "set", n.inner.name, "listen-port", "0", ns=n.b.ns)
    _code, doc = nlab.host_check("--netns", "all")
    inner = peer_of(by_netns(doc)[n.b.ns], n.inner.name)
    assert inner["verdict"] == "direct", inner
    assert inner["outer_netns"] == ""
    assert nlab.ping(n.b.ns, s2.tunnel_v4, count=3)
    assert nlab.server_view(s2)[n.inner.public].startswith(n.a.v4 + ":")


def test_check_netns_all_reads_a_process_only_namespace(nlab: NetnsLab) -> None:
    """A container-like namespace: no /run/netns name, its socket only in its own mount
    namespace. `all` finds it from /proc and names it by its lowest pid's comm."""
    s1 = nlab.servers["s1"]
    h = nlab.hidden("h", 5)
    dev = nlab.hidden_device(h, f"{nlab.tag}h", s1, 21)
    assert nlab.hping(h, s1.tunnel_v4, count=2)
    _code, doc = nlab.host_check("--netns", "all")
    assert holders(doc, dev.name) == [h.comm], [e["netns"] for e in doc["namespaces"]]
    entry = by_netns(doc)[h.comm]
    (device,) = [d for d in entry["devices"] if d["name"] == dev.name]
    assert device["public_key"] == dev.public
    assert device["implementation"] == "userspace"
    peer = peer_of(entry, dev.name)
    assert peer["public_key"] == s1.public
    assert peer["netns"] == h.comm
    assert peer["verdict"] == "direct", peer
    assert peer["egress"] == h.dev
    assert peer["last_handshake"] > 0

    # the same namespace by path
    _code, doc = nlab.host_check("--netns", h.path)
    assert [e["netns"] for e in doc["namespaces"]] == [h.comm]
    assert holders(doc, dev.name) == [h.comm]
    # the flag repeated, a path and a name: those two; s1's server sees the hidden device
    _code, doc = nlab.host_check("--netns", h.path, "--netns", s1.host.ns)
    assert sorted(by_netns(doc)) == sorted([h.comm, s1.host.ns])
    assert dev.public in {p["public_key"] for p in by_netns(doc)[s1.host.ns]["peers"]}


def test_check_two_containers_with_one_hostname_get_distinct_labels(nlab: NetnsLab) -> None:
    """Same hostname, same device name: the labels stay apart by the namespace's inode."""
    s1, s2 = nlab.servers["s1"], nlab.servers["s2"]
    box = f"{nlab.tag}-box"
    h1, h2 = nlab.hidden("k1", 6, hostname=box), nlab.hidden("k2", 7, hostname=box)
    name = f"{nlab.tag}d"
    d1, d2 = nlab.hidden_device(h1, name, s1, 31), nlab.hidden_device(h2, name, s2, 32)
    _code, doc = nlab.host_check("--netns", "all")
    labels = holders(doc, name)
    assert len(labels) == 2, labels
    assert len(set(labels)) == 2
    for h, d in ((h1, d1), (h2, d2)):
        (label,) = [e["netns"] for e in doc["namespaces"]
                    if d.public in {x["public_key"] for x in e["devices"]}]
        assert label in (box, f"{box}-{h.inode()}"), label


def wait_scrape(lab: NetnsLab, done: Callable[[list[Sample]], bool], timeout: float = 15.0
                ) -> tuple[str, list[Sample]]:
    deadline = time.monotonic() + timeout
    while True:
        text, samples = lab.scrape()
        if done(samples) or time.monotonic() > deadline:
            return text, samples
        time.sleep(0.25)


def of_netns(samples: list[Sample], netns: str) -> list[Sample]:
    return [s for s in samples if s[1].get("netns") == netns]


def promtool_lint(text: str) -> None:
    assert Path(PROMTOOL).exists() or shutil.which("promtool"), "promtool (Debian) is missing"
    lint = subprocess.run([shutil.which("promtool") or PROMTOOL, "check", "metrics"],
                          input=text, text=True, capture_output=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_serve_netns_all_exports_the_nesting_across_namespaces(nlab: NetnsLab) -> None:
    n = build_nesting(nlab)
    nlab.host_serve("--netns", "all", "--refresh.interval", "1s", "--no-probe.enabled")
    text, samples = wait_scrape(nlab, lambda s: bool(select(
        s, "wireguard_peer_nested", netns=n.b.ns, device=n.inner.name)))
    promtool_lint(text)
    (inner,) = select(samples, "wireguard_peer_nested", netns=n.b.ns, device=n.inner.name)
    assert inner[2] == 1, inner
    assert inner[1]["outer_device"] == n.w0
    assert inner[1]["outer_netns"] == n.a.ns
    for ns, device in ((n.a.ns, n.w0), (n.c.ns, n.direct.name)):
        (peer,) = select(samples, "wireguard_peer_nested", netns=ns, device=device)
        assert peer[2] == 0, peer
        assert peer[1]["outer_netns"] == ""
    (fwmark,) = select(samples, "wireguard_device_fwmark", netns=n.a.ns, device=n.w0)
    assert fwmark[2] == 51820
    # the same device names in no other namespace
    assert {s[1]["netns"] for s in select(samples, "wireguard_device_info")
            if s[1]["device"] in (n.w0, n.inner.name, n.direct.name)} == {
        n.a.ns, n.b.ns, n.c.ns}


def test_serve_netns_all_drops_a_deleted_namespace(nlab: NetnsLab) -> None:
    s1, s2 = nlab.servers["s1"], nlab.servers["s2"]
    x, y = nlab.plain("x", 4), nlab.plain("y", 8)
    dx = nlab.quick_device(x, 3, s2, "10.202.0.0/24")
    dy = nlab.quick_device(y, 4, s1, "10.201.0.0/24")
    h = nlab.hidden("h", 5, hostname=f"{nlab.tag}-box")
    dh = nlab.hidden_device(h, f"{nlab.tag}h", s1, 21)
    assert nlab.ping(x.ns, s2.tunnel_v4)
    assert nlab.ping(y.ns, s1.tunnel_v4)
    assert nlab.hping(h, s1.tunnel_v4)
    nlab.host_serve("--netns", "all", "--refresh.interval", "1s", "--no-probe.enabled")

    def shows(ns: str, dev: Device) -> Callable[[list[Sample]], bool]:
        return lambda s: bool(select(s, "wireguard_device_info", netns=ns, device=dev.name))

    text, samples = wait_scrape(nlab, lambda s: all(
        shows(ns, d)(s) for ns, d in ((x.ns, dx), (y.ns, dy), (h.hostname, dh))))
    promtool_lint(text)
    for ns, dev in ((x.ns, dx), (y.ns, dy), (h.hostname, dh)):
        (info,) = select(samples, "wireguard_device_info", netns=ns, device=dev.name)
        assert info[1]["public_key"] == dev.public
        (peer,) = select(samples, "wireguard_peer_info", netns=ns, device=dev.name)
        assert peer[1]["public_key"] == dev.server.public
        (nested,) = select(samples, "wireguard_peer_nested", netns=ns, device=dev.name)
        assert nested[2] == 0
        assert nested[1]["outer_netns"] == ""
        assert [s[2] for s in select(samples, "wgnest_netns_info", netns=ns)] == [1]
        successes = select(samples, "wgnest_collector_success", netns=ns)
        assert successes
        assert all(s[2] == 1 for s in successes), successes
    (xinfo,) = select(samples, "wgnest_netns_info", netns=x.ns)
    assert xinfo[1]["path"] == f"/run/netns/{x.ns}"
    read = len(select(samples, "wgnest_netns_info"))
    assert read >= 3 + 4  # x, y, h and the lab's own (router, client, s1, s2) at least
    # no wireguard_* series without its namespace
    assert not [s for s in samples if s[0].startswith("wireguard_") and "netns" not in s[1]]

    nlab.delete_namespace(x.ns)
    assert not (UAPI_DIR / f"{dx.name}.sock").exists()  # wireguard-go removed its socket
    text, samples = wait_scrape(nlab, lambda s: not of_netns(s, x.ns), timeout=10)
    assert not of_netns(samples, x.ns), "series of a deleted namespace are still exported"
    assert select(samples, "wireguard_device_info", netns=y.ns, device=dy.name)
    assert select(samples, "wireguard_device_info", netns=h.hostname, device=dh.name)
    promtool_lint(text)
    # a process-only namespace ends with its last process: its series go too
    nlab.stop_hidden(h)
    text, samples = wait_scrape(nlab, lambda s: not of_netns(s, h.hostname), timeout=10)
    assert not of_netns(samples, h.hostname), "series of an ended namespace are still exported"
    assert select(samples, "wireguard_device_info", netns=y.ns, device=dy.name)
    assert nlab.serve_log is not None
    nlab.assert_no_private_key(text, nlab.serve_log.read_text())
    # the contract's gauge of namespaces read: one fewer now
    counts = [s[2] for s in select(samples, "wgnest_netns")]
    assert counts == [len(select(samples, "wgnest_netns_info"))], "wgnest_netns gauge"
    assert len(select(samples, "wgnest_netns_info")) < read


def test_serve_same_device_name_in_two_namespaces_stays_two_series(nlab: NetnsLab) -> None:
    (h1, d1), (h2, d2) = two_containers(nlab)
    s1, s2, name = nlab.servers["s1"], nlab.servers["s2"], d1.name
    nlab.host_serve("--netns", "all", "--refresh.interval", "1s", "--no-probe.enabled")
    text, samples = wait_scrape(nlab, lambda s: len(
        select(s, "wireguard_device_info", device=name)) >= 2)
    promtool_lint(text)
    want = {h1.hostname: (d1, s1), h2.hostname: (d2, s2)}
    infos = select(samples, "wireguard_device_info", device=name)
    assert {s[1]["netns"]: s[1]["public_key"] for s in infos} == {
        ns: d.public for ns, (d, _srv) in want.items()}
    assert len(infos) == 2
    peers = select(samples, "wireguard_peer_info", device=name)
    assert sorted((s[1]["netns"], s[1]["public_key"]) for s in peers) == sorted(
        (ns, srv.public) for ns, (_d, srv) in want.items())
    for ns, (_d, srv) in want.items():
        rx = select(samples, "wireguard_peer_receive_bytes_total", netns=ns, device=name)
        assert [s[1]["public_key"] for s in rx] == [srv.public]
        assert rx[0][2] > 0  # the pings' replies, counted in that namespace's device
    # one line per series: nothing of the two devices merged or repeated
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(set(lines))
    assert not [s for s in samples if s[1].get("device") == name
                and s[1].get("netns") not in want]

