"""ICMP echo sockets: one per (family, mark, device), with the probe's privilege mode.

icmplib builds and parses the packets; these sockets add SO_MARK (the flow's mark),
SO_BINDTODEVICE (a path through the underlay), kernel receive stamps and the payload that
icmplib's parser drops (replies are matched on a random token in it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from wgnest.lean_imports import import_asyncio_without_ssl

import_asyncio_without_ssl()  # (icmplib imports asyncio)
from icmplib import ICMPLibError, ICMPv4Socket, ICMPv6Socket, SocketPermissionError  # noqa: E402

SO_BINDTODEVICE, SO_MARK, SO_TIMESTAMPNS, SO_RCVBUFFORCE = 25, 36, 35, 33
RCVBUF = 2 << 20  # bytes asked (the kernel doubles it): a round's replies queue while it sends
PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
ChannelKey = tuple[int, int, str]  # (family, mark, device to bind to or "")


def probe_mode(privileged: bool | None, cap_net_raw: bool, range_text: str | None,
               gids: Sequence[int]) -> tuple[bool, str]:
    """(use raw sockets, disabled reason or "") from CAP_NET_RAW and net.ipv4.ping_group_range."""
    if privileged or (privileged is None and cap_net_raw):
        return True, "" if cap_net_raw else "raw ICMP requested but the process has no CAP_NET_RAW"
    lo, hi = 1, 0
    with contextlib.suppress(ValueError, AttributeError):
        lo, hi = (int(x) for x in (range_text or "").split())
    if any(lo <= g <= hi for g in gids):
        return False, ""
    if range_text is None:
        return False, f"no CAP_NET_RAW and {PING_GROUP_RANGE} is unreadable"
    return False, (f"no CAP_NET_RAW and net.ipv4.ping_group_range '{' '.join(range_text.split())}'"
                   f" excludes gid {gids[0] if gids else '?'}")


def system_probe_mode(privileged: bool | None) -> tuple[bool, str]:
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:")).split()[1]
        cap_net_raw = bool(int(caps, 16) >> 13 & 1)
    except (OSError, StopIteration, IndexError, ValueError):
        cap_net_raw = os.geteuid() == 0
    try:
        with open(PING_GROUP_RANGE) as f:
            text: str | None = f.read()
    except OSError:
        text = None
    gids = list(dict.fromkeys([os.getegid(), os.getgid(), *os.getgroups()]))
    return probe_mode(privileged, cap_net_raw, text, gids)


@dataclass(frozen=True, slots=True)
class Reply:
    source: str
    ident: int
    sequence: int
    echo: bool  # an echo reply; else an ICMP error quoting our request
    payload: bytes
    stamp: int | None  # kernel receive time (Unix nanoseconds), if known


class Channel(Protocol):
    """One ICMP socket for one (family, mark). Tests substitute fakes via _open_channel."""

    def fileno(self) -> int: ...
    def ident(self, chosen: int) -> int: ...  # the id our replies carry
    def send(self, address: str, ident: int, sequence: int, payload: bytes) -> int | None: ...
    # ^ returns time.time_ns() right before the packet left, when known
    def receive(self) -> tuple[list[Reply], OSError | None]: ...  # drains, never blocks
    def close(self) -> None: ...


class _PayloadMixin:  # icmplib's parser drops the payload we match the token on
    @staticmethod
    def _checksum(data: bytes) -> int:  # same as icmplib's, 10x faster
        total: int = sum(struct.unpack(f"!{len(data) // 2}H", data[:len(data) // 2 * 2]))
        total += data[-1] << 8 if len(data) % 2 else 0
        total = (total & 0xFFFF) + (total >> 16)
        return ~(total + (total >> 16)) & 0xFFFF

    def _parse_reply(self, packet: bytes, source: str, current_time: float) -> Any:
        start = 0
        if self._IP_VERSION == 4 and self._privileged and packet:  # type: ignore[attr-defined]
            packet, start = bytes(20) + packet[(packet[0] & 0x0F) * 4:], 20  # any IP options
        reply = super()._parse_reply(packet, source, current_time)  # type: ignore[misc]
        return None if reply is None else (reply, packet[start + 8:])


_V4: Any = type("_V4", (_PayloadMixin, ICMPv4Socket), {})
_V6: Any = type("_V6", (_PayloadMixin, ICMPv6Socket), {})


class IcmpChannel:
    def __init__(self, family: int, mark: int, device: str, privileged: bool) -> None:
        try:
            self.icmp = (_V4 if family == 4 else _V6)(privileged=privileged)
        except SocketPermissionError as e:
            raise OSError(errno.EPERM, str(e)) from None
        except ICMPLibError as e:
            raise OSError(errno.EIO, str(e)) from None
        self.sock: socket.socket = self.icmp.sock
        self.echo_reply = 0 if family == 4 else 129
        try:
            if mark:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if device:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.setblocking(False)
        except OSError:
            self.close()
            raise
        # The default buffer holds ~200 replies: more targets than that lost most replies.
        # SO_RCVBUFFORCE (CAP_NET_ADMIN) may pass net.core.rmem_max; SO_RCVBUF stops there.
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF)
                break

    def fileno(self) -> int:
        return self.sock.fileno()

    def ident(self, chosen: int) -> int:  # ping sockets: the kernel sets the id to the port
        return chosen if self.icmp.is_privileged else int(self.sock.getsockname()[1])

    def send(self, address: str, ident: int, sequence: int, payload: bytes) -> int | None:
        packet, dest = self.icmp._create_packet(ident, sequence, payload), (address, 0)
        wall = time.time_ns()
        self.sock.sendto(packet, dest)
        return wall

    def receive(self) -> tuple[list[Reply], OSError | None]:
        out: list[Reply] = []
        while True:
            try:
                data, anc, _, addr = self.sock.recvmsg(2048, 64)
            except BlockingIOError:
                return out, None
            except OSError as e:  # e.g. an ICMP error the kernel reports on the socket
                return out, e
            stamp = next((sec * 10**9 + ns for lvl, typ, raw in anc
                          if (lvl, typ) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)
                          for sec, ns in [struct.unpack("qq", raw[:16])]), None)
            parsed = self.icmp._parse_reply(data, addr[0], 0.0)
            if parsed is not None:
                r, payload = parsed
                out.append(Reply(addr[0], r.id, r.sequence, r.type == self.echo_reply,
                                 payload, stamp))

    def close(self) -> None:
        self.icmp.close()


