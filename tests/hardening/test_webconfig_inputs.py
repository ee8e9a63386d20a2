"""Issue 12 (and issue 9 defect 6): web config inputs that hung, ballooned or misled.

A FIFO or /dev/zero as --web.config.file or as a TLS file hung start-up forever or grew it
to gigabytes; a 10 MB config took 47 s and 882 MB before it was refused, 150k valid users 38 s
to start; keys `0x1F` and `010` became users 31 and 8; newlines and ANSI escapes went raw
into the error line; a `$2$` hash passed validation, then aborted start-up with "cannot
listen on ...". Each of these now ends start-up at once with one line naming the path, the
key or the user, and exit code 2; hang-prone cases run in a real `wgnest serve` process
under a timeout and a 2 GiB address-space limit.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import bcrypt
import pytest

from tests.hardening.conftest import PASSWORD, Figures, child_env, scrape
from wgnest.runtime.web import serve
from wgnest.runtime.webconfig import WebConfig, WebConfigError, load_web_config

REFUSE_WITHIN = 5.0  # seconds for a whole `wgnest serve` process (about 0.5 s of it start-up)
_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@dataclass
class Run:
    returncode: int | None  # None: killed at the timeout (it hung)
    stderr: str
    seconds: float


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_serve(config: Path, workdir: Path) -> Run:
    cmd = [sys.executable, "-m", "wgnest", "serve", "--web.listen-address", "127.0.0.1:0",
           "--no-probe.enabled", "--config-dir", str(workdir), "--web.config.file", str(config)]
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=REFUSE_WITHIN + 3,
                             env=child_env(), stdin=subprocess.DEVNULL, check=False,
                             preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as e:  # run() has killed it
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        return Run(None, err, time.monotonic() - t0)
    return Run(res.returncode, res.stderr, time.monotonic() - t0)


def _users(n: int) -> str:
    return "basic_auth_users:\n" + "".join(f"  user{i:06d}: '{_HASH}'\n" for i in range(n))


@dataclass
class Case:
    config: Path
    names: tuple[str, ...]  # what the one line must name


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("inputs")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", "k", "-out", "c"],
        cwd=d, check=True, capture_output=True, timeout=30)
    fifo = d / "fifo"
    os.mkfifo(fifo)
    os.mkfifo(d / "web-fifo.yml")

    def tls(cert: Path, key: Path, ca: Path | None = None) -> str:
        text = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        if ca is not None:
            text += f"  client_ca_file: {ca}\n  client_auth_type: RequireAndVerifyClientCert\n"
        return text

    out: dict[str, Case] = {
        "config is a FIFO": Case(d / "web-fifo.yml", (str(d / "web-fifo.yml"), "FIFO")),
        "config is /dev/zero": Case(Path("/dev/zero"), ("/dev/zero", "character device")),
    }
    files = {
        "config of 10 MB (150k users)": (_users(150_000), ("larger than 1 MiB",)),
        "1001 users": (_users(1001), ("basic_auth_users", "at most 1000")),
        "cert_file is a FIFO": (tls(fifo, d / "k"), ("cert_file", str(fifo), "FIFO")),
        "key_file is a FIFO": (tls(d / "c", fifo), ("key_file", str(fifo), "FIFO")),
        "client_ca_file is a FIFO": (tls(d / "c", d / "k", fifo),
                                     ("client_ca_file", str(fifo), "FIFO")),
        "cert_file is /dev/zero": (tls(Path("/dev/zero"), d / "k"), ("cert_file", "/dev/zero")),
        "key_file is /dev/zero": (tls(d / "c", Path("/dev/zero")), ("key_file", "/dev/zero")),
        "client_ca_file is /dev/zero": (tls(d / "c", d / "k", Path("/dev/zero")),
                                        ("client_ca_file", "/dev/zero")),
        "a $2$ hash": ("basic_auth_users:\n  alice: '$2$" + _HASH[4:] + "'\n",
                       ("basic_auth_users.alice", "$2$")),
        "an ANSI escape in a header name": ('http_server_config:\n  headers:\n'
                                            '    "X-Frame-Options\\e[2J\\n": deny\n',
                                            ("headers.X-Frame-Options\\x1b[2J\\n",)),
    }
    for i, (name, (text, names)) in enumerate(files.items()):
        path = d / f"case{i}.yml"
        path.write_text(text)
        out[name] = Case(path, (str(path), *names))
    return out


@pytest.fixture(scope="module")
def runs(cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every case in its own `wgnest serve` process, four at a time."""
    workdir = tmp_path_factory.mktemp("config-dir")
    with ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda c: run_serve(c.config, workdir), cases.values())
        return dict(zip(cases, results, strict=True))


CASE_NAMES = ["config is a FIFO", "config is /dev/zero", "config of 10 MB (150k users)",
              "1001 users", "cert_file is a FIFO", "key_file is a FIFO",
              "client_ca_file is a FIFO", "cert_file is /dev/zero", "key_file is /dev/zero",
              "client_ca_file is /dev/zero", "a $2$ hash", "an ANSI escape in a header name"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_refused_at_once_in_one_line(name: str, cases: dict[str, Case],
                                               runs: dict[str, Run], figures: Figures) -> None:
    run, case = runs[name], cases[name]
    assert run.returncode is not None, f"hung: killed after {run.seconds:.1f} s"
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-500:]
    assert len(lines) == 1, run.stderr[-500:]
    line = lines[0]
    assert line.startswith("wgnest: ")
    assert "cannot listen on" not in line
    assert line.isprintable()  # no newline, no escape sequence reached the terminal
    for what in case.names:
        assert what in line
    assert run.seconds < REFUSE_WITHIN
    t0 = time.perf_counter()  # the same refusal inside the process, without its start-up
    with pytest.raises(WebConfigError):
        load_web_config(case.config)
    figures(f"refused {name}: `wgnest serve` exited 2 after {run.seconds:.2f} s; "
            f"load_web_config refused it in {(time.perf_counter() - t0) * 1000:.1f} ms")


def test_a_thousand_users_load_fast_and_promtool_agrees(tmp_path: Path, figures: Figures
                                                        ) -> None:
    path = tmp_path / "users.yml"
    path.write_text(_users(1000))
    t0 = time.perf_counter()
    cfg = load_web_config(path)
    took = time.perf_counter() - t0
    assert len(cfg.basic_auth_users) == 1000
    assert took < 1.0
    figures(f"1000 users ({path.stat().st_size >> 10} KiB) load in {took * 1000:.0f} ms")
    _promtool_accepts(path)


def _promtool_accepts(path: Path) -> None:
    if shutil.which("promtool") is None:
        return
    res = subprocess.run(["promtool", "check", "web-config", str(path)], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


class _App:
    def metrics(self) -> bytes:
        return b"wgnest_up 1\n"

    def status_page(self) -> str:
        return "status"


def test_usernames_are_taken_as_written(tmp_path: Path) -> None:
    keys = ["0x1F", "010", "8", "true", "1e3", "0o17", "'007'", "null_user"]
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n" + "".join(f"  {k}: '{_HASH}'\n" for k in keys))
    _promtool_accepts(path)
    cfg = load_web_config(path)
    assert set(cfg.basic_auth_users) == {"0x1F", "010", "8", "true", "1e3", "0o17", "007",
                                         "null_user"}
    srv = serve("127.0.0.1:0", _App(), web_config=cfg)
    try:
        for user, status in [("0x1F", 200), ("010", 200), ("8", 200), ("007", 200),
                             ("31", 401), ("15", 401), ("True", 401), ("1000.0", 401)]:
            assert scrape(srv.port, auth=(user, PASSWORD))[0] == status, user
    finally:
        srv.shutdown()


@pytest.mark.parametrize("text", ["basic_auth_users:\n  ~: 'H'\n",
                                  "basic_auth_users:\n  '': 'H'\n"])
def test_an_empty_username_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text.replace("H", _HASH))
    with pytest.raises(WebConfigError, match="username is empty"):
        load_web_config(path)


ESCAPED = {
    # YAML text: what the message must show, escaped
    'basic_auth_users:\n  "al\\nice\\e[31m": hunter2hunter2\n':
        "basic_auth_users.al\\nice\\x1b[31m",
    '"\\e[2Jtls": {}\n': "\\x1b[2Jtls: unknown key",
    'http_server_config:\n  headers:\n    "X-XSS-Protection\\r\\n": "0"\n':
        "X-XSS-Protection\\r\\n",
    'tls_server_config:\n  cert_file: "c\\e]0;owned\\a"\n  key_file: k\n': "c\\x1b]0;owned\\x07",
    'tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: "TLS\\u202e12"\n':
        "\\u202e",
}


@pytest.mark.parametrize("text", sorted(ESCAPED))
def test_control_characters_are_escaped_in_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError) as exc:
        load_web_config(path)
    message = str(exc.value)
    assert message.isprintable(), repr(message)
    assert ESCAPED[text] in message
    assert "hunter2" not in message


def test_an_unprintable_config_path_is_escaped(tmp_path: Path) -> None:
    path = tmp_path / "web\n\x1b[31m.yml"
    with pytest.raises(WebConfigError) as exc:
        load_web_config(path)
    assert str(exc.value).isprintable()
    assert "web\\n\\x1b[31m.yml: file: cannot read" in str(exc.value)


def _variant(prefix: str) -> str:
    return prefix + _HASH[4:]


_B64 = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _bump(hashed: str, index: int) -> str:
    """The hash with one spare (unused) bit set in the character at `index`."""
    return hashed[:index] + _B64[_B64.index(hashed[index]) + 1] + hashed[index + 1:]


BAD_HASHES = {
    "$2$": (_variant("$2$"), "$2$ is not supported"),
    "$2x$": (_variant("$2x$"), "$2x$ is not supported"),
    "$2c$": (_variant("$2c$"), "$2c$ is not supported"),
    "cost 03": (_HASH[:4] + "03" + _HASH[6:], "cost 03 is outside 4..31"),
    "cost 32": (_HASH[:4] + "32" + _HASH[6:], "cost 32 is outside 4..31"),
    "salt with spare bits set": (_bump(_HASH, 28), "not validly encoded"),
    "digest with spare bits set": (_bump(_HASH, 59), "not validly encoded"),
    "59 characters": (_HASH[:-1], "not a bcrypt hash"),
}


@pytest.mark.parametrize("name", sorted(BAD_HASHES))
def test_hashes_that_could_never_verify_are_refused_at_load(tmp_path: Path, name: str) -> None:
    hashed, problem = BAD_HASHES[name]
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")
    with pytest.raises(WebConfigError) as exc:
        load_web_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: basic_auth_users.alice: ")
    assert problem in message
    assert hashed not in message
    assert hashed[7:] not in message
    with pytest.raises(WebConfigError, match=r"basic_auth_users\.alice"):  # serve() too
        serve("127.0.0.1:0", _App(),
              web_config=WebConfig(basic_auth_users=MappingProxyType({"alice": hashed})))


def test_the_refused_hashes_really_cannot_verify_here() -> None:
    """Why refusing is right: this bcrypt raises on $2$ and $2c$ and on a salt with spare bits,
    so such a user could never log in (the old server found out at the first login, or died
    at start-up); $2x$ (crypt_blowfish's buggy-8-bit variant) it would verify as $2a$."""
    for prefix in ("$2$", "$2c$"):
        with pytest.raises(ValueError, match="salt"):
            bcrypt.checkpw(PASSWORD.encode(), _variant(prefix).encode())
    with pytest.raises(ValueError, match="salt"):
        bcrypt.checkpw(PASSWORD.encode(), _bump(_HASH, 28).encode())
    assert not bcrypt.checkpw(PASSWORD.encode(), _bump(_HASH, 59).encode())


@pytest.fixture
def variant_server(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n" + "".join(
        f"  {v}: '{_variant(f'$2{v}$')}'\n" for v in "aby"))
    srv = serve("127.0.0.1:0", _App(), web_config=load_web_config(path))
    try:
        yield srv.port
    finally:
        srv.shutdown()


def test_every_accepted_variant_verifies(variant_server: int) -> None:
    for user in "aby":
        assert scrape(variant_server, auth=(user, PASSWORD))[0] == 200
        assert scrape(variant_server, auth=(user, "wrong"))[0] == 401
