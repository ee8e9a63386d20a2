"""`wgnest serve` scraped on kernel WireGuard devices: the values the userspace lab asserts
(tests/lab/test_serve_lab.py), from the generic netlink source, and promtool's lint."""

from __future__ import annotations

import subprocess

from tests.kernel.klab import KernelLab
from tests.lab.lab import http_get
from tests.lab.test_serve_lab import URL, check_seed_scrape, value, wait_for

PROMTOOL = "/usr/bin/promtool"
SLOW = 240.0  # seconds: a refresh in the guest takes a while


def test_serve_kernel_devices_then_tunnel_down(klab: KernelLab) -> None:
    lab = klab
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    assert lab.ping(lab.client.ns, s2.tunnel_v4, count=2)
    lab.serve("--refresh.interval", "1", "--no-probe.enabled")
    k1 = lab.public_keys[w1]
    text, samples = wait_for(lab, lambda t, s: "wireguard_peer_nested{" in t, timeout=SLOW)
    assert value(samples, "wgnest_collector_success", collector="wireguard_kernel") == 1
    assert value(samples, "wgnest_collector_success", collector="route_lookup") == 1
    assert value(samples, "wgnest_collector_success", collector="udp_sockets") == 1
    check_seed_scrape(lab, samples, w0, w1, max_age=120)
    assert value(samples, "wireguard_device_info", device=w1, public_key=k1) == 1
    assert value(samples, "wireguard_peer_receive_bytes_total", device=w1,
                 public_key=s2.public) > 0
    assert value(samples, "wireguard_peer_transmit_bytes_total", device=w1,
                 public_key=s2.public) > 0

    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                          capture_output=True, check=False, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    lab.wg_down(w1)
    text, samples = wait_for(lab, lambda t, s: w1 not in t, timeout=SLOW)
    assert w1 not in text, "series of a removed tunnel are still exported"
    assert value(samples, "wireguard_device_fwmark", device=w0) == 51820

    status, page = http_get(lab.client.ns, URL + "/", timeout=60)
    assert status == 200
    assert w0.encode() in page
    assert lab.serve_log is not None
    lab.assert_no_private_key(text, lab.serve_log.read_text(), page)
