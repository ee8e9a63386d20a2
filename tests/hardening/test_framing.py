"""Issue 12: request framing. Duplicate Content-Length headers (0 and 40) made the old server
run the body as a second request (request smuggling). Conflicting or invalid framing is now a
400 and the connection closes; a body is never parsed as a request."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from wgnest.runtime.web import serve

SMUGGLED = b"GET /-/healthy HTTP/1.1\r\nHost: smugg\r\n\r\n"  # answered "OK\n" if it ran
assert len(SMUGGLED) == 40


class _App:
    def metrics(self) -> bytes:
        return b"wgnest_up 1\n"

    def status_page(self) -> str:
        return "status"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    srv = serve("127.0.0.1:0", _App())
    try:
        yield srv.port
    finally:
        srv.shutdown()


def exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send `data` without ending our side; read until the server closes or `timeout` passes:
    (all that came, whether the server closed the connection)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    return b"".join(chunks), False


def head(*lines: bytes) -> bytes:
    return b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in lines) \
        + b"\r\n"


BAD_FRAMING = {
    "content-length 0 then 40": head(b"Content-Length: 0", b"Content-Length: 40") + SMUGGLED,
    "content-length 40 then 0": head(b"Content-Length: 40", b"Content-Length: 0") + SMUGGLED,
    "content-length list 0, 40": head(b"Content-Length: 0, 40") + SMUGGLED,
    "content-length and chunked": head(b"Content-Length: 40", b"Transfer-Encoding: chunked")
    + SMUGGLED,
    "chunked and content-length": head(b"Transfer-Encoding: chunked", b"Content-Length: 0")
    + SMUGGLED,
    "chunked twice": head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
    + b"0\r\n\r\n" + SMUGGLED,
    "gzip, chunked": head(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n" + SMUGGLED,
    "identity": head(b"Transfer-Encoding: identity") + SMUGGLED,
    "content-length +40": head(b"Content-Length: +40") + SMUGGLED,
    "content-length -1": head(b"Content-Length: -1") + SMUGGLED,
    "content-length 0x28": head(b"Content-Length: 0x28") + SMUGGLED,
    "content-length 40.0": head(b"Content-Length: 40.0") + SMUGGLED,
    "space before colon": head(b"Content-Length : 40") + SMUGGLED,
    "transfer-encoding space before colon": head(b"Transfer-Encoding : chunked") + SMUGGLED,
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMING))
def test_conflicting_or_invalid_framing_is_400_and_closes(port: int, name: str) -> None:
    answer, closed = exchange(port, BAD_FRAMING[name])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled request never ran
    assert b"OK\n" not in answer
    assert closed


@pytest.mark.parametrize(("name", "data"), [
    ("one content-length", head(b"Content-Length: 40") + SMUGGLED),
    ("the same content-length twice", head(b"Content-Length: 40", b"Content-Length: 40")
     + SMUGGLED),
    ("chunked", head(b"Transfer-Encoding: chunked") + b"28\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"
     + SMUGGLED),
])
def test_a_valid_body_is_answered_once_then_closed(port: int, name: str, data: bytes) -> None:
    """A body is never read, so it can never run as a request: one answer, then a close."""
    answer, closed = exchange(port, data)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in answer.lower()
    assert closed


def test_pipelined_requests_without_bodies_still_work(port: int) -> None:
    answer, _ = exchange(port, head() + head(b"Connection: close"))
    assert answer.count(b"HTTP/1.1 200 ") == 2
