"""The HTTP(S) surface: telemetry path, status page, health check, basic auth.

One asyncio event loop in one thread serves every connection; h11 parses the requests. An
idle, slow or half-open client costs a suspended coroutine and a few kilobytes, and every wait
has a deadline: TLS_HANDSHAKE_TIMEOUT for the handshake, HEADER_TIMEOUT for a request head
(from the accept, or from the first byte of a kept-alive request), IDLE_TIMEOUT between
kept-alive requests, WRITE_TIMEOUT for a client to take each part of its answer. When
MAX_CONNECTIONS are open, a new connection closes the one that has waited longest (for a
request, or for its client to read), so no number of idle clients can lock a scrape out: the
only connections that cannot be closed so are the few waiting for a bcrypt check or a status
page, and both waits are bounded (AUTH_QUEUE_TOTAL, MAX_PENDING_PAGES).

Request bodies are never read. A request with one is answered and its connection closed;
framing that is invalid or ambiguous (Content-Length given twice with different values, both
Content-Length and Transfer-Encoding, a transfer coding other than chunked) is a 400 and the
connection closes: a body can never be taken for a second request.

bcrypt runs in a few daemon threads, never on the event loop and never behind one lock. The next
check is taken from the client (address, username) served least recently, one at a time per
client, and at most one at a time for a slow hash (cost >= SLOW_BCRYPT_COST), so a flood of
guesses or one user's costly hash delays other clients' logins by one check at most. As in
exporter-toolkit, a verified credential is cached (by an HMAC of user, password and hash;
AUTH_CACHE_SIZE entries, least recently used out), so a correct client pays bcrypt once;
failures are never cached.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import http
import ipaddress
import logging
import os
import re
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import h11

from wgnest.lean_imports import import_asyncio_without_ssl
from wgnest.runtime.malloc import return_free_memory
from wgnest.runtime.webconfig import WebConfig, WebConfigError, bcrypt_problem, build_ssl_context

import_asyncio_without_ssl()
import asyncio  # noqa: E402

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

# Connections at once. 768 keeps the process's descriptors below 1024, where select() (used
# by the prober and pyroute2) still works; beyond it the longest-idle connection is closed.
MAX_CONNECTIONS = 768
BACKLOG = 4096  # pending connections the kernel queues (capped by net.core.somaxconn)
TLS_HANDSHAKE_TIMEOUT = 5.0
HEADER_TIMEOUT = 10.0  # to receive a whole request head
IDLE_TIMEOUT = 30.0  # a kept-alive connection waiting for its next request
WRITE_TIMEOUT = 30.0  # for the client to take each 256 KiB of an answer
LINGER_TIMEOUT = 1.0  # after the last answer, unread input is drained this long, then closed
MAX_HEAD_BYTES = 64 * 1024
MAX_TARGET_BYTES = 8192
MAX_AUTH_HEADER = 1024
AUTH_TIMEOUT = 10.0  # a request waits this long for its bcrypt check, then gets a 503
AUTH_CACHE_SIZE = 1024
AUTH_QUEUE_PER_CLIENT = 8  # checks waiting per client; more are a 429
AUTH_QUEUE_TOTAL = 256  # checks waiting in all; more are a 503
SLOW_BCRYPT_COST = 14  # about a second a check on one core; such checks run one at a time
MAX_PENDING_PAGES = 8  # status pages rendering or waiting to; more are a 503

_READ_SIZE = 8192
_WRITE_CHUNK = 256 * 1024
_LINGER_BYTES = 256 * 1024
_FD_RESERVE = 256  # descriptors left for everything else in the process
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

# the text format's content type, as prometheus_client names it (CONTENT_TYPE_LATEST,
# tested equal): written here so serving never imports it
CONTENT_TYPE = b"text/plain; version=1.0.0; charset=utf-8"


def accepts_gzip(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether Accept-Encoding allows gzip (Prometheus always sends `gzip`); `q=0` refuses."""
    for name, value in headers:
        if name != b"accept-encoding":
            continue
        for item in value.split(b","):
            coding, _, params = item.strip().partition(b";")
            if coding.strip().lower() not in (b"gzip", b"*"):
                continue
            q = params.strip().lower()
            if not (q.startswith(b"q=") and q[2:].strip() in (b"0", b"0.0", b"0.00", b"0.000")):
                return True
    return False


def _writes(chunks: Sequence[bytes], size: int) -> Iterator[bytes]:
    """The chunks as writes of about `size` bytes: runs of small ones joined (a gateway's
    gzip member is ~2,000 pieces), large ones cut."""
    run: list[bytes] = []
    held = 0
    for chunk in chunks:
        if len(chunk) >= size:
            if run:
                yield b"".join(run)
                run, held = [], 0
            for start in range(0, len(chunk), size):
                yield chunk[start:start + size]
            continue
        run.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(run)
            run, held = [], 0
    if run:
        yield b"".join(run)


class Handlers(Protocol):
    def metrics(self) -> bytes: ...  # the rendered exposition body; cheap, no netlink I/O
    def status_page(self) -> str: ...  # HTML for "/"


# ---------------------------------------------------------------- basic auth


Bucket = tuple[str, str | None]  # (client network, username or None for unknown users)
_SLOW = object()  # the running-count key shared by every slow-hash check


@dataclass(eq=False)
class _Job:
    bucket: Bucket
    slow: bool
    password: bytes
    hashed: bytes
    done: Callable[[bool], None]
    queued: bool = True


class _CheckPool:
    """bcrypt checks in daemon threads (a cost-31 check runs for days: it must not hold up
    the interpreter's exit). Fair: the next job comes from the bucket that started one least
    recently, a bucket runs one job at a time, and slow hashes one at a time in all."""

    def __init__(self, workers: int) -> None:
        import bcrypt  # (only with basic auth users)

        self._bcrypt = bcrypt
        self._cond = threading.Condition()
        self._queues: dict[Bucket, collections.deque[_Job]] = {}
        self._started: collections.OrderedDict[Bucket, float] = collections.OrderedDict()
        self._running: collections.Counter[object] = collections.Counter()
        self._pending = 0
        self._stopped = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"wgnest-bcrypt-{i}", daemon=True).start()

    def submit(self, job: _Job) -> str | None:
        """Queue the job; None, or why not: "client" (its queue is full) or "server"."""
        with self._cond:
            queue = self._queues.get(job.bucket)
            if queue is not None and len(queue) >= AUTH_QUEUE_PER_CLIENT:
                return "client"
            if self._stopped or self._pending >= AUTH_QUEUE_TOTAL:
                return "server"
            if queue is None:
                queue = self._queues[job.bucket] = collections.deque()
            queue.append(job)
            self._pending += 1
            self._cond.notify()
        return None

    def cancel(self, job: _Job) -> None:
        """Drop a job nobody waits for any more, unless it already runs."""
        with self._cond:
            if job.queued:
                self._unqueue(job.bucket, job)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _unqueue(self, bucket: Bucket, job: _Job | None = None) -> _Job:
        queue = self._queues[bucket]
        if job is None:
            job = queue.popleft()
        else:
            queue.remove(job)
        job.queued = False
        self._pending -= 1
        if not queue:
            del self._queues[bucket]
        return job

    def _take(self) -> _Job | None:
        best: Bucket | None = None
        best_at = 0.0
        for bucket, queue in self._queues.items():
            if self._running[bucket] or (queue[0].slow and self._running[_SLOW]):
                continue
            at = self._started.get(bucket, float("-inf"))
            if best is None or at < best_at:
                best, best_at = bucket, at
        if best is None:
            return None
        job = self._unqueue(best)
        self._started[best] = time.monotonic()
        self._started.move_to_end(best)
        while len(self._started) > 4 * AUTH_QUEUE_TOTAL:
            self._started.popitem(last=False)
        self._running[best] += 1
        if job.slow:
            self._running[_SLOW] += 1
        return job

    def _work(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopped and (job := self._take()) is None:
                    self._cond.wait()
                if job is None:
                    return
            try:
                ok = self._bcrypt.checkpw(job.password, job.hashed)
            except ValueError:
                ok = False
            with self._cond:
                for held in (job.bucket, _SLOW) if job.slow else (job.bucket,):
                    self._running[held] -= 1
                    if not self._running[held]:
                        del self._running[held]
                self._cond.notify_all()
            job.done(ok)


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[bool]
    job: _Job
    waiters: int = 0


@dataclass
class _Credentials:
    user: str
    user_bytes: bytes
    password: bytes


def parse_basic(header: bytes | None) -> _Credentials | None:
    """User and password of a Basic Authorization header, None when it cannot match any
    bcrypt hash (malformed, no colon, not UTF-8, a password over 72 bytes or with a NUL)."""
    if header is None or len(header) > MAX_AUTH_HEADER:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
        user_b, colon, password = raw.partition(b":")
        user = user_b.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    if not colon or len(password) > 72 or b"\0" in password:
        return None  # bcrypt refuses these; they can never match
    return _Credentials(user, user_b, password)


class _BasicAuth:
    """Checks credentials on the event loop's side; bcrypt itself runs in the _CheckPool."""

    def __init__(self, users: Mapping[str, str]) -> None:
        for user, hashed in users.items():  # a WebConfig not made by load_web_config
            problem = bcrypt_problem(hashed)
            if problem is not None:
                raise WebConfigError(f"basic_auth_users.{user}: {problem}")
        self._users = {u: h.encode() for u, h in users.items()}
        self._slow = {u: int(h[4:6]) >= SLOW_BCRYPT_COST for u, h in users.items()}
        # An unknown user costs the cheapest real check, so timing does not tell who exists.
        cheapest = min(users, key=lambda u: int(users[u][4:6]))
        self._dummy = (self._users[cheapest], self._slow[cheapest])
        import hmac  # (only with basic auth users: it loads OpenSSL's libcrypto)

        self._digest = hmac.digest
        self._secret = os.urandom(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        self._pool = _CheckPool(min(8, os.cpu_count() or 2) + 1)
        for user, slow in self._slow.items():
            if slow:
                log.warning("basic auth user %r has a bcrypt cost of %s: each first login "
                            "takes seconds, and such checks run one at a time",
                            user, users[user][4:6])

    def close(self) -> None:
        self._pool.stop()

    async def check(self, header: bytes | None, client: str) -> str:
        """ "ok", "denied", "throttled" (this client has too many checks waiting) or "busy"."""
        creds = parse_basic(header)
        if creds is None:
            return "denied"
        hashed = self._users.get(creds.user)
        known = hashed is not None
        if hashed is not None:
            slow = self._slow[creds.user]
        else:
            hashed, slow = self._dummy
        key = self._digest(self._secret, struct.pack("!I", len(creds.user_bytes))
                          + creds.user_bytes + hashed + creds.password, "sha256")
        if known and key in self._cache:
            self._cache.move_to_end(key)
            return "ok"
        pending = self._pending.get(key)
        if pending is None:  # the same credentials already being checked share that check
            loop = asyncio.get_running_loop()
            future: asyncio.Future[bool] = loop.create_future()

            def done(ok: bool, key: bytes = key, future: asyncio.Future[bool] = future) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: shut down
                    loop.call_soon_threadsafe(self._finish, key, future, known and ok)

            job = _Job((client, creds.user if known else None), slow, creds.password, hashed,
                       done)
            refused = self._pool.submit(job)
            if refused is not None:
                return "throttled" if refused == "client" else "busy"
            pending = self._pending[key] = _Pending(future, job)
        pending.waiters += 1
        try:
            async with asyncio.timeout(AUTH_TIMEOUT):
                ok = await asyncio.shield(pending.future)
        except TimeoutError:
            return "busy"
        finally:
            pending.waiters -= 1
            if not pending.waiters and not pending.future.done():
                self._pool.cancel(pending.job)
                if self._pending.get(key) is pending:
                    del self._pending[key]
        return "ok" if ok else "denied"

    def _finish(self, key: bytes, future: asyncio.Future[bool], ok: bool) -> None:
        if self._pending.get(key) is not None and self._pending[key].future is future:
            del self._pending[key]
        if ok:
            self._cache[key] = None
            self._cache.move_to_end(key)
            while len(self._cache) > AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
        if not future.done():
            future.set_result(ok)


# ---------------------------------------------------------------- streams


class _Stream:
    """A connection's bytes: plain TCP."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(_READ_SIZE)

    def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> bool:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


class _TLSStream(_Stream):
    """TLS over the plain stream through memory BIOs: an idle or half-open connection holds
    no more than OpenSSL's state (asyncio's own TLS keeps a 256 KiB buffer per connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        super().__init__(reader, writer)
        self._tls, self._in, self._out = tls, incoming, outgoing

    @classmethod
    async def accept(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     context: ssl.SSLContext) -> _TLSStream:
        """Handshake. OpenSSL's state is made only once the client has sent a first byte: a
        connection that never sends a ClientHello costs no more than a plain one."""
        import ssl  # (loaded with the TLS config: no new import here)

        first = await reader.read(_READ_SIZE)
        if not first:
            raise ConnectionResetError("closed before the TLS handshake")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        incoming.write(first)
        stream = cls(reader, writer, context.wrap_bio(incoming, outgoing, server_side=True),
                     incoming, outgoing)
        await stream._handshake()
        return stream

    def _flush(self) -> None:
        if self._out.pending:
            self.writer.write(self._out.read())

    async def _fill(self) -> bool:
        data = await self.reader.read(_READ_SIZE)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def _handshake(self) -> None:
        import ssl

        while True:
            try:
                self._tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                pass
            finally:  # our flight, or the alert that tells the client why it failed
                self._flush()
            if not await self._fill():
                raise ConnectionResetError("closed during the TLS handshake")

    async def read(self) -> bytes:
        import ssl

        while True:
            try:
                data = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a plain TCP close
            self._flush()
            return data

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self._tls.write(view)
            view = view[n:]
            self._flush()

    def write_eof(self) -> bool:
        return False  # TLS cannot half-close; the linger waits for the client to close

    def close(self) -> None:
        import ssl

        with contextlib.suppress(ssl.SSLError, ValueError):
            self._tls.unwrap()  # close_notify; the client's own is not waited for
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._flush()
        self.writer.close()


# ---------------------------------------------------------------- HTTP


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def _client_network(peer: object) -> str:
    """The client for fairness: its IPv4 address, or its IPv6 /64."""
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        ip = ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Conn:
    __slots__ = ("client", "task", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.client = _client_network(writer.get_extra_info("peername"))
        self.task = asyncio.current_task()

    def kill(self) -> None:
        self.writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class _Reply(Exception):
    """Answer with this status and close the connection."""

    def __init__(self, status: int, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(status)
        self.status, self.headers = status, headers


def _connection_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return min(MAX_CONNECTIONS, max(16, soft - _FD_RESERVE))


@dataclass(eq=False)
class _App:
    handlers: Handlers
    telemetry_path: bytes
    ssl_context: ssl.SSLContext | None
    auth: _BasicAuth | None
    extra_headers: list[tuple[bytes, bytes]]
    limit: int = field(default_factory=_connection_limit)
    conns: dict[_Conn, None] = field(default_factory=dict)
    # Connections waiting for a request (handshake, head, keep-alive, linger), longest first.
    idle: collections.OrderedDict[_Conn, None] = field(
        default_factory=collections.OrderedDict)
    pages: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="wgnest-page"))
    # plain (not gzip) scrapes: the exposition inflated from its compressed form; threads
    # of their own, never behind a slow status page
    texts: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="wgnest-text"))
    text_job: asyncio.Future[bytes] | None = None  # the plain text being inflated
    last_full_log: float = float("-inf")
    pending_pages: int = 0

    # -- connection bookkeeping (event loop only)

    def admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= self.limit:
            if not self.idle:
                return False
            victim, _ = self.idle.popitem(last=False)
            self.conns.pop(victim, None)
            victim.kill()
            now = time.monotonic()
            noisy, self.last_full_log = now - self.last_full_log > 60, now
            (log.warning if noisy else log.debug)(
                "%d connections open: closed the one from %s that waited longest (for a "
                "request, or for its client to read)", len(self.conns) + 1, victim.client)
        self.conns[conn] = None
        self.idle[conn] = None
        return True

    def set_idle(self, conn: _Conn) -> None:
        if conn in self.conns:
            self.idle[conn] = None
            self.idle.move_to_end(conn)

    def set_busy(self, conn: _Conn) -> None:
        self.idle.pop(conn, None)

    def forget(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)
        self.idle.pop(conn, None)

    async def close(self) -> None:
        conns = list(self.conns)
        for conn in conns:
            conn.kill()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1)

    def release(self) -> None:
        self.pages.shutdown(wait=False, cancel_futures=True)
        self.texts.shutdown(wait=False, cancel_futures=True)
        if self.auth is not None:
            self.auth.close()

    # -- one connection

    async def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        started = time.monotonic()
        conn = _Conn(writer)
        if not self.admit(conn):  # every connection is busy answering: no room
            if self.ssl_context is None:
                writer.write(_error_bytes(503, (), self.extra_headers))
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):  # asyncio skips it for sockets accepted here
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream: _Stream = _Stream(reader, writer)
        try:
            if self.ssl_context is not None:
                async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT):
                    stream = await _TLSStream.accept(reader, writer, self.ssl_context)
            if await self._requests(conn, stream, started + HEADER_TIMEOUT):
                await self._linger(conn, stream)
        except (OSError, TimeoutError, EOFError) as e:  # gone, too slow, or a failed handshake
            log.debug("connection from %s: %s", conn.client, e)
        except Exception:
            log.debug("connection from %s failed", conn.client, exc_info=True)
        except asyncio.CancelledError:  # kill(): evicted, or shutting down. Ending the task
            pass  # cancelled would make asyncio (3.11) log an error for it
        finally:
            self.forget(conn)
            transport = writer.transport
            if not transport.is_closing():
                if transport.get_write_buffer_size():  # a client that does not read:
                    with contextlib.suppress(OSError):  # reset, rather than leave the kernel
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    transport.abort()  # trickling what it buffered to it after we close
                else:
                    stream.close()

    async def _requests(self, conn: _Conn, stream: _Stream, deadline: float) -> bool:
        """Serve requests until the connection is to close. True: close after a linger (an
        answer was the last word); False: close at once (EOF, or a deadline passed)."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES - _READ_SIZE)
        fresh = False  # True: on a kept-alive connection, no byte of the next request yet
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (414, 431) else 400
                log.debug("bad request from %s: %s", conn.client, e)
                await self._write(conn, stream, _error_bytes(status, (), self.extra_headers))
                return True
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        data = await stream.read()
                except TimeoutError:
                    log.debug("connection from %s: no request in time", conn.client)
                    return False  # no answer, as Go's server on a read deadline
                if data and fresh:
                    fresh, deadline = False, time.monotonic() + HEADER_TIMEOUT
                h.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return False  # the client closed (h11.ConnectionClosed)
            self.set_busy(conn)
            try:
                keep = await self._request(conn, stream, h, event)
            except _Reply as reply:
                await self._write(conn, stream, _error_bytes(reply.status, reply.headers,
                                                             self.extra_headers))
                return True
            if not keep:
                return True
            h.start_next_cycle()
            self.set_idle(conn)
            fresh, deadline = True, time.monotonic() + IDLE_TIMEOUT

    async def _request(self, conn: _Conn, stream: _Stream, h: h11.Connection,
                       req: h11.Request) -> bool:
        """Answer one request; True if the connection stays open for the next one."""
        names = [name for name, _ in req.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise _Reply(400)  # ambiguous framing: the classic smuggling shape
        if req.http_version not in (b"1.0", b"1.1"):
            raise _Reply(505)
        if len(req.target) > MAX_TARGET_BYTES:
            raise _Reply(414)
        has_body = b"transfer-encoding" in names or any(
            name == b"content-length" and value != b"0" for name, value in req.headers)
        if not has_body:
            end = h.next_event()  # a request without a body ends with its head
            if not isinstance(end, h11.EndOfMessage):
                raise _Reply(400)
        close = has_body  # a body is never read: the connection cannot be reused
        if self.auth is not None:
            values = [value for name, value in req.headers if name == b"authorization"]
            verdict = await self.auth.check(values[0] if len(values) == 1 else None,
                                            conn.client)
            if verdict == "throttled":
                raise _Reply(429, ((b"Retry-After", b"1"),))
            if verdict == "busy":
                raise _Reply(503, ((b"Retry-After", b"1"),))
            if verdict != "ok":
                return await self._respond(conn, stream, h, req, 401, b"Unauthorized\n",
                                           close,
                                           ((b"WWW-Authenticate", b'Basic realm="wgnest"'),))
        if req.method not in (b"GET", b"HEAD"):
            return await self._respond(conn, stream, h, req, 405, b"Method Not Allowed\n",
                                       True, ((b"Allow", b"GET, HEAD"),))
        path = req.target.partition(b"?")[0]
        ctype = b"text/plain; charset=utf-8"
        inflated = False  # a plain scrape's text
        try:
            if path == self.telemetry_path:
                gzipped = getattr(self.handlers, "metrics_gzip", None)
                if gzipped is not None and accepts_gzip(req.headers):
                    # compressed by the refresher, never per scrape
                    body = gzipped()
                    extra = ((b"Content-Encoding", b"gzip"), (b"Vary", b"Accept-Encoding"))
                    return await self._respond(conn, stream, h, req, 200, body, close,
                                               extra, CONTENT_TYPE)
                # inflated from the compressed form in a thread (the loop serves on), once
                # for all the plain scrapes that come while it runs: they share its bytes
                # (10,000 peers: 13 MB), however many they are
                job = self.text_job
                if job is None or job.done():
                    job = self.text_job = asyncio.get_running_loop().run_in_executor(
                        self.texts, self.handlers.metrics)
                    job.add_done_callback(self._text_done)  # (not kept once inflated)
                body = await asyncio.shield(job)
                del job  # (held by the scrapes still sending it, not by this one once sent)
                status, ctype, inflated = 200, CONTENT_TYPE, True
            elif path == b"/":
                if self.pending_pages >= MAX_PENDING_PAGES:
                    raise _Reply(503, ((b"Retry-After", b"1"),))
                self.pending_pages += 1
                try:  # rendered in a thread: the event loop goes on serving scrapes
                    page = await asyncio.get_running_loop().run_in_executor(
                        self.pages, self.handlers.status_page)
                finally:
                    self.pending_pages -= 1
                status, body, ctype = 200, page.encode("utf-8"), b"text/html; charset=utf-8"
            elif path == b"/-/healthy":
                status, body = 200, b"OK\n"
            else:
                status, body = 404, b"Not Found\n"
        except _Reply:
            raise
        except Exception:
            log.exception("handler for %s failed", path.decode("ascii", "backslashreplace"))
            status, body, ctype = 500, b"internal error\n", b"text/plain; charset=utf-8"
        if not inflated:
            return await self._respond(conn, stream, h, req, status, body, close, (), ctype)
        try:
            return await self._respond(conn, stream, h, req, status, body, close, (), ctype)
        finally:
            # the text and the writes' copies, freed, go back to the system: glibc keeps
            # them in its heap otherwise (+10 MiB at 10,000 peers until a refresh trims it)
            del body
            with contextlib.suppress(RuntimeError):  # (the pool shut down: serve is ending)
                asyncio.get_running_loop().run_in_executor(self.texts, return_free_memory)

    def _text_done(self, job: asyncio.Future[bytes]) -> None:
        """An inflated text is held by the scrapes that share it, not by the server: once
        they are sent, its 13 MB (10,000 peers) go."""
        if self.text_job is job:
            self.text_job = None

    async def _respond(self, conn: _Conn, stream: _Stream, h: h11.Connection,
                       req: h11.Request, status: int, body: bytes | Sequence[bytes],
                       close: bool, headers: tuple[tuple[bytes, bytes], ...] = (),
                       ctype: bytes = b"text/plain; charset=utf-8") -> bool:
        """`body`: bytes, or chunks sent one after the other (the gzip member as the
        refresher keeps it: never joined into one copy)."""
        chunks = (body,) if isinstance(body, bytes) else body
        length = sum(map(len, chunks))
        fields = [(b"Content-Type", ctype), (b"Content-Length", b"%d" % length),
                  (b"Server", b"wgnest"), *headers, *self.extra_headers]
        if close:
            fields.append((b"Connection", b"close"))
        head = h.send(h11.Response(status_code=status, headers=fields,
                                   reason=_REASONS.get(status, b"")))
        stream.write(head or b"")
        if req.method != b"HEAD" and length:
            for data in _writes(chunks, _WRITE_CHUNK):
                stream.write(h.send(h11.Data(data=data)) or b"")
                await self._drain(conn, stream)
        h.send(h11.EndOfMessage())
        await self._drain(conn, stream)
        return h.our_state is h11.DONE and h.their_state is h11.DONE

    async def _write(self, conn: _Conn, stream: _Stream, data: bytes) -> None:
        stream.write(data)
        await self._drain(conn, stream)

    async def _drain(self, conn: _Conn, stream: _Stream) -> None:
        """Wait (WRITE_TIMEOUT at most) for the client to take what we wrote; meanwhile the
        connection is idle, to be closed first if room is needed."""
        self.set_idle(conn)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await stream.drain()
        finally:
            self.set_busy(conn)

    async def _linger(self, conn: _Conn, stream: _Stream) -> None:
        """After the last answer: end our side, then discard what the client still sends
        until it closes (or LINGER_TIMEOUT), so closing never resets the answer away."""
        self.set_idle(conn)
        stream.write_eof()
        drained = 0
        with contextlib.suppress(OSError, TimeoutError, EOFError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while drained < _LINGER_BYTES and (data := await stream.read()):
                    drained += len(data)


def _error_bytes(status: int, headers: tuple[tuple[bytes, bytes], ...],
                 extra: list[tuple[bytes, bytes]]) -> bytes:
    """A complete closing answer, for requests h11 could not (or we will not) parse."""
    reason = _REASONS.get(status, b"Error")
    body = reason + b"\n"
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Content-Type: text/plain; charset=utf-8",
             b"Content-Length: %d" % len(body), b"Server: wgnest", b"Connection: close"]
    lines += [name + b": " + value for name, value in (*headers, *extra)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------- the server


AUTH_RETIRE_SECONDS = 60.0  # the old users' checks that were queued at a reload end by then


class Server:
    """A running server; `shutdown()` stops accepting, closes the socket and open connections."""

    def __init__(self, app: _App, sock: socket.socket) -> None:
        self._app = app
        self._port = int(sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                app.connected, sock=sock, backlog=BACKLOG, limit=4 * _READ_SIZE))
        except BaseException:
            self._loop.close()
            sock.close()
            raise
        self._stopped = False
        self._thread = threading.Thread(target=self._loop.run_forever, name="wgnest-http",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._port

    def reload(self, web_config: WebConfig | None) -> None:
        """Use a new web config (SIGHUP) for the connections that come from now on: TLS,
        users and headers are built here (a bad config raises before anything changes),
        then swapped on the event loop in one step."""
        tls, auth, headers = _settings(web_config)

        def swap() -> None:
            old = self._app.auth
            self._app.ssl_context, self._app.auth, self._app.extra_headers = tls, auth, headers
            if old is not None:  # checks already queued there finish first
                self._loop.call_later(AUTH_RETIRE_SECONDS, old.close)

        self._loop.call_soon_threadsafe(swap)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def stop() -> None:
            self._server.close()  # the listening socket, at once
            await self._app.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            self._loop.close()
        self._app.release()


def parse_listen(listen: str) -> tuple[str, int]:
    """":9586" -> ("", 9586); "[::1]:9586" -> ("::1", 9586). Raises ValueError."""
    m = re.fullmatch(r"(\[([^\]]*)\]|[^\[\]:]*):(\d{1,5})", listen.strip())
    if m is None or int(m[3]) > 65535:
        raise ValueError(f"bad listen address {listen!r} (want HOST:PORT, :PORT or [V6]:PORT)")
    return (m[2] if m[2] is not None else m[1]), int(m[3])


def _listen_socket(family: socket.AddressFamily, address: tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(host: str, port: int) -> socket.socket:
    if host in ("", "::"):
        try:  # all addresses, IPv4 included, when the machine has IPv6
            return _listen_socket(socket.AF_INET6, ("::", port))
        except OSError:
            if host == "::":
                raise
        return _listen_socket(socket.AF_INET, ("0.0.0.0", port))
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)[0]
    return _listen_socket(family, tuple(addr))


def _settings(web_config: WebConfig | None
              ) -> tuple[ssl.SSLContext | None, _BasicAuth | None, list[tuple[bytes, bytes]]]:
    """TLS context, basic auth and extra headers of a web config."""
    users = web_config.basic_auth_users if web_config else {}
    headers = web_config.headers if web_config else {}
    return (build_ssl_context(web_config) if web_config else None,
            _BasicAuth(users) if users else None,
            [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()])


def serve(listen: str, handlers: Handlers, telemetry_path: str = "/metrics",
          web_config: WebConfig | None = None) -> Server:
    """Bind `listen` and serve in a background thread. Raises ValueError, OSError,
    WebConfigError."""
    host, port = parse_listen(listen)
    return serve_socket(lambda: _bind(host, port), handlers, telemetry_path, web_config)


def serve_socket(make_socket: Callable[[], socket.socket], handlers: Handlers,
                 telemetry_path: str = "/metrics", web_config: WebConfig | None = None
                 ) -> Server:
    """Serve on the listening socket `make_socket()` gives (one we bind, or one systemd
    passed: --web.systemd-socket)."""
    if not telemetry_path.startswith("/") or telemetry_path in ("/", "/-/healthy"):
        raise ValueError(f"bad telemetry path {telemetry_path!r}")
    app = _App(handlers, telemetry_path.encode("utf-8"), *_settings(web_config))
    try:
        return Server(app, make_socket())
    except BaseException:
        app.release()
        raise


SD_LISTEN_FDS_START = 3


def systemd_sockets(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation: LISTEN_PID, LISTEN_FDS).
    Raises ValueError when there are none for this process."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        raise ValueError("--web.systemd-socket: no sockets passed by systemd to this process "
                         "(LISTEN_PID is not ours)")
    try:
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        raise ValueError("--web.systemd-socket: LISTEN_FDS is not a number") from None
    if count < 1:
        raise ValueError("--web.systemd-socket: systemd passed no socket")
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out.append(sock)
    return out
