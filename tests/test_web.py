"""The HTTP(S) surface and its web config file, over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST

from wgnest.runtime import web
from wgnest.runtime.web import Server, parse_listen, serve
from wgnest.runtime.webconfig import WebConfig, WebConfigError, build_ssl_context, load_web_config

BODY = b"# HELP wgnest_up up\n# TYPE wgnest_up gauge\nwgnest_up 1\n"
PASSWORD = "s3cret pässword"


class App:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def metrics(self) -> bytes:
        if self.fail:
            raise RuntimeError("boom: /secret/path in Traceback")
        return BODY

    def status_page(self) -> str:
        return "<html><body>wgnest ✓</body></html>"


@pytest.fixture
def start() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def _start(app: App | None = None, **kw: object) -> Server:
        srv = serve("127.0.0.1:0", app or App(), **kw)  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.shutdown()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", "k", "-out", "c"],
        cwd=d, check=True, capture_output=True)
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-aes256", "-pass", "pass:x", "-out", "enc.key"], cwd=d, check=True, capture_output=True)
    (d / "garbage.pem").write_text("not a certificate\n")
    return d


@pytest.fixture(scope="module")
def pw_hash() -> str:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def write_cfg(d: Path, text: str, name: str = "web.yml") -> Path:
    path = d / name
    path.write_text(text)
    return path


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None,
        ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=5, context=ctx)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send bytes and end our side, then read the answer until the server closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise
        except OSError:  # the server hung up first: what came before counts
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def basic(user: str | bytes, password: str | bytes) -> str:
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(u + b":" + p).decode()


def client_ctx(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "c"))


# ---------------------------------------------------------------- plain HTTP


def test_metrics_body_and_content_type(start: Callable[..., Server]) -> None:
    status, headers, body = get(start().port)
    assert (status, headers["Content-Type"], body) == (200, CONTENT_TYPE_LATEST, BODY)
    assert headers["Content-Length"] == str(len(BODY))


class _SlowText(App):
    """A plain text that takes a while to make (a gateway's inflate), counted."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def metrics(self) -> bytes:
        self.made += 1
        time.sleep(0.5)
        return BODY + str(self.made).encode() + b"\n"


def test_plain_scrapes_at_once_share_one_text(start: Callable[..., Server]) -> None:
    """Plain scrapes that come while the text is being made wait for that one and share
    its bytes (10,000 peers: 13 MB each otherwise); a later scrape makes a new one."""
    from concurrent.futures import ThreadPoolExecutor

    app = _SlowText()
    port = start(app).port
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _i: get(port), range(8)))
    assert {g[0] for g in got} == {200}
    assert {g[2] for g in got} == {BODY + b"1\n"}
    assert app.made == 1
    assert get(port)[2] == BODY + b"2\n"


def test_an_inflated_text_is_not_kept_once_sent(start: Callable[..., Server]) -> None:
    """The server holds a plain text only while scrapes share it: a gateway's 13 MB are
    not kept after one `curl` without gzip."""
    srv = start(_SlowText())
    assert get(srv.port)[0] == 200
    deadline = time.monotonic() + 5
    while srv._app.text_job is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv._app.text_job is None


def test_a_plain_scrape_hands_the_freed_text_back(start: Callable[..., Server],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a plain scrape is sent, glibc is asked to give freed memory back (its text's
    blocks), each time; a gzip scrape, which copies nothing, does not ask."""
    import gzip
    import threading

    from wgnest.runtime import web

    class Both(_SlowText):
        def metrics_gzip(self) -> tuple[bytes, ...]:
            return (gzip.compress(BODY),)

    asked = threading.Semaphore(0)
    monkeypatch.setattr(web, "return_free_memory", asked.release)
    port = start(Both()).port
    for _ in range(2):
        assert get(port)[0] == 200
        assert asked.acquire(timeout=5)
    assert get(port, headers={"Accept-Encoding": "gzip"})[0] == 200
    assert not asked.acquire(timeout=0.5)


def test_custom_telemetry_path(start: Callable[..., Server]) -> None:
    port = start(telemetry_path="/probe").port
    assert get(port, "/probe")[2] == BODY
    assert get(port, "/metrics")[0] == 404


def test_status_page_and_health(start: Callable[..., Server]) -> None:
    port = start().port
    status, headers, body = get(port, "/")
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert body.decode("utf-8") == App().status_page()
    assert get(port, "/-/healthy")[::2] == (200, b"OK\n")


def test_head_sends_headers_only(start: Callable[..., Server]) -> None:
    status, headers, body = get(start().port, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(BODY)), b"")


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/../metrics", "/%6detrics",
                                  "/-/healthy/..", "http://x/metrics", "*"])
def test_unknown_paths_404(start: Callable[..., Server], path: str) -> None:
    assert get(start().port, path)[0] == 404


def test_query_string_ignored(start: Callable[..., Server]) -> None:
    port = start().port
    for query in ["?", "?a=b", "?name[]=x&%ff%00=%", "?" + "x" * 4000]:
        assert get(port, "/metrics" + query)[::2] == (200, BODY)
    answer = raw(port, b"GET /metrics?a=%7f%ff%01;/../ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 200
    # Raw control bytes in the target, or HTTP/1.1 without Host, are not HTTP (RFC 9112
    # 3.2, 3.2): a 400 and a close, as from Go's net/http; never a 500, and the server lives on.
    for bad in (b"GET /metrics?\x7f\xff\x01;/../ HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\n\r\n"):
        answer = raw(port, bad)
        assert status_of(answer) == 400
        assert answer.count(b"HTTP/1.1 ") == 1
    assert get(port)[::2] == (200, BODY)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
def test_other_methods_405(start: Callable[..., Server], method: str) -> None:
    status, headers, _ = get(start().port, method=method)
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


def test_post_with_body_does_not_poison_keepalive(start: Callable[..., Server]) -> None:
    answer = raw(start().port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
                 b"GET /metrics HTTP/1.1\r\nX: y\r\n\r\n")
    assert status_of(answer) == 405
    assert answer.count(b"HTTP/1.1 ") == 1  # the body was not taken for a second request


def test_keepalive_serves_several_requests(start: Callable[..., Server]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", start().port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/metrics")
        assert conn.getresponse().read() == BODY
    conn.close()


def test_handler_exception_is_500_without_traceback(
        start: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="wgnest.runtime.web")
    port = start(App(fail=True)).port
    status, headers, body = get(port)
    assert (status, body) == (500, b"internal error\n")
    assert headers["Content-Type"].startswith("text/plain")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert get(port, "/-/healthy")[0] == 200  # the server lives on


@pytest.mark.parametrize("request_bytes", [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics HTTP/9.9\r\n\r\n",
    b"GET /metrics HTTP/1.1 extra\r\n\r\n",
    b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /m\xff\xfe HTTP/1.1\r\nHost: \xff\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",  # a TLS ClientHello on the plain port
])
def test_garbage_requests_never_500(start: Callable[..., Server], request_bytes: bytes) -> None:
    port = start().port
    answer = raw(port, request_bytes)
    if answer:  # closing without an answer is fine too
        assert status_of(answer) < 500 or status_of(answer) == 505, answer[:80]
        assert b"Traceback" not in answer
    assert get(port)[0] == 200


def test_shutdown_releases_port_promptly(start: Callable[..., Server]) -> None:
    srv = serve("127.0.0.1:0", App())
    port = srv.port
    idle = socket.create_connection(("127.0.0.1", port))  # keeps a handler thread busy
    keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    keepalive.request("GET", "/metrics")
    keepalive.getresponse().read()
    t0 = time.monotonic()
    srv.shutdown()
    assert time.monotonic() - t0 < 2
    with pytest.raises(ConnectionRefusedError):
        get(port)
    again = serve(f"127.0.0.1:{port}", App())
    try:
        assert again.port == port
        assert get(port)[0] == 200
    finally:
        again.shutdown()
        idle.close()
        keepalive.close()


def test_connection_cap(start: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """At the cap a new connection closes the one that has waited longest for a request, so
    idle clients can never lock a scrape out (the old server answered 503 instead)."""
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 8)
    port = start().port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    try:
        time.sleep(0.3)  # let the accept loop take them all
        answer = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 200
        assert answer.endswith(BODY)
        with contextlib.suppress(ConnectionResetError):  # the oldest was closed for it
            assert idle[0].recv(100) == b""
        for s in idle[1:]:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):  # the others are still open
                s.recv(100)
    finally:
        for s in idle:
            s.close()
    assert get(port)[0] == 200


def test_slow_client_is_cut_off_at_the_deadline(
        start: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "HEADER_TIMEOUT", 1.0)
    port = start().port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        with contextlib.suppress(OSError):  # trickle one header byte every 0.2 s
            for _ in range(25):
                s.sendall(b"X")
                time.sleep(0.2)
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 3


@pytest.mark.parametrize(("listen", "expected"), [
    (":9586", ("", 9586)), ("0.0.0.0:9586", ("0.0.0.0", 9586)), ("[::]:9586", ("::", 9586)),
    ("127.0.0.1:0", ("127.0.0.1", 0)), ("localhost:80", ("localhost", 80)),
    ("[::1]:1", ("::1", 1)),
])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9586", "::1:80", "host:", ":65536", "[::1]", "a:b", ""])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError, match="listen"):
        parse_listen(listen)


def test_ipv6_loopback() -> None:
    try:
        srv = serve("[::1]:0", App())
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        conn = http.client.HTTPConnection("::1", srv.port, timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().read() == BODY
        conn.close()
    finally:
        srv.shutdown()


# ---------------------------------------------------------------- TLS


def tls_config(certs: Path, extra: str = "") -> WebConfig:
    return load_web_config(write_cfg(certs, f"tls_server_config:\n  cert_file: c\n"
                                            f"  key_file: k\n{extra}", "tls.yml"))


def test_https_scrape(start: Callable[..., Server], certs: Path) -> None:
    port = start(web_config=tls_config(certs)).port
    status, headers, body = get(port, ctx=client_ctx(certs))
    assert (status, headers["Content-Type"], body) == (200, CONTENT_TYPE_LATEST, BODY)
    with pytest.raises(ssl.SSLCertVerificationError):  # and it really is the server's cert
        get(port, ctx=ssl.create_default_context())


def test_plain_http_to_tls_port_is_dropped(start: Callable[..., Server], certs: Path) -> None:
    port = start(web_config=tls_config(certs)).port
    answer = raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert b"wgnest_up" not in answer
    assert get(port, ctx=client_ctx(certs))[0] == 200


def old_client(certs: Path) -> ssl.SSLContext:
    ctx = client_ctx(certs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1 otherwise
    return ctx


def test_tls11_client_rejected(start: Callable[..., Server], certs: Path) -> None:
    port = start(web_config=tls_config(certs)).port
    with pytest.raises(ssl.SSLError) as exc:
        get(port, ctx=old_client(certs))
    assert "PROTOCOL_VERSION" in str(exc.value).upper()  # the server's alert, not a local refusal
    assert get(port, ctx=client_ctx(certs))[0] == 200


def test_tls13_only(start: Callable[..., Server], certs: Path) -> None:
    port = start(web_config=tls_config(certs, "  min_version: TLS13\n")).port
    tls12 = client_ctx(certs)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        get(port, ctx=tls12)
    assert get(port, ctx=client_ctx(certs))[0] == 200


def test_idle_clients_do_not_block_tls_scrape(start: Callable[..., Server], certs: Path) -> None:
    port = start(web_config=tls_config(certs)).port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    no_hello = socket.create_connection(("127.0.0.1", port))
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        status, _, body = get(port, ctx=client_ctx(certs))
        assert (status, body) == (200, BODY)
        assert time.monotonic() - t0 < 2
    finally:
        for s in [*idle, no_hello]:
            s.close()


def test_client_certificate_required(start: Callable[..., Server], certs: Path) -> None:
    cfg = tls_config(certs, "  client_ca_file: c\n  client_auth_type: RequireAndVerifyClientCert\n")
    port = start(web_config=cfg).port
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, ctx=client_ctx(certs))  # no client certificate
    with_cert = client_ctx(certs)
    with_cert.load_cert_chain(certs / "c", certs / "k")
    assert get(port, ctx=with_cert)[0] == 200


def test_ssl_context_defaults(certs: Path) -> None:
    ctx = build_ssl_context(tls_config(certs))
    assert ctx is not None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert build_ssl_context(WebConfig()) is None


# ---------------------------------------------------------------- basic auth


@pytest.fixture
def auth_port(start: Callable[..., Server], tmp_path: Path, pw_hash: str) -> int:
    cfg = load_web_config(write_cfg(tmp_path, f"basic_auth_users:\n  alice: '{pw_hash}'\n"))
    return start(web_config=cfg).port


@pytest.fixture
def checkpw_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_right_password_then_cached(auth_port: int, checkpw_calls: list[bytes]) -> None:
    for _ in range(3):
        assert get(auth_port, headers={"Authorization": basic("alice", PASSWORD)})[::2] == (
            200, BODY)
    assert len(checkpw_calls) == 1


@pytest.mark.parametrize(("user", "password"), [
    ("alice", "wrong"), ("alice", ""), ("bob", PASSWORD), ("", PASSWORD), ("alice", PASSWORD[:-1]),
])
def test_wrong_credentials_401(auth_port: int, checkpw_calls: list[bytes], user: str,
                               password: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, _ = get(auth_port, headers={"Authorization": basic(user, password)})
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="wgnest"')
    assert len(checkpw_calls) == 1  # unknown users cost a bcrypt too
    assert PASSWORD not in caplog.text


def test_auth_covers_every_route(auth_port: int) -> None:
    for path, method in [("/", "GET"), ("/-/healthy", "GET"), ("/nope", "GET"),
                         ("/metrics", "POST"), ("/metrics", "HEAD")]:
        assert get(auth_port, path, method)[0] == 401


@pytest.mark.parametrize("password", [b"a" * 73, b"a" * 1000, PASSWORD.encode() + b"x" * 80])
def test_long_passwords_401_without_bcrypt(auth_port: int, checkpw_calls: list[bytes],
                                           password: bytes) -> None:
    assert get(auth_port, headers={"Authorization": basic("alice", password)})[0] == 401
    assert checkpw_calls == []


@pytest.mark.parametrize("header", [
    "Basic", "Basic ", "Basic !!!!", "Basic ====", "Basic YWxpY2U=",  # "alice", no colon
    "Bearer abc", "Digest x", "basic" + "A" * 5000, "Basic " + "QUFB" * 3000,
    basic("alice", b"a\x00b"), basic(b"\xff\xfe", PASSWORD), basic(b"al\x00ice", PASSWORD),
    "Basic YWxpY2U6\u00e9",
])
def test_garbage_auth_headers(auth_port: int, header: str) -> None:
    data = (b"GET /metrics HTTP/1.1\r\nConnection: close\r\nAuthorization: "
            + header.encode("latin-1") + b"\r\n\r\n")
    answer = raw(auth_port, data)
    assert status_of(answer) in (400, 401, 431), answer[:80]


def test_raw_non_utf8_auth_bytes(auth_port: int) -> None:
    data = b"GET /metrics HTTP/1.1\r\nAuthorization: Basic \xff\xfe\x00\x80\r\n\r\n"
    assert status_of(raw(auth_port, data)) in (400, 401)


def test_huge_auth_header_431(auth_port: int) -> None:
    data = b"GET /metrics HTTP/1.1\r\nAuthorization: Basic " + b"A" * 100000 + b"\r\n\r\n"
    assert status_of(raw(auth_port, data)) in (400, 431)


def test_auth_over_tls(start: Callable[..., Server], certs: Path, pw_hash: str) -> None:
    cfg = tls_config(certs, f"basic_auth_users:\n  alice: '{pw_hash}'\n")
    port = start(web_config=cfg).port
    ctx = client_ctx(certs)
    assert get(port, headers={"Authorization": basic("alice", PASSWORD)}, ctx=ctx)[0] == 200
    assert get(port, ctx=ctx)[0] == 401


def test_request_head_capped(start: Callable[..., Server]) -> None:
    headers = b"".join(b"X%d: %s\r\n" % (i, b"v" * 1000) for i in range(90))  # 90 KB in all
    answer = raw(start().port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
    assert status_of(answer) == 431


# ---------------------------------------------------------------- web config file


@pytest.fixture
def cfg_dir(tmp_path: Path, certs: Path) -> Path:
    for name in ("c", "k", "enc.key", "garbage.pem"):
        shutil.copy(certs / name, tmp_path / name)
    return tmp_path


TLS = "tls_server_config:\n  cert_file: c\n  key_file: k\n"
BAD_CONFIGS = {
    # name: (file text, key the message must name)
    "bad_yaml": ("tls_server_config: [: :\n", "yaml"),
    "top_list": ("- a\n", "yaml"),
    "duplicate": ("basic_auth_users:\n  a: x\n  a: y\n", "given twice"),
    "unknown_top": ("tls_config: {}\n", "tls_config"),
    "unknown_tls": (TLS + "  cert: c\n", "tls_server_config.cert"),
    "unknown_http": ("http_server_config: {http3: true}\n", "http_server_config.http3"),
    "plaintext": ("basic_auth_users:\n  alice: hunter2hunter2\n", "basic_auth_users.alice"),
    "short_hash": ("basic_auth_users:\n  alice: '$2b$10$abc'\n", "basic_auth_users.alice"),
    "users_list": ("basic_auth_users: [alice]\n", "basic_auth_users"),
    "no_cert": ("tls_server_config:\n  key_file: k\n", "tls_server_config.cert_file"),
    "no_key": ("tls_server_config:\n  cert_file: c\n", "tls_server_config.key_file"),
    "cert_absent": ("tls_server_config:\n  cert_file: nope\n  key_file: k\n", "cert_file"),
    "key_absent": ("tls_server_config:\n  cert_file: c\n  key_file: nope\n", "key_file"),
    "cert_garbage": ("tls_server_config:\n  cert_file: garbage.pem\n  key_file: k\n", "cert_file"),
    "key_garbage": ("tls_server_config:\n  cert_file: c\n  key_file: garbage.pem\n", "key_file"),
    "swapped": ("tls_server_config:\n  cert_file: k\n  key_file: c\n", "cert_file"),
    "encrypted_key": ("tls_server_config:\n  cert_file: c\n  key_file: enc.key\n", "key_file"),
    "auth_no_ca": (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file"),
    "ca_no_auth": (TLS + "  client_ca_file: c\n", "client_ca_file"),
    "ca_absent": (TLS + "  client_ca_file: nope\n  client_auth_type: VerifyClientCertIfGiven\n",
                  "client_ca_file"),
    "bad_auth_type": (TLS + "  client_auth_type: Sometimes\n", "client_auth_type"),
    "tls10": (TLS + "  min_version: TLS10\n", "min_version"),
    "tls_bogus": (TLS + "  min_version: SSL3\n", "min_version"),
    "min_above_max": (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "min_version"),
    "ciphers": (TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "cipher_suites"),
    "header": ("http_server_config:\n  headers: {Set-Cookie: a}\n", "headers.Set-Cookie"),
    "header_value": ("http_server_config:\n  headers: {X-Frame-Options: allow}\n",
                     "X-Frame-Options"),
    "http2": ("http_server_config: {http2: 3}\n", "http2"),
    "require_any": (TLS + "  client_ca_file: c\n  client_auth_type: RequireAnyClientCert\n",
                    "client_auth_type"),
    "ca_garbage": (TLS + "  client_ca_file: garbage.pem\n  client_auth_type: "
                   "RequireAndVerifyClientCert\n", "client_ca_file"),
    "hash_bad_char": ("basic_auth_users:\n  alice: '$2b$04$" + "a" * 52 + "!'\n",
                      "basic_auth_users.alice"),
    "header_crlf": ('http_server_config:\n  headers: {X-XSS-Protection: "0\\r\\nSet-Cookie: a"}\n',
                    "X-XSS-Protection"),
    "hash_2": ("basic_auth_users:\n  alice: '$2$04$" + "a" * 21 + "." + "a" * 30 + "e'\n",
               "basic_auth_users.alice"),
    "hash_2x": ("basic_auth_users:\n  alice: '$2x$04$" + "a" * 21 + "." + "a" * 30 + "e'\n",
                "basic_auth_users.alice"),
    "hash_spare_bits": ("basic_auth_users:\n  alice: '$2b$04$" + "a" * 53 + "'\n",
                        "basic_auth_users.alice"),
    "empty_user": ("basic_auth_users:\n  ~: '$2b$04$" + "a" * 21 + "." + "a" * 30 + "e'\n",
                   "basic_auth_users"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_names_file_and_key(cfg_dir: Path, name: str) -> None:
    text, key = BAD_CONFIGS[name]
    path = write_cfg(cfg_dir, text)
    with pytest.raises(WebConfigError) as exc:
        load_web_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert "\n" not in message
    assert "hunter2" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=r"nope\.yml: file: cannot read"):
        load_web_config(tmp_path / "nope.yml")


def test_non_utf8_config_file(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_bytes(b"basic_auth_users: {\xff\xfe: x}\n")
    with pytest.raises(WebConfigError, match=r"web\.yml: yaml"):
        load_web_config(path)


def test_good_config(cfg_dir: Path, pw_hash: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # relative paths follow the config file, not the working directory
    path = write_cfg(cfg_dir, TLS + "  client_ca_file: c\n  client_auth_type: "
                     "VerifyClientCertIfGiven\n  min_version: TLS13\n"
                     f"basic_auth_users:\n  alice: '{pw_hash}'\n  42: '{pw_hash}'\n"
                     "http_server_config:\n  http2: false\n  headers:\n"
                     "    X-Frame-Options: deny\n")
    cfg = load_web_config(path)
    assert cfg.tls is not None
    assert (cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file) == (
        cfg_dir / "c", cfg_dir / "k", cfg_dir / "c")
    assert (cfg.tls.client_auth_type, cfg.tls.min_version) == ("VerifyClientCertIfGiven", "TLS13")
    assert dict(cfg.basic_auth_users) == {"alice": pw_hash, "42": pw_hash}
    assert dict(cfg.headers) == {"X-Frame-Options": "deny"}
    ctx = build_ssl_context(cfg)
    assert ctx is not None
    assert (ctx.minimum_version, ctx.verify_mode) == (ssl.TLSVersion.TLSv1_3, ssl.CERT_OPTIONAL)


@pytest.mark.parametrize("text", ["", "---\n", "tls_server_config:\n", "tls_server_config: {}\n",
                                  "basic_auth_users: {}\n", "http_server_config: {http2: true}\n"])
def test_configs_without_tls_or_auth(tmp_path: Path, text: str) -> None:
    cfg = load_web_config(write_cfg(tmp_path, text))
    assert (cfg.tls, dict(cfg.basic_auth_users)) == (None, {})


def test_config_headers_are_sent(start: Callable[..., Server], tmp_path: Path) -> None:
    text = "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    port = start(web_config=load_web_config(write_cfg(tmp_path, text))).port
    assert get(port)[1]["X-Content-Type-Options"] == "nosniff"
    assert get(port, "/nope")[1]["X-Content-Type-Options"] == "nosniff"


GOOD_CONFIGS = {
    "empty": "",
    "tls": TLS,
    "tls13": TLS + "  min_version: TLS13\n  max_version: TLS13\n",
    "client_ca": TLS + "  client_ca_file: c\n  client_auth_type: RequireAndVerifyClientCert\n",
    "prefer": TLS + "  prefer_server_cipher_suites: true\n",
    "users": "basic_auth_users:\n  alice: HASH\n  bob: HASH\n",
    "headers": "http_server_config:\n  http2: false\n  headers:\n"
               "    Strict-Transport-Security: max-age=31536000\n",
    "everything": TLS + "basic_auth_users:\n  alice: HASH\n",
}
# wgnest refuses these although promtool (exporter-toolkit) takes them: see webconfig.py.
STRICTER = {"auth_no_ca", "tls10", "min_above_max", "ciphers", "header_crlf", "require_any",
            "ca_garbage", "hash_bad_char", "hash_2", "hash_2x", "hash_spare_bits", "empty_user"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_agrees(cfg_dir: Path, pw_hash: str) -> None:
    cases = {name: (text, True) for name, text in GOOD_CONFIGS.items()}
    cases |= {name: (text, False) for name, (text, _) in BAD_CONFIGS.items()}
    disagreements = {}
    for name, (text, ours) in cases.items():
        path = write_cfg(cfg_dir, text.replace("HASH", pw_hash), f"{name}.yml")
        error = None
        try:
            load_web_config(path)
        except WebConfigError as e:
            error = str(e)
        assert (error is None) == ours, f"{name}: wgnest says {error}"
        result = subprocess.run(["promtool", "check", "web-config", str(path)],
                                capture_output=True, text=True, timeout=30, check=False)
        if (result.returncode == 0) != ours:
            disagreements[name] = result.stdout + result.stderr
    assert set(disagreements) == STRICTER, disagreements


# ---------------------------------------------------------------- fuzzing

_VOCAB = ["tls_server_config", "basic_auth_users", "http_server_config", "cert_file", "key_file",
          "client_ca_file", "client_auth_type", "min_version", "max_version", "headers", "http2",
          "cipher_suites", "prefer_server_cipher_suites", "X-Frame-Options", "alice", "c", "k",
          "TLS12", "TLS13", "RequireAndVerifyClientCert", "deny", "$2b$04$" + "a" * 53]
_scalars = st.one_of(st.sampled_from(_VOCAB), st.none(), st.booleans(), st.integers(),
                     st.floats(allow_nan=False), st.text(max_size=8))
_yaml_docs = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_VOCAB), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_yaml_docs)
def test_fuzz_config_only_raises_web_config_error(cfg_dir: Path, doc: object) -> None:
    path = write_cfg(cfg_dir, yaml.safe_dump(doc))
    with contextlib.suppress(WebConfigError):
        load_web_config(path)


@pytest.fixture(scope="module")
def fuzz_port(pw_hash: str) -> Iterator[int]:
    users = MappingProxyType({"alice": pw_hash})
    srv = serve("127.0.0.1:0", App(), web_config=WebConfig(basic_auth_users=users))
    yield srv.port
    srv.shutdown()


@settings(max_examples=150, deadline=None)
@given(head=st.binary(max_size=300), auth=st.text(st.characters(max_codepoint=255), max_size=200))
def test_fuzz_requests_never_500(fuzz_port: int, head: bytes, auth: str) -> None:
    for data in (head, b"GET /metrics HTTP/1.1\r\nAuthorization: " + auth.encode("latin-1")
                 + b"\r\n\r\n"):
        answer = raw(fuzz_port, data)
        if answer.startswith(b"HTTP/"):
            assert status_of(answer) < 500 or status_of(answer) == 505, answer[:80]
        assert b"Traceback" not in answer


def test_tls_and_basic_auth_load_openssl_only_when_configured(certs: Path, pw_hash: str
                                                              ) -> None:
    """Serving without a web config loads neither ssl, OpenSSL's hashes nor bcrypt (asyncio,
    which icmplib and the server import, is imported with ssl hidden: 5 MiB resident); a
    config with TLS and basic auth then loads them, and an HTTPS scrape with a password
    works in that same process."""
    from tests.fresh_python import run_fresh

    cfg = write_cfg(certs, f"tls_server_config:\n  cert_file: {certs / 'c'}\n  key_file: "
                           f"{certs / 'k'}\nbasic_auth_users:\n  alice: {pw_hash}\n",
                    "fresh.yml")
    code = f"""
import base64, sys
from pathlib import Path
import wgnest.runtime.serve, wgnest.probe.icmp, asyncio
from wgnest.runtime.web import serve
from wgnest.runtime.webconfig import load_web_config
loaded = lambda: [m for m in ("ssl", "_ssl", "_hashlib", "bcrypt") if m in sys.modules]
print("before", *loaded())
class App:
    def metrics(self): return {BODY!r}
    def status_page(self): return ""
srv = serve("127.0.0.1:0", App(), web_config=load_web_config(Path({str(cfg)!r})))
print("after", *loaded())
import http.client, ssl
ctx = ssl.create_default_context(cafile={str(certs / 'c')!r})
conn = http.client.HTTPSConnection("localhost", srv.port, timeout=10, context=ctx)
auth = "Basic " + base64.b64encode("alice:{PASSWORD}".encode()).decode()
conn.request("GET", "/metrics", headers={{"Authorization": auth}})
resp = conn.getresponse()
print("status", resp.status, resp.read() == {BODY!r})
conn.request("GET", "/metrics")
print("status", conn.getresponse().status)
srv.shutdown()
"""
    out = run_fresh(code).stdout.splitlines()
    assert out == ["before", "after ssl _ssl _hashlib bcrypt", "status 200 True",
                   "status 401"]


class ChunkedApp(App):
    """A gzip body in chunks, as the refresher keeps it: small ones and one above a write."""

    def __init__(self) -> None:
        super().__init__()
        import gzip
        import random

        rng = random.Random(7)
        text = b"".join(b"x%d %d\n" % (i, rng.getrandbits(64)) for i in range(60000))
        member = gzip.compress(text, mtime=0)
        assert len(member) > 50_000 + 2 * web._WRITE_CHUNK
        # 500 small chunks, then one that takes more than two writes
        self.chunks = (*(member[i:i + 100] for i in range(0, 50_000, 100)), member[50_000:])
        self.member = member

    def metrics_gzip(self) -> tuple[bytes, ...]:
        return self.chunks


def test_a_gzip_body_in_chunks_is_sent_whole(start: Callable[..., Server]) -> None:
    app = ChunkedApp()
    port = start(app).port
    status, headers, body = get(port, headers={"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert int(headers["Content-Length"]) == len(app.member)
    assert body == app.member
    status, headers, body = get(port, method="HEAD", headers={"Accept-Encoding": "gzip"})
    assert (status, int(headers["Content-Length"]), body) == (200, len(app.member), b"")


def test_writes_join_small_chunks_and_cut_large_ones() -> None:
    chunks = (b"a" * 3, b"b" * 10, b"c" * 25, b"d", b"e" * 4)
    writes = list(web._writes(chunks, 8))
    assert b"".join(writes) == b"".join(chunks)
    assert writes == [b"aaa", b"b" * 8, b"bb", b"c" * 8, b"c" * 8, b"c" * 8, b"c", b"deeee"]
    assert list(web._writes((), 8)) == []
