"""exporter-toolkit's listen flags on a real `wgnest serve` (issue 14): several
--web.listen-address values, and --web.systemd-socket with a socket passed the way systemd
passes it (fd 3, LISTEN_PID, LISTEN_FDS). In a network namespace of the test's own."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.hardening.conftest import child_env, stop_process
from tests.lab.lab import in_netns

pytestmark = pytest.mark.lab

ACTIVATE = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 9593))
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "wgnest", "serve", "--web.systemd-socket",
                          "--no-probe.enabled"])
"""


def status(ns: str, url: str) -> int:
    with in_netns(ns):
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return int(resp.status)
        except urllib.error.URLError:
            return 0


def run_until_serving(ns: str, argv: list[str], urls: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        if all(status(ns, u) == 200 for u in urls):
            return proc
        time.sleep(0.1)
    proc.kill()
    _, err = proc.communicate(timeout=5)
    raise AssertionError(f"not serving on {urls}: {err.decode()[-1500:]}")


stop = stop_process


def test_several_listen_addresses(netns: str) -> None:
    urls = ["http://127.0.0.1:9591/metrics", "http://127.0.0.1:9592/-/healthy"]
    proc = run_until_serving(netns, [sys.executable, "-m", "wgnest", "serve",
                                     "--web.listen-address", "127.0.0.1:9591",
                                     "--web.listen-address", "127.0.0.1:9592",
                                     "--no-probe.enabled"], urls)
    stop(proc)
    assert status(netns, urls[0]) == 0  # both closed on exit


def test_one_bad_address_starts_none(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "wgnest", "serve",
                          "--web.listen-address", "127.0.0.1:9594",
                          "--web.listen-address", "192.0.2.1:9595", "--no-probe.enabled"],
                         capture_output=True, text=True, timeout=30, env=child_env(),
                         check=False)
    assert res.returncode == 2
    assert "cannot listen on 192.0.2.1:9595" in res.stderr


def test_systemd_socket_activation(netns: str) -> None:
    proc = run_until_serving(netns, [sys.executable, "-c", ACTIVATE],
                             ["http://127.0.0.1:9593/metrics"])
    stop(proc)
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "wgnest", "serve",
                          "--web.systemd-socket", "--no-probe.enabled"], capture_output=True,
                         text=True, timeout=30, env=child_env(), check=False)
    assert res.returncode == 2  # no socket passed: one line, never a traceback
    assert "--web.systemd-socket: no sockets passed by systemd" in res.stderr
