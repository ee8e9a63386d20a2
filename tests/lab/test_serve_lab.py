"""`wgnest serve` on the seed lab, scraped over HTTP from inside the client namespace."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab.lab import Lab, http_get, run

pytestmark = pytest.mark.lab
URL = "http://127.0.0.1:9586"


def scrape(lab: Lab) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    status, body = http_get(lab.client.ns, URL + "/metrics")
    assert status == 200
    text = body.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    hits = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


def wait_for(lab: Lab, predicate: object, timeout: float = 10.0) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        text, samples = scrape(lab)
        if predicate(text, samples) or time.monotonic() > deadline:  # type: ignore[operator]
            return text, samples
        time.sleep(0.2)


def check_seed_scrape(lab: Lab, samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
                      w0: str, w1: str, max_age: float) -> None:
    """What a scrape of the seed shows: wg1 nested in wg0 with its fix, MTU cost and routes
    (shared with the kernel stage, which checks the same on kernel devices)."""
    s2 = lab.servers["s2"]
    assert value(samples, "wireguard_peer_nested", device=w1, outer_device=w0) == 1
    assert value(samples, "wireguard_peer_nested", device=w0, outer_device="") == 0
    assert value(samples, "wireguard_peer_suggested_fwmark", device=w1) == 51820
    # the fix, the loop and the MTU cost only for the peers they concern (series budget)
    assert not [k for k in samples if k[0] == "wireguard_peer_suggested_fwmark"
                and ("device", w0) in k[1]]
    assert value(samples, "wireguard_device_fwmark", device=w0) == 51820
    assert value(samples, "wireguard_device_fwmark", device=w1) == 0
    # the fwmark label is the mark as `wg show` prints it (0xca6c, off), for the dashboard
    for dev in (w0, w1):
        printed = run("wg", "show", dev, "fwmark", ns=lab.client.ns).stdout.strip()
        assert value(samples, "wireguard_device_fwmark", device=dev, fwmark=printed) in (
            0, 51820), (dev, printed)
    assert value(samples, "wireguard_peer_suggested_fwmark", device=w1,
                 fwmark=f"{51820:#x}") == 51820
    assert value(samples, "wireguard_device_mtu_bytes", device=w1) == 1340
    assert not [k for k in samples if k[0] == "wireguard_peer_routing_loop"]
    assert value(samples, "wireguard_peer_nesting_mtu_cost_bytes", device=w1) == 80
    assert value(samples, "wireguard_peer_endpoint_route_info", device=w1, egress_device=w0,
                 table="51820", endpoint=f"{s2.host.v4}:51820") == 1
    assert value(samples, "wireguard_peer_endpoint_route_info", device=w0,
                 egress_device=lab.client.dev, table="main", gateway=lab.client.router_v4) == 1
    age = value(samples, "wireguard_peer_handshake_age_seconds", device=w1, public_key=s2.public)
    assert 0 <= age < max_age
    assert value(samples, "wireguard_peer_info", device=w1, public_key=s2.public,
                 allowed_ips="10.202.0.0/24", endpoint=f"{s2.host.v4}:51820") == 1


def test_serve_seed_metrics_then_tunnel_down(lab: Lab) -> None:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    assert lab.ping(lab.client.ns, s2.tunnel_v4)
    lab.serve("--refresh.interval", "0.5")
    k1 = lab.public_keys[w1]
    text, samples = wait_for(lab, lambda t, s: "wireguard_peer_nested" in t)
    check_seed_scrape(lab, samples, w0, w1, max_age=30)
    assert value(samples, "wgnest_collector_success", collector="wireguard_uapi") == 1
    assert value(samples, "wgnest_collector_success", collector="route_lookup") == 1
    assert k1  # the client's own key is the device key, exported as such
    assert value(samples, "wireguard_device_info", device=w1, public_key=k1) == 1

    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr

    lab.wg_down(w1)
    text, samples = wait_for(lab, lambda t, s: w1 not in t)
    assert w1 not in text, "series of a removed tunnel are still exported"
    assert value(samples, "wireguard_device_fwmark", device=w0) == 51820

    status, page = http_get(lab.client.ns, URL + "/")
    assert status == 200
    assert w0.encode() in page
    assert lab.serve_log is not None
    lab.assert_no_private_key(text, lab.serve_log.read_text(), page)


def test_status_page_shows_verdict_and_fix(lab: Lab) -> None:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    lab.serve("--refresh.interval", "0.5")
    status, page = http_get(lab.client.ns, URL + "/")
    html = page.decode()
    assert status == 200
    assert "NESTED in" in html
    assert "FwMark = 51820" in html
    assert f"wg set {w1} fwmark 51820" in html
    assert "CRITICAL" in html


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def test_status_page_in_headless_chromium(lab: Lab) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is needed (make test installs Debian's chromium)")
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    assert lab.ping(lab.client.ns, s2.tunnel_v4)
    lab.serve("--refresh.interval", "0.5", "--probe.target", f"{w1}={s2.tunnel_v4}")
    time.sleep(2)  # a few probe rounds, so the latency column has numbers
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    base = ["ip", "netns", "exec", lab.client.ns, chromium, *CHROMIUM_FLAGS,
            f"--user-data-dir={lab.workdir / 'chromium'}"]
    dom = subprocess.run([*base, "--dump-dom", URL + "/"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert f"NESTED in {w0}" in dom
    assert "FwMark = 51820" in dom
    assert f"wg set {w1} fwmark 51820" in dom
    assert "tunnel " in dom
    assert " ms" in dom
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1500,1000", URL + "/"],
                   capture_output=True, timeout=120, check=True)
    assert shot.exists()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank image


def test_one_filtered_probe_target_is_not_a_failing_prober(lab: Lab) -> None:
    """A netfilter OUTPUT drop makes sendto() fail with EPERM for one target: that target's
    probes are lost and counted, the prober stays healthy and the page never turns UNKNOWN
    with a permission hint (the landed code did both)."""
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24", extra="FwMark = 51820")
    assert lab.ping(lab.client.ns, s2.tunnel_v4)  # a handshake: tunnel probes are due
    run("nft", "-f", "-", ns=lab.client.ns, input=(
        "table inet wnfilter {\n chain out {\n  type filter hook output priority 0;\n"
        f"  ip daddr {s2.tunnel_v4} icmp type echo-request drop\n }}\n}}\n"))
    assert not lab.ping(lab.client.ns, s2.tunnel_v4)  # the kernel refuses it: sendto EPERM
    lab.serve("--refresh.interval", "0.5", "--probe.target", f"{w1}={s2.tunnel_v4}",
              "--probe.histograms")  # the per-path counters
    _text, samples = wait_for(lab, lambda t, s: 'path="tunnel"' in t and value(
        s, "wireguard_probe_packets_sent_total", device=w1, path="tunnel") >= 2)
    assert value(samples, "wireguard_probe_packets_sent_total", device=w1, path="tunnel") >= 2
    assert value(samples, "wireguard_probe_packets_received_total", device=w1,
                 path="tunnel") == 0
    assert value(samples, "wireguard_probe_packets_received_total", device=w1,
                 path="transport") >= 1  # the other paths are probed as usual
    assert value(samples, "wgnest_collector_success", collector="probe") == 1
    assert value(samples, "wgnest_probe_send_errors_total", reason="eperm") >= 2
    status, page = http_get(lab.client.ns, URL + "/")
    html = page.decode()
    assert status == 200
    assert "UNKNOWN" not in html
    assert "CAP_NET_ADMIN" not in html
    assert '<div class="banner b0">OK' in html


def test_gzip_when_the_scraper_asks(lab: Lab) -> None:
    """Prometheus always sends `Accept-Encoding: gzip`: the body is compressed once per
    refresh (the same bytes for every scrape of that refresh), and plain otherwise."""
    import gzip

    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    lab.client_tunnel(1, s2, "10.202.0.0/24")
    lab.serve("--refresh.interval", "60", "--no-probe.enabled")
    import urllib.request

    from tests.lab.lab import in_netns

    def get(encoding: str) -> tuple[dict[str, str], bytes]:
        req = urllib.request.Request(URL + "/metrics", headers={"Accept-Encoding": encoding})
        with in_netns(lab.client.ns), urllib.request.urlopen(req, timeout=5) as resp:
            return dict(resp.headers), resp.read()

    # serve refreshes at start and once more as its refresher starts: a plain scrape is
    # compared with the gzip scrapes around it once both of those hold the same refresh
    for _attempt in range(5):
        headers, first = get("gzip")
        plain_headers, plain = get("identity")
        _, second = get("deflate, gzip;q=0.5")
        if first == second:  # compressed once for this refresh
            break
        time.sleep(0.5)
    assert first == second
    assert "Content-Encoding" not in plain_headers
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(first) == plain
    assert len(first) < len(plain) / 3
    refused_headers, _ = get("gzip;q=0")
    assert "Content-Encoding" not in refused_headers
