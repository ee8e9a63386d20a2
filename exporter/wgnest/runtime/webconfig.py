"""The exporter-toolkit web config file (--web.config.file), as `promtool check web-config` has it.

wgnest is stricter than promtool where Python's ssl module cannot do what the file asks or
where the file is surely a mistake: TLS10/TLS11, cipher_suites, curve_preferences,
RequestClientCert/RequireAnyClientCert, client verification without client_ca_file, an
unparseable client CA file and malformed bcrypt hashes are rejected rather than ignored.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_GO_ONLY_TLS_VERSIONS = ("TLS10", "TLS11")
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
# The only headers exporter-toolkit lets a config set, with their allowed values (None: any).
HEADER_VALUES: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_BCRYPT = re.compile(r"\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
             "max_version", "prefer_server_cipher_suites", "cipher_suites", "curve_preferences"}


class WebConfigError(Exception):
    """The web config file is unusable. The message is one line naming the file and the key."""


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str | None = None


@dataclass(frozen=True)
class WebConfig:
    source: Path | None = None
    tls: TLSServerConfig | None = None
    # username -> bcrypt hash; empty means no authentication.
    basic_auth_users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Extra response headers (http_server_config.headers).
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class _Loader(yaml.SafeLoader):
    """SafeLoader that, like Go's yaml, refuses a key given twice in one mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: object) -> WebConfigError:
        return WebConfigError(f"{self.path}: {key}: {_one_line(problem)}")

    def section(self, doc: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        for sub in value:
            if sub not in allowed:
                raise self.fail(f"{key}.{sub}", "unknown key")
        return value

    def string(self, section: Mapping[str, Any], name: str, key: str) -> str:
        value = section.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(f"{key}.{name}", "must be a string")
        return value

    def path_of(self, value: str) -> Path:
        return (self.path.parent / value).absolute()  # an absolute value stays as it is

    def tls(self, doc: Mapping[str, Any]) -> TLSServerConfig | None:
        sec = self.section(doc, "tls_server_config", _TLS_KEYS)
        key = "tls_server_config"
        cert, keyf, ca, auth = (self.string(sec, n, key) for n in
                                ("cert_file", "key_file", "client_ca_file", "client_auth_type"))
        versions = {n: self.string(sec, n, key) for n in ("min_version", "max_version")}
        for name, value in versions.items():
            if value in _GO_ONLY_TLS_VERSIONS:
                raise self.fail(f"{key}.{name}", f"{value} is not supported (use TLS12 or TLS13)")
            if value and value not in TLS_VERSIONS:
                raise self.fail(f"{key}.{name}", f"unknown TLS version {value!r}")
        for name in ("cipher_suites", "curve_preferences"):
            if sec.get(name):
                raise self.fail(f"{key}.{name}", "not supported by wgnest; remove it")
        if not isinstance(sec.get("prefer_server_cipher_suites", False), bool):
            raise self.fail(f"{key}.prefer_server_cipher_suites", "must be true or false")
        if not (cert or keyf or ca or auth):
            return None  # as in exporter-toolkit: no TLS at all
        if not cert:
            raise self.fail(f"{key}.cert_file", "missing")
        if not keyf:
            raise self.fail(f"{key}.key_file", "missing")
        auth = auth or "NoClientCert"
        if auth in _UNVERIFIED_CLIENT_AUTH:
            raise self.fail(f"{key}.client_auth_type", f"{auth} is not supported; use "
                            "VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        if auth not in CLIENT_AUTH:
            raise self.fail(f"{key}.client_auth_type", f"unknown value {auth!r}")
        if ca and auth == "NoClientCert":
            raise self.fail(f"{key}.client_ca_file", "set without a client_auth_type")
        if auth != "NoClientCert" and not ca:
            raise self.fail(f"{key}.client_ca_file", f"required by client_auth_type {auth}")
        lo, hi = versions["min_version"] or "TLS12", versions["max_version"] or None
        if hi is not None and TLS_VERSIONS[lo] > TLS_VERSIONS[hi]:
            raise self.fail(f"{key}.min_version", f"{lo} is above max_version {hi}")
        return TLSServerConfig(self.path_of(cert), self.path_of(keyf),
                               self.path_of(ca) if ca else None, auth, lo, hi)

    def users(self, doc: Mapping[str, Any]) -> dict[str, str]:
        raw = doc.get("basic_auth_users")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail("basic_auth_users", "must be a mapping of username to bcrypt hash")
        users: dict[str, str] = {}
        for user, hashed in raw.items():
            if isinstance(user, bool) or not isinstance(user, str | int):
                raise self.fail("basic_auth_users", f"username {user!r} must be a string")
            if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
                # Never echo the value: it may be a plaintext password.
                raise self.fail(f"basic_auth_users.{user}", "not a bcrypt hash (plaintext "
                                "passwords are not accepted; use htpasswd -nBC 10 USER)")
            users[str(user)] = hashed
        return users

    def headers(self, doc: Mapping[str, Any]) -> dict[str, str]:
        sec = self.section(doc, "http_server_config", {"http2", "headers"})
        if not isinstance(sec.get("http2", True), bool):
            raise self.fail("http_server_config.http2", "must be true or false")
        raw = sec.get("headers") or {}
        if not isinstance(raw, dict):
            raise self.fail("http_server_config.headers", "must be a mapping")
        out: dict[str, str] = {}
        for name, value in raw.items():
            key = f"http_server_config.headers.{name}"
            if name not in HEADER_VALUES:
                raise self.fail(key, "this header can not be configured")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise self.fail(key, "must be a string")
            if not (str(value).isascii() and str(value).isprintable()):
                raise self.fail(key, "must be printable ASCII on one line")
            allowed = HEADER_VALUES[name]
            if allowed is not None and str(value) not in allowed:
                raise self.fail(key, f"must be one of {', '.join(allowed)}")
            out[name] = str(value)
        return out


def load_web_config(path: Path) -> WebConfig:
    """Read and check the file, including that the TLS files load. Raises WebConfigError."""
    parser = _Parser(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        raise parser.fail("file", f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = yaml.load(data, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:  # no snippet: the line may hold a secret
        mark = e.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise parser.fail("yaml", f"{e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise parser.fail("yaml", e) from None
    except RecursionError:
        raise parser.fail("yaml", "nested too deeply") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise parser.fail("yaml", "the top level must be a mapping")
    for key in doc:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            raise parser.fail(str(key), "unknown key")
    cfg = WebConfig(path, parser.tls(doc), MappingProxyType(parser.users(doc)),
                    MappingProxyType(parser.headers(doc)))
    build_ssl_context(cfg)  # fail now, naming the key, rather than at the first scrape
    return cfg


def _refuse_encrypted_key() -> bytes:
    raise WebConfigError("encrypted private keys are not supported")


def build_ssl_context(cfg: WebConfig) -> ssl.SSLContext | None:
    """The server context for cfg.tls (None when TLS is off). Raises WebConfigError."""
    tls = cfg.tls
    if tls is None:
        return None
    where = f"{cfg.source}: tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.max_version is not None:
        ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    files = [("cert_file", tls.cert_file), ("key_file", tls.key_file)]
    if tls.client_ca_file is not None:
        files.append(("client_ca_file", tls.client_ca_file))
    for name, file in files:
        try:
            with open(file, "rb") as f:
                f.read(1)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise WebConfigError(f"{where}.{name}: cannot read {file}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
    for name, file in files:
        if name == "key_file":
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=file)
        except (ssl.SSLError, ValueError) as e:
            reason = _one_line(getattr(e, "reason", None) or e)
            raise WebConfigError(f"{where}.{name}: no usable certificate in {file}: {reason}"
                                 ) from None
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_encrypted_key)
    except (ssl.SSLError, OSError, ValueError, WebConfigError) as e:
        reason = _one_line(getattr(e, "reason", None) or e)
        raise WebConfigError(f"{where}.key_file: cannot use {tls.key_file} with "
                             f"{tls.cert_file}: {reason}") from None
    ctx.verify_mode = CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file is not None:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    return ctx
