"""`wgnest check` on kernel WireGuard devices: wg-quick full tunnel + site tunnels, kernel
servers, read back over generic netlink (the userspace lab covers the UAPI path)."""

from __future__ import annotations

from collections.abc import Callable

from tests.kernel.klab import KernelLab, check_json, link_kind, peer_of
from tests.lab.lab import daemon_pids, run

FULL_MARK = 51820


def _seed(lab: KernelLab, *, v6: bool = False) -> tuple[str, str]:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0, ::/0" if v6 else "0.0.0.0/0", v6=v6)
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24, fd02::/64", v6=v6)
    far = s2.tunnel_v6 if v6 else s2.tunnel_v4
    assert lab.ping(lab.client.ns, far, count=2), "no traffic through the site tunnel"
    return w0, w1


def _assert_kernel_devices(lab: KernelLab, doc: dict[str, object], *names: str) -> None:
    devices = {d["name"]: d for d in doc["devices"]}  # type: ignore[attr-defined]
    assert set(devices) == set(names), devices
    for name in names:
        assert devices[name]["implementation"] == "kernel", devices[name]
        assert link_kind(lab.client.ns, name) == "wireguard"
        assert not daemon_pids(name), f"wg-quick fell back to wireguard-go for {name}"


def test_seed_nested_then_fwmark_makes_it_clean(klab: KernelLab) -> None:
    lab = klab
    w0, w1 = _seed(lab)
    code, doc = check_json(lab.client.ns, lab.workdir)
    assert code == 2, doc
    assert doc["status"] == "critical"
    _assert_kernel_devices(lab, doc, w0, w1)
    inner, outer = peer_of(doc, w1), peer_of(doc, w0)
    assert inner["verdict"] == "nested", inner
    assert inner["outer"] == w0
    assert inner["egress"] == w0
    assert inner["table"] == str(FULL_MARK)
    assert inner["outer_peer"] == lab.servers["s1"].public
    assert inner["chain"] == [w1, w0, lab.client.dev]
    assert inner["fix"]["kind"] == "fwmark"
    assert inner["fix"]["fwmark"] == FULL_MARK
    assert inner["fix"]["verified"] is True
    assert inner["flow"]["mark"] == 0
    assert inner["mtu"]["usable_mtu"] == 1420 - 60
    assert outer["verdict"] == "direct"
    assert outer["egress"] == lab.client.dev
    assert outer["flow"]["mark"] == FULL_MARK
    devices = {d["name"]: d for d in doc["devices"]}
    assert devices[w0]["fwmark"] == FULL_MARK
    assert devices[w1]["fwmark"] == 0
    # the kernel's own account of its sockets: wg-quick gave each device a random port
    ports = run("wg", "show", w1, "listen-port", ns=lab.client.ns).stdout.strip()
    assert devices[w1]["listen_port"] == int(ports)
    # ground truth: the far server sees the first server's address, not the client's
    s2 = lab.servers["s2"]
    assert lab.server_view(s2)[lab.public_keys[w1]].startswith(lab.servers["s1"].host.v4 + ":")

    run("wg", "set", w1, "fwmark", str(FULL_MARK), ns=lab.client.ns)
    code, doc = check_json(lab.client.ns, lab.workdir)
    assert code == 0, doc
    assert doc["status"] == "ok"
    fixed = peer_of(doc, w1)
    assert fixed["verdict"] == "direct", fixed
    assert fixed["egress"] == lab.client.dev
    assert fixed["flow"]["mark"] == FULL_MARK
    # and the kernel really sends it direct now: the far server sees the client itself
    assert lab.ping(lab.client.ns, s2.tunnel_v4, count=2)
    assert lab.server_view(s2)[lab.public_keys[w1]].startswith(lab.client.v4 + ":")


def test_ipv6_endpoints_nested(klab: KernelLab) -> None:
    lab = klab
    w0, w1 = _seed(lab, v6=True)
    code, doc = check_json(lab.client.ns, lab.workdir)
    assert code == 2, doc
    _assert_kernel_devices(lab, doc, w0, w1)
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    inner = peer_of(doc, w1)
    assert inner["endpoint"] == f"[{s2.host.v6}]:51820"
    assert inner["verdict"] == "nested", inner
    assert inner["outer"] == w0
    assert inner["chain"] == [w1, w0, lab.client.dev]
    assert inner["fix"]["kind"] == "fwmark"
    assert inner["fix"]["fwmark"] == FULL_MARK
    assert inner["fix"]["verified"] is True
    assert inner["mtu"]["usable_mtu"] == 1420 - 80
    assert peer_of(doc, w0)["endpoint"] == f"[{s1.host.v6}]:51820"
    assert peer_of(doc, w0)["verdict"] == "direct"
    assert lab.server_view(s2)[lab.public_keys[w1]].startswith(f"[{s1.host.v6}]:")


def test_three_deep_chain(make_klab: Callable[[int], KernelLab]) -> None:
    """wg2's endpoint is inside wg1's AllowedIPs (main table), wg1's transport goes into the
    full tunnel wg0: wg2 -> wg1 -> wg0 -> the uplink, each hop a real kernel device."""
    lab = make_klab(3)
    s1, s2, s3 = lab.servers["s1"], lab.servers["s2"], lab.servers["s3"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, f"10.202.0.0/24, {s3.host.v4}/32")
    w2 = lab.client_tunnel(2, s3, "10.203.0.0/24")
    assert lab.ping(lab.client.ns, s3.tunnel_v4, count=2), "no traffic through wg2"
    code, doc = check_json(lab.client.ns, lab.workdir)
    assert code == 2, doc
    _assert_kernel_devices(lab, doc, w0, w1, w2)
    assert doc["summary"].startswith("2 nested, 0 routing loops"), doc["summary"]
    deepest, middle = peer_of(doc, w2), peer_of(doc, w1)
    assert deepest["verdict"] == "nested", deepest
    assert deepest["outer"] == w1
    assert deepest["egress"] == w1
    assert deepest["table"] == "main"
    assert deepest["chain"] == [w2, w1, w0, lab.client.dev]
    assert middle["verdict"] == "nested"
    assert middle["outer"] == w0
    assert middle["chain"] == [w1, w0, lab.client.dev]
    assert middle["fix"]["fwmark"] == FULL_MARK
    assert peer_of(doc, w0)["verdict"] == "direct"
    # ground truth: s3 sees s2 (which masquerades what leaves it), s2 sees s1
    assert lab.server_view(s3)[lab.public_keys[w2]].startswith(s2.host.v4 + ":")
    assert lab.server_view(s2)[lab.public_keys[w1]].startswith(s1.host.v4 + ":")
