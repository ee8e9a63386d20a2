"""Friendly peer names from wg-quick, networkd and TOML files (wgnest.sources.peer_names)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from wgnest.sources import peer_names
from wgnest.sources.peer_names import PeerNamesError, load_peer_names, parse_wg_config


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


A, B, C, D = key(1), key(2), key(3), key(4)
# Valid, distinctive keys; outputs are searched for their first 40 characters (partial echoes).
PRIVATE = base64.b64encode(b"private key: 0123456789abcdefghi").decode()
PSK = base64.b64encode(b"preshared key: 0123456789abcdefg").decode()
SECRETS = (PRIVATE[:40], PSK[:40])


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# wg-portal's template (internal/app/configfile/tpl_files/wg_interface.tpl), abridged:
# friendly_name first in the [Peer] section, and the peer's private key in a comment.
WG_PORTAL = f"""\
# -WGP- WIREGUARD PORTAL CONFIGURATION FILE
[Interface]
# -WGP- Display name: server
# friendly_name = not a peer
PrivateKey = {PRIVATE}
Address = 10.0.0.1/24
ListenPort = 51820
PostUp = iptables -A FORWARD -i %i -j ACCEPT # comment

[Peer]
# friendly_name = Alice's phone
# -WGP- Peer: abc
# -WGP- PrivateKey: {PRIVATE}
PublicKey = {A}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32

[Peer]
PublicKey = {B}
AllowedIPs = 10.0.0.3/32
#friendly_name=Bob laptop

[Peer]
PublicKey = {C}
AllowedIPs = 10.0.0.4/32
"""

# wg-easy writes "# Client: NAME (id)" right before [Peer], wireguard-ui a "# Name:" block.
WG_EASY = f"""\
[Interface]
PrivateKey = {PRIVATE}
Address = 10.8.0.1/24

# Client: Alice (2b9a1e4c-1111-4f4f-8d8d-123456789abc)
[Peer]
PublicKey = {A}
PresharedKey = {PSK}
AllowedIPs = 10.8.0.2/32

# Client: Bob (work) (7)
[Peer]
PublicKey = {B}
AllowedIPs = 10.8.0.3/32
"""

WIREGUARD_UI = f"""\
[Interface]
PrivateKey = {PRIVATE}

# ID:           cl9a
# Name:         Carol
# Email:        carol@example.com
[Peer]
PublicKey = {C}
"""


def test_wg_portal_style_file_with_several_peers() -> None:
    names, warnings = parse_wg_config(WG_PORTAL, "/etc/wireguard/wg0.conf")
    assert names == {A: "Alice's phone", B: "Bob laptop"}
    assert warnings == []


def test_wg_easy_and_wireguard_ui_comment_before_peer() -> None:
    assert parse_wg_config(WG_EASY, "wg0.conf") == ({A: "Alice", B: "Bob (work)"}, [])
    assert parse_wg_config(WIREGUARD_UI, "wg0.conf") == ({C: "Carol"}, [])


def test_friendly_name_in_section_beats_comment_before_it() -> None:
    text = f"# Client: old\n[Peer]\n# friendly_name = new\nPublicKey = {A}\n"
    assert parse_wg_config(text, "x")[0] == {A: "new"}


def test_comment_before_peer_must_be_adjacent() -> None:
    text = f"# Client: stray\n\n[Peer]\nPublicKey = {A}\n"
    assert parse_wg_config(text, "x")[0] == {}
    text = f"# Name: stray\nListenPort = 1\n[Peer]\nPublicKey = {A}\n"
    assert parse_wg_config(text, "x")[0] == {}


@pytest.mark.parametrize(
    "section",
    [
        f"[Peer]\n# friendly_name = N\nPublicKey = {A}\n",
        f"[Peer]\nPublicKey = {A}\n# friendly_name = N\n",
        f"[peer]\npublickey={A} # trailing comment\n  #   FRIENDLY_NAME   =   N  \n",
        f"[Peer]\nAllowedIPs = 10.0.0.2/32\n# friendly_name =N\nEndpoint = h:1\nPublicKey = {A}",
    ],
)
def test_comment_before_or_after_public_key(section: str) -> None:
    text = f"[Interface]\nPrivateKey = {PRIVATE}\n\n{section}\n[Peer]\nPublicKey = {B}\n"
    assert parse_wg_config(text, "x") == ({A: "N"}, [])


def test_interface_friendly_name_is_ignored() -> None:
    text = (
        f"[Interface]\n# friendly_name = server\nPrivateKey = {PRIVATE}\n[Peer]\nPublicKey = {A}\n"
    )
    assert parse_wg_config(text, "x") == ({}, [])


def test_empty_name_ignored_and_name_without_key_warned() -> None:
    text = f"[Peer]\n# friendly_name =   \nPublicKey = {A}\n\n[Peer]\n# friendly_name = lost\n"
    names, warnings = parse_wg_config(text, "wg0.conf")
    assert names == {}
    assert warnings == ["wg0.conf:5: peer section has a name but no PublicKey"]


def test_names_with_quotes_backslash_emoji_preserved() -> None:
    odd = ['say "hi"', "back\\slash\\", "emoji 🙂🇫🇷", "'single' \\\"both\\\"", "ünï # cödé"]
    text = "".join(
        f"[Peer]\n# friendly_name = {n}\nPublicKey = {key(i)}\n" for i, n in enumerate(odd)
    )
    assert parse_wg_config(text, "x") == ({key(i): n for i, n in enumerate(odd)}, [])


NETDEV = f"""\
[NetDev]
Name=wg1
Kind=wireguard
Description=office \\
  tunnel

[WireGuard]
PrivateKey={PRIVATE}
ListenPort=51820

[WireGuardPeer]
# friendly_name = Dave
PublicKey={D}
PresharedKey={PSK}
AllowedIPs=10.1.0.2/32

[WireGuardPeer]
PublicKey={A}
# friendly_name = Alice via networkd
"""


def test_netdev_file(tmp_path: Path) -> None:
    (tmp_path / "30-wg1.netdev").write_text(NETDEV)
    (tmp_path / "30-wg1.network").write_text("[Match]\nName=wg1\n")
    names, warnings = load_peer_names(None, netdev_dirs=[tmp_path])
    assert names == {D: "Dave", A: "Alice via networkd"}
    assert warnings == []


def test_toml_peer_file(tmp_path: Path) -> None:
    peers = tmp_path / "peers.toml"
    peers.write_text(
        f'[[peer]]\npublic_key = "{A}"\nname = "foo"\n\n'
        f'[[peer]]\npublic_key = "{B}"\nname = \'b\\"ar 🙂\'\n\n'
        f'[[peer]]\npublic_key = "{C}"\nname = " "\n'
    )
    names, warnings = load_peer_names(None, peer_file=peers, netdev_dirs=())
    assert names == {A: "foo", B: 'b\\"ar 🙂'}
    assert warnings == []


def test_override_order_configs_then_netdev_then_peer_file(tmp_path: Path) -> None:
    wg, nd = tmp_path / "wireguard", tmp_path / "network"
    wg.mkdir()
    nd.mkdir()
    conf = "".join(f"[Peer]\n# friendly_name = conf\nPublicKey = {k}\n" for k in (A, B, C))
    (wg / "wg0.conf").write_text(conf)
    (wg / "wg9.netdev").write_text(f"[WireGuardPeer]\n# friendly_name = netdev\nPublicKey={B}\n")
    (nd / "wg1.netdev").write_text(f"[WireGuardPeer]\n# friendly_name = netdev\nPublicKey={C}\n")
    peers = tmp_path / "peers.toml"
    peers.write_text(f'[[peer]]\npublic_key = "{C}"\nname = "toml"\n')
    names, warnings = load_peer_names(wg, peer_file=peers, netdev_dirs=[nd])
    assert names == {A: "conf", B: "netdev", C: "toml"}
    assert warnings == []


def test_netdev_files_in_config_dir_are_read_once(tmp_path: Path) -> None:
    (tmp_path / "wg1.netdev").write_text(f"[WireGuardPeer]\n# friendly_name = x\nPublicKey={A}\n")
    (tmp_path / "bad.netdev").write_text("garbage\n")
    names, warnings = load_peer_names(tmp_path, netdev_dirs=[tmp_path])
    assert names == {A: "x"}
    assert warnings == [
        f"{tmp_path / 'bad.netdev'}:1: not 'Key = Value', [Section] or comment; file skipped"
    ]


@pytest.mark.parametrize(
    "bad",
    [
        A[:-2] + "=",  # too short
        A + "A",  # too long
        "!" * 43 + "=",  # not base64
        base64.b64encode(b"\x01" * 33).decode()[:44],  # right length, wrong padding
        A[:42] + "B=",  # 32 bytes but not canonical (stray low bits)
        "ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄ=",  # not ASCII
        "",
    ],
)
def test_bad_public_keys_ignored_with_file_and_line(bad: str) -> None:
    text = f"[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\n# friendly_name = x\nPublicKey = {bad}\n"
    names, warnings = parse_wg_config(text, "/etc/wireguard/wg0.conf")
    assert names == {}
    assert warnings == ["/etc/wireguard/wg0.conf:5: PublicKey is not base64 of 32 bytes; ignored"]


def test_bad_public_key_in_toml_warned(tmp_path: Path) -> None:
    peers = tmp_path / "p.toml"
    peers.write_text(
        f'[[peer]]\npublic_key = "nope"\nname = "x"\n[[peer]]\npublic_key = "{A}"\nname = "a"\n'
    )
    names, warnings = load_peer_names(None, peer_file=peers, netdev_dirs=())
    assert names == {A: "a"}
    assert len(warnings) == 1
    assert str(peers) in warnings[0]
    assert "#1" in warnings[0]


@pytest.mark.parametrize(
    "content",
    [
        f'[[peer]]\npublic_key = "{A}"\nname = "unterminated\n',
        "[[peer]\n",
        f"[Interface]\nPrivateKey = {PRIVATE}\n",  # --peer-file pointed at wg0.conf by mistake
        f'PrivateKey = "{PRIVATE}"\nPrivateKey = "{PRIVATE}"\n',
        f'peer = "{PRIVATE}"\n',
        f'[[peer]]\npublic_key = "{A}"\n',
        f"[[peer]]\npublic_key = {PRIVATE}\n",
        f'peer = {{"{PRIVATE}" = 1, "{PRIVATE}" = 2}}\n',  # tomllib's message quotes this key
    ],
)
def test_malformed_toml_raises_naming_file_without_secrets(tmp_path: Path, content: str) -> None:
    peers = tmp_path / "peers.toml"
    peers.write_text(content)
    with pytest.raises(PeerNamesError) as info:
        load_peer_names(None, peer_file=peers, netdev_dirs=())
    message = str(info.value)
    assert str(peers) in message
    assert "\n" not in message
    no_secrets(message, "".join(traceback.format_exception(info.value)))


def test_missing_peer_file_raises(tmp_path: Path) -> None:
    with pytest.raises(PeerNamesError, match=r"nope\.toml: cannot read"):
        load_peer_names(None, peer_file=tmp_path / "nope.toml", netdev_dirs=())


def test_malformed_config_skipped_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text(
        f"[Peer]\n# friendly_name = a\nPublicKey = {A}\nPresharedKey {PSK}\n"
    )
    (tmp_path / "b.conf").write_text(f"[Peer\n# friendly_name = b\nPublicKey = {B}\n")
    (tmp_path / "c.conf").write_bytes(
        f"[Peer]\nPublicKey = {C}\n# friendly_name = \xff\n".encode("latin-1")
    )
    (tmp_path / "d.conf").write_text(f"[Peer]\n# friendly_name = d\nPublicKey = {D}\n")
    names, warnings = load_peer_names(tmp_path, netdev_dirs=())
    assert names == {D: "d"}
    assert warnings == [
        f"{tmp_path / 'a.conf'}:4: not 'Key = Value', [Section] or comment; file skipped",
        f"{tmp_path / 'b.conf'}:1: malformed [Section] line; file skipped",
        f"{tmp_path / 'c.conf'}:3: not valid UTF-8; file skipped",
    ]


def test_missing_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names, warnings = load_peer_names(tmp_path / "nope", netdev_dirs=[tmp_path / "nope2"])
    assert names == {}
    assert warnings == [
        f"{tmp_path / 'nope'}: directory not found",
        f"{tmp_path / 'nope2'}: directory not found",
    ]
    monkeypatch.setattr(
        peer_names, "DEFAULT_DIRS", frozenset({tmp_path / "nope", tmp_path / "nope2"})
    )
    assert load_peer_names(tmp_path / "nope", netdev_dirs=[tmp_path / "nope2"]) == ({}, [])


def test_warnings_are_one_line() -> None:
    assert parse_wg_config("garbage", "we\nird\r.conf") == (
        {},
        ["we\\nird\\r.conf:1: not 'Key = Value', [Section] or comment; file skipped"],
    )


def _load_without_dac_override(config_dir: Path, netdev: Path) -> tuple[dict[str, str], list[str]]:
    code = ("import json, sys; from pathlib import Path; from wgnest.sources.peer_names import "
            "load_peer_names as f; print(json.dumps(f(Path(sys.argv[1]), "
            "netdev_dirs=[Path(sys.argv[2])])))")
    res = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code,
         str(config_dir), str(netdev)], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "exporter")})
    names, warnings = json.loads(res.stdout)
    return names, warnings


def test_unreadable_dir_and_file_warn(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "wg0.conf").write_text(f"[Interface]\nPrivateKey = {PRIVATE}\n")
    (tmp_path / "wg0.conf").chmod(0)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root: run it again without the DAC override caps
            names, warnings = _load_without_dac_override(tmp_path, locked)
        else:
            names, warnings = load_peer_names(tmp_path, netdev_dirs=[locked])
    finally:
        locked.chmod(0o700)
    assert names == {}
    assert warnings == [
        f"{locked}: cannot list directory: Permission denied",
        f"{tmp_path / 'wg0.conf'}: cannot read: Permission denied",
    ]


def test_secrets_never_in_warnings(tmp_path: Path) -> None:
    files = {
        "portal.conf": WG_PORTAL,
        "malformed.conf": f"[Interface]\nPrivateKey {PRIVATE}\n",
        "malformed2.conf": f"[Peer]\nPresharedKey: {PSK}\n",
        "header.conf": f"[Interface {PRIVATE}\n",
        "swapped.conf": f"[Peer]\n# friendly_name = x\nPublicKey={PRIVATE}x\nPresharedKey={PSK}\n",
        "noname.conf": f"[Peer]\n# friendly_name = x\nPresharedKey = {PSK}\n",
        "wg.netdev": NETDEV.replace("PublicKey=" + D, "PublicKey=" + PSK[1:]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.conf").write_bytes(f"PrivateKey = {PRIVATE}\n\xe9\n".encode("latin-1"))
    names, warnings = load_peer_names(tmp_path, netdev_dirs=[tmp_path, tmp_path / "missing"])
    assert len(warnings) == 8
    no_secrets(*warnings, *names, *names.values())


_LINES = st.one_of(
    st.text(),
    st.sampled_from(
        ["[Peer]", "[Interface]", "[WireGuardPeer]", "[NetDev]", "[", "", "x \\", "# Name: n"]
    ),
    st.text().map(lambda s: f"# friendly_name = {s}"),
    st.text().map(lambda s: f"# Client: {s} (id)"),
    st.integers(0, 255).map(lambda n: f"PublicKey = {key(n)}"),
    st.text().map(lambda s: f"PublicKey = {s}"),
)


@settings(max_examples=300)
@given(
    lines=st.lists(_LINES, max_size=20),
    secret=st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode()),
    data=st.data(),
)
def test_parse_never_raises_nor_echoes_private_key(
    lines: list[str], secret: str, data: st.DataObject
) -> None:
    assume(not any(secret in line for line in lines))
    for template in (
        "PrivateKey = {}",
        "PresharedKey={}",
        "# -WGP- PrivateKey: {}",
        "PublicKey = {}x",
    ):
        lines.insert(data.draw(st.integers(0, len(lines))), template.format(secret))
    names, warnings = parse_wg_config("\n".join(lines), "f.conf")
    for text in [*names, *names.values(), *warnings]:
        assert secret not in text
    assert all(k and v and v == v.strip() for k, v in names.items())


class _OneName(Collector):
    def __init__(self, name: str) -> None:
        self.name = name

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("wireguard_peer_info", "x", labels=["name"])
        family.add_metric([self.name], 1)
        yield family


def _round_trip(name: str) -> str:
    registry = CollectorRegistry()
    registry.register(_OneName(name))
    (family,) = text_string_to_metric_families(generate_latest(registry).decode())
    (sample,) = family.samples
    return sample.labels["name"]


@pytest.mark.parametrize(
    "name", ['say "hi"', "back\\slash", "new\nline", "emoji 🙂🇫🇷", '\\"\\n\n"', "trailing\\"]
)
def test_names_round_trip_through_exposition(name: str) -> None:
    assert _round_trip(name) == name


def test_parsed_names_round_trip_through_exposition() -> None:
    text = f'[Peer]\n# friendly_name = Ann "the \\ admin" 🙂\nPublicKey = {A}\n'
    (name,) = parse_wg_config(text, "x")[0].values()
    assert name == 'Ann "the \\ admin" 🙂'
    assert _round_trip(name) == name


@given(st.text(st.characters(blacklist_categories=["Cs"])))
def test_any_name_round_trips_through_exposition(name: str) -> None:
    assert _round_trip(name) == name


def test_mdlayher_peer_names_flag_and_priority(tmp_path: Path) -> None:
    from wgnest.sources.peer_names import parse_peer_names_flag

    a, b = "A" * 43 + "=", "B" * 42 + "A="
    assert parse_peer_names_flag(f"{a}:foo, {b}:bar baz") == {a: "foo", b: "bar baz"}
    for bad in ("nokey", f"{a}:", "short:foo"):
        with pytest.raises(peer_names.PeerNamesError, match=r"--wireguard\.peer-names"):
            parse_peer_names_flag(bad)
    toml = tmp_path / "peers.toml"
    toml.write_text(f'[[peer]]\npublic_key = "{a}"\nname = "from file"\n')
    names, _ = peer_names.load_peer_names(tmp_path, toml, (), names_flag=f"{a}:flag,{b}:bar")
    assert names == {a: "from file", b: "bar"}  # the file takes priority, as mdlayher's


def test_mindflavor_friendly_json_names_a_peer() -> None:
    a, b = "A" * 43 + "=", "B" * 42 + "A="
    text = (f'[Interface]\n[Peer]\n# friendly_json = {{"friendly_name": "laptop", "x": 1}}\n'
            f"PublicKey = {a}\n[Peer]\n# friendly_json = not json\nPublicKey = {b}\n")
    names, _ = peer_names.parse_wg_config(text, "wg0.conf")
    assert names == {a: "laptop"}
