"""The exporter-toolkit web config file (--web.config.file), as `promtool check web-config` has it.

wgnest is stricter than promtool where Python's ssl module cannot do what the file asks or
where the file is surely a mistake: TLS10/TLS11, cipher_suites, curve_preferences,
RequestClientCert/RequireAnyClientCert, client verification without client_ca_file, an
unparseable client CA file, an empty username, more than MAX_USERS users, and bcrypt hashes
that could never verify (malformed, not canonically encoded, or the $2$/$2x$ variants) are
rejected rather than ignored.

Every file (the config, the TLS files) is opened with O_NONBLOCK, so a FIFO cannot block
start-up, and read only if fstat says it is a regular file of at most MAX_CONFIG_BYTES /
MAX_TLS_FILE_BYTES: a FIFO, /dev/zero or a huge file is a one-line WebConfigError at once.
Mapping keys are taken as written (`010:` is the user "010", not 8), as Go's YAML reader
does for the string keys exporter-toolkit declares.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB; exporter-toolkit's example files are a few hundred bytes
MAX_TLS_FILE_BYTES = 4 << 20  # a certificate chain, a key or a CA bundle
MAX_USERS = 1000

# (names only: the ssl module, and OpenSSL with it, is loaded only when TLS is configured)
TLS_VERSIONS = ("TLS12", "TLS13")  # oldest first
_GO_ONLY_TLS_VERSIONS = ("TLS10", "TLS11")
CLIENT_AUTH = ("NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
# The only headers exporter-toolkit lets a config set, with their allowed values (None: any).
HEADER_VALUES: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
# bcrypt's base64 alphabet; $2<variant>$<cost>$<22 chars of salt><31 chars of digest>.
_B64 = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT = re.compile(r"\$2([a-z]?)\$(\d\d)\$([./A-Za-z0-9]{22})([./A-Za-z0-9]{31})")
BCRYPT_VARIANTS = ("a", "b", "y")  # what the bcrypt module verifies, as Go's bcrypt does
_HASH_ADVICE = "use htpasswd -nBC 10 USER"
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
             "max_version", "prefer_server_cipher_suites", "cipher_suites", "curve_preferences"}
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with every unprintable character (newlines, ANSI escapes, bidi overrides, lone
    surrogates of undecodable file names) escaped as repr() would, everything else kept."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class WebConfigError(Exception):
    """The web config file is unusable. The message is one line naming the file and the key,
    with control characters escaped (it may quote names and values from the file)."""

    def __init__(self, message: str) -> None:
        super().__init__(escape_controls(str(message)))


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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Unreadable(Exception):
    """A file we will not read; the message says why, in a few words."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def _open_regular(path: Path, limit: int) -> int:
    """An fd of `path` if it is a regular file of at most `limit` bytes. O_NONBLOCK: opening a
    FIFO returns at once (then fstat refuses it) instead of waiting for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise _Unreadable(getattr(e, "strerror", None) or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special")
            raise _Unreadable(f"not a regular file ({kind})")
        if st.st_size > limit:
            raise _Unreadable(f"larger than {_size_text(limit)} ({st.st_size} bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Raises _Unreadable."""
    fd = _open_regular(path, limit)
    try:
        chunks, total = [], 0
        while total <= limit:  # the size may change under us: never read past limit + 1
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            except OSError as e:
                raise _Unreadable(e.strerror or str(e)) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _Unreadable(f"larger than {_size_text(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _checked_name(path: Path, limit: int) -> Iterator[str]:
    """A name OpenSSL can open that is surely the regular file we checked: /proc/self/fd/N of
    our own fd while it is open (the path itself where /proc is not mounted)."""
    fd = _open_regular(path, limit)
    try:
        proc = f"/proc/self/fd/{fd}"
        yield proc if os.path.exists(proc) else str(path)
    finally:
        os.close(fd)


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
        if hi is not None and TLS_VERSIONS.index(lo) > TLS_VERSIONS.index(hi):
            raise self.fail(f"{key}.min_version", f"{lo} is above max_version {hi}")
        return TLSServerConfig(self.path_of(cert), self.path_of(keyf),
                               self.path_of(ca) if ca else None, auth, lo, hi)

    def users(self, doc: Mapping[str, Any]) -> dict[str, str]:
        raw = doc.get("basic_auth_users")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail("basic_auth_users", "must be a mapping of username to bcrypt hash")
        if len(raw) > MAX_USERS:
            raise self.fail("basic_auth_users", f"{len(raw)} users; at most {MAX_USERS} "
                            "are supported")
        users: dict[str, str] = {}
        for user, hashed in raw.items():  # keys are strings as written (see web_yaml)
            if not user:
                raise self.fail("basic_auth_users", "a username is empty")
            # Never echo the value: it may be a plaintext password.
            problem = bcrypt_problem(hashed)
            if problem is not None:
                raise self.fail(f"basic_auth_users.{user}", problem)
            users[user] = hashed
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


def bcrypt_problem(hashed: object) -> str | None:
    """Why `hashed` is not a bcrypt hash that can verify here (None: it is one). Never quotes
    the value, which may be a plaintext password; cost and variant are safe to name."""
    m = _BCRYPT.fullmatch(hashed) if isinstance(hashed, str) else None
    if m is None:
        return f"not a bcrypt hash (plaintext passwords are not accepted; {_HASH_ADVICE})"
    variant, cost, salt, digest = m.groups()
    if variant not in BCRYPT_VARIANTS:
        return (f"bcrypt variant $2{variant}$ is not supported (only $2a$, $2b$ and $2y$ "
                f"verify here); hash the password again: {_HASH_ADVICE}")
    if not 4 <= int(cost) <= 31:
        return f"bcrypt cost {cost} is outside 4..31"
    # 22 characters hold the 16-byte salt with 4 bits to spare, 31 the 23-byte digest with 2:
    # spare bits that are set make bcrypt refuse the salt or never match the digest.
    if _B64.index(salt[-1]) % 16 or _B64.index(digest[-1]) % 4:
        return f"not a bcrypt hash (its salt or digest is not validly encoded; {_HASH_ADVICE})"
    return None


def load_web_config(path: Path) -> WebConfig:
    """Read and check the file, including that the TLS files load. Raises WebConfigError."""
    parser = _Parser(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except _Unreadable as e:
        raise parser.fail("file", f"cannot read: {e}") from None
    from wgnest.runtime.web_yaml import YamlProblem, load_yaml  # (PyYAML: only when asked)

    try:
        doc = load_yaml(data)
    except YamlProblem as e:
        raise parser.fail("yaml", e) from None
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
    """The server context for cfg.tls (None when TLS is off). Raises WebConfigError.

    Each file is opened and checked (regular, at most MAX_TLS_FILE_BYTES) before OpenSSL
    reads it through our own fd, so a FIFO or /dev/zero can neither hang nor balloon it."""
    tls = cfg.tls
    if tls is None:
        return None
    import ssl

    versions = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
    where = f"{cfg.source}: tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = versions[tls.min_version]
    if tls.max_version is not None:
        ctx.maximum_version = versions[tls.max_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    files = [("cert_file", tls.cert_file), ("key_file", tls.key_file)]
    if tls.client_ca_file is not None:
        files.append(("client_ca_file", tls.client_ca_file))
    with contextlib.ExitStack() as opened:
        names: dict[str, str] = {}
        for name, file in files:
            try:
                names[name] = opened.enter_context(_checked_name(file, MAX_TLS_FILE_BYTES))
            except _Unreadable as e:
                raise WebConfigError(f"{where}.{name}: cannot read {file}: {e}") from None
        for name, file in files:
            if name == "key_file":
                continue
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=names[name])
            except (ssl.SSLError, OSError, ValueError) as e:
                reason = _one_line(getattr(e, "reason", None) or e)
                raise WebConfigError(f"{where}.{name}: no usable certificate in {file}: "
                                     f"{reason}") from None
        try:
            ctx.load_cert_chain(names["cert_file"], names["key_file"],
                                password=_refuse_encrypted_key)
        except (ssl.SSLError, OSError, ValueError, WebConfigError) as e:
            reason = _one_line(getattr(e, "reason", None) or e)
            raise WebConfigError(f"{where}.key_file: cannot use {tls.key_file} with "
                                 f"{tls.cert_file}: {reason}") from None
        ctx.verify_mode = {"NoClientCert": ssl.CERT_NONE,
                           "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                           "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
                           }[tls.client_auth_type]
        if tls.client_ca_file is not None:
            ctx.load_verify_locations(cafile=names["client_ca_file"])
    return ctx
