"""Friendly peer names, read from the files other WireGuard tools already write.

Sources, later ones overriding earlier ones:
1. `<config_dir>/*.conf` (wg-quick): a `# friendly_name = NAME` comment inside a `[Peer]` section,
   the MindFlavor exporter's convention (wg-portal writes it). Failing that, the comment block right
   before `[Peer]` that wg-easy (`# Client: NAME (id)`) and wireguard-ui (`# Name: NAME`) write.
2. `*.netdev` (systemd-networkd) in config_dir and netdev_dirs: the same, in `[WireGuardPeer]`.
3. mdlayher/wireguard_exporter's TOML file: `[[peer]]` tables with `public_key` and `name`.

These files hold private and preshared keys: only public keys and names are kept, and no warning
or error ever quotes a line of input.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

from wgnest.sources.files import FileInputError, read_config_bytes

DEFAULT_DIRS = frozenset({Path("/etc/wireguard"), Path("/etc/systemd/network")})
_PEER_SECTIONS = frozenset({"peer", "wireguardpeer"})
_FRIENDLY = re.compile(r"#\s*friendly_name\s*=(.*)", re.IGNORECASE)
_FRIENDLY_JSON = re.compile(r"#\s*friendly_json\s*=(.*)", re.IGNORECASE)  # MindFlavor's
_BEFORE = re.compile(r"#\s*(Client|Name):(.*)")  # wg-easy / wireguard-ui, before [Peer]
_ID_SUFFIX = re.compile(r"\s\([^()]*\)$")  # wg-easy's " (client id)"
_FIELD = re.compile(r"\s*[A-Za-z][\w-]*\s*")


class PeerNamesError(Exception):
    """The peer names file given on the command line cannot be used. One line, names the file."""


def _show(text: str) -> str:
    """A path safe to put on one log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _valid_key(key: str) -> bool:
    """44 characters of canonical base64 for 32 bytes, as the kernel reports keys."""
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        return False
    return len(key) == 44 and len(raw) == 32 and base64.b64encode(raw).decode() == key


def _json_name(text: str) -> str:
    """The name in MindFlavor's `# friendly_json = {...}` tag: its `friendly_name` or `name`
    string; "" when the JSON is not an object or has neither."""
    import json  # (here: serve with no tags to read never loads it)
    try:
        doc = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    for key in ("friendly_name", "name"):
        if isinstance(doc.get(key), str) and doc[key].strip():
            return str(doc[key]).strip()
    return ""


def parse_peer_names_flag(spec: str) -> dict[str, str]:
    """mdlayher's --wireguard.peer-names: "keyA:foo,keyB:bar" -> {key: name}. Raises
    PeerNamesError naming the bad entry (keys are shown, they are public)."""
    names: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        key, sep, name = entry.partition(":")
        if not sep or not _valid_key(key.strip()) or not name.strip():
            raise PeerNamesError(f"--wireguard.peer-names: {_show(entry)!r} is not "
                                 "PUBLIC_KEY:NAME")
        names[key.strip()] = name.strip()
    return names


def parse_wg_config(text: str, source: str) -> tuple[dict[str, str], list[str]]:
    """Names from one wg-quick or .netdev file: ({public_key: name}, warnings).

    A line that is not blank, a comment, a [Section] or Key=Value makes the whole file skipped.
    """
    where = _show(source)
    names: dict[str, str] = {}
    warnings: list[str] = []
    in_peer, continued, start, name, before, pending = False, False, 0, "", "", ""
    key_: str | None = None  # None: no PublicKey yet; "": an invalid one
    lines = text.split("\n")  # as wg reads it; line numbers as editors count them
    for lineno, raw in enumerate([*lines, "[]"], 1):  # the "[]" sentinel closes the last section
        line = raw.strip()
        if continued and lineno <= len(lines):  # systemd's backslash line continuation
            continued = line.endswith("\\")
            continue
        if not line or line[0] in "#;":
            if m := _FRIENDLY.fullmatch(line):
                name = m[1].strip()
            elif m := _FRIENDLY_JSON.fullmatch(line):
                name = _json_name(m[1]) or name
            elif m := _BEFORE.fullmatch(line):
                pending = m[2].strip() if m[1] == "Name" else _ID_SUFFIX.sub("", m[2].strip())
            elif not line:
                pending = ""
            continue
        content = line.split("#", 1)[0].strip()  # wg-quick allows trailing comments
        if content.startswith("["):
            if not content.endswith("]"):
                return {}, [f"{where}:{lineno}: malformed [Section] line; file skipped"]
            label = name or before
            if in_peer and key_ and label:
                names[key_] = label
            elif in_peer and key_ is None and label:
                warnings.append(f"{where}:{start}: peer section has a name but no PublicKey")
            in_peer = content[1:-1].strip().lower() in _PEER_SECTIONS
            start, key_, name, before, pending = lineno, None, "", pending if in_peer else "", ""
            continue
        pending = ""
        field, sep, value = content.partition("=")
        if not sep or not _FIELD.fullmatch(field):
            return {}, [f"{where}:{lineno}: not 'Key = Value', [Section] or comment; file skipped"]
        if in_peer and field.strip().lower() == "publickey":
            key_ = value.strip() if _valid_key(value.strip()) else ""
            if not key_:
                warnings.append(f"{where}:{lineno}: PublicKey is not base64 of 32 bytes; ignored")
        continued = line.endswith("\\")
    return names, warnings


def _list_dir(directory: Path, warnings: list[str]) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix in (".conf", ".netdev"))
    except FileNotFoundError:
        if directory not in DEFAULT_DIRS:
            warnings.append(f"{_show(str(directory))}: directory not found")
    except OSError as e:
        warnings.append(f"{_show(str(directory))}: cannot list directory: {e.strerror}")
    return []


def _read_config(path: Path, names: dict[str, str], warnings: list[str]) -> None:
    where = _show(str(path))
    try:
        data = read_config_bytes(path)
    except FileInputError as e:  # one file among many: a warning, and the others are read
        warnings.append(str(e))
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        warnings.append(f"{where}:{lineno}: not valid UTF-8; file skipped")
        return
    found, warns = parse_wg_config(text, str(path))
    names.update(found)
    warnings.extend(warns)


def _read_peer_file(path: Path, names: dict[str, str], warnings: list[str]) -> None:
    import tomllib  # (here: only a peer names file loads it, 0.25 MiB)
    where = _show(str(path))
    try:
        data = tomllib.loads(read_config_bytes(path).decode("utf-8"))
    except FileInputError as e:
        raise PeerNamesError(f"peer names file {e}") from None
    except UnicodeDecodeError:
        raise PeerNamesError(f"{where}: cannot read peer names file: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as e:  # its message may quote input: report position only
        m = re.search(r"at line (\d+), column (\d+)", str(e))
        at = f":{m[1]}: invalid TOML at column {m[2]}" if m else ": invalid TOML at end of file"
        raise PeerNamesError(where + at) from None
    peers = data.get("peer", [])
    if not isinstance(peers, list):
        raise PeerNamesError(f"{where}: 'peer' must be an array of tables ([[peer]])")
    for i, peer in enumerate(peers, 1):
        entry = peer if isinstance(peer, dict) else {}
        key, name = entry.get("public_key"), entry.get("name")
        if not isinstance(key, str) or not isinstance(name, str):
            raise PeerNamesError(f"{where}: [[peer]] #{i} needs string public_key and name")
        if not _valid_key(key.strip()):
            warnings.append(f"{where}: [[peer]] #{i}: public_key is not a WireGuard key; ignored")
        elif name.strip():
            names[key.strip()] = name.strip()


def load_peer_names(
    config_dir: Path | None = Path("/etc/wireguard"),
    peer_file: Path | None = None,
    netdev_dirs: Sequence[Path] = (Path("/etc/systemd/network"),),
    names_flag: str = "",
) -> tuple[dict[str, str], list[str]]:
    """({public_key: name}, warnings). Raises PeerNamesError only for a bad peer_file or
    --wireguard.peer-names. Later sources win: configs, .netdev files, the flag, the file
    (mdlayher's order: the TOML file takes priority over the flag)."""
    names: dict[str, str] = {}
    warnings: list[str] = []
    dirs = list(dict.fromkeys([*([config_dir] if config_dir is not None else []), *netdev_dirs]))
    listing = {d: _list_dir(d, warnings) for d in dirs}
    confs = [p for p in listing[config_dir] if p.suffix == ".conf"] if config_dir else []
    netdevs = [p for d in dirs for p in listing[d] if p.suffix == ".netdev"]
    for path in [*confs, *netdevs]:
        _read_config(path, names, warnings)
    names.update(parse_peer_names_flag(names_flag))
    if peer_file is not None:
        _read_peer_file(peer_file, names, warnings)
    return names, warnings
