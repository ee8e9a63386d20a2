"""The shipped systemd unit is valid and hardened."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "exporter" / "systemd" / "wgnest.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


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
    unit = tmp_path / "wgnest.service"
    exec_start = f"ExecStart={sys.executable} -m wgnest serve --web.listen-address=:9586"
    unit.write_text("\n".join(exec_start if line.startswith("ExecStart=") else line
                              for line in UNIT.read_text().splitlines()) + "\n")
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wgnest.service" not in res.stderr, res.stderr
