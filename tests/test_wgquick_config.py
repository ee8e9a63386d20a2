"""wg-quick configs read as `wg-quick up` reads them, keys never kept (no I/O but tmp files)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from wgnest.model.host import Endpoint
from wgnest.sources.wgquick_config import (
    ConfigError,
    configs_in,
    interface_name,
    parse_config,
    read_config,
    resolve_config,
    table_names,
)

PRIVATE = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PSK = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="
PUB = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
N = ipaddress.ip_network
TEXT = f"""\
[interface]
PrivateKey = {PRIVATE}
address = 10.9.0.2/24, fd09::2/64   # trailing comment
Address = 10.10.0.2
ListenPort = 51821
FWMARK = 0x1234
Table = vpn
MTU = 1380
DNS = 10.9.0.1, corp.example
SaveConfig = True
PreUp = wgnest lint --refuse %i
PostUp = ip rule add pref 9 lookup main
# a comment = with an equals sign

[Peer]
PublicKey = {PUB}
PresharedKey = {PSK}
AllowedIPs = 0.0.0.0/0, ::/0
AllowedIPs = 10.1.2.3/24
Endpoint = vpn.example.net:51820
PersistentKeepalive = 25

[Peer]
PublicKey = {PUB[:-2]}A=
AllowedIPs = 192.168.7.1
Endpoint = [fd00:3::2]:51820
"""


def resolver(host: str, port: int) -> Endpoint | None:
    return Endpoint(ipaddress.ip_address("203.0.113.5"), port) if host == "vpn.example.net" \
        else None


def test_every_field_routing_depends_on() -> None:
    c = parse_config(TEXT, "wg7", "/etc/wireguard/wg7.conf", {"vpn": 100}, resolver)
    assert c.addresses == (("10.9.0.2", 24), ("fd09::2", 64), ("10.10.0.2", 32))
    assert (c.listen_port, c.fwmark, c.table, c.table_id, c.mtu) == (51821, 0x1234, "vpn", 100,
                                                                      1380)
    assert c.dns == ("10.9.0.1", "corp.example")
    assert c.save_config
    assert [(h.phase, h.command, h.line) for h in c.hooks] == [
        ("PreUp", "wgnest lint --refuse %i", 11), ("PostUp", "ip rule add pref 9 lookup main", 12)]
    first, second = c.peers
    assert first.endpoint == Endpoint(ipaddress.ip_address("203.0.113.5"), 51820)
    assert first.endpoint_text == "vpn.example.net:51820"
    assert first.allowed_ips == (N("0.0.0.0/0"), N("::/0"), N("10.1.2.0/24"))
    assert first.persistent_keepalive == 25
    assert second.endpoint == Endpoint(ipaddress.ip_address("fd00:3::2"), 51820)
    assert second.allowed_ips == (N("192.168.7.1/32"),)
    assert not c.problems


def test_keys_are_never_kept() -> None:
    c = parse_config(TEXT, "wg7", "/x/wg7.conf", {}, resolver)
    assert PRIVATE not in repr(c)
    assert PSK not in repr(c)


def test_problems_name_lines_never_content() -> None:
    text = (f"[Interface]\nPrivateKey = {PRIVATE}\nFrobnicate = {PRIVATE}\nFwMark = lots\n"
            "[Peer]\nPublicKey = x\nEndpoint = nowhere.invalid:1\n[Wat]\n")
    c = parse_config(text, "wg7", "/x/wg7.conf", {}, resolver)
    assert c.problems == ("line 3: unknown [Interface] key (wg setconf would refuse it)",
                          "line 4: FwMark is not a number or off",
                          "line 8: unknown section (wg setconf would refuse it)",
                          "line 5: peer's Endpoint does not resolve")
    assert all(PRIVATE not in p for p in c.problems)


def test_names_and_paths(tmp_path: Path) -> None:
    assert interface_name(Path("/etc/wireguard/wg0.conf")) == "wg0"
    assert interface_name(Path("/x/this-name-is-too-long.conf")) is None
    assert resolve_config("wg0", tmp_path) == tmp_path / "wg0.conf"
    assert resolve_config("./wg0.conf", tmp_path) == Path("./wg0.conf")
    (tmp_path / "a.conf").write_text("[Interface]\n")
    (tmp_path / "b.netdev").write_text("")
    assert configs_in(tmp_path) == [tmp_path / "a.conf"]
    assert read_config(tmp_path / "a.conf").name == "a"
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path / "missing.conf")
    with pytest.raises(ConfigError, match="valid interface name"):
        read_config(tmp_path / "b.netdev")


def test_table_names(tmp_path: Path) -> None:
    rt = tmp_path / "rt_tables"
    rt.write_text("# comment\n100 vpn\n0x10 hex\n")
    (tmp_path / "rt_tables.d").mkdir()
    (tmp_path / "rt_tables.d" / "x.conf").write_text("200 extra\n")
    names = table_names((rt,))
    assert (names["vpn"], names["hex"], names["extra"], names["main"]) == (100, 16, 200, 254)
