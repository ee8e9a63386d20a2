"""Secrets and noise of a real `wgnest serve` in the seed lab (issue 12): debug logging is
summarised per refresh (not a line per socket, device or netlink message) and never holds a
key; a UAPI socket left by a daemon gone, named after a link that is no TUN device, is
reported once, costs nothing and keeps the collector healthy."""

from __future__ import annotations

import socket
import time

import pytest

from tests.hardening.conftest import Figures
from tests.lab.lab import UAPI_DIR, Lab, http_get, run

pytestmark = pytest.mark.lab
URL = "http://127.0.0.1:9586/metrics"


def test_debug_log_is_small_and_holds_no_key(lab: Lab, figures: Figures) -> None:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    lab.client_tunnel(1, s2, "10.202.0.0/24")
    lab.serve("--refresh.interval", "200ms")  # --log.level debug, as the lab starts it
    assert lab.serve_log is not None
    time.sleep(1.0)
    before = lab.serve_log.stat().st_size
    time.sleep(4.0)
    rate = (lab.serve_log.stat().st_size - before) / 4.0
    text = lab.serve_log.read_text()
    figures(f"debug log at a 200 ms refresh: {rate:.0f} bytes/s (was 45 KB/s at 1 s)")
    assert rate < 2000, text[-3000:]
    assert "refresh: 2 devices" in text  # the per-refresh summary
    lab.assert_no_private_key(text)


def test_stale_socket_of_a_non_tun_link_is_reported_once_and_costs_nothing(
        lab: Lab, figures: Figures) -> None:
    s1 = lab.servers["s1"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    name = f"{lab.tag}st"  # a veth with the name a wireguard-go once had
    run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{lab.tag}sp",
        ns=lab.client.ns)
    path = UAPI_DIR / f"{name}.sock"
    lab.interfaces.append(name)  # the lab removes the socket file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))  # bound and listening, never answering: a timeout each read
        listener.listen(4)
        listener.setblocking(False)
        lab.serve("--refresh.interval", "200ms", "--no-probe.enabled")
        time.sleep(2.0)
        status, body = http_get(lab.client.ns, URL)
        with pytest.raises(BlockingIOError):
            listener.accept()  # never connected to
    text = body.decode()
    assert status == 200
    assert 'wgnest_collector_success{collector="wireguard_uapi"} 1.0' in text
    assert "wgnest_uapi_stale_sockets 1.0" in text
    duration = next(float(line.split()[1]) for line in text.splitlines() if line.startswith(
        'wgnest_collector_duration_seconds{collector="wireguard_uapi"}'))
    figures(f"stale UAPI socket: wireguard_uapi takes {duration * 1000:.1f} ms a refresh "
            "(the full 1 s timeout before)")
    assert duration < 0.2
    assert lab.serve_log is not None
    assert lab.serve_log.read_text().count(f"{path}: a UAPI socket named after a link") == 1
