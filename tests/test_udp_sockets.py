"""udp_listen_ports (NETLINK_SOCK_DIAG) against this host's kernel: sockets bound here are
listed, closed ones are not, and a network namespace sees only its own. Kernel WireGuard
devices' sockets are covered in tests/kernel/ (the kernel stage)."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from tests.lab.lab import in_netns, run
from wgnest.sources.errors import SourceError
from wgnest.sources.udp_sockets import (
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    SOCK_DIAG_BY_FAMILY,
    decode_messages,
    encode_request,
    udp_listen_ports,
)


def bound(family: int, address: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_bound_sockets_are_listed_by_family() -> None:
    with bound(socket.AF_INET, "127.0.0.1") as v4, bound(socket.AF_INET, "0.0.0.0") as any4, \
            bound(socket.AF_INET6, "::") as v6:
        ports = udp_listen_ports()
        assert (4, port(v4)) in ports
        assert (4, port(any4)) in ports
        assert (6, port(v6)) in ports
        assert (6, port(v4)) not in ports or port(v4) == port(v6)
        gone = port(v4)
    assert (4, gone) not in udp_listen_ports()


def test_connected_socket_is_listed() -> None:
    with bound(socket.AF_INET, "127.0.0.1") as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(("127.0.0.1", port(server)))  # binds an ephemeral port, connected
        assert (4, port(client)) in udp_listen_ports()


def test_many_sockets_span_several_messages() -> None:
    socks = [bound(socket.AF_INET, "127.0.0.1") for _ in range(600)]
    try:
        ports = udp_listen_ports()
        assert {(4, port(s)) for s in socks} <= ports
    finally:
        for s in socks:
            s.close()


def test_request_encoding() -> None:
    raw = encode_request(socket.AF_INET6, 7)
    length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(raw)
    assert (length, mtype, seq) == (len(raw), SOCK_DIAG_BY_FAMILY, 7)
    assert flags == 0x301  # NLM_F_REQUEST | NLM_F_DUMP
    family, proto, _ext, _pad, states = struct.unpack_from("=BBBBI", raw, NLMSGHDR.size)
    assert (family, proto, states) == (socket.AF_INET6, socket.IPPROTO_UDP, 0xFFFFFFFF)
    assert len(raw) == NLMSGHDR.size + 56  # inet_diag_req_v2


def _msg(mtype: int, body: bytes, seq: int = 1, flags: int = 0) -> bytes:
    length = NLMSGHDR.size + len(body)
    return NLMSGHDR.pack(length, mtype, flags, seq, 0) + body + b"\0" * (-length % 4)


def _diag(family: int, sport: int) -> bytes:
    return struct.pack("!BBBBH", family, 7, 0, 0, sport) + bytes(72 - 6)


def test_decode_answers_errors_and_garbage() -> None:
    data = (_diag(socket.AF_INET, 51820), _diag(socket.AF_INET6, 51820), _diag(99, 5),
            _diag(socket.AF_INET, 0))
    found, done, intr, code = decode_messages(
        b"".join(_msg(SOCK_DIAG_BY_FAMILY, d) for d in data) + _msg(9, b"", seq=2), 1)
    assert found == [(4, 51820), (6, 51820)]  # unknown families and port 0 are no sockets
    assert (done, intr, code) == (False, False, 0)
    found, done, intr, _ = decode_messages(
        _msg(SOCK_DIAG_BY_FAMILY, data[0], flags=0x10) + _msg(NLMSG_DONE, bytes(4)), 1)
    assert (found, done, intr) == ([(4, 51820)], True, True)
    _, done, _, code = decode_messages(_msg(NLMSG_ERROR, struct.pack("=i", -13) + bytes(16)), 1)
    assert (done, code) == (True, 13)
    with pytest.raises(SourceError) as err:
        decode_messages(_msg(SOCK_DIAG_BY_FAMILY, b"short"), 1)
    assert err.value.reason == "parse"
    with pytest.raises(SourceError) as err:
        decode_messages(_msg(SOCK_DIAG_BY_FAMILY, data[0])[:40], 1)
    assert err.value.reason == "parse"


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    name = "us" + secrets.token_hex(3)
    try:
        run("ip", "netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a network namespace: {exc}")
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def test_a_namespace_sees_only_its_own_sockets(netns: str) -> None:
    with bound(socket.AF_INET, "0.0.0.0") as here:
        with in_netns(netns):
            assert udp_listen_ports() == frozenset()
            run("ip", "link", "set", "lo", "up", ns=netns)
            with bound(socket.AF_INET6, "::") as there:  # made inside: belongs to netns
                inside, theirs = udp_listen_ports(), port(there)
        assert inside == {(6, theirs)}
        outside = udp_listen_ports()
        assert (4, port(here)) in outside
        assert (6, theirs) not in outside
