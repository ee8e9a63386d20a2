"""`wgnest serve` scraped on kernel WireGuard devices: the values the userspace lab asserts
(tests/lab/test_serve_lab.py), from the generic netlink source, and promtool's lint."""

from __future__ import annotations

import base64
import subprocess

from tests.kernel.klab import KernelLab
from tests.lab.lab import http_get
from tests.lab.test_serve_lab import URL, value, wait_for

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
    assert value(samples, "wireguard_peer_nested", device=w1, outer_device=w0) == 1
    assert value(samples, "wireguard_peer_nested", device=w0, outer_device="") == 0
    assert value(samples, "wireguard_peer_suggested_fwmark", device=w1) == 51820
    # the fix, the loop and the MTU cost only for the peers they concern (series budget)
    assert not [k for k in samples if k[0] == "wireguard_peer_suggested_fwmark"
                and ("device", w0) in k[1]]
    assert value(samples, "wireguard_device_fwmark", device=w0) == 51820
    assert value(samples, "wireguard_device_fwmark", device=w1) == 0
    assert value(samples, "wireguard_device_mtu_bytes", device=w1) == 1340
    assert not [k for k in samples if k[0] == "wireguard_peer_routing_loop"]
    assert value(samples, "wireguard_peer_nesting_mtu_cost_bytes", device=w1) == 80
    assert value(samples, "wireguard_peer_endpoint_route_info", device=w1, egress_device=w0,
                 table="51820", endpoint=f"{s2.host.v4}:51820") == 1
    assert value(samples, "wireguard_peer_endpoint_route_info", device=w0,
                 egress_device=lab.client.dev, table="main", gateway=lab.client.router_v4) == 1
    age = value(samples, "wireguard_peer_handshake_age_seconds", device=w1, public_key=s2.public)
    assert 0 <= age < 120
    assert value(samples, "wireguard_peer_info", device=w1, public_key=s2.public,
                 allowed_ips="10.202.0.0/24", endpoint=f"{s2.host.v4}:51820") == 1
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
    logged = lab.serve_log.read_text()
    for private in lab.private_keys:
        for form in (private, base64.b64decode(private).hex()):
            assert form not in text
            assert form not in logged, "a private key in the log: " + "".join(
                [line.replace(form, "<PRIVATE KEY>")[:300] + "\n"
                 for line in logged.splitlines() if form in line][:3])
            assert form.encode() not in page
