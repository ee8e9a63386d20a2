"""The HTTP(S) surface: telemetry path, status page, health check, basic auth.

One daemon thread per connection, at most MAX_CONNECTIONS at once. The TLS handshake and the
whole request head are read in that thread under a deadline, so an idle or slow client only
ever holds its own thread and never blocks the accept loop or other scrapes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import logging
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol, cast

import bcrypt
from prometheus_client import CONTENT_TYPE_LATEST

from wgnest.runtime.webconfig import WebConfig, build_ssl_context

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # seconds for a TLS handshake, and for each request head
MAX_HEAD_BYTES = 64 * 1024
_MAX_AUTH_HEADER = 1024
_REJECT_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Handlers(Protocol):
    def metrics(self) -> bytes: ...  # the rendered exposition body; cheap, no netlink I/O
    def status_page(self) -> str: ...  # HTML for "/"


class _HeadTooLarge(Exception):
    """The request head passed MAX_HEAD_BYTES."""


class _BasicAuth:
    """Checks credentials against bcrypt hashes, one bcrypt at a time, caching successes."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {u: h.encode() for u, h in users.items()}
        cost = min((int(h[4:6]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(b"wgnest-unknown-user", bcrypt.gensalt(min(cost, 14)))
        self._lock = threading.Lock()
        self._ok: set[tuple[str, bytes]] = set()

    def check(self, header: str | None) -> bool:
        if header is None or len(header) > _MAX_AUTH_HEADER:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(encoded.strip().encode("latin-1"), validate=True)
            user_b, colon, password = raw.partition(b":")
            user = user_b.decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            return False
        if not colon or len(password) > 72 or b"\0" in password:
            return False  # bcrypt refuses these; they can never match
        key = (user, hashlib.sha256(password).digest())
        if key in self._ok:
            return True
        with self._lock:
            try:
                ok = bcrypt.checkpw(password, self._users.get(user, self._dummy))
            except ValueError:
                ok = False
            ok = ok and user in self._users
            if ok:
                if len(self._ok) >= 256:
                    self._ok.clear()
                self._ok.add(key)
        return ok


class _DeadlineReader(io.RawIOBase):
    """Reads from the socket only until the handler's deadline, and only MAX_HEAD_BYTES."""

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        h = self._handler
        remaining = h.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        if h.head_bytes >= MAX_HEAD_BYTES:
            raise _HeadTooLarge
        self._sock.settimeout(remaining)
        n = self._sock.recv_into(buf)
        h.head_bytes += n
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so even answers to garbage have a status line
    server_version = "wgnest"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    disable_nagle_algorithm = True
    deadline = 0.0
    head_bytes = 0

    def setup(self) -> None:
        self.app = cast(_Server, self.server)
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle(self) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            try:  # bounded as a whole by the socket timeout set in setup()
                self.connection.do_handshake()
            except (OSError, ValueError) as e:
                log.debug("TLS handshake with %s failed: %s", self.client_address[0], e)
                return
        super().handle()

    def handle_one_request(self) -> None:
        self.deadline, self.head_bytes = time.monotonic() + self.timeout, 0
        self.close_connection = True
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
        try:
            self.raw_requestline = self.rfile.readline(8193)
            if len(self.raw_requestline) > 8192:
                self.send_error(414)
                return
            if not self.raw_requestline or not self.parse_request():
                return
            self.connection.settimeout(self.timeout)
            self._route()
            self.wfile.flush()
        except _HeadTooLarge:
            self.send_error(431)
        except OSError as e:  # includes timeouts; the client is gone or too slow
            log.debug("connection from %s: %s", self.client_address[0], e)

    def _route(self) -> None:
        length = self.headers.get("Content-Length", "0").strip()
        if length != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body we will not read
        if self.app.auth is not None and not self.app.auth.check(self.headers["Authorization"]):
            self._reply(401, b"Unauthorized\n", {"WWW-Authenticate": 'Basic realm="wgnest"'})
            return
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            self._reply(405, b"Method Not Allowed\n", {"Allow": "GET, HEAD"})
            return
        path = self.path.partition("?")[0]
        try:
            if path == self.app.telemetry_path:
                self._reply(200, self.app.handlers.metrics(), ctype=CONTENT_TYPE_LATEST)
            elif path == "/":
                page = self.app.handlers.status_page().encode("utf-8")
                self._reply(200, page, ctype="text/html; charset=utf-8")
            elif path == "/-/healthy":
                self._reply(200, b"OK\n")
            else:
                self._reply(404, b"Not Found\n")
        except Exception:
            log.exception("handler for %s failed", path)
            self._reply(500, b"internal error\n")

    def _reply(self, code: int, body: bytes, headers: Mapping[str, str] | None = None,
               ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self) -> None:
        for name, value in self.app.extra_headers.items():
            self.send_header(name, value)
        super().end_headers()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing per request: scrapes are routine."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: %s", self.client_address[0], format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # socketserver's 5 drops SYNs in a burst: 1 s client retries

    def __init__(self, family: socket.AddressFamily, address: tuple[str, int],
                 handlers: Handlers, telemetry_path: str, web_config: WebConfig | None) -> None:
        self.address_family = family
        self.handlers, self.telemetry_path = handlers, telemetry_path
        self.ssl_context = build_ssl_context(web_config) if web_config else None
        users = web_config.basic_auth_users if web_config else {}
        self.auth = _BasicAuth(users) if users else None
        self.extra_headers: Mapping[str, str] = web_config.headers if web_config else {}
        self.active: set[socket.socket] = set()
        self.lock = threading.Lock()
        self._last_full_log = 0.0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no getfqdn() DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, addr = self.socket.accept()
        if self.ssl_context is None:
            return sock, addr
        try:  # no I/O here: the handshake happens in the connection's own thread
            return self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False), addr
        except OSError:
            sock.close()
            raise

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int] | str) -> bool:
        sock = cast(socket.socket, request)
        with self.lock:
            if len(self.active) < MAX_CONNECTIONS:
                self.active.add(sock)
                return True
            now = time.monotonic()
            noisy, self._last_full_log = now - self._last_full_log > 60, now
        (log.warning if noisy else log.debug)(
            "%d connections open; refusing one from %s", MAX_CONNECTIONS, client_address[0])
        if not isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(_REJECT_503)
        return False  # the caller closes it

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        with self.lock:
            self.active.discard(cast(socket.socket, request))
        super().shutdown_request(request)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket],
                     client_address: tuple[str, int] | str) -> None:
        log.debug("connection from %s failed", client_address[0], exc_info=True)


class Server:
    """A running server; `shutdown()` stops accepting, closes the socket and open connections."""

    def __init__(self, httpd: _Server) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name="wgnest-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_port

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._httpd.lock:
            open_now = list(self._httpd.active)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)


def parse_listen(listen: str) -> tuple[str, int]:
    """":9586" -> ("", 9586); "[::1]:9586" -> ("::1", 9586). Raises ValueError."""
    m = re.fullmatch(r"(\[([^\]]*)\]|[^\[\]:]*):(\d{1,5})", listen.strip())
    if m is None or int(m[3]) > 65535:
        raise ValueError(f"bad listen address {listen!r} (want HOST:PORT, :PORT or [V6]:PORT)")
    return (m[2] if m[2] is not None else m[1]), int(m[3])


def serve(listen: str, handlers: Handlers, telemetry_path: str = "/metrics",
          web_config: WebConfig | None = None) -> Server:
    """Bind `listen` and serve in background threads. Raises ValueError, OSError, WebConfigError."""
    host, port = parse_listen(listen)
    if not telemetry_path.startswith("/") or telemetry_path in ("/", "/-/healthy"):
        raise ValueError(f"bad telemetry path {telemetry_path!r}")
    args = (handlers, telemetry_path, web_config)
    if host in ("", "::"):
        try:  # all addresses, IPv4 included, when the machine has IPv6
            return Server(_Server(socket.AF_INET6, ("::", port), *args))
        except OSError:
            if host == "::":
                raise
        return Server(_Server(socket.AF_INET, ("0.0.0.0", port), *args))
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)[0]
    return Server(_Server(family, (str(addr[0]), int(addr[1])), *args))
