"""Shared pieces of the hardening suite (issue 12): real servers on 127.0.0.1 in processes of
their own, clients that always close, and the figures each test measures.

Every loop is bounded in count and time; every socket and process is closed in teardown,
failure or not. Figures are printed at the end of the run (and appended to the file named by
$WGNEST_HARDENING_FIGURES, if set).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import math
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

import wgnest
from tests.lab.lab import stop_process  # noqa: F401  (the hardening tests import it here)

HERE = Path(__file__).resolve().parent
EXPORTER = Path(wgnest.__file__).resolve().parent.parent  # the tree under test
PASSWORD = "hardening pässword"
Figures = Callable[[str], None]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(EXPORTER)}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) by the nearest-rank method."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.99 * len(ordered)))
    return ordered[len(ordered) // 2], ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    lines: list[str] = []
    yield lines.append
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if lines and reporter is not None:
        reporter.write_sep("-", "hardening figures")
        for line in lines:
            reporter.write_line(line)
    target = os.environ.get("WGNEST_HARDENING_FIGURES")
    if lines and target:
        with open(target, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost: files c (cert), k (key)."""
    d = tmp_path_factory.mktemp("hardening-certs")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", "k", "-out", "c"],
        cwd=d, check=True, capture_output=True, timeout=30)
    return d


def client_ctx(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "c"))


@pytest.fixture(scope="session")
def hash4() -> str:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def with_cost(hashed: str, cost: int) -> str:
    """A well-formed hash of another cost (what promtool checks); it verifies nothing, and at
    cost 31 checking it takes days."""
    return f"{hashed[:4]}{cost:02d}{hashed[6:]}"


def config_text(users: dict[str, str] | None = None, tls: Path | None = None) -> str:
    text = ""
    if tls is not None:
        text += f"tls_server_config:\n  cert_file: {tls / 'c'}\n  key_file: {tls / 'k'}\n"
    if users:
        text += "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items())
    return text


@dataclass
class AppServer:
    proc: subprocess.Popen[str]
    port: int

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def _stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[Callable[..., AppServer]]:
    """Start tests/hardening/app_server.py (`serve()` of the tree under test) on 127.0.0.1."""
    procs: list[subprocess.Popen[str]] = []

    def start(config: str | None = None, body_bytes: int = 20_000,
              **settings: float) -> AppServer:
        cmd = [sys.executable, str(HERE / "app_server.py"), "--body-bytes", str(body_bytes)]
        if config is not None:
            path = tmp_path / f"web{len(procs)}.yml"
            path.write_text(config)
            cmd += ["--web-config", str(path)]
        for name, value in settings.items():
            cmd += ["--set", f"{name}={value}"]
        err_path = tmp_path / f"server{len(procs)}.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=child_env())
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            _stop(proc)
            raise AssertionError(f"server did not start: {err_path.read_text()[-2000:]}")
        return AppServer(proc, int(line))

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; all closed afterwards, whatever happened."""
    held: list[socket.socket] = []
    yield held
    for s in held:
        with contextlib.suppress(OSError):
            s.close()


def scrape(port: int, *, auth: tuple[str, str] | None = None, ctx: ssl.SSLContext | None = None,
           source: str | None = None, timeout: float = 5.0, path: str = "/metrics"
           ) -> tuple[int, float, bytes]:
    """One GET on a new connection: (status, seconds from connect to the last body byte, body)."""
    headers = {"Authorization": basic(*auth)} if auth else {}
    src = (source, 0) if source else None
    conn: http.client.HTTPConnection
    t0 = time.perf_counter()
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=src)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx,
                                           source_address=src)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, time.perf_counter() - t0, body
    finally:
        conn.close()


def scrape_series(port: int, n: int, **kw: object) -> tuple[list[int], list[float]]:
    statuses, seconds = [], []
    for _ in range(n):
        try:
            status, took, _ = scrape(port, **kw)  # type: ignore[arg-type]
        except (OSError, http.client.HTTPException):
            status, took = 0, float("inf")  # refused, reset or timed out
        statuses.append(status)
        seconds.append(took)
    return statuses, seconds


def wait_closed(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed `s` (EOF or reset), reading and discarding; None if it
    was still open after `timeout`."""
    t0 = time.monotonic()
    s.setblocking(False)
    while (left := timeout - (time.monotonic() - t0)) > 0:
        ready, _, _ = select.select([s], [], [], min(left, 0.05))
        if not ready:
            continue
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        except BlockingIOError:
            continue
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own, with its loopback up; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs wgnest serve in a network namespace of its own")
    import secrets

    ns = "wnh" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
