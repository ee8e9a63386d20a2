"""Userspace WireGuard (wireguard-go, boringtun) read over its UAPI unix socket.

Private and preshared keys are dropped as they are read: they never reach a log line,
an exception or a returned object, and messages never echo a line of the answer.
"""

from __future__ import annotations

import base64
import contextlib
import errno as errno_mod
import ipaddress
import operator
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

try:
    from _blake2 import blake2b
except ImportError:  # (a Python without it: hashlib's, through OpenSSL)
    from hashlib import blake2b

from wgnest.model.host import Device, Endpoint, IPNetwork, Link, Peer
from wgnest.sources.errors import SourceError, reason_for_errno
from wgnest.sources.netns import resolve_in_root
from wgnest.sources.peer_builder import PeerBuilder, lean_network

SOCK_DIR = Path("/var/run/wireguard")
MAX_ANSWER = 64 << 20  # bytes; a larger answer is refused as "parse"
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_ENDPOINT = re.compile(r"\[([0-9a-fA-F:.]+)(?:%([^\]]+))?\]:([0-9]{1,5})|([0-9.]+):([0-9]{1,5})")
_PEER_UINTS = {  # key -> (PeerBuilder field, maximum)
    "last_handshake_time_sec": ("handshake_sec", 2**63 - 1),
    "last_handshake_time_nsec": ("handshake_nsec", 999_999_999),
    "tx_bytes": ("tx_bytes", 2**64 - 1),
    "rx_bytes": ("rx_bytes", 2**64 - 1),
    "persistent_keepalive_interval": ("keepalive", 65535),
    "protocol_version": ("protocol_version", 2**32 - 1),
}
_PEER_KEYS = {*_PEER_UINTS, "preshared_key", "endpoint", "allowed_ip"}
_DEVICE_KEYS = {"private_key", "own_public_key", "listen_port", "fwmark", "errno"}
_P = 2**255 - 19


def x25519(scalar: bytes, u: int = 9) -> bytes:
    """RFC 7748 X25519 (Montgomery ladder); not constant time: only derives public keys."""
    k = int.from_bytes(scalar, "little") & ~7 & ~(1 << 255) | (1 << 254)
    x1, x2, z2, x3, z3, swap = u % _P, 1, 0, u % _P, 1, 0
    for t in range(254, -1, -1):
        bit = (k >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        aa, bb, da, cb = a * a % _P, b * b % _P, d * a % _P, c * b % _P
        e = aa - bb
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


# Derived public keys by a keyed hash of the private key (keyed BLAKE2b, a MAC of its own,
# under a key made at start and never shown): a device's key is derived once, not every
# refresh (1 ms each), and neither the private key nor anything that can be checked against
# it outside this process is kept. CPython's own _blake2 loads no OpenSSL (hashlib would:
# 3.5 MiB resident for one hash a refresh).
_DERIVED: dict[bytes, str] = {}
_DERIVED_KEY = os.urandom(32)


def derived_public_key(private: bytes) -> str:
    tag = blake2b(private, key=_DERIVED_KEY, digest_size=32).digest()
    public = _DERIVED.get(tag)
    if public is None:
        public = _b64(x25519(private))
        if len(_DERIVED) >= 4096:
            _DERIVED.clear()
        _DERIVED[tag] = public
    return public


class _Bad(Exception):
    """A defect of one line; its text is ours and never holds a value from the answer."""


def _uint(value: str, maximum: int) -> int:
    # [0-9]{1,20} without a regex; isascii() as isdigit() alone accepts other digits ("١٢")
    if not (len(value) <= 20 and value.isascii() and value.isdigit()):
        raise ValueError
    number = int(value)
    if number > maximum:
        raise ValueError
    return number


def _key(value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise ValueError
    return bytes.fromhex(value)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _public_key(value: str) -> str:
    return _b64(_key(value))


def _scope(zone: str | None) -> int:
    if zone is None:
        return 0
    if zone.isascii() and zone.isdigit():
        return _uint(zone, 2**32 - 1)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        return 0


def _endpoint(value: str) -> Endpoint:
    m = _ENDPOINT.fullmatch(value)
    if m is None:
        raise ValueError
    if m[3] is not None:
        return Endpoint(ipaddress.IPv6Address(m[1]), _uint(m[3], 65535), _scope(m[2]))
    return Endpoint(ipaddress.IPv4Address(m[4]), _uint(m[5], 65535))


def _network(value: str) -> IPNetwork:
    addr, sep, plen = value.partition("/")
    if not sep or "%" in addr:
        raise ValueError
    network = ipaddress.IPv6Network if ":" in addr else ipaddress.IPv4Network  # as ip_network
    return lean_network(network(f"{addr}/{_uint(plen, 128)}", strict=False))


def _check_errno(last: str, name: str) -> None:
    key, _, value = last.partition("=")
    if key != "errno":
        raise SourceError(f"UAPI answer of {name}: ended without errno (truncated)", "parse")
    if not re.fullmatch(r"-?[0-9]{1,10}", value):
        raise SourceError(f"UAPI answer of {name}: invalid value for key 'errno'", "parse")
    code = abs(int(value))
    if code:
        label = errno_mod.errorcode.get(code, "?")
        raise SourceError(f"UAPI get on {name} failed: errno {code} ({label})", "errno")


def _apply(key: str, value: str, dev: dict[str, str | int], peers: list[PeerBuilder],
           old: Peer | None = None) -> None:
    """Apply one known key; unknown keys are ignored. `old`: the peer as the last answer
    gave it, whose endpoint and allowed IPs are kept (the very objects) where their text is
    unchanged: a peer whose counters moved is parsed again, its addresses are not."""
    if key in _PEER_KEYS and not peers:
        raise _Bad(f"key {key!r} before any public_key")
    if key == "private_key":  # derive the public key at once; the private key is not kept
        dev["derived"] = derived_public_key(_key(value))
    elif key == "own_public_key":
        dev["own"] = _b64(_key(value))
    elif key in ("listen_port", "fwmark"):
        dev[key] = _uint(value, 65535 if key == "listen_port" else 2**32 - 1)
    elif key == "public_key":
        peers.append(PeerBuilder(_public_key(value)))
    elif key in _PEER_UINTS:
        attr, maximum = _PEER_UINTS[key]
        setattr(peers[-1], attr, _uint(value, maximum))
    elif key == "endpoint":  # (one with a zone prints without it: parsed again, always)
        kept = old.endpoint if old is not None else None
        same = kept is not None and not kept.scope_id and str(kept) == value
        peers[-1].endpoint = kept if same else _endpoint(value)
    elif key == "allowed_ip":
        nets = peers[-1].allowed_ips
        same = old is not None and len(old.allowed_ips) > len(nets) and str(
            old.allowed_ips[len(nets)]) == value
        nets.append(old.allowed_ips[len(nets)] if same and old is not None else _network(value))
    elif key == "errno":
        raise _Bad("errno before the end of the answer")


class _Again(Exception):
    """The answer is not in the shape the incremental parse takes: parse it whole."""


# A peer's block of the answer (by its length and hash, in one int: the text itself is never
# kept, it holds the preshared key) -> the Peer it parsed to. str hashes are keyed SipHash
# with a key made at start: nothing outside this process can be checked against them.
PeerCache = dict[int, Peer]
_PEER_MARK = "\npublic_key="


def _tag(block: str) -> int:
    return len(block) << 64 | hash(block) & 0xFFFF_FFFF_FFFF_FFFF


def _parse_blocks(text: str, name: str, ifindex: int, mtu: int, cache: PeerCache) -> Device:
    """The answer cut at each `public_key=` line: a peer whose block is the same text as in
    the last answer is the same Peer (on a gateway most peers' counters and handshakes do
    not move between two refreshes); only the others are parsed. `cache` is replaced by the
    blocks of this answer."""
    body, _, last = text.rstrip("\n").rpartition("\n")
    _check_errno(last, name)
    body = "\n" + body
    start = body.find(_PEER_MARK)
    dev: dict[str, str | int] = {"derived": "", "own": "", "listen_port": 0, "fwmark": 0}
    for line in body[:start if start >= 0 else len(body)].split("\n")[1:]:
        key, sep, value = line.partition("=")
        if not sep or key in _PEER_KEYS:
            raise _Again
        _apply(key, value, dev, [])
    fresh: PeerCache = {}
    peers: list[Peer] = []
    previous: dict[str, Peer] | None = None  # by key, made at the first changed block
    while start >= 0:  # one block at a time: 10,000 peers' blocks at once were 4 MB
        end = body.find(_PEER_MARK, start + 1)
        block = body[start + len(_PEER_MARK):end if end >= 0 else len(body)]
        start, tag = end, _tag(block)
        peer = cache.get(tag)
        if peer is None:
            if previous is None:
                previous = {p.public_key: p for p in cache.values()}
            peer = _parse_block(block, previous)
        fresh[tag] = peer
        peers.append(peer)
    cache.clear()
    cache.update(fresh)
    return Device(name=name, ifindex=ifindex, implementation="userspace",
                  public_key=str(dev["own"] or dev["derived"]), listen_port=int(dev["listen_port"]),
                  fwmark=int(dev["fwmark"]), mtu=mtu, peers=_in_key_order(peers))


def _in_key_order(peers: list[Peer]) -> tuple[Peer, ...]:
    """wireguard-go answers in Go's map order, new at each `get`: in the order of their
    keys, the same peers come back in the same order, and every later stage (flows, route
    answers, paths, rendered lines) sees "unchanged" at once."""
    peers.sort(key=_PUBLIC_KEY)
    return tuple(peers)


_PUBLIC_KEY = operator.attrgetter("public_key")


def _parse_block(block: str, previous: dict[str, Peer]) -> Peer:
    lines = block.split("\n")
    builder = [PeerBuilder(_public_key(lines[0]))]
    old = previous.get(builder[0].public_key)
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        uint = _PEER_UINTS.get(key)
        if uint is not None:
            setattr(builder[0], uint[0], _uint(value, uint[1]))
        elif not sep or key in _DEVICE_KEYS:
            raise _Again  # a device key among the peers, or no key=value: the whole parse says
        else:
            _apply(key, value, {}, builder, old)  # a peer key, or one unknown (ignored)
    return builder[0].build()


def parse_uapi(text: str, *, name: str, ifindex: int, mtu: int,
               cache: PeerCache | None = None) -> Device:
    """Parse the answer to `get=1`; raises SourceError("parse" or "errno"). With `cache`
    (kept by the caller between answers of one device), unchanged peers are not parsed
    again; any answer that one cannot take is parsed whole, errors included."""
    if cache is not None:
        try:
            return _parse_blocks(text, name, ifindex, mtu, cache)
        except (_Again, _Bad, ValueError):
            cache.clear()
    lines = text.rstrip("\n").split("\n")
    _check_errno(lines[-1], name)
    dev: dict[str, str | int] = {"derived": "", "own": "", "listen_port": 0, "fwmark": 0}
    peers: list[PeerBuilder] = []
    for num, line in enumerate(lines[:-1], 1):
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise _Bad("not key=value")
            uint = _PEER_UINTS.get(key)
            if uint is not None and peers:  # most lines of a large answer: no call to _apply
                setattr(peers[-1], uint[0], _uint(value, uint[1]))
            else:
                _apply(key, value, dev, peers)
        except _Bad as exc:
            raise SourceError(f"UAPI answer of {name}: line {num}: {exc}", "parse") from None
        except ValueError:
            msg = f"UAPI answer of {name}: line {num}: invalid value for key {key!r}"
            raise SourceError(msg, "parse") from None
    return Device(name=name, ifindex=ifindex, implementation="userspace",
                  public_key=str(dev["own"] or dev["derived"]), listen_port=int(dev["listen_port"]),
                  fwmark=int(dev["fwmark"]), mtu=mtu,
                  peers=_in_key_order([p.build() for p in peers]))


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        raise SourceError(f"{path}: no complete answer within the timeout", "timeout") from None
    except OSError as exc:
        text = exc.strerror or str(exc)
        raise SourceError(f"{path}: {text}", reason_for_errno(exc.errno)) from None


def _connect(path: Path, deadline: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_remaining(deadline))
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, path: Path, deadline: float) -> str:
    """Send `get=1` and read up to the empty line that ends the answer."""
    sock.settimeout(_remaining(deadline))
    sock.sendall(b"get=1\n\n")
    buf = bytearray(b"\n")  # so that an answer starting with the empty line ends at once
    while (end := buf.find(b"\n\n", max(len(buf) - 65537, 0))) < 0:
        if len(buf) > MAX_ANSWER:
            raise SourceError(f"{path}: answer larger than {MAX_ANSWER} bytes", "parse")
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(65536)
        if not chunk:
            raise SourceError(f"{path}: connection closed before the end of the answer", "parse")
        buf += chunk
    try:
        return buf[1 : end + 1].decode()
    except UnicodeDecodeError:
        raise SourceError(f"{path}: answer is not UTF-8", "parse") from None


def read_uapi(path: Path, timeout: float) -> str:
    """The raw answer to `get=1` (without the final empty line), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with _os_errors(path), _connect(path, deadline) as sock:
        return _exchange(sock, path, deadline)


def _netns(who: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{who}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


_IN_ROOT = re.compile(r"/proc/[0-9]+/root(?=/)")


def _bound_as(path: Path) -> Callable[[str], str]:
    """How a path a socket was bound at compares with `path`: resolved by us, or, for a
    directory reached through /proc/PID/root (a container's), resolved inside that root."""
    root = _IN_ROOT.match(str(path))
    if root is None:
        return os.path.realpath
    base = Path(root.group(0))
    return lambda bound: str(resolve_in_root(base, Path(bound))) if bound.startswith("/") \
        else bound


def _listening_here(path: Path) -> bool | None:
    """Whether our netns' table of unix sockets has a listener bound at `path`."""
    try:
        lines = Path("/proc/thread-self/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    resolve = _bound_as(path)
    want = os.path.realpath(path) if resolve is os.path.realpath else str(path)
    for line in lines:
        fields = line.split(maxsplit=7)  # Num RefCount Protocol Flags Type St Inode Path
        if (len(fields) == 8 and int(fields[3], 16) & 0x10000 and fields[7].endswith(path.name)
                and resolve(fields[7]) == want):
            return True
    return False


def _same_netns(sock: socket.socket, path: Path) -> bool | None:
    """SO_PEERCRED names the pid that called listen(); if it has exited (wireguard-go
    daemonizes after listening) the kernel's own per-netns socket table decides."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    mine, theirs = _netns("thread-self"), _netns(str(pid)) if pid > 0 else None
    if mine and theirs:
        return mine == theirs
    listed = _listening_here(path)
    if listed is not None:
        return listed
    return None


def socket_in_my_netns(path: Path, timeout: float) -> bool | None:
    """Whether the daemon behind `path` lives in our network namespace; None if unknown."""
    try:
        with _connect(path, time.monotonic() + timeout) as sock:
            return _same_netns(sock, path)
    except OSError:
        return None


def _read_device(path: Path, link: Link, timeout: float, cache: PeerCache | None = None
                 ) -> Device | None:
    deadline = time.monotonic() + timeout
    with _os_errors(path), _connect(path, deadline) as sock:
        if _same_netns(sock, path) is False:
            return None  # its daemon lives in another network namespace
        text = _exchange(sock, path, deadline)
    return parse_uapi(text, name=link.name, ifindex=link.index, mtu=link.mtu, cache=cache)


def _sockets(sock_dir: Path) -> list[tuple[str, Path]]:
    try:
        with os.scandir(sock_dir) as it:
            entries = list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SourceError(f"{sock_dir}: {exc.strerror}", reason_for_errno(exc.errno)) from None
    found = []
    for entry in entries:
        if not entry.name.endswith(".sock") or entry.name == ".sock":
            continue
        with contextlib.suppress(OSError):  # vanished meanwhile
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                found.append((entry.name[:-5], Path(entry.path)))
    return sorted(found)


def uapi_devices(links: Sequence[Link], sock_dir: Path = SOCK_DIR, timeout: float = 1.0,
                 skip: Collection[str] = (), caches: dict[str, PeerCache] | None = None
                 ) -> tuple[list[Device], list[SourceError], list[Path]]:
    """Read every userspace device of this netns: (devices, one error per device that
    failed, stale sockets). A socket named after a link that is no TUN device (userspace
    WireGuard always runs on one) is left over from a daemon gone: it is never connected to
    (it could only time out or be refused, every refresh), only reported. `caches` (by
    socket path, kept by the caller) let unchanged peers be reused (see parse_uapi)."""
    by_name = {link.name: link for link in links}
    devices: list[Device] = []
    errors: list[SourceError] = []
    stale: list[Path] = []
    used: set[str] = set()
    for name, path in _sockets(sock_dir):
        link = by_name.get(name)
        if name in skip or link is None:
            continue  # a kernel device, or a socket of another namespace's device
        if link.kind != "tun":
            stale.append(path)
            continue
        key = f"{path}\0{link.index}"
        used.add(key)
        cache = caches.setdefault(key, {}) if caches is not None else None
        try:
            device = _read_device(path, link, timeout, cache)
        except SourceError as exc:
            errors.append(exc)  # logged by the refresher when it starts and ends
            continue
        if device is not None:
            devices.append(device)
    if caches is not None:  # the peers of devices gone are let go
        mine = f"{sock_dir}/"
        for key in [k for k in caches if k.startswith(mine) and k not in used]:
            del caches[key]
    return devices, errors, stale
