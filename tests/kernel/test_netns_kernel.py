"""The netns trick (https://www.wireguard.com/netns/): a kernel WireGuard device made in
namespace A and moved into namespace B keeps its UDP socket in A. B's default route is the
device itself, yet the transport leaves through A's uplink: no loop. Seen from B, the route
lookup alone says "loop"; the socket's namespace tells it apart."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from tests.kernel.klab import KernelLab, check_json, peer_of
from tests.lab.lab import genkey, in_netns, run
from wgnest.sources.udp_sockets import udp_listen_ports

PORT = 51877


def _moved_device(lab: KernelLab) -> tuple[str, str]:
    """A device made in the client namespace (A), moved into a bare namespace B whose only
    route is the device. Returns (B, device)."""
    s1 = lab.servers["s1"]
    a = lab.client.ns
    b = lab._ns("b")  # only lo: no uplink of its own
    name = f"{lab.tag}mv"
    private, public = genkey()
    lab.private_keys.append(private)
    keyfile = lab.workdir / f"{name}.key"
    keyfile.write_text(private + "\n")
    keyfile.chmod(0o600)
    address = "10.201.0.40"
    lab.add_server_peer(s1, public, address, "fd01::40")
    run("ip", "link", "add", name, "type", "wireguard", ns=a)
    run("wg", "set", name, "listen-port", str(PORT), "private-key", str(keyfile), "peer",
        s1.public, "endpoint", f"{s1.host.v4}:{s1.port}", "allowed-ips", "0.0.0.0/0,::/0",
        ns=a)
    run("ip", "link", "set", name, "netns", b, ns=a)
    run("ip", "addr", "add", f"{address}/24", "dev", name, ns=b)
    run("ip", "link", "set", name, "up", ns=b)
    run("ip", "route", "add", "default", "dev", name, ns=b)
    (lab.workdir / f"{name}.conf").write_text(
        f"[Interface]\nListenPort = {PORT}\n\n[Peer]\nPublicKey = {s1.public}\n"
        f"AllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = {s1.host.v4}:{s1.port}\n")
    return b, name


def test_device_moved_to_another_namespace_is_not_a_loop(
        make_klab: Callable[[int], KernelLab]) -> None:
    lab = make_klab(1)
    b, name = _moved_device(lab)
    s1 = lab.servers["s1"]
    # B has no interface but lo and the device: a reply proves the transport left via A
    assert lab.ping(b, s1.tunnel_v4, count=3), "no traffic through the moved device"
    assert lab.server_view(s1)[run("wg", "show", name, "public-key", ns=b).stdout.strip()] == (
        f"{lab.client.v4}:{PORT}")
    # the socket is A's, not B's
    with in_netns(lab.client.ns):
        in_a = udp_listen_ports()
    with in_netns(b):
        in_b = udp_listen_ports()
    assert {(4, PORT), (6, PORT)} <= in_a
    assert (4, PORT) not in in_b
    assert not {port for _family, port in in_b}, in_b

    code, doc = check_json(b, lab.workdir)
    peer = peer_of(doc, name)
    assert peer["verdict"] != "loop", peer
    assert peer["verdict"] == "unknown", peer
    assert "namespace" in (peer.get("error") or ""), peer
    assert code in (1, 3), (code, doc["summary"])


def test_kernel_device_sockets_are_listed_where_they_were_made() -> None:
    """udp_listen_ports against the kernel: a device's sockets (IPv4 and IPv6) appear when
    it goes up, stay in the creating namespace when the device moves, and go with it."""
    tag = "wk" + secrets.token_hex(2)
    a, b, dev = f"{tag}a", f"{tag}b", f"{tag}wg"
    try:
        for ns in (a, b):
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", dev, "type", "wireguard", ns=a)
        run("wg", "set", dev, "listen-port", str(PORT), ns=a)
        with in_netns(a):
            assert (4, PORT) not in udp_listen_ports()  # a device that is down has none
        run("ip", "link", "set", dev, "up", ns=a)
        with in_netns(a):
            assert {(4, PORT), (6, PORT)} <= udp_listen_ports()
        run("ip", "link", "set", dev, "netns", b, ns=a)
        run("ip", "link", "set", dev, "up", ns=b)
        assert run("wg", "show", dev, "listen-port", ns=b).stdout.strip() == str(PORT)
        with in_netns(a):
            assert {(4, PORT), (6, PORT)} <= udp_listen_ports()
        with in_netns(b):
            assert (4, PORT) not in udp_listen_ports()
        run("ip", "link", "del", dev, ns=b)
        with in_netns(a):
            assert (4, PORT) not in udp_listen_ports()
    finally:
        for ns in (a, b):
            run("ip", "netns", "del", ns, check=False)
