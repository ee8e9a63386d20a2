"""The UDP ports bound in this thread's network namespace, read with NETLINK_SOCK_DIAG.

A kernel WireGuard device keeps its UDP socket in the namespace it was created in, even when
the device itself is moved to another one (https://www.wireguard.com/netns/). Its listen port
missing from this namespace's sockets is how that is recognised. This module asks the kernel
what `ss -uan` asks (SOCK_DIAG_BY_FAMILY, inet_diag_req_v2, IPPROTO_UDP, every state), for
AF_INET and AF_INET6, with stdlib struct over an AF_NETLINK socket. A netlink socket belongs
to the namespace of the thread that opens it, so a caller that entered a namespace with
setns() sees that namespace's sockets.
"""

from __future__ import annotations

import errno
import socket
import struct

from wgnest.sources.errors import SourceError, reason_for_errno

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLM_F_DUMP_INTR = 0x10
ALL_STATES = 0xFFFFFFFF
NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes:
# sport, dport big-endian, src[4], dst[4], interface, cookie[2]); zero matches everything.
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, then the sockid, whose first field is sport
# (big-endian); the rest (expires, queues, uid, inode) is not needed.
INET_DIAG_MSG_HEAD = struct.Struct("!BBBBH")
INET_DIAG_MSG_SIZE = 72
DUMP_RETRIES = 3
VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6}


def encode_request(family: int, seq: int) -> bytes:
    body = INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_UDP, 0, 0, ALL_STATES)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                         NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def decode_messages(data: bytes, seq: int) -> tuple[list[tuple[int, int]], bool, bool, int]:
    """Parse one recv() worth of dump messages. Returns (family and port of each socket,
    done, interrupted, errno of an NLMSG_ERROR or 0)."""
    found: list[tuple[int, int]] = []
    done = interrupted = False
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, flags, mseq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise SourceError(f"sock_diag: truncated message ({length} bytes at {off})",
                              "parse")
        body = data[off + NLMSGHDR.size:off + length]
        off += (length + 3) & ~3
        if mseq != seq:
            continue  # not an answer to this dump
        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
            return found, True, interrupted, code or errno.EIO
        if mtype != SOCK_DIAG_BY_FAMILY or len(body) < INET_DIAG_MSG_SIZE:
            raise SourceError(f"sock_diag: unexpected message type {mtype} "
                              f"({len(body)} bytes)", "parse")
        family, _state, _timer, _retrans, sport = INET_DIAG_MSG_HEAD.unpack_from(body)
        if family in VERSIONS and sport:
            found.append((VERSIONS[family], sport))
    return found, done, interrupted, 0


def _dump(sock: socket.socket, family: int, seq: int) -> tuple[set[tuple[int, int]], bool]:
    """One dump of one address family. Returns (sockets, interrupted)."""
    sock.sendall(encode_request(family, seq))
    out: set[tuple[int, int]] = set()
    interrupted = False
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise SourceError("sock_diag: socket closed during the dump", "other")
        found, done, intr, code = decode_messages(data, seq)
        out.update(found)
        interrupted = interrupted or intr
        if code:
            raise OSError(code, f"{errno.errorcode.get(code, code)} "
                                f"({'AF_INET6' if family == socket.AF_INET6 else 'AF_INET'})")
        if done:
            return out, interrupted


def udp_listen_ports(timeout: float = 2.0) -> frozenset[tuple[int, int]]:
    """(4 or 6, port) of every bound UDP socket of this thread's network namespace.

    A dump the kernel flags as interrupted (sockets came or went while it was read) is read
    again, at most DUMP_RETRIES times; the last read is returned. Raises SourceError."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise SourceError(f"sock_diag unavailable: {exc}", reason_for_errno(exc.errno)) from None
    seq = 0
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        ports: set[tuple[int, int]] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for _attempt in range(DUMP_RETRIES):
                seq += 1
                try:
                    found, interrupted = _dump(sock, family, seq)
                except OSError as exc:
                    if family == socket.AF_INET6 and exc.errno in (
                            errno.EAFNOSUPPORT, errno.ENOENT):
                        found, interrupted = set(), False  # a kernel without IPv6
                    else:
                        raise
                if not interrupted:
                    break
            ports |= found
        return frozenset(ports)
    except TimeoutError:
        raise SourceError(f"sock_diag dump timed out after {timeout}s", "timeout") from None
    except OSError as exc:
        raise SourceError(f"sock_diag UDP dump failed: {exc}",
                          reason_for_errno(exc.errno)) from None
    finally:
        sock.close()
