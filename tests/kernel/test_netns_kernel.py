"""The netns trick (https://www.wireguard.com/netns/): a kernel WireGuard device made in
namespace A and moved into namespace B keeps its UDP socket in A, so its transport is routed
by A. Seen from B alone, B's default route being the device itself looks like a loop; wgnest
finds the socket's namespace (sock_diag in every namespace it can enter) and asks A's routing.

One lab serves every scenario (a boot is slow and so is every wgnest run in the guest):

    client (wg-quick full tunnel w0 to s1) ──┐
    d (no tunnel) ───────────────────────────┼── router ── s1, s2 (kernel servers, port 51820)
    bd: md (born in d, peer s1, its default route) and ms (born in d, peer s2, port 51820)
    bn: mn (born in the client, peer s2, its default route): its transport enters w0, nested

bd's and bn's only interfaces are lo and the moved devices.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.kernel.klab import KernelLab, check_json, netns_of, peer_of
from tests.lab.lab import Server, genkey, in_netns, run
from wgnest.sources.udp_sockets import udp_listen_ports

PORT = 51877  # md: moved out of d, a port no other namespace uses
# ms: also moved out of d, on the servers' port: s1 and s2 have a socket on it too, each
# explained by a device of their own there (the netns trick's usual port, everywhere)
SHARED_PORT = 51820
NESTED_PORT = 51878  # mn: moved out of the client, which has the full tunnel
SOCKET_PORT = 51877  # test_kernel_device_sockets_are_listed_where_they_were_made
FULL_MARK = 51820  # wg-quick's Table=auto fwmark and table of the full tunnel
ALL = "all"  # NetnsLab.check: `--netns all` from the guest's root namespace


def test_kernel_device_sockets_are_listed_where_they_were_made() -> None:
    """udp_listen_ports against the kernel: a device's sockets (IPv4 and IPv6) appear when
    it goes up, stay in the creating namespace when the device moves, and go with it."""
    tag = "wk" + secrets.token_hex(2)
    a, b, dev = f"{tag}a", f"{tag}b", f"{tag}wg"
    try:
        for ns in (a, b):
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", dev, "type", "wireguard", ns=a)
        run("wg", "set", dev, "listen-port", str(SOCKET_PORT), ns=a)
        with in_netns(a):
            assert (4, SOCKET_PORT) not in udp_listen_ports()  # a device that is down has none
        run("ip", "link", "set", dev, "up", ns=a)
        with in_netns(a):
            assert {(4, SOCKET_PORT), (6, SOCKET_PORT)} <= udp_listen_ports()
        run("ip", "link", "set", dev, "netns", b, ns=a)
        run("ip", "link", "set", dev, "up", ns=b)
        assert run("wg", "show", dev, "listen-port", ns=b).stdout.strip() == str(SOCKET_PORT)
        with in_netns(a):
            assert {(4, SOCKET_PORT), (6, SOCKET_PORT)} <= udp_listen_ports()
        with in_netns(b):
            assert (4, SOCKET_PORT) not in udp_listen_ports()
        run("ip", "link", "del", dev, ns=b)
        with in_netns(a):
            assert (4, SOCKET_PORT) not in udp_listen_ports()
    finally:
        for ns in (a, b):
            run("ip", "netns", "del", ns, check=False)


@dataclass
class Moved:
    """A kernel WireGuard device made in `birth`, then moved into `home`."""

    birth: str
    home: str
    name: str
    public: str
    port: int
    server: Server


@dataclass
class NetnsLab:
    lab: KernelLab
    direct: Moved  # md: born in d (no tunnel there), direct through d's uplink
    shared: Moved  # ms: like md, on a port s1's and s2's own devices listen on too
    nested: Moved  # mn: born in the client, whose full tunnel w0 carries its transport
    outer: str  # w0
    uplink: str  # d's veth towards the router
    # ground truth, measured while building (the pings also make the handshakes)
    pings: dict[str, bool] = field(default_factory=dict)  # device -> a reply came back
    outer_tx_growth: int = 0  # bytes w0 sent while bn pinged s2 through mn
    views: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> endpoints
    sockets: dict[str, frozenset[tuple[int, int]]] = field(default_factory=dict)  # ns -> ports
    birth_gone: bool = False  # test_birth_namespace_gone_is_unknown deleted d
    _checks: dict[str, tuple[int, dict[str, Any]] | AssertionError] = field(
        default_factory=dict)

    def check(self, where: str) -> tuple[int, dict[str, Any]]:
        """`wgnest check --format json` run in namespace `where` (default --netns self), or
        with `--netns all` from the root namespace for ALL; each run once per lab (a run
        that failed fails every test that asks for it, without running again)."""
        assert not self.birth_gone, "the lab's namespace d is gone: this check is meaningless"
        if where not in self._checks:
            try:
                self._checks[where] = (
                    check_json(None, self.lab.workdir, "--netns", "all") if where == ALL
                    else check_json(where, self.lab.workdir))
            except AssertionError as exc:
                self._checks[where] = exc
        done = self._checks[where]
        if isinstance(done, AssertionError):
            raise AssertionError(f"wgnest check ({where}) failed: {done}")
        print(f"wgnest check ({where}), exit {done[0]}:\n{json.dumps(done[1])}")  # on failure
        return done


def _move(lab: KernelLab, birth: str, role: str, srv: Server, address: str, port: int,
          home: str = "") -> Moved:
    """A kernel device `<tag>m<role>` made in `birth` with peer `srv`, moved into `home`.
    Without `home`: into a bare new namespace `<tag>b<role>` whose default route is the
    device, which carries everything; with one, it carries only srv's tunnel subnet."""
    everything = not home
    home = home or lab._ns(f"b{role}")  # only lo: no uplink of its own
    name = f"{lab.tag}m{role}"
    private, public = genkey()
    lab.private_keys.append(private)
    keyfile = lab.workdir / f"{name}.key"
    keyfile.write_text(private + "\n")
    keyfile.chmod(0o600)
    lab.add_server_peer(srv, public, address, f"fd0{srv.name[-1]}::{address.split('.')[-1]}")
    allowed = "0.0.0.0/0,::/0" if everything else f"{srv.tunnel_v4.rsplit('.', 1)[0]}.0/24"
    run("ip", "link", "add", name, "type", "wireguard", ns=birth)
    run("wg", "set", name, "listen-port", str(port), "private-key", str(keyfile), "peer",
        srv.public, "endpoint", f"{srv.host.v4}:{srv.port}", "allowed-ips", allowed, ns=birth)
    run("ip", "link", "set", name, "netns", home, ns=birth)
    run("ip", "addr", "add", f"{address}/24", "dev", name, ns=home)
    run("ip", "link", "set", name, "up", ns=home)
    if everything:
        run("ip", "route", "add", "default", "dev", name, ns=home)
    (lab.workdir / f"{name}.conf").write_text(
        f"[Interface]\nListenPort = {port}\n\n[Peer]\nPublicKey = {srv.public}\n"
        f"AllowedIPs = {allowed.replace(',', ', ')}\nEndpoint = {srv.host.v4}:{srv.port}\n")
    return Moved(birth, home, name, public, port, srv)


def show(peer: dict[str, Any]) -> str:
    """A peer entry in full for an assertion message (pytest cuts dicts short)."""
    return json.dumps(peer, sort_keys=True)


def _tx_bytes(ns: str, device: str) -> int:
    out = run("wg", "show", device, "transfer", ns=ns).stdout
    return sum(int(line.split("\t")[2]) for line in out.splitlines() if line.count("\t") == 2)


def _build(lab: KernelLab) -> NetnsLab:
    lab.build(2)
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    d = lab._attach("d", 9)  # a second uplinked namespace, without any tunnel
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")  # wg-quick: fwmark 51820, Table=auto rules
    direct = _move(lab, d.ns, "d", s1, "10.201.0.40", PORT)
    shared = _move(lab, d.ns, "s", s2, "10.202.0.41", SHARED_PORT, home=direct.home)
    nested = _move(lab, lab.client.ns, "n", s2, "10.202.0.40", NESTED_PORT)
    nl = NetnsLab(lab, direct, shared, nested, w0, d.dev)
    nl.pings[direct.name] = lab.ping(direct.home, s1.tunnel_v4, count=3)
    nl.pings[shared.name] = lab.ping(shared.home, s2.tunnel_v4, count=3)
    before = _tx_bytes(lab.client.ns, w0)
    nl.pings[nested.name] = lab.ping(nested.home, s2.tunnel_v4, count=3)
    nl.outer_tx_growth = _tx_bytes(lab.client.ns, w0) - before
    nl.views = {"s1": lab.server_view(s1), "s2": lab.server_view(s2)}
    for ns in (d.ns, lab.client.ns, direct.home, nested.home):
        with in_netns(ns):
            nl.sockets[ns] = udp_listen_ports()
    return nl


@pytest.fixture(scope="module")
def nlab() -> Iterator[NetnsLab]:
    lab = KernelLab()
    try:
        try:
            built = _build(lab)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None
        yield built
    finally:
        lab.close()


def test_moved_devices_send_through_their_birth_namespace(nlab: NetnsLab) -> None:
    """Ground truth for what wgnest must say: bd and bn have no interface but lo and the
    moved devices, so a reply proves the transport left through the birth namespace."""
    lab, direct, shared, nested = nlab.lab, nlab.direct, nlab.shared, nlab.nested
    assert nlab.pings == dict.fromkeys((direct.name, shared.name, nested.name), True), (
        f"no reply through some moved device: {nlab.pings}")
    # s1 and s2 see d's own address: direct through d's uplink
    assert nlab.views["s1"][direct.public] == f"{lab.hosts['d'].v4}:{PORT}", nlab.views
    assert nlab.views["s2"][shared.public] == f"{lab.hosts['d'].v4}:{SHARED_PORT}", nlab.views
    # s2 sees s1 (which masquerades what its tunnel brings out): mn's transport went into w0
    assert nlab.views["s2"][nested.public].startswith(direct.server.host.v4 + ":"), nlab.views
    # ...and w0 sent at least the three pings, each wrapped in mn's transport (>= 150 bytes)
    assert nlab.outer_tx_growth >= 3 * 150, nlab.outer_tx_growth
    # the sockets are the birth namespaces', not the homes'
    assert {(4, PORT), (6, PORT), (4, SHARED_PORT), (6, SHARED_PORT)} <= nlab.sockets[direct.birth]
    assert {(4, NESTED_PORT), (6, NESTED_PORT)} <= nlab.sockets[nested.birth]
    assert not nlab.sockets[direct.home], nlab.sockets[direct.home]
    assert not nlab.sockets[nested.home], nlab.sockets[nested.home]


def _assert_direct(nlab: NetnsLab, moved: Moved, peer: dict[str, Any]) -> None:
    assert peer["verdict"] == "direct", show(peer)
    assert peer["endpoint"] == f"{moved.server.host.v4}:{moved.server.port}", show(peer)
    assert peer["transport_netns"] == moved.birth, show(peer)
    assert peer["egress"] == nlab.uplink, show(peer)  # d's uplink, not the device itself
    assert peer["outer"] == "", show(peer)
    assert peer["outer_netns"] == "", show(peer)
    assert not peer["error"], show(peer)


def _assert_nested(nlab: NetnsLab, peer: dict[str, Any]) -> None:
    nested = nlab.nested
    assert peer["verdict"] == "nested", show(peer)
    assert peer["endpoint"] == f"{nested.server.host.v4}:{nested.server.port}", show(peer)
    assert peer["transport_netns"] == nested.birth, show(peer)
    assert peer["outer"] == nlab.outer, show(peer)
    assert peer["outer_netns"] == nested.birth, show(peer)
    assert peer["outer_peer"] == nlab.lab.servers["s1"].public, show(peer)  # w0's peer
    assert peer["egress"] == nlab.outer, show(peer)
    assert peer["flow"]["mark"] == 0, show(peer)
    assert peer["alarming"] is True, show(peer)


def _bd_devices(nlab: NetnsLab, doc: dict[str, Any]) -> None:
    names = sorted(d["name"] for d in doc["devices"])
    assert names == sorted((nlab.direct.name, nlab.shared.name)), doc["devices"]


def test_moved_device_direct_from_inside(nlab: NetnsLab) -> None:
    """wgnest in bd (--netns self): md's socket is found in d, d routes the transport out
    of its uplink: direct, not the loop bd's own routing suggests."""
    _code, doc = nlab.check(nlab.direct.home)
    assert "namespaces" not in doc, doc  # self: today's document
    _bd_devices(nlab, doc)
    _assert_direct(nlab, nlab.direct, peer_of(doc, nlab.direct.name))


def test_moved_device_on_a_shared_port_from_inside(nlab: NetnsLab) -> None:
    """ms's port has sockets in d, s1 and s2; s1's and s2's are their own devices' (not
    moved): d is the only candidate, so ms is direct too and bd is all clear."""
    code, doc = nlab.check(nlab.shared.home)
    _assert_direct(nlab, nlab.shared, peer_of(doc, nlab.shared.name))
    assert (code, doc["status"]) == (0, "ok"), (code, doc["summary"], doc["errors"])


def test_moved_device_direct_with_netns_all(nlab: NetnsLab) -> None:
    code, doc = nlab.check(ALL)
    home = netns_of(doc, nlab.direct.home)
    _bd_devices(nlab, home)
    peer = peer_of(home, nlab.direct.name)
    assert peer["netns"] == nlab.direct.home, show(peer)
    _assert_direct(nlab, nlab.direct, peer)
    # d itself has no device: its sockets are bd's devices', not reported on their own
    birth = netns_of(doc, nlab.direct.birth)
    assert not birth["devices"], birth
    assert not birth["peers"], birth
    assert code == 2, (code, doc["summary"])  # mn is nested


def test_moved_device_on_a_shared_port_with_netns_all(nlab: NetnsLab) -> None:
    _code, doc = nlab.check(ALL)
    peer = peer_of(netns_of(doc, nlab.shared.home), nlab.shared.name)
    assert peer["netns"] == nlab.shared.home, show(peer)
    _assert_direct(nlab, nlab.shared, peer)


def test_moved_device_nested_from_inside(nlab: NetnsLab) -> None:
    """wgnest in bn (--netns self): the socket is the client's, whose full tunnel w0 takes
    every unmarked packet (Table=auto: `not fwmark 51820 table 51820`): nested in w0."""
    code, doc = nlab.check(nlab.nested.home)
    assert "namespaces" not in doc, doc
    assert [d["name"] for d in doc["devices"]] == [nlab.nested.name], doc["devices"]
    _assert_nested(nlab, peer_of(doc, nlab.nested.name))
    assert (code, doc["status"]) == (2, "critical"), (code, doc["summary"])


def test_moved_device_nested_with_netns_all(nlab: NetnsLab) -> None:
    code, doc = nlab.check(ALL)
    lab = nlab.lab
    peer = peer_of(netns_of(doc, nlab.nested.home), nlab.nested.name)
    assert peer["netns"] == nlab.nested.home, show(peer)
    _assert_nested(nlab, peer)
    # the outer tunnel itself, in its own namespace: direct, its transport its own
    outer = peer_of(netns_of(doc, lab.client.ns), nlab.outer)
    assert outer["verdict"] == "direct", show(outer)
    assert outer["netns"] == lab.client.ns, show(outer)
    assert outer["transport_netns"] == "", show(outer)
    assert outer["outer_netns"] == "", show(outer)
    assert outer["egress"] == lab.client.dev, show(outer)
    assert outer["flow"]["mark"] == FULL_MARK, show(outer)
    nested = [(n["netns"], p["device"]) for n in doc["namespaces"] for p in n["peers"]
              if p["verdict"] == "nested"]
    assert nested == [(nlab.nested.home, nlab.nested.name)], nested
    assert (code, doc["status"]) == (2, "critical"), (code, doc["summary"])


def test_birth_namespace_gone_is_unknown(nlab: NetnsLab) -> None:
    """When d is deleted the kernel closes its devices' sockets (wg_netns_pre_exit): md and
    ms stay in bd with their listen ports, but no namespace has their sockets (s1's and
    s2's on ms's port are their own devices'). wgnest must say so (unknown, with the
    reason), not guess direct or loop. Runs last: it takes d away."""
    lab, direct = nlab.lab, nlab.direct
    nlab.birth_gone = True
    run("ip", "netns", "del", direct.birth)
    lab.namespaces.remove(direct.birth)
    # the namespace dies asynchronously; its veth's far end in the router goes with it
    veth = f"{lab.tag}do"
    deadline = time.monotonic() + 60
    while run("ip", "link", "show", veth, ns=lab.router, check=False).returncode == 0:
        assert time.monotonic() < deadline, f"namespace {direct.birth} is not destroyed"
        time.sleep(0.5)
    assert run("wg", "show", direct.name, "listen-port", ns=direct.home).stdout.strip() == (
        str(PORT))
    assert not lab.ping(direct.home, direct.server.tunnel_v4), "md still sends"
    code, doc = check_json(direct.home, lab.workdir)
    for moved in (direct, nlab.shared):
        peer = peer_of(doc, moved.name)
        assert peer["verdict"] == "unknown", show(peer)
        assert peer["error"], show(peer)
    assert code in (1, 3), (code, doc["summary"])
