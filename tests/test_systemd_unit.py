"""The shipped systemd unit is valid and hardened, and so is its `--netns all` variant."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "exporter" / "systemd" / "wgnest.service"
NETNS_MARK = "# --netns all"
NETNS_CAPS = {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"}
BASE_CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW"}


def settings(text: str | None = None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNIT.read_text() if text is None else text).splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def netns_block() -> list[str]:
    """The commented setting lines of the `--netns all` variant, in order."""
    lines = UNIT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(NETNS_MARK))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("["))
    return [line for line in lines[start:end] if re.match(r"#[A-Z][A-Za-z]*=", line)]


def netns_variant() -> str:
    """The unit with the `--netns all` block uncommented, as its comment says to do."""
    block = set(netns_block())
    return "\n".join(line[1:] if line in block else line
                     for line in UNIT.read_text().splitlines()) + "\n"


def effective(values: list[str], kind: str) -> list[str] | set[str] | str:
    """What systemd makes of repeated assignments (systemd.exec(5)): ExecStart= empty resets
    the list; capability sets are merged; RestrictNamespaces= yes/no resets, a list after it
    adds the listed types to what is allowed; anything else: the last one wins."""
    if kind == "list":
        out: list[str] = []
        for v in values:
            out = [] if not v else [*out, v]
        return out
    if kind == "caps":
        caps: set[str] = set()
        for v in values:
            caps = set() if not v else caps | set(v.split())
        return caps
    if kind == "namespaces":
        allowed = "all"
        for v in values:
            if v in ("yes", "true"):
                allowed = ""
            elif v in ("no", "false", ""):
                allowed = "all"
            else:
                assert not v.startswith("~"), v
                allowed = " ".join(sorted({*allowed.split(), *v.split()} - {"all"}))
        return allowed
    return values[-1]


def write_unit(tmp_path: Path, text: str) -> Path:
    """`text` as tmp_path/wgnest.service, its ExecStart pointed at this interpreter."""
    unit = tmp_path / "wgnest.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/wgnest ",
                                 f"ExecStart={sys.executable} -m wgnest "))
    return unit


def analyze_verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(write_unit(tmp_path, text))],
                          capture_output=True, text=True, check=False)


def verify(tmp_path: Path, text: str) -> None:
    res = analyze_verify(tmp_path, text)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wgnest.service" not in res.stderr, res.stderr


def security(tmp_path: Path, text: str) -> dict[str, bool]:
    """systemd's own reading of the unit: `systemd-analyze security --offline`, each check's
    name (e.g. `RestrictNamespaces=~net`) -> whether the restriction is in place."""
    unit = write_unit(tmp_path, text)
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--json=short",
                          str(unit)], capture_output=True, text=True, check=False)
    if res.returncode != 0 and "--offline" in res.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert res.stdout, res.stderr
    return {check["name"]: bool(check["set"]) for check in json.loads(res.stdout)}


def test_unit_is_hardened_and_unprivileged() -> None:
    s = settings()
    assert s["DynamicUser"] == ["yes"]
    assert s["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0]
    assert s["ExecStart"][0].split()[1] == "serve"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    verify(tmp_path, UNIT.read_text())


def test_netns_variant_block() -> None:
    """The `--netns all` block: only the settings it needs, each of them commented out."""
    keys = [line[1:].partition("=")[0] for line in netns_block()]
    assert keys == ["ExecStart", "ExecStart", "AmbientCapabilities", "CapabilityBoundingSet",
                    "RestrictNamespaces", "ProtectProc"]
    assert settings() == settings(UNIT.read_text().replace(NETNS_MARK, "# (moved)"))
    block = UNIT.read_text().split(NETNS_MARK, 1)[1].split("\n[", 1)[0]
    for word in ("CAP_SYS_ADMIN", "setns", "CAP_SYS_PTRACE", "/proc/PID/ns/net",
                 "CAP_DAC_OVERRIDE", "RestrictNamespaces=yes", "ProtectProc=invisible",
                 "/run/netns", "systemctl edit"):
        assert word in block, word


def test_netns_variant_settings() -> None:
    """Uncommented, it runs `serve --netns all` with the capabilities entering namespaces
    needs, setns(CLONE_NEWNET) allowed (and no other namespace type), /proc unhidden, and
    every other hardening setting as in the default unit."""
    base, var = settings(), settings(netns_variant())
    exec_start = effective(var["ExecStart"], "list")
    assert exec_start == [base["ExecStart"][0] + " --netns all"]
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert effective(base[key], "caps") == BASE_CAPS
        assert effective(var[key], "caps") == BASE_CAPS | NETNS_CAPS
    assert effective(base["RestrictNamespaces"], "namespaces") == ""
    assert effective(var["RestrictNamespaces"], "namespaces") == "net"
    assert effective(base["ProtectProc"], "last") == "invisible"
    assert effective(var["ProtectProc"], "last") == "default"
    changed = {"ExecStart", "AmbientCapabilities", "CapabilityBoundingSet",
               "RestrictNamespaces", "ProtectProc"}
    assert {k: v for k, v in var.items() if k not in changed} == {
        k: v for k, v in base.items() if k not in changed}
    assert var["DynamicUser"] == ["yes"]
    assert var["ProtectSystem"] == ["strict"]
    assert "@privileged" in " ".join(var["SystemCallFilter"])  # setns is in @process


def test_netns_variant_systemd_analyze(tmp_path: Path) -> None:
    """systemd itself reads the variant as intended: it verifies, and `security --offline`
    sees CAP_SYS_ADMIN/CAP_SYS_PTRACE, network namespaces allowed and nothing else, /proc
    not hidden; the default unit keeps them all restricted."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    verify(tmp_path, netns_variant())
    base, var = security(tmp_path, UNIT.read_text()), security(tmp_path, netns_variant())
    for check in ("CapabilityBoundingSet=~CAP_SYS_ADMIN", "CapabilityBoundingSet=~CAP_SYS_PTRACE",
                  "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
                  "RestrictNamespaces=~net", "ProtectProc="):
        assert base[check], check
        assert not var[check], check
    for kind in ("user", "pid", "uts", "mnt", "cgroup", "ipc"):
        assert base[f"RestrictNamespaces=~{kind}"], kind
        assert var[f"RestrictNamespaces=~{kind}"], kind
    same = {k for k in base if "SYS_ADMIN" not in k and "SYS_PTRACE" not in k
            and "DAC_" not in k and k not in ("RestrictNamespaces=~net", "ProtectProc=")}
    assert {k: var[k] for k in same} == {k: base[k] for k in same}


def test_netns_variant_needs_exec_start_reset(tmp_path: Path) -> None:
    """Without the empty `ExecStart=` the variant would be refused (Type=simple takes one)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    res = analyze_verify(tmp_path, netns_variant().replace("\nExecStart=\n", "\n", 1))
    assert res.returncode != 0, res.stderr
    assert "more than one ExecStart=" in res.stderr, res.stderr
