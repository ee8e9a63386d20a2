"""wg-quick configs read as `wg-quick up` reads them (its parse_options, then `wg setconf`
for the rest): interface name from the file name, [Interface] keys case-insensitive, `#`
starts a comment. Only what routing depends on is kept: PrivateKey and PresharedKey lines
are skipped unread, and no message ever quotes a line (it may hold a key).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from wgnest.model.host import Endpoint, IPNetwork
from wgnest.model.wgquick import ConfigPeer, Hook, IPInterface, WgQuickConfig

# wg-quick: `[[ $CONFIG_FILE =~ (^|/)([a-zA-Z0-9_=+.-]{1,15})\.conf$ ]]`
NAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")
RT_TABLES = (Path("/etc/iproute2/rt_tables"), Path("/usr/share/iproute2/rt_tables"))
BUILTIN_TABLES = {"default": 253, "main": 254, "local": 255, "unspec": 0}
HOOKS = {"preup": "PreUp", "postup": "PostUp", "predown": "PreDown", "postdown": "PostDown"}
SECRET = frozenset({"privatekey", "presharedkey"})
INTERFACE_KEYS = frozenset({"address", "mtu", "dns", "table", "saveconfig", "listenport",
                            "fwmark", *HOOKS, *SECRET})
PEER_KEYS = frozenset({"publickey", "allowedips", "endpoint", "persistentkeepalive", *SECRET})

Resolver = Callable[[str, int], Endpoint | None]


class ConfigError(Exception):
    """The config cannot be linted (missing, unreadable, not a valid interface name)."""


def interface_name(path: Path) -> str | None:
    """The interface wg-quick would create for this file, or None when it would refuse it."""
    if path.suffix != ".conf" or not NAME.fullmatch(path.stem):
        return None
    return path.stem


def resolve_config(arg: str, config_dir: Path) -> Path:
    """`wg0` -> <config_dir>/wg0.conf (as wg-quick does under /etc/wireguard); a path as is."""
    if NAME.fullmatch(arg) and not arg.endswith(".conf"):
        return config_dir / f"{arg}.conf"
    return Path(arg)


def configs_in(config_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in config_dir.iterdir() if p.suffix == ".conf" and p.is_file())
    except OSError as exc:
        raise ConfigError(f"{config_dir}: cannot list: {exc.strerror}") from None


def table_names(files: tuple[Path, ...] = RT_TABLES) -> dict[str, int]:
    """iproute2's table names (rt_tables and rt_tables.d/*.conf), the built-in ones first."""
    names = dict(BUILTIN_TABLES)
    paths: list[Path] = []
    for f in files:
        paths.append(f)
        d = f.with_name("rt_tables.d")
        if d.is_dir():
            paths.extend(sorted(d.glob("*.conf")))
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2:
                number = _number(parts[0])
                if number is not None:
                    names.setdefault(parts[1], number)
    return names


def resolve_endpoint(host: str, port: int) -> Endpoint | None:
    """As wg(8): getaddrinfo(AF_UNSPEC, SOCK_DGRAM, IPPROTO_UDP), the first answer."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM,
                                   socket.IPPROTO_UDP)
    except (OSError, UnicodeError):
        return None
    for family, _type, _proto, _name, addr in infos:
        if family == socket.AF_INET:
            return Endpoint(ipaddress.ip_address(addr[0]), int(addr[1]))
        if family == socket.AF_INET6:
            text = str(addr[0]).split("%", 1)[0]
            scope = int(addr[3]) if len(addr) == 4 else 0
            return Endpoint(ipaddress.ip_address(text), int(addr[1]), scope)
    return None


def predicted_implementation(modules: Path = Path("/sys/module")) -> str:
    """What `wg-quick up` would create: a kernel device when the module is loaded or can be,
    else the userspace fallback it runs (wireguard-go, or $WG_QUICK_USERSPACE_IMPLEMENTATION)."""
    if (modules / "wireguard").exists():
        return "kernel"
    driver = Path("/lib/modules", os.uname().release, "kernel/drivers/net/wireguard")
    if any(driver.glob("wireguard.ko*")):
        return "kernel"
    userspace = os.environ.get("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
    return "userspace" if shutil.which(userspace) else "kernel"


def read_config(path: Path, tables: dict[str, int] | None = None,
                resolve: Resolver = resolve_endpoint) -> WgQuickConfig:
    name = interface_name(path)
    if name is None:
        raise ConfigError(f"{path}: the config file must be a valid interface name, followed "
                          "by .conf (as wg-quick requires)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    return parse_config(text, name, str(path), tables or dict(BUILTIN_TABLES), resolve)


def _number(text: str) -> int | None:
    """A number as wg and ip read it: decimal, or hex with 0x."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def _split(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value) if v]


class _Peer:
    def __init__(self, line: int) -> None:
        self.line = line
        self.key = ""
        self.endpoint = ""
        self.allowed: list[IPNetwork] = []
        self.keepalive = 0


def parse_config(text: str, name: str, path: str, tables: dict[str, int],
                 resolve: Resolver = resolve_endpoint) -> WgQuickConfig:
    addresses: list[IPInterface] = []
    hooks: list[Hook] = []
    dns: list[str] = []
    problems: list[str] = []
    peers: list[_Peer] = []
    mtu = fwmark = port = 0
    table, save = "", False
    section = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.split("#", 1)[0].strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            section = stripped.lower()
            if section == "[peer]":
                peers.append(_Peer(lineno))
            elif section != "[interface]":
                problems.append(f"line {lineno}: unknown section (wg setconf would refuse it)")
            continue
        key, sep, value = stripped.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            problems.append(f"line {lineno}: not `Key = Value` (wg setconf would refuse it)")
            continue
        if key in SECRET:
            continue  # never read
        where = f"line {lineno}"
        if section == "[interface]":
            if key not in INTERFACE_KEYS:
                problems.append(f"{where}: unknown [Interface] key (wg setconf would refuse it)")
            elif key == "address":
                for item in _split(value):
                    parsed = _interface(item)
                    if parsed is None:
                        problems.append(f"{where}: Address is not an IP address")
                    else:
                        addresses.append(parsed)
            elif key == "mtu":
                mtu = _number(value) or 0
                if not mtu:
                    problems.append(f"{where}: MTU is not a number")
            elif key == "dns":
                dns.extend(_split(value))
            elif key == "table":
                table = value
            elif key == "saveconfig":
                save = value.lower() == "true"
            elif key == "listenport":
                port = _number(value) or 0
            elif key == "fwmark":
                mark = 0 if value == "off" else _number(value)
                if mark is None or not 0 <= mark <= 0xFFFFFFFF:
                    problems.append(f"{where}: FwMark is not a number or off")
                fwmark = mark or 0
            else:
                hooks.append(Hook(HOOKS[key], value, lineno))
        elif section == "[peer]" and peers:
            peer = peers[-1]
            if key not in PEER_KEYS:
                problems.append(f"{where}: unknown [Peer] key (wg setconf would refuse it)")
            elif key == "publickey":
                peer.key = value
            elif key == "endpoint":
                peer.endpoint = value
            elif key == "persistentkeepalive":
                peer.keepalive = 0 if value == "off" else (_number(value) or 0)
            elif key == "allowedips":
                for item in _split(value):
                    try:
                        peer.allowed.append(ipaddress.ip_network(item, strict=False))
                    except ValueError:
                        problems.append(f"{where}: AllowedIPs holds something not a prefix")
        else:
            problems.append(f"{where}: key outside a section (wg setconf would refuse it)")
    table_id = 0
    if table not in ("", "auto", "off"):
        number = _number(table)
        table_id = number if number is not None else tables.get(table, 0)
    return WgQuickConfig(
        name=name, path=path, addresses=tuple(addresses), mtu=mtu, table=table,
        table_id=table_id, fwmark=fwmark, listen_port=port, hooks=tuple(hooks),
        dns=tuple(dns), save_config=save,
        peers=_peers(peers, resolve, problems), problems=tuple(problems))


def _interface(item: str) -> IPInterface | None:
    addr, _, plen = item.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    length = _number(plen) if plen else ip.max_prefixlen
    if length is None or not 0 <= length <= ip.max_prefixlen:
        return None
    return str(ip), length


def _endpoint(text: str, resolve: Resolver) -> Endpoint | None:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    number = _number(port) if sep else None
    if not host or number is None:
        return None
    scope = ""
    if "%" in host:
        host, _, scope = host.partition("%")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return resolve(host, number)
    if scope and address.version == 6:
        index = _number(scope)
        if index is None:
            try:
                index = socket.if_nametoindex(scope)
            except OSError:
                return None
        return Endpoint(address, number, index)
    return Endpoint(address, number)


def _peers(peers: list[_Peer], resolve: Resolver, problems: list[str]
           ) -> tuple[ConfigPeer, ...]:
    out: list[ConfigPeer] = []
    taken: dict[IPNetwork, int] = {}  # an allowed IP given twice belongs to the last peer
    for i, peer in enumerate(peers):
        for net in peer.allowed:
            taken[net] = i
    for i, peer in enumerate(peers):
        if not peer.key:
            problems.append(f"line {peer.line}: [Peer] without PublicKey")
            continue
        endpoint = _endpoint(peer.endpoint, resolve) if peer.endpoint else None
        if peer.endpoint and endpoint is None:
            problems.append(f"line {peer.line}: peer's Endpoint does not resolve")
        allowed = tuple(dict.fromkeys(n for n in peer.allowed if taken[n] == i))
        out.append(ConfigPeer(peer.key, endpoint, peer.endpoint, allowed, peer.keepalive))
    return tuple(out)
