"""The generic netlink reader (wgnest.sources.wg_kernel) against the kernel itself: large
devices whose dump spans many messages, a peer split across messages, a device deleted under
the reader, and dumps the kernel flags NLM_F_DUMP_INTR because peers changed meanwhile.

Ground truth is `wg show all dump` (wireguard-tools, C). The reader runs in this process,
inside a lab namespace (in_netns), exactly as `wgnest serve` reads."""

from __future__ import annotations

import base64
import ipaddress
import itertools
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import genkey, in_netns, run
from wgnest.sources.netstate import NetState
from wgnest.sources.wg_kernel import DUMP_RETRIES, kernel_devices, open_wireguard

NLM_F_DUMP_INTR = 0x10
PEERS = 1000
WIDE = 2000  # allowed IPs on one peer: far more than one dump message holds


def fake_key() -> str:
    """A public key nobody holds: the kernel takes any 32 bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Net:
    """Two namespaces joined by veth; kernel WireGuard devices are made in `a`."""

    tag: str = field(default_factory=lambda: "wk" + secrets.token_hex(2))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wgnest-k-")))

    @property
    def a(self) -> str:
        return f"{self.tag}a"

    @property
    def b(self) -> str:
        return f"{self.tag}b"

    def build(self) -> Net:
        for ns in (self.a, self.b):
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", "va", "netns", self.a, "type", "veth", "peer", "vb",
            "netns", self.b)
        for ns, dev, addr in ((self.a, "va", "192.168.77.1"), (self.b, "vb", "192.168.77.2")):
            run("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)
        return self

    def close(self) -> None:
        for ns in (self.a, self.b):
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def device(self, name: str, conf: str, ns: str | None = None) -> None:
        """Make kernel device `name` and load `conf` (wg setconf syntax) into it at once."""
        ns = ns or self.a
        path = self.workdir / f"{name}.conf"
        path.write_text(conf)
        run("ip", "link", "add", name, "type", "wireguard", ns=ns)
        run("wg", "setconf", name, str(path), ns=ns, timeout=300)
        run("ip", "link", "set", name, "up", ns=ns)

    def read(self, open_wg: Any = open_wireguard) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Links, then every kernel device, as wgnest reads them, from inside namespace a.
        Returns (devices by name, (reason, message) of each error)."""
        with in_netns(self.a):
            state = NetState()
            try:
                links = state.links()
            finally:
                state.close()
            return read_devices(links, open_wg)


def read_devices(links: Any, open_wg: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    devices, errors = kernel_devices(links, open_wg)
    return {d.name: d for d in devices}, error_list(errors)


def error_list(errors: Any) -> list[tuple[str, str]]:
    """(reason, message) per failed device; kernel_devices returned a dict of texts by device
    name before it returned a list of SourceError."""
    if isinstance(errors, dict):
        return [(text.split(":", 1)[0], f"{name}: {text}") for name, text in errors.items()]
    return [(exc.reason, str(exc)) for exc in errors]


@pytest.fixture
def net() -> Iterator[Net]:
    built = Net()
    try:
        yield built.build()
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None
    finally:
        built.close()


def peer_conf(key: str, allowed: list[str], endpoint: str | None = None) -> str:
    ep = f"Endpoint = {endpoint}\n" if endpoint else ""
    return f"[Peer]\nPublicKey = {key}\nAllowedIPs = {', '.join(allowed)}\n{ep}\n"


def many_peers(count: int, first: int = 0) -> list[tuple[str, list[str], str]]:
    """`count` peers with one IPv4 /32 and one IPv6 /128 each; endpoints alternate between
    IPv4 and IPv6 addresses."""
    out = []
    for i in range(first, first + count):
        v4 = ipaddress.ip_address("10.64.0.0") + i
        ep = f"192.0.2.{1 + i % 250}:{20000 + i}" if i % 2 else f"[2001:db8::{i:x}]:{20000 + i}"
        out.append((fake_key(), [f"{v4}/32", f"fd10::{i:x}/128"], ep))
    return out


# ---- ground truth -------------------------------------------------------------------------

def wg_dump(ns: str) -> dict[str, dict[str, Any]]:
    """`wg show all dump`: device -> {"public_key", "listen_port", "fwmark", "peers": {key:
    (endpoint, sorted allowed IPs, handshake, rx, tx, keepalive)}}."""
    out: dict[str, dict[str, Any]] = {}
    for line in run("wg", "show", "all", "dump", ns=ns, timeout=120).stdout.splitlines():
        f = line.split("\t")
        if len(f) == 5:
            out[f[0]] = {"public_key": f[2], "listen_port": int(f[3]),
                         "fwmark": 0 if f[4] == "off" else int(f[4], 0), "peers": {}}
        else:
            allowed = sorted(f[4].split(",")) if f[4] != "(none)" else []
            keepalive = 0 if f[8] == "off" else int(f[8])
            out[f[0]]["peers"][f[1]] = (f[3] if f[3] != "(none)" else "", allowed, int(f[5]),
                                        int(f[6]), int(f[7]), keepalive)
    return out


def endpoint_text(ep: Any) -> str:
    if ep is None:
        return ""
    return f"[{ep.address}]:{ep.port}" if ep.address.version == 6 else f"{ep.address}:{ep.port}"


def as_dump(device: Any) -> dict[str, Any]:
    peers = {}
    for p in device.peers:
        assert p.public_key not in peers, f"{device.name}: peer {p.public_key} twice"
        peers[p.public_key] = (endpoint_text(p.endpoint), sorted(str(n) for n in p.allowed_ips),
                               int(p.last_handshake), p.rx_bytes, p.tx_bytes,
                               p.persistent_keepalive)
    return {"public_key": device.public_key, "listen_port": device.listen_port,
            "fwmark": device.fwmark, "peers": peers}


def assert_matches(got: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """`got` equals the kernel's dump; counters and handshake times may only have moved
    between the dump taken before and the one taken after the read."""
    for key in ("public_key", "listen_port", "fwmark"):
        assert got[key] == after[key] == before[key], key
    assert set(got["peers"]) == set(after["peers"]), (
        f"{len(got['peers'])} peers read, {len(after['peers'])} in wg show")
    for key, (ep, allowed, hs, rx, tx, ka) in got["peers"].items():
        _, _, b_hs, b_rx, b_tx, _ = before["peers"][key]
        a_ep, a_allowed, a_hs, a_rx, a_tx, a_ka = after["peers"][key]
        assert ep == a_ep, (key, ep, a_ep)
        assert allowed == a_allowed, (key, len(allowed), len(a_allowed))
        assert ka == a_ka
        assert b_hs <= hs <= a_hs, (key, b_hs, hs, a_hs)
        assert b_rx <= rx <= a_rx, (key, b_rx, rx, a_rx)
        assert b_tx <= tx <= a_tx, (key, b_tx, tx, a_tx)


def public_key(raw_peer: Any) -> str:
    value = raw_peer.get_attr("WGPEER_A_PUBLIC_KEY")
    value = value.get("value", b"") if isinstance(value, dict) else value
    return value.decode() if isinstance(value, bytes) else str(value)


class Recording:
    """The reader's own pyroute2 WireGuard socket, recording the messages of each dump (and
    whether the kernel flagged it NLM_F_DUMP_INTR). The messages are the kernel's. The socket
    is opened at the first read, so in the namespace the reader runs in."""

    def __init__(self) -> None:
        self._wg: Any = None
        self.dumps: list[tuple[str, list[Any]]] = []

    def _open(self) -> Any:
        return open_wireguard()

    def info(self, name: str) -> list[Any]:
        if self._wg is None:
            self._wg = self._open()
        msgs = list(self._wg.info(name))
        self.dumps.append((name, msgs))
        return msgs

    def flags(self, name: str) -> list[bool]:
        """Whether the kernel flagged each dump of device `name`, in order."""
        return [self.interrupted(msgs) for dev, msgs in self.dumps if dev == name]

    def close(self) -> None:
        if self._wg is not None:
            self._wg.close()
            self._wg = None

    @staticmethod
    def interrupted(msgs: list[Any]) -> bool:
        return any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in msgs)


# ---- tests ----------------------------------------------------------------------------------

def test_thousand_peers_and_a_split_peer_match_wg_show_dump(net: Net) -> None:
    """1,000 peers (IPv4 and IPv6 endpoints), one peer with 2,000 allowed IPs, and one real
    peer with a handshake and traffic: every key, endpoint, allowed IP, counter and handshake
    as `wg show all dump` has them."""
    private_a, public_a = genkey()
    private_b, public_b = genkey()
    wide = [f"{ipaddress.ip_address('10.128.0.0') + i}/32" for i in range(WIDE)]
    wide_key = fake_key()
    conf = f"[Interface]\nPrivateKey = {private_a}\nListenPort = 51820\nFwMark = 0x77\n\n"
    conf += peer_conf(public_b, ["10.99.0.2/32"], "192.168.77.2:51820")
    conf += "".join(peer_conf(*p) for p in many_peers(PEERS))
    conf += peer_conf(wide_key, wide, "[2001:db8::ffff]:1")
    dev_a, dev_b = f"{net.tag}wa", f"{net.tag}wb"
    net.device(dev_a, conf)
    net.device(dev_b, f"[Interface]\nPrivateKey = {private_b}\nListenPort = 51820\n\n"
                      + peer_conf(public_a, ["10.99.0.1/32"], "192.168.77.1:51820"), ns=net.b)
    run("ip", "addr", "add", "10.99.0.1/24", "dev", dev_a, ns=net.a)
    run("ip", "addr", "add", "10.99.0.2/24", "dev", dev_b, ns=net.b)
    ping = run("ping", "-c", "3", "-i", "0.2", "-W", "5", "10.99.0.2", ns=net.a, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    before = wg_dump(net.a)
    recording = Recording()
    devices, errors = net.read(lambda: recording)
    after = wg_dump(net.a)
    assert errors == []
    assert set(devices) == {dev_a}  # dev_b lives in the other namespace
    dev = devices[dev_a]
    assert dev.implementation == "kernel"
    assert len(dev.peers) == PEERS + 2
    got = as_dump(dev)
    assert_matches(got, before[dev_a], after[dev_a])
    assert got["fwmark"] == 0x77
    assert got["public_key"] == public_a
    real = got["peers"][public_b]
    assert min(real[2:5]) > 0, real  # handshake, rx, tx
    assert len(got["peers"][wide_key][1]) == WIDE
    # the dump really was split: many messages, the wide peer in more than one of them
    ((name, msgs),) = recording.dumps
    assert name == dev_a
    assert len(msgs) > 2, len(msgs)
    carrying = [m for m in msgs
                if any(public_key(p) == wide_key for p in m.get_attr("WGDEVICE_A_PEERS") or ())]
    assert len(carrying) > 1, f"the {WIDE}-IP peer fit in one message"


def test_device_deleted_before_and_while_read(net: Net) -> None:
    """A device listed as a link but gone by the time it is read is one clean error
    for that device; the others are still read whole. Deleting one while the reader works
    on the devices gives the same, or the device read whole: never an exception."""
    names = [f"{net.tag}d{i}" for i in range(3)]
    peers = many_peers(200)
    for name in names:
        net.device(name, "[Interface]\nListenPort = 0\n\n"
                         + "".join(peer_conf(*p) for p in peers))
    with in_netns(net.a):
        state = NetState()
        try:
            links = state.links()
        finally:
            state.close()
    run("ip", "link", "del", names[0], ns=net.a)
    with in_netns(net.a):
        devices, errors = read_devices(links, open_wireguard)
    assert set(devices) == set(names[1:])
    assert [r for r, _m in errors] == ["enodev"], errors
    assert names[0] in errors[0][1]
    for name in names[1:]:
        assert len(devices[name].peers) == len(peers)

    # now delete one from another thread while the reader is reading them
    recording = Recording()
    deleter = threading.Thread(
        target=lambda: (time.sleep(0.05), run("ip", "link", "del", names[1], ns=net.a)))
    with in_netns(net.a):
        deleter.start()
        try:
            devices, errors = read_devices(links, lambda: recording)
        finally:
            deleter.join(timeout=120)
    assert names[2] in devices
    assert len(devices[names[2]].peers) == len(peers)
    if names[1] in devices:
        assert len(devices[names[1]].peers) == len(peers)  # read before it went: whole
        assert len(errors) == 1  # names[0]
    else:
        assert sorted(r for r, _m in errors) == ["enodev", "enodev"], errors
    assert run("ip", "link", "show", names[1], ns=net.a, check=False).returncode != 0


class Flipping(Recording):
    """A Recording whose socket changes the device in the middle of a dump: when the first
    message of one of the first `dumps` dumps arrives, `flip()` runs (synchronously, in
    pyroute2's receive callback). The kernel makes a dump's messages as the reader takes
    them, so by then it has made at most the second; every later one is made after the
    change and the kernel flags it NLM_F_DUMP_INTR (a dump of 3 messages or more)."""

    def __init__(self, flip: Any, dumps: int) -> None:
        super().__init__()
        self._flip, self._left, self._arrived = flip, dumps, 0

    def _open(self) -> Any:
        wg = open_wireguard()
        protocol = wg.asyncore.local.protocol  # pyroute2 0.9's receiving end
        enqueue = protocol.enqueue

        def arrived(data: bytes, addr: Any) -> None:
            self._arrived += 1
            if self._arrived == 1 and self._left > 0:
                self._left -= 1
                self._flip()
            enqueue(data, addr)

        protocol.enqueue = arrived
        return wg

    def info(self, name: str) -> list[Any]:
        self._arrived = 0
        return super().info(name)


@dataclass
class FlipLab:
    """A kernel device of 1,000 peers (7-10 dump messages) in `net`, whose every 50th peer
    has the allowed IPs of phase 0 or of phase 1; flip(p) sets phase p on all of them in one
    `wg set` (one netlink message: atomic in the kernel, so a real state of the device is a
    pure phase)."""

    net: Net
    name: str
    phases: dict[int, dict[str, list[str]]]
    steady: dict[str, list[str]]
    count: int

    @classmethod
    def build(cls, net: Net) -> FlipLab:
        peers = many_peers(1000)
        phases: dict[int, dict[str, list[str]]] = {0: {}, 1: {}}
        for n, (key, _allowed, _ep) in enumerate(peers[::50]):
            phases[0][key] = [f"10.200.{n}.0/24"]
            phases[1][key] = [f"10.201.{n}.0/24", f"10.202.{n}.0/24"]
        name = f"{net.tag}ch"
        net.device(name, "[Interface]\nListenPort = 0\n\n" + "".join(
            peer_conf(key, phases[0].get(key, allowed), ep) for key, allowed, ep in peers))
        steady = {key: sorted(allowed) for key, allowed, _ep in peers if key not in phases[0]}
        return cls(net, name, phases, steady, len(peers))

    def flip(self, phase: int) -> None:
        argv = ["wg", "set", self.name]
        for key, allowed in self.phases[phase].items():
            argv += ["peer", key, "allowed-ips", ",".join(allowed)]  # replaces them
        run(*argv, ns=self.net.a)

    def phase_of(self, device: Any) -> set[int]:
        """The phases `device` (as read) is wholly in: one for a real state, none for a mix;
        the peers that never change must be as they are."""
        got = {p.public_key: sorted(str(n) for n in p.allowed_ips) for p in device.peers}
        assert len(got) == self.count
        assert {k: v for k, v in got.items() if k in self.steady} == self.steady
        return {p for p, want in self.phases.items()
                if all(got.get(k) == sorted(v) for k, v in want.items())}


def test_dump_interrupted_once_is_read_again(net: Net) -> None:
    """The device changes in the middle of the reader's dump: the kernel flags it
    NLM_F_DUMP_INTR, the reader drops it, dumps again and returns the state after the
    change, never the mix of two states the flagged dump holds."""
    lab = FlipLab.build(net)
    recording = Flipping(lambda: lab.flip(1), dumps=1)
    devices, errors = net.read(lambda: recording)
    flagged = recording.flags(lab.name)
    assert flagged == [True, False], flagged
    assert errors == []
    assert lab.phase_of(devices[lab.name]) == {1}


def test_dump_interrupted_every_time_is_a_dump_intr_error(net: Net) -> None:
    """The device changes during every dump: the reader gives up after DUMP_RETRIES dumps,
    every one flagged, with a dump_intr error and no data; once the changes stop, a read is
    whole again."""
    lab = FlipLab.build(net)
    flips = itertools.count(1)
    recording = Flipping(lambda: lab.flip(next(flips) % 2), dumps=DUMP_RETRIES)
    devices, errors = net.read(lambda: recording)
    flagged = recording.flags(lab.name)
    assert flagged == [True] * DUMP_RETRIES, flagged
    assert lab.name not in devices
    assert [reason for reason, _message in errors] == ["dump_intr"], errors
    devices, errors = net.read()
    assert errors == []
    assert lab.phase_of(devices[lab.name]) == {DUMP_RETRIES % 2}
