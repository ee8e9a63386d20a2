"""merge_dump and kernel_devices on real pyroute2 wgmsg objects: built, encoded to bytes, then
decoded by a fresh wgmsg, so the adapter sees exactly what pyroute2 hands back from a dump."""

from __future__ import annotations

import base64
import ipaddress
import socket
import sys
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.generic.wireguard import WG_CMD_GET_DEVICE, wgmsg

from wgnest.model.host import Device, Endpoint, Link
from wgnest.sources.errors import SourceError
from wgnest.sources.wg_kernel import kernel_devices, merge_dump

LINK = Link(7, "wg0", "wireguard", 1420, True)
U64_MAX = 2**64 - 1


def key(n: int, tag: int) -> bytes:
    """A distinct base64 key: `tag` tells public (0xAA), private (0xEE), preshared (0xDD)."""
    return base64.b64encode(bytes([tag, n >> 8, n & 0xFF]) + bytes(29))


PRIVATE, DEV_PUBLIC = key(0, 0xEE), key(0, 0xAA)


def pub(n: int) -> str:
    return key(n + 1, 0xAA).decode()


def psk(n: int) -> bytes:
    return key(n + 1, 0xDD)


def host_order_scope(scope: int) -> int:
    """The value to give pyroute2's big-endian encoder so the bytes on the wire are `scope` in
    host order, as the kernel writes sin6_scope_id."""
    return int.from_bytes(scope.to_bytes(4, sys.byteorder), "big")


def allowed(*nets: str) -> list[dict[str, Any]]:
    out = []
    for text in nets:
        net = ipaddress.ip_network(text)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        out.append({"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                              ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                              ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]})
    return out


def peer(n: int, nets: tuple[str, ...], endpoint: dict[str, Any] | None = None,
         handshake: tuple[int, int] = (0, 0), rx: int = 0, tx: int = 0,
         keepalive: int = 0) -> dict[str, Any]:
    """A peer as the kernel's first message of it carries (get_peer in netlink.c)."""
    attrs: list[list[Any]] = [
        ["WGPEER_A_PUBLIC_KEY", {"value": pub(n).encode()}],
        ["WGPEER_A_PRESHARED_KEY", {"value": psk(n)}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive],
        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
        ["WGPEER_A_RX_BYTES", rx],
        ["WGPEER_A_TX_BYTES", tx],
        ["WGPEER_A_PROTOCOL_VERSION", 1],
    ]
    if endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", endpoint])
    attrs.append(["WGPEER_A_ALLOWEDIPS", allowed(*nets)])
    return {"attrs": attrs}


def continuation(n: int, nets: tuple[str, ...]) -> dict[str, Any]:
    """The rest of a split peer: only its public key and more allowed IPs."""
    return {"attrs": [["WGPEER_A_PUBLIC_KEY", {"value": pub(n).encode()}],
                      ["WGPEER_A_ALLOWEDIPS", allowed(*nets)]]}


def device_attrs(listen_port: int = 51820, fwmark: int = 0x1234) -> list[list[Any]]:
    return [["WGDEVICE_A_LISTEN_PORT", listen_port], ["WGDEVICE_A_FWMARK", fwmark],
            ["WGDEVICE_A_IFINDEX", LINK.index], ["WGDEVICE_A_IFNAME", LINK.name],
            ["WGDEVICE_A_PRIVATE_KEY", {"value": PRIVATE}],
            ["WGDEVICE_A_PUBLIC_KEY", {"value": DEV_PUBLIC}]]


def wire(attrs: list[list[Any]], peers: list[dict[str, Any]] | None = None) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"] = attrs + ([["WGDEVICE_A_PEERS", peers]] if peers is not None else [])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def v4(addr: str, port: int = 51820) -> dict[str, Any]:
    return {"addr": addr, "port": port}


def v6(addr: str, port: int = 51820, scope: int = 0) -> dict[str, Any]:
    return {"addr": addr, "port": port, "flowinfo": 0, "scope_id": host_order_scope(scope)}


def test_scope_id_is_host_order_on_the_wire() -> None:
    msg = wire([], [peer(0, (), v6("fe80::1", scope=2))])
    sockaddr_tail = ipaddress.ip_address("fe80::1").packed + (2).to_bytes(4, sys.byteorder)
    assert sockaddr_tail in msg.data


def split_dump() -> list[wgmsg]:
    """300 peers over 3 messages; peer 99 is split between the first and the second."""
    def p(n: int) -> dict[str, Any]:
        return peer(n, (f"10.{n >> 8}.{n & 0xFF}.0/24",), v4(f"198.18.{n >> 8}.{n & 0xFF}", n + 1))

    return [
        wire(device_attrs(), [p(n) for n in range(100)]),
        wire([["WGDEVICE_A_IFINDEX", LINK.index], ["WGDEVICE_A_IFNAME", LINK.name]],
             [continuation(99, ("10.200.0.0/16", "fd00::99/128")), *map(p, range(100, 200))]),
        wire([], [p(n) for n in range(200, 300)]),
    ]


def test_split_dump_merges_every_peer_once() -> None:
    msgs = split_dump()
    assert [len(m.get_attr("WGDEVICE_A_PEERS")) for m in msgs] == [100, 101, 100]
    device = merge_dump(msgs, LINK)
    assert (device.name, device.ifindex, device.implementation, device.mtu) == (
        "wg0", 7, "kernel", 1420)
    assert (device.public_key, device.listen_port, device.fwmark) == (
        DEV_PUBLIC.decode(), 51820, 0x1234)
    assert [p.public_key for p in device.peers] == [pub(n) for n in range(300)]
    by_key = {p.public_key: p for p in device.peers}
    assert [str(n) for n in by_key[pub(99)].allowed_ips] == [
        "10.0.99.0/24", "10.200.0.0/16", "fd00::99/128"]
    assert by_key[pub(99)].endpoint == Endpoint(ipaddress.ip_address("198.18.0.99"), 100)
    assert [str(n) for n in by_key[pub(298)].allowed_ips] == ["10.1.42.0/24"]
    assert by_key[pub(298)].endpoint == Endpoint(ipaddress.ip_address("198.18.1.42"), 299)


def test_peer_with_100_allowed_ips() -> None:
    nets = tuple(f"10.9.{i}.0/24" for i in range(50)) + tuple(f"fd00:{i:x}::/64" for i in range(50))
    device = merge_dump([wire(device_attrs(), [peer(0, nets, v4("192.0.2.1"))])], LINK)
    (only,) = device.peers
    assert only.allowed_ips == tuple(ipaddress.ip_network(n) for n in nets)
    assert len(only.allowed_ips) == 100


@pytest.mark.parametrize(("endpoint", "want"), [
    (v4("192.0.2.1", 51820), Endpoint(ipaddress.ip_address("192.0.2.1"), 51820)),
    (v6("2001:db8::7", 443), Endpoint(ipaddress.ip_address("2001:db8::7"), 443)),
    (v6("fe80::1", 51820, scope=2), Endpoint(ipaddress.ip_address("fe80::1"), 51820, 2)),
    (v6("fe80::1", 1, scope=0x01020304), Endpoint(ipaddress.ip_address("fe80::1"), 1, 0x01020304)),
    (None, None),
], ids=["v4", "v6", "link-local-scope-2", "scope-all-bytes", "none"])
def test_endpoint(endpoint: dict[str, Any] | None, want: Endpoint | None) -> None:
    device = merge_dump([wire(device_attrs(), [peer(0, ("10.0.0.0/8",), endpoint)])], LINK)
    assert device.peers[0].endpoint == want


def test_counters_handshake_keepalive() -> None:
    peers = [peer(0, (), v4("192.0.2.1"), (0, 0), U64_MAX, U64_MAX, 25),
             peer(1, (), v4("192.0.2.2"), (1700000000, 500000000), 7, 9, 0)]
    first, second = merge_dump([wire(device_attrs(fwmark=0), peers)], LINK).peers
    assert (first.last_handshake, first.rx_bytes, first.tx_bytes, first.persistent_keepalive) \
        == (0.0, U64_MAX, U64_MAX, 25)
    assert isinstance(first.last_handshake, float)
    assert (second.last_handshake, second.rx_bytes, second.tx_bytes,
            second.persistent_keepalive) == (1700000000.5, 7, 9, 0)


def test_secret_keys_are_dropped() -> None:
    msgs = [wire(device_attrs(), [peer(n, ("10.0.0.0/8",), v4("192.0.2.1")) for n in range(3)])]
    # pyroute2 did decode them: the adapter must be the one that drops them
    assert msgs[0].get_attr("WGDEVICE_A_PRIVATE_KEY") == PRIVATE
    assert msgs[0].get_attr("WGDEVICE_A_PEERS")[0].get_attr("WGPEER_A_PRESHARED_KEY") == psk(0)
    device = merge_dump(msgs, LINK)
    secrets = [PRIVATE.decode()] + [psk(n).decode() for n in range(3)]
    dumped = repr(device) + str(device)
    assert not [s for s in secrets if s in dumped]
    assert [p.public_key for p in device.peers] == [pub(0), pub(1), pub(2)]
    assert device.public_key == DEV_PUBLIC.decode()


class FakeWG:
    """Stands in for pyroute2.WireGuard: info() plays `script` (an exception is raised)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[str] = []
        self.closed = False

    def info(self, ifname: str) -> list[wgmsg]:
        self.calls.append(ifname)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step  # type: ignore[no-any-return]

    def close(self) -> None:
        self.closed = True


def one_peer_dump() -> list[wgmsg]:
    return [wire(device_attrs(), [peer(0, ("0.0.0.0/0",), v4("192.0.2.1"))])]


def test_dump_interrupted_twice_is_retried() -> None:
    wg = FakeWG(NetlinkDumpInterrupted(), NetlinkDumpInterrupted(), one_peer_dump())
    devices, errors = kernel_devices([LINK], lambda: wg)
    assert errors == []
    assert [(d.name, len(d.peers)) for d in devices] == [("wg0", 1)]
    assert (wg.calls, wg.closed) == (["wg0"] * 3, True)


@pytest.mark.parametrize(("script", "calls", "error"), [
    ([NetlinkDumpInterrupted()] * 5, 3, "dump_intr: device wg0: dump changed 3 times while read"),
    ([NetlinkError(19)], 1, "enodev: device wg0: (19, 'No such device')"),
    ([NetlinkError(1)], 1, "eperm: device wg0: (1, 'Operation not permitted')"),
    ([OSError(11, "again")], 1, "timeout: device wg0: [Errno 11] again"),
], ids=["dump-intr", "enodev", "eperm", "oserror"])
def test_device_errors(script: list[BaseException], calls: int, error: str) -> None:
    wg = FakeWG(*script)
    devices, errors = kernel_devices([LINK], lambda: wg)
    assert (devices, [f"{e.reason}: {e}" for e in errors]) == ([], [error])
    assert (len(wg.calls), wg.closed) == (calls, True)


def test_one_device_failing_does_not_hide_the_others() -> None:
    other = Link(8, "wg1", "wireguard", 1420, True)
    wg = FakeWG(NetlinkError(19), one_peer_dump())
    devices, errors = kernel_devices([LINK, other, Link(9, "tun0", "tun", 1500, True)],
                                     lambda: wg)
    assert [(d.name, d.ifindex) for d in devices] == [("wg1", 8)]
    assert [str(e).split(":")[0] for e in errors] == ["device wg0"]
    assert wg.calls == ["wg0", "wg1"]


def test_no_wireguard_links_never_opens_netlink() -> None:
    opened: list[int] = []

    def factory() -> FakeWG:
        opened.append(1)
        return FakeWG()

    links = [Link(1, "lo", "", 65536, True), Link(2, "tun0", "tun", 1500, True)]
    assert kernel_devices(links, factory) == ([], [])
    assert kernel_devices([], factory) == ([], [])
    assert opened == []


@pytest.mark.parametrize(("exc", "reason"), [
    (NetlinkError(2), "enodev"), (PermissionError(1, "denied"), "eperm")])
def test_open_failure_is_a_source_error(exc: BaseException, reason: str) -> None:
    def factory() -> FakeWG:
        raise exc

    with pytest.raises(SourceError, match="wireguard generic netlink unavailable") as info:
        kernel_devices([LINK], factory)
    assert info.value.reason == reason


def test_device_type_has_no_secret_fields() -> None:
    fields = set(Device.__dataclass_fields__)
    assert not {f for f in fields if "private" in f or "preshared" in f}


def flagged(msgs: list[wgmsg]) -> list[wgmsg]:
    """The same messages, the last one carrying NLM_F_DUMP_INTR as the kernel sets it."""
    msgs[-1]["header"]["flags"] = int(msgs[-1]["header"].get("flags", 0)) | 0x10
    return msgs


def test_dump_flagged_interrupted_is_read_again() -> None:
    """pyroute2 never raises NetlinkDumpInterrupted: the flag on a message is what tells
    that the dump mixes two states (seen in the kernel stage)."""
    stale = flagged([wire(device_attrs(), [peer(0, ("10.0.0.0/8",), v4("192.0.2.9"))])])
    wg = FakeWG(stale, one_peer_dump())
    devices, errors = kernel_devices([LINK], lambda: wg)
    assert errors == []
    assert [str(n) for n in devices[0].peers[0].allowed_ips] == ["0.0.0.0/0"]
    assert wg.calls == ["wg0", "wg0"]
    always = FakeWG(*[flagged(one_peer_dump()) for _ in range(3)])
    devices, errors = kernel_devices([LINK], lambda: always)
    assert devices == []
    assert [e.reason for e in errors] == ["dump_intr"]
