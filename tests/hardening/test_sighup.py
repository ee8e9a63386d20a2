"""SIGHUP reloads the web config and the peer names (one log line); an invalid new config
keeps the old one; the process never dies of it (issue 12). A real `wgnest serve` in a
network namespace of the test's own, scraped there."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.hardening.conftest import child_env, stop_process
from tests.lab.lab import in_netns

pytestmark = pytest.mark.lab
KEY = "A" * 43 + "="


def auth_config(path: Path, user: str, password: str) -> None:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    path.write_text(f"basic_auth_users:\n  {user}: {hashed}\n")


def get(ns: str, url: str, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with in_netns(ns):
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except urllib.error.URLError:
            return 0  # not listening (yet)


def wait_until(check: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_sighup_reloads_web_config_and_peer_names(netns: str, tmp_path: Path) -> None:
    web, peers, log = tmp_path / "web.yml", tmp_path / "peers.toml", tmp_path / "serve.log"
    auth_config(web, "alice", "one")
    peers.write_text(f'[[peer]]\npublic_key = "{KEY}"\nname = "first"\n')
    url = "http://127.0.0.1:9586/metrics"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "wgnest", "serve",
         "--web.listen-address", "127.0.0.1:9586", "--no-probe.enabled",
         "--web.config.file", str(web), "--wireguard.peer-file", str(peers)],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), env=child_env())
    try:
        assert wait_until(lambda: get(netns, url, "alice", "one") == 200, 15), log.read_text()
        auth_config(web, "bob", "two")
        peers.write_text(f'[[peer]]\npublic_key = "{KEY}"\nname = "second"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: get(netns, url, "bob", "two") == 200), log.read_text()
        assert get(netns, url, "alice", "one") == 401
        assert proc.poll() is None  # SIGHUP no longer kills the process
        assert "reloaded (SIGHUP): 1 peer names" in log.read_text()

        web.write_text("basic_auth_users: [not, a, mapping]\n")  # invalid: keep the old
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keeping the previous configuration" in log.read_text())
        assert get(netns, url, "bob", "two") == 200
        assert proc.poll() is None
        reloads = [line for line in log.read_text().splitlines() if "SIGHUP" in line]
        assert len(reloads) == 2  # one line each
    finally:
        stop_process(proc)
