"""A misbehaving UAPI server for fault tests, run inside a lab namespace.

    python fake_uapi.py SOCKET_PATH garbage|hang

Binds SOCKET_PATH, prints "ready", then prints "accepted" for every connection. `garbage`
reads the request and answers with one of a few malformed answers (in turn); `hang` accepts
and then never answers, holding the connection open.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

GARBAGE = (
    b"this is not uapi\n\n",  # no errno line at the end
    b"listen_port=banana\nerrno=0\n\n",  # a bad value
    b"endpoint=198.51.100.1:1\nerrno=0\n\n",  # a peer key before any public_key
    b"\xff\xfe\x00 not utf-8\nerrno=0\n\n",
    b"errno=what\n\n",
)


def _read_request(conn: socket.socket) -> None:
    conn.settimeout(2.0)
    buf = b""
    with contextlib.suppress(OSError):
        while b"\n\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    print("ready", flush=True)
    held: list[socket.socket] = []
    turn = 0
    while True:
        conn, _ = srv.accept()
        print("accepted", flush=True)
        if mode == "hang":
            held.append(conn)
            if len(held) > 64:  # the exporter gave up on these long ago
                held.pop(0).close()
            continue
        with conn:
            _read_request(conn)
            with contextlib.suppress(OSError):
                conn.sendall(GARBAGE[turn % len(GARBAGE)])
            turn += 1


if __name__ == "__main__":
    main()
