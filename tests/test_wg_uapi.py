"""UAPI source: parser, X25519, reads against fake daemons, and one real wireguard-go."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgnest.model.host import Device, Endpoint, Link, Peer
from wgnest.sources import wg_uapi
from wgnest.sources.errors import SourceError
from wgnest.sources.wg_uapi import (
    PeerCache,
    parse_uapi,
    read_uapi,
    socket_in_my_netns,
    uapi_devices,
    x25519,
)

WG = shutil.which("wg")
# RFC 7748 section 6.1 (Alice) and a private and preshared key that must never leak.
ALICE_PRIV = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUB = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
PSK = "c0ffee" * 10 + "abcd"
PUB1, PUB2, PUB3 = ("11" * 32), ("22" * 32), ("ab" * 32)


def b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


def secret_forms(hexkey: str) -> list[str]:
    return [hexkey, hexkey.upper(), b64(hexkey)]


def parse(text: str) -> Device:
    return parse_uapi(text, name="wgt0", ifindex=7, mtu=1420)


def answer(*lines: str) -> str:
    return "\n".join([*lines, "errno=0"]) + "\n"


FULL = answer(
    f"private_key={ALICE_PRIV}", "listen_port=51820", "fwmark=4660",
    f"public_key={PUB1}", f"preshared_key={PSK}", "protocol_version=1",
    "endpoint=192.0.2.1:51820", "last_handshake_time_sec=1700000000",
    "last_handshake_time_nsec=500000000", f"tx_bytes={2**64 - 1}", f"rx_bytes={2**64 - 1}",
    "persistent_keepalive_interval=25", "allowed_ip=10.0.0.0/24", "allowed_ip=fd00::/64",
    "some_future_key=whatever",
    f"public_key={PUB2}", f"preshared_key={'0' * 64}", "endpoint=[2001:db8::1]:51820",
    "last_handshake_time_sec=0", "last_handshake_time_nsec=0", "allowed_ip=10.1.0.0/16",
    f"public_key={PUB3}", "endpoint=[fe80::1%7]:51821",
)


# --- X25519 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "u", "out"),
    [  # RFC 7748 sections 5.2 and 6.1
        ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
         "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
         "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
        ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
         "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
         "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
        (ALICE_PRIV, "09" + "00" * 31, ALICE_PUB),
        ("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb", "09" + "00" * 31,
         "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"),
    ],
)
def test_x25519_rfc7748_vectors(scalar: str, u: str, out: str) -> None:
    u_int = int.from_bytes(bytes.fromhex(u), "little") & ((1 << 255) - 1)
    assert x25519(bytes.fromhex(scalar), u_int).hex() == out


def test_x25519_rfc7748_iterated_once() -> None:
    k = (9).to_bytes(32, "little")
    assert x25519(k, 9).hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"


@pytest.mark.skipif(WG is None, reason="the wg tool is not installed")
def test_x25519_matches_wg_pubkey() -> None:
    assert WG is not None
    keys = [secrets.token_bytes(32) for _ in range(4)]
    keys.append(base64.b64decode(subprocess.run([WG, "genkey"], capture_output=True,
                                                 check=True, text=True).stdout))
    for key in keys:
        expected = subprocess.run([WG, "pubkey"], input=base64.b64encode(key).decode() + "\n",
                                  capture_output=True, check=True, text=True).stdout.strip()
        assert base64.b64encode(x25519(key)).decode() == expected
        text = answer(f"private_key={key.hex()}")
        assert parse(text).public_key == expected


# --- parser ------------------------------------------------------------------------------


def test_parse_every_key() -> None:
    dev = parse(FULL)
    assert dev == Device(
        name="wgt0", ifindex=7, implementation="userspace", public_key=b64(ALICE_PUB),
        listen_port=51820, fwmark=4660, mtu=1420,
        peers=(
            Peer(b64(PUB1), Endpoint(ipaddress.IPv4Address("192.0.2.1"), 51820),
                 (ipaddress.IPv4Network("10.0.0.0/24"), ipaddress.IPv6Network("fd00::/64")),
                 1700000000.5, 2**64 - 1, 2**64 - 1, 25),
            Peer(b64(PUB2), Endpoint(ipaddress.IPv6Address("2001:db8::1"), 51820),
                 (ipaddress.IPv4Network("10.1.0.0/16"),), 0.0, 0, 0, 0),
            Peer(b64(PUB3), Endpoint(ipaddress.IPv6Address("fe80::1"), 51821, 7),
                 (), 0.0, 0, 0, 0),
        ),
    )
    assert str(dev.peers[1].endpoint) == "[2001:db8::1]:51820"


def test_single_address_networks_are_parsed_lean() -> None:
    """A /32 or /128 allowed IP has no `hosts` lambda of its own (ipaddress makes one for
    each; half the network's memory), and is still the network ipaddress makes."""
    import tracemalloc

    from wgnest.sources.peer_builder import lean_network
    from wgnest.sources.wg_uapi import _network

    for text in ("10.9.8.7/32", "fd00::7/128", "10.0.0.0/24", "10.0.0.0/31", "::/0"):
        net, plain = _network(text), ipaddress.ip_network(text)
        assert type(net) is type(plain)
        assert (net, hash(net), str(net), repr(net)) == (plain, hash(plain), str(plain),
                                                          repr(plain))
        assert net.network_address in net
        assert plain.network_address in net
        assert net.overlaps(plain)
        assert net.subnet_of(plain)
        assert plain.supernet_of(net)
        assert (net.prefixlen, net.num_addresses, net.broadcast_address, net.hostmask) == (
            plain.prefixlen, plain.num_addresses, plain.broadcast_address, plain.hostmask)
        if 2 < net.num_addresses <= 256:  # (a /31's, /32's hosts() is never asked)
            assert list(net.hosts()) == list(plain.hosts())
        assert sorted([plain, net]) == [plain, net]
        assert "hosts" not in vars(net)

    def size_of(make: Callable[[ipaddress.IPv4Network], object]) -> float:
        make(ipaddress.IPv4Network("10.1.0.0/32"))  # (the first one's caches apart)
        tracemalloc.start()
        kept = [make(ipaddress.IPv4Network(f"10.0.{i >> 8}.{i & 255}/32")) for i in range(2000)]
        size = tracemalloc.get_traced_memory()[0] / len(kept)
        tracemalloc.stop()
        return size

    def popped(net: ipaddress.IPv4Network) -> object:
        vars(net).pop("hosts")  # (what this parse did before: the dict then exists)
        return net

    size_of(lean_network)  # (its first thousands once cost 64 bytes more each: the class's
    # shared attribute keys settle; a gateway's parse makes networks at every change)
    plain, without_hosts, lean = size_of(lambda n: n), size_of(popped), size_of(lean_network)
    assert lean < 0.45 * plain
    assert lean < 0.85 * without_hosts


def test_no_key_material_in_device_repr() -> None:
    dev = parse(FULL)
    for text in (repr(dev), str(dev)):
        for secret in secret_forms(ALICE_PRIV) + secret_forms(PSK):
            assert secret not in text


def test_named_scope_resolved_unknown_is_zero() -> None:
    lo = socket.if_nametoindex("lo")
    dev = parse(answer(f"public_key={PUB1}", "endpoint=[fe80::1%lo]:1",
                       f"public_key={PUB2}", "endpoint=[fe80::2%nosuchif9]:2"))
    assert [p.endpoint.scope_id for p in dev.peers if p.endpoint] == [lo, 0]


def test_boringtun_own_public_key_wins() -> None:
    assert parse(answer(f"own_public_key={PUB3}")).public_key == b64(PUB3)
    both = answer(f"private_key={ALICE_PRIV}", f"own_public_key={PUB3}")
    assert parse(both).public_key == b64(PUB3)


def test_device_without_private_key_or_peers() -> None:
    dev = parse(answer("listen_port=0"))
    assert (dev.public_key, dev.listen_port, dev.fwmark, dev.peers) == ("", 0, 0, ())
    assert parse("errno=0\n\n").peers == ()


@pytest.mark.parametrize(
    ("lines", "reason", "needle"),
    [
        (["listen_port=abc"], "parse", "'listen_port'"),
        (["listen_port=65536"], "parse", "'listen_port'"),
        (["fwmark=4294967296"], "parse", "'fwmark'"),
        (["private_key=" + ALICE_PRIV[:-1] + "g"], "parse", "'private_key'"),
        (["private_key=" + ALICE_PRIV[:-2]], "parse", "'private_key'"),
        (["own_public_key=" + " " + PUB1[1:]], "parse", "'own_public_key'"),
        ([f"public_key={PUB1}", f"tx_bytes={2**64}"], "parse", "'tx_bytes'"),
        ([f"public_key={PUB1}", "rx_bytes=-1"], "parse", "'rx_bytes'"),
        ([f"public_key={PUB1}", "rx_bytes= 1"], "parse", "'rx_bytes'"),
        ([f"public_key={PUB1}", "rx_bytes=1_000"], "parse", "'rx_bytes'"),
        ([f"public_key={PUB1}", "rx_bytes=\u0661\u0662"], "parse", "'rx_bytes'"),
        ([f"public_key={PUB1}", "last_handshake_time_nsec=1000000000"], "parse", "_nsec'"),
        ([f"public_key={PUB1}", "endpoint=192.0.2.1"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "endpoint=192.0.2.1:65536"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "endpoint=300.0.2.1:1"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "endpoint=2001:db8::1:51820"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "endpoint=[192.0.2.1]:1"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "endpoint=[2001:db8::1]51820"], "parse", "'endpoint'"),
        ([f"public_key={PUB1}", "allowed_ip=10.0.0.0"], "parse", "'allowed_ip'"),
        ([f"public_key={PUB1}", "allowed_ip=10.0.0.0/33"], "parse", "'allowed_ip'"),
        ([f"public_key={PUB1}", "allowed_ip=fe80::%1/64"], "parse", "'allowed_ip'"),
        (["endpoint=192.0.2.1:1"], "parse", "before any public_key"),
        (["listen_port"], "parse", "not key=value"),
        (["listen_port=1", "", "fwmark=1"], "parse", "line 2: not key=value"),
        (["errno=0"], "parse", "errno before the end"),
    ],
)
def test_malformed_line(lines: list[str], reason: str, needle: str) -> None:
    with pytest.raises(SourceError) as err:
        parse(answer(*lines))
    assert err.value.reason == reason
    assert "wgt0" in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("text", "reason", "needle"),
    [
        ("", "parse", "truncated"),
        ("listen_port=1\n", "parse", "truncated"),
        ("errno=x\n", "parse", "'errno'"),
        ("errno=22\n", "errno", "errno 22 (EINVAL)"),
        ("errno=-5\n", "errno", "errno 5 (EIO)"),
    ],
)
def test_malformed_answer(text: str, reason: str, needle: str) -> None:
    with pytest.raises(SourceError) as err:
        parse(text)
    assert (err.value.reason, "wgt0" in str(err.value)) == (reason, True)
    assert needle in str(err.value)


def assert_no_secret(exc: BaseException, secrets_: list[str]) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    for secret in secrets_:
        assert secret not in text


@pytest.mark.parametrize(
    "bad", ["listen_port=x", "endpoint=1", "allowed_ip=::/129", "public_key=zz", "junk", "errno=1"]
)
def test_no_key_material_in_errors(bad: str) -> None:
    broken_priv = ALICE_PRIV[:40] + "xyz" + ALICE_PRIV[43:]
    for priv in (ALICE_PRIV, broken_priv):
        text = answer(f"private_key={priv}", f"public_key={PUB1}", f"preshared_key={PSK}", bad)
        with pytest.raises(SourceError) as err:
            parse(text)
        assert_no_secret(err.value, secret_forms(ALICE_PRIV) + secret_forms(PSK) + [broken_priv])


KEYS = ["private_key", "own_public_key", "listen_port", "fwmark", "public_key", "preshared_key",
        "protocol_version", "endpoint", "last_handshake_time_sec", "last_handshake_time_nsec",
        "tx_bytes", "rx_bytes", "persistent_keepalive_interval", "allowed_ip", "errno", "x", ""]
HEX = "0123456789abcdefABCDEF"
VALUES = st.one_of(
    st.text(max_size=40), st.text(HEX, min_size=64, max_size=64), st.integers().map(str),
    st.sampled_from(["1.2.3.4:5", "[::1]:5", "[fe80::1%lo]:5", "10.0.0.0/8", "::/0", "0"]),
)
LINE = st.one_of(st.builds("{}={}".format, st.sampled_from(KEYS), VALUES), st.text(max_size=30))
# At least one letter: a run of digits could be a (legitimately shown) 20-digit counter.
SECRET = st.text(HEX, min_size=16, max_size=70).filter(lambda s: not s.isdigit())


def is_public_key_line(line: str, values: set[str]) -> bool:
    """A peer (or own) public key that happens to equal the secret is shown, rightly."""
    key, _, value = line.partition("=")
    return key in ("public_key", "own_public_key") and value.lower() in values


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINE, max_size=12), priv=SECRET, psk=SECRET, pos=st.integers(0, 12),
       end=st.sampled_from(["errno=0", "errno=5", "", "errno=0\n"]))
def test_fuzz_structured(lines: list[str], priv: str, psk: str, pos: int, end: str) -> None:
    lines = [line for line in lines if not is_public_key_line(line, {priv.lower(), psk.lower()})]
    lines.insert(pos, f"private_key={priv}")
    lines.insert(pos // 2, f"preshared_key={psk}")
    forms = [priv, psk] + [b64(k) for k in (priv, psk) if len(k) == 64]
    try:
        dev = parse("\n".join([*lines, end]))
    except SourceError as exc:
        assert_no_secret(exc, forms)
    else:
        assert not any(f in repr(dev) for f in forms)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_fuzz_arbitrary_text_raises_only_source_error(text: str) -> None:
    with contextlib.suppress(SourceError):
        parse(text)


# --- reading a socket ------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (sun_path holds 108 bytes; pytest's tmp_path can be long)."""
    with tempfile.TemporaryDirectory(prefix="wgu", dir="/tmp") as name:
        yield Path(name)


Behaviour = Callable[[socket.socket, threading.Event], None]


class Daemons:
    """Real unix stream servers; each records every byte a client sent."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.servers: list[socketserver.ThreadingUnixStreamServer] = []
        self.received: dict[str, bytes] = {}

    def serve(self, path: Path, behaviour: Behaviour) -> Path:
        daemons = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                data = b""
                while b"\n\n" not in data and (chunk := self.request.recv(4096)):
                    data += chunk
                try:
                    behaviour(self.request, daemons.stop)
                    while chunk := self.request.recv(4096):  # all until the client closes
                        data += chunk
                except OSError:  # the client hung up first (ECONNRESET if it left data unread)
                    pass
                daemons.received[path.name] = data

        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.servers.append(server)
        return path

    def close(self) -> None:
        self.stop.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.close()


def canned(text: str) -> Behaviour:
    return lambda conn, stop: conn.sendall(text.encode())


def hang(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait(10)


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        conn.sendall(b"x")


def dead_socket(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return path


def test_read_canned_answer(sock_dir: Path, daemons: Daemons) -> None:
    path = daemons.serve(sock_dir / "wgt0.sock", canned(FULL + "\n" + "trailing=junk\n"))
    text = read_uapi(path, 2.0)
    assert text == FULL
    assert parse(text) == parse(FULL)
    deadline = time.monotonic() + 2
    while "wgt0.sock" not in daemons.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert daemons.received["wgt0.sock"] == b"get=1\n\n"


@pytest.mark.parametrize("behaviour", [hang, trickle])
def test_hanging_daemon_times_out(sock_dir: Path, daemons: Daemons, behaviour: Behaviour) -> None:
    path = daemons.serve(sock_dir / "slow.sock", behaviour)
    caught: list[SourceError] = []

    def read_and_keep_error() -> None:
        try:
            read_uapi(path, 0.5)
        except SourceError as exc:
            caught.append(exc)

    start = time.monotonic()
    watchdog = threading.Thread(target=read_and_keep_error, daemon=True)
    watchdog.start()
    watchdog.join(3)  # a read without an overall deadline would never return from a trickle
    assert not watchdog.is_alive(), "read_uapi did not return"
    assert [e.reason for e in caught] == ["timeout"]
    assert 0.4 < time.monotonic() - start < 1.5


def test_dead_socket_refused_and_kept(sock_dir: Path) -> None:
    path = dead_socket(sock_dir / "dead.sock")
    with pytest.raises(SourceError) as err:
        read_uapi(path, 1.0)
    assert err.value.reason == "refused"
    assert path.is_socket()
    assert socket_in_my_netns(path, 1.0) is None


def test_vanished_socket_is_enodev(sock_dir: Path) -> None:
    with pytest.raises(SourceError) as err:
        read_uapi(sock_dir / "gone.sock", 1.0)
    assert err.value.reason == "enodev"


@pytest.mark.parametrize(
    "reply", [b"\x00\xffgarbage\n\n", b"hello world\n\n", b"listen_port=1\n", b"\n"]
)
def test_garbage_answer_is_parse(sock_dir: Path, daemons: Daemons, reply: bytes) -> None:
    def reply_and_close(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)

    path = daemons.serve(sock_dir / "g.sock", reply_and_close)
    with pytest.raises(SourceError) as err:
        parse(read_uapi(path, 2.0))
    assert err.value.reason == "parse"


def test_answer_size_is_capped(sock_dir: Path, daemons: Daemons,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wg_uapi, "MAX_ANSWER", 100_000)
    path = daemons.serve(sock_dir / "big.sock", canned("tx_bytes=1\n" * 50_000))
    with pytest.raises(SourceError, match="larger than") as err:
        read_uapi(path, 5.0)
    assert err.value.reason == "parse"


def test_fake_daemon_is_in_my_netns(sock_dir: Path, daemons: Daemons) -> None:
    assert socket_in_my_netns(daemons.serve(sock_dir / "me.sock", hang), 1.0) is True


def unconnected(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    s.setblocking(False)
    return s


def test_uapi_devices_good_hanging_dead(sock_dir: Path, daemons: Daemons) -> None:
    daemons.serve(sock_dir / "good.sock", canned(FULL + "\n"))
    daemons.serve(sock_dir / "hang.sock", hang)
    dead_socket(sock_dir / "dead.sock")
    (sock_dir / "file.sock").write_text("not a socket")
    links = [Link(i, n, "tun", 1280 + i, True)
             for i, n in enumerate(["good", "hang", "dead", "file", "kern"], 10)]
    with unconnected(sock_dir / "nolink.sock") as nolink, \
            unconnected(sock_dir / "kern.sock") as kern:
        start = time.monotonic()
        devices, errors, _stale = uapi_devices(links, sock_dir, timeout=0.5, skip={"kern"})
        assert time.monotonic() - start < 1.5
        for listener in (nolink, kern):
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected
    assert devices == [parse_uapi(FULL, name="good", ifindex=10, mtu=1290)]
    by_name = {Path(str(e).split(":")[0]).stem: f"{e.reason}: {e}" for e in errors}
    assert sorted(by_name) == ["dead", "hang"]
    assert by_name["dead"].startswith("refused: ")
    assert by_name["hang"].startswith("timeout: ")
    assert "\n" not in "".join(by_name.values())


def test_uapi_devices_missing_dir(tmp_path: Path) -> None:
    assert uapi_devices([Link(1, "x", "tun", 1420, True)], tmp_path / "nope") == ([], [], [])


# --- a real wireguard-go --------------------------------------------------------------------


def run(*args: str, inp: str | None = None) -> str:
    return subprocess.run(args, input=inp, capture_output=True, text=True, check=True,
                          timeout=20).stdout


@contextlib.contextmanager
def wireguard_go(tmp_path: Path) -> Iterator[tuple[str, str, Path, subprocess.Popen[bytes]]]:
    tag = secrets.token_hex(2)
    ns, name = f"wgnu{tag}", f"wgu{tag}"
    sock = Path("/var/run/wireguard") / f"{name}.sock"
    proc: subprocess.Popen[bytes] | None = None
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not sock.is_socket():
            assert proc.poll() is None, "wireguard-go exited"
            assert time.monotonic() < deadline, "wireguard-go made no UAPI socket"
            time.sleep(0.05)
        yield ns, name, sock, proc
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        sock.unlink(missing_ok=True)


def dump_peers(dump: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line.split("\t") for line in dump.splitlines()]
    return lines[0], {f[0]: f for f in lines[1:]}


def assert_matches_dump(dev: Device, dump: str, priv_b64: str) -> None:
    head, peers = dump_peers(dump)
    assert head[0] == priv_b64
    assert dev.public_key == head[1]
    assert dev.listen_port == int(head[2])
    assert dev.fwmark == (0 if head[3] == "off" else int(head[3], 16))
    assert {p.public_key for p in dev.peers} == set(peers)
    for p in dev.peers:
        _, _, endpoint, allowed, handshake, rx, tx, keepalive = peers[p.public_key]
        assert (str(p.endpoint) if p.endpoint else "(none)") == endpoint
        want = set() if allowed == "(none)" else set(allowed.split(","))
        assert {str(n) for n in p.allowed_ips} == want
        assert int(p.last_handshake) == int(handshake)
        assert (p.rx_bytes, p.tx_bytes) == (int(rx), int(tx))
        assert p.persistent_keepalive == (0 if keepalive == "off" else int(keepalive))


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go is not installed")
@pytest.mark.skipif(WG is None, reason="the wg tool is not installed")
@pytest.mark.skipif(not Path("/dev/net/tun").exists(), reason="/dev/net/tun missing")
def test_real_wireguard_go(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        priv = run("wg", "genkey")
        (tmp_path / "key").write_text(priv)
        (tmp_path / "psk").write_text(run("wg", "genpsk"))
    finally:
        os.umask(old)
    priv_b64, priv_hex = priv.strip(), base64.b64decode(priv).hex()
    pubs = [run("wg", "pubkey", inp=run("wg", "genkey")).strip() for _ in range(3)]
    with wireguard_go(tmp_path) as (ns, name, sock, proc):
        run("ip", "netns", "exec", ns, "wg", "set", name, "private-key", str(tmp_path / "key"),
            "listen-port", "51999", "fwmark", "0x1234",
            "peer", pubs[0], "endpoint", "192.0.2.1:51820", "allowed-ips", "10.0.0.0/24,fd00::/64",
            "preshared-key", str(tmp_path / "psk"),
            "peer", pubs[1], "endpoint", "[2001:db8::1]:51820", "allowed-ips", "10.1.0.0/16",
            # sends handshake initiations to a closed port on lo: tx_bytes grows
            "peer", pubs[2], "endpoint", "127.0.0.1:9", "persistent-keepalive", "1")
        run("ip", "-n", ns, "link", "set", name, "up")
        time.sleep(1.5)
        link = json.loads(run("ip", "-n", ns, "-j", "link", "show", name))[0]
        for _ in range(20):  # counters move: compare with a dump taken around a quiet read
            before = run("ip", "netns", "exec", ns, "wg", "show", name, "dump")
            dev = parse_uapi(read_uapi(sock, 2.0), name=name, ifindex=link["ifindex"],
                             mtu=link["mtu"])
            if before == run("ip", "netns", "exec", ns, "wg", "show", name, "dump"):
                break
        assert_matches_dump(dev, before, priv_b64)
        assert (dev.ifindex, dev.mtu, dev.implementation) == (link["ifindex"], 1420, "userspace")
        assert len(dev.peers) == 3
        assert dev.fwmark == 0x1234
        assert next(p for p in dev.peers if p.public_key == pubs[2]).tx_bytes > 0
        assert not any(s in repr(dev) for s in (priv_b64, priv_hex))

        # The socket dir is shared by every netns: from here the daemon is elsewhere.
        assert socket_in_my_netns(sock, 2.0) is False
        fake = [Link(link["ifindex"], name, "tun", 1420, True)]
        devices, errors, _stale = uapi_devices(fake, timeout=2.0)
        assert errors == []
        assert name not in [d.name for d in devices]

        # From inside the namespace the same call finds it.
        code = ("import json,sys; from pathlib import Path; from wgnest.model.host import Link; "
                "from wgnest.sources.wg_uapi import uapi_devices, socket_in_my_netns as s; "
                f"d, e, _ = uapi_devices([Link({link['ifindex']}, '{name}', 'tun', 1420, True)]); "
                f"print(json.dumps([s(Path('{sock}'), 2.0), [x.name for x in d], len(e)]))")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "exporter")}
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, check=True, timeout=20).stdout
        assert json.loads(out) == [True, [name], 0]

        # A real error answer: wireguard-go rejects a bad set with a non-zero errno.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"set=1\nlisten_port=bogus\n\n")
            reply = s.recv(4096).decode()
        with pytest.raises(SourceError) as err:
            parse_uapi(reply, name=name, ifindex=1, mtu=1420)
        assert err.value.reason == "errno"
    assert ns not in run("ip", "netns", "list").split()
    assert str(proc.pid) not in subprocess.run(["pgrep", "-x", "wireguard-go"],
                                               capture_output=True, text=True).stdout.split()
    assert not sock.exists()


def test_socket_named_after_a_link_that_is_no_tun_is_stale_and_never_connected(
        sock_dir: Path) -> None:
    """A socket left by a daemon gone, whose name a veth (or any non-TUN link) now has: it
    is reported as stale at no cost, not retried with the full timeout every refresh, and
    no collector failure."""
    links = [Link(3, "eth7", "veth", 1500, True)]
    with unconnected(sock_dir / "eth7.sock") as listener:
        start = time.monotonic()
        devices, errors, stale = uapi_devices(links, sock_dir, timeout=2.0)
        took = time.monotonic() - start
        with pytest.raises(BlockingIOError):
            listener.accept()  # never connected to
    assert (devices, errors, stale) == ([], [], [sock_dir / "eth7.sock"])
    assert took < 0.2


# --- the incremental parse -------------------------------------------------------------------


def test_cached_parse_equals_the_whole_parse_and_reuses_unchanged_peers() -> None:
    cache: PeerCache = {}
    first = parse_uapi(FULL, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    assert first == parse(FULL)
    assert len(cache) == 3
    moved = FULL.replace("rx_bytes=" + str(2**64 - 1), "rx_bytes=5")
    second = parse_uapi(moved, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    assert second == parse(moved)
    assert second.peers[0] is not first.peers[0]  # its counters moved: parsed again
    assert second.peers[0].rx_bytes == 5
    assert second.peers[1] is first.peers[1]
    assert second.peers[2] is first.peers[2]
    # nothing of the answer is kept: no preshared key (nor any other text) in the cache
    assert all(isinstance(k, int) for k in cache)
    assert PSK not in repr(cache)
    assert b64(PSK) not in repr(cache)


def test_a_peer_parsed_again_keeps_its_unchanged_addresses() -> None:
    """A peer whose counters moved is parsed again, but its endpoint and allowed IPs are
    the last answer's very objects where their text is the same; a moved one is new."""
    cache: PeerCache = {}
    first = {p.public_key: p for p in parse_uapi(FULL, name="wgt0", ifindex=7, mtu=1420,
                                                  cache=cache).peers}
    moved = FULL.replace("rx_bytes=" + str(2**64 - 1), "rx_bytes=5").replace(
        "allowed_ip=fd00::/64", "allowed_ip=fd00:1::/64").replace(
        "[fe80::1%7]:51821", "[fe80::1%7]:51822")
    second = {p.public_key: p for p in parse_uapi(moved, name="wgt0", ifindex=7, mtu=1420,
                                                   cache=cache).peers}
    one, zoned = b64(PUB1), b64(PUB3)
    assert second[one] is not first[one]
    assert second[one].rx_bytes == 5
    assert second[one].endpoint is first[one].endpoint
    assert second[one].allowed_ips[0] is first[one].allowed_ips[0]
    assert str(second[one].allowed_ips[1]) == "fd00:1::/64"
    assert second[one].allowed_ips[1] is not first[one].allowed_ips[1]
    zoned_endpoint = second[zoned].endpoint
    assert zoned_endpoint is not None
    assert (zoned_endpoint.port, zoned_endpoint.scope_id) == (51822, 7)
    unzoned = moved.replace("[fe80::1%7]:51822", "[fe80::1]:51822")  # the zone went
    third = parse_uapi(unzoned, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    assert third == parse(unzoned)
    assert {p.public_key: p for p in third.peers}[zoned].endpoint == Endpoint(
        ipaddress.IPv6Address("fe80::1"), 51822, 0)
    assert list(second.values()) == list(parse(moved).peers)


def test_peers_come_in_key_order_whatever_the_answer_order() -> None:
    """wireguard-go answers in Go's map order, another at each `get`: the same peers in
    another order are the same Peer objects in the same (key) order, cached or not."""
    head, *blocks = FULL.rstrip("\n").rsplit("\nerrno=", 1)[0].split("\npublic_key=")
    shuffled = "\npublic_key=".join([head, *reversed(blocks)]) + "\nerrno=0\n"
    assert len(blocks) == 3
    cache: PeerCache = {}
    first = parse_uapi(FULL, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    again = parse_uapi(shuffled, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    assert [p.public_key for p in first.peers] == sorted(p.public_key for p in first.peers)
    assert all(a is b for a, b in zip(first.peers, again.peers, strict=True))
    assert parse(shuffled) == parse(FULL) == first


def test_cached_parse_of_a_bad_answer_fails_as_the_whole_parse() -> None:
    cache: PeerCache = {}
    parse_uapi(FULL, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    bad = FULL.replace("persistent_keepalive_interval=25", "persistent_keepalive_interval=x")
    with pytest.raises(SourceError) as cached:
        parse_uapi(bad, name="wgt0", ifindex=7, mtu=1420, cache=cache)
    with pytest.raises(SourceError) as whole:
        parse(bad)
    assert str(cached.value) == str(whole.value)
    late = FULL.replace("allowed_ip=10.1.0.0/16", "allowed_ip=10.1.0.0/16\nlisten_port=1")
    assert parse_uapi(late, name="wgt0", ifindex=7, mtu=1420, cache=cache) == parse(late)  # type: ignore[arg-type]


ENDPOINTS = ["1.2.3.4:5", "[fe80::1%7]:5", "[fe80::1]:5", "[fe80::1%lo]:5"]
NETS = ["10.0.0.0/24", "10.0.0.1/32", "fd00::/64", "fd00::1/128"]
PEERS = st.lists(st.tuples(st.sampled_from([PUB1, PUB2, PUB3]),
                           st.none() | st.sampled_from(ENDPOINTS),
                           st.lists(st.sampled_from(NETS), max_size=3), st.integers(0, 3)),
                 max_size=3, unique_by=lambda peer: peer[0])


def _answer_of(peers: list[tuple[str, str | None, list[str], int]]) -> str:
    lines = []
    for key, endpoint, nets, rx in peers:
        lines += [f"public_key={key}", *([f"endpoint={endpoint}"] if endpoint else []),
                  *[f"allowed_ip={n}" for n in nets], f"rx_bytes={rx}"]
    return answer(*lines)


@settings(max_examples=300, deadline=None)
@given(first=PEERS, then=PEERS)
def test_fuzz_cached_parse_of_a_changed_answer_agrees_with_the_whole_parse(
        first: list[tuple[str, str | None, list[str], int]],
        then: list[tuple[str, str | None, list[str], int]]) -> None:
    """One answer, then another with the same cache: the peers parsed again (and the
    addresses they keep from the first) are what the whole parse of the second gives,
    zones included."""
    cache: PeerCache = {}
    parse_uapi(_answer_of(first), name="wgt0", ifindex=7, mtu=1420, cache=cache)
    text = _answer_of(then)
    assert parse_uapi(text, name="wgt0", ifindex=7, mtu=1420, cache=cache) == parse(text)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINE, max_size=12), end=st.sampled_from(["errno=0", "errno=5", ""]))
def test_fuzz_cached_parse_agrees_with_the_whole_parse(lines: list[str], end: str) -> None:
    text = "\n".join([*lines, end])
    cache: PeerCache = {}
    for _round in range(2):  # cold, then with every block cached
        try:
            whole: object = parse(text)
        except SourceError as exc:
            whole = str(exc)
        try:
            cached: object = parse_uapi(text, name="wgt0", ifindex=7, mtu=1420,
                                        cache=cache)
        except SourceError as exc:
            cached = str(exc)
        assert cached == whole
