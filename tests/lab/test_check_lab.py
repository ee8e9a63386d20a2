"""`wgnest check` on real tunnels: wg-quick full tunnel + a site tunnel, real wireguard-go."""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab.lab import Lab, run

pytestmark = pytest.mark.lab


def _peer(doc: dict[str, Any], device: str) -> dict[str, Any]:
    (peer,) = [p for p in doc["peers"] if p["device"] == device]
    return peer


def _seed(lab: Lab, *, v6: bool = False, w0_extra: str = "", w1_extra: str = "") -> tuple[str, str]:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    full = "0.0.0.0/0, ::/0" if v6 else "0.0.0.0/0"
    w0 = lab.client_tunnel(0, s1, full, v6=v6, extra=w0_extra)
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24, fd02::/64", v6=v6, extra=w1_extra)
    far = s2.tunnel_v6 if v6 else s2.tunnel_v4
    assert lab.ping(lab.client.ns, far, count=2), "no traffic through the site tunnel"
    return w0, w1


def test_seed_site_tunnel_nested_in_full_tunnel(lab: Lab) -> None:
    w0, w1 = _seed(lab)
    code, doc = lab.check_json()
    assert code == 2, doc
    assert doc["status"] == "critical"
    inner, outer = _peer(doc, w1), _peer(doc, w0)
    assert inner["verdict"] == "nested"
    assert inner["outer"] == w0
    assert inner["egress"] == w0
    assert inner["table"] == "51820"
    assert inner["outer_peer"] == lab.servers["s1"].public
    assert inner["chain"] == [w1, w0, lab.client.dev]
    assert inner["fix"]["kind"] == "fwmark"
    assert inner["fix"]["fwmark"] == 51820
    assert inner["fix"]["verified"] is True
    assert inner["fix"]["resulting_egress"] == lab.client.dev
    assert inner["flow"]["mark"] == 0
    assert inner["flow"]["dport"] == 51820
    # wg-quick sized w1 through w0 (1420 - 80); through w0 only 1360 fit, direct 1440 would
    assert inner["mtu"]["usable_mtu"] == 1420 - 60
    assert inner["mtu"]["direct_mtu"] == 1500 - 60
    assert outer["verdict"] == "direct"
    assert outer["egress"] == lab.client.dev
    assert outer["table"] == "main"
    assert outer["flow"]["mark"] == 51820
    devices = {d["name"]: d for d in doc["devices"]}
    assert devices[w0]["fwmark"] == 51820
    assert devices[w1]["fwmark"] == 0
    # Only this namespace's devices: the servers' UAPI sockets share /var/run/wireguard.
    assert set(devices) == {w0, w1}
    # Ground truth from the far server: it sees the first server's address, not the client's.
    seen = lab.server_view(lab.servers["s2"])[lab.public_keys[w1]]
    assert seen.startswith(lab.servers["s1"].host.v4 + ":")


def test_text_output_names_the_fix_and_the_file(lab: Lab) -> None:
    _w0, w1 = _seed(lab)
    res = lab.wgnest("check", "--config-dir", str(lab.workdir))
    assert res.returncode == 2
    first = res.stdout.splitlines()[0]
    assert first.startswith("WGNEST CRITICAL - 1 nested")
    assert f"add to the [Interface] section of {lab.workdir}/{w1}.conf:  FwMark = 51820" in (
        res.stdout)
    assert f"wg set {w1} fwmark 51820" in res.stdout


def test_fwmark_on_site_tunnel_is_clean(lab: Lab) -> None:
    _w0, w1 = _seed(lab, w1_extra="FwMark = 51820")
    code, doc = lab.check_json()
    assert code == 0, doc
    assert _peer(doc, w1)["verdict"] == "direct"
    assert _peer(doc, w1)["egress"] == lab.client.dev
    seen = lab.server_view(lab.servers["s2"])[lab.public_keys[w1]]
    assert seen.startswith(lab.client.v4 + ":")


def test_fix_applied_at_runtime_clears_nesting(lab: Lab) -> None:
    _w0, w1 = _seed(lab)
    code, doc = lab.check_json()
    fix = _peer(doc, w1)["fix"]["commands"][0]
    assert code == 2
    run(*fix.split(), ns=lab.client.ns)  # the fix is a command line, run verbatim
    code, doc = lab.check_json()
    assert code == 0
    assert _peer(doc, w1)["verdict"] == "direct"


def test_ipv6_endpoints_nested(lab: Lab) -> None:
    w0, w1 = _seed(lab, v6=True)
    code, doc = lab.check_json()
    assert code == 2, doc
    inner = _peer(doc, w1)
    assert inner["endpoint"] == f"[{lab.servers['s2'].host.v6}]:51820"
    assert inner["verdict"] == "nested"
    assert inner["outer"] == w0
    assert inner["fix"]["fwmark"] == 51820
    assert inner["fix"]["verified"]
    assert inner["mtu"]["usable_mtu"] == 1420 - 80
    seen = lab.server_view(lab.servers["s2"])[lab.public_keys[w1]]
    assert seen.startswith(f"[{lab.servers['s1'].host.v6}]:")


def test_custom_fwmark_on_full_tunnel(lab: Lab) -> None:
    w0, w1 = _seed(lab, w0_extra="FwMark = 0x1234")
    code, doc = lab.check_json()
    assert code == 2
    inner = _peer(doc, w1)
    assert inner["outer"] == w0
    assert inner["table"] == str(0x1234)
    assert inner["fix"]["fwmark"] == 0x1234
    assert inner["fix"]["verified"]


def test_allowed_nesting_is_reported_not_alarmed(lab: Lab) -> None:
    w0, w1 = _seed(lab)
    code, doc = lab.check_json("--allow-nesting", f"{w1}:{w0}")
    assert code == 0, doc
    inner = _peer(doc, w1)
    assert inner["verdict"] == "nested"
    assert inner["allowed"] is True


def test_main_table_route_of_another_tunnel_captures_endpoint(lab: Lab) -> None:
    """No policy routing: wg0's AllowedIPs cover wg1's endpoint, so wg-quick's plain route
    in main captures it. No fwmark helps; the fix is a host route via the underlay."""
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "10.201.0.0/24, 198.18.3.0/24")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    code, doc = lab.check_json()
    assert code == 2
    inner = _peer(doc, w1)
    assert inner["verdict"] == "nested"
    assert inner["outer"] == w0
    assert inner["table"] == "main"
    fix = inner["fix"]
    assert fix["kind"] == "route"
    assert fix["commands"][0] == (
        f"ip route add {s2.host.v4}/32 via {lab.client.router_v4} dev {lab.client.dev}")
    run(*fix["commands"][0].split(), ns=lab.client.ns)
    code, doc = lab.check_json()
    assert code == 0
    assert _peer(doc, w1)["verdict"] == "direct"
    assert lab.ping(lab.client.ns, s2.tunnel_v4)


def test_split_default_routes_loop_the_tunnel_into_itself(lab: Lab) -> None:
    """OpenVPN-style 0/1 + 128/1 in main: the tunnel's own endpoint is routed into itself."""
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/1, 128.0.0.0/1")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24")
    code, doc = lab.check_json()
    assert code == 2
    assert doc["summary"].startswith("1 nested, 1 routing loops")
    own = _peer(doc, w0)
    assert own["verdict"] == "loop"
    assert own["egress"] == w0
    assert own["fix"]["kind"] == "route"
    assert own["fix"]["commands"][0] == (
        f"ip route add {s1.host.v4}/32 via {lab.client.router_v4} dev {lab.client.dev}")
    assert _peer(doc, w1)["verdict"] == "nested"
    assert not lab.ping(lab.client.ns, s1.tunnel_v4)  # the loop really kills the tunnel
    run(*own["fix"]["commands"][0].split(), ns=lab.client.ns)
    code, doc = lab.check_json()
    assert _peer(doc, w0)["verdict"] == "direct"
    assert _peer(doc, w1)["verdict"] == "nested"  # still inside wg0, as its AllowedIPs say
    # wireguard-go retries a failed handshake every 5 s: give it time to come up
    assert lab.ping(lab.client.ns, s1.tunnel_v4, count=40)
