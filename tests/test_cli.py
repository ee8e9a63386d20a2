"""The command line: bad input gets one clear line and the documented exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wgnest.runtime.cli import main

EXPORTER = Path(__file__).resolve().parents[1] / "exporter"


def wgnest(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(EXPORTER)}
    return subprocess.run([sys.executable, "-m", "wgnest", *args], capture_output=True,
                          text=True, env=env, timeout=30, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("args", [
    ("serve", "--refresh.interval", "0"),
    ("serve", "--refresh.interval", "soon"),
    ("check", "--allow-nesting", "wg1"),
    ("check", "--probe.target", "wg1=not-an-ip"),
    ("check", "--anomaly.min-excess", "5 parsecs"),
    ("check", "--format", "yaml"),
    ("frobnicate",),
])
def test_bad_flags_one_line_exit_2(args: tuple[str, ...]) -> None:
    res = wgnest(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("wgnest: ")
    assert "Traceback" not in res.stderr


def test_bad_web_config_one_line_exit_2_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n  alice: plaintext-password\n")
    res = wgnest("serve", "--web.config.file", str(config), "--web.listen-address",
                 "127.0.0.1:0", "--no-probe.enabled")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(config) in lines[0]
    assert "plaintext-password" not in res.stderr


def test_bad_listen_address_exit_2(tmp_path: Path) -> None:
    res = wgnest("serve", "--web.listen-address", "nowhere", "--no-probe.enabled",
                 "--config-dir", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("wgnest: cannot listen on nowhere")


def test_check_without_wireguard_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    code = main(["check", "--wireguard.uapi-dir", str(tmp_path), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert (code, doc["status"], doc["summary"]) == (0, "ok", "no WireGuard devices found")
    assert doc["devices"] == []


def test_check_unknown_when_uapi_dir_unreadable(tmp_path: Path) -> None:
    """Without permission to read the UAPI sockets: UNKNOWN (3), and the line says why."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop the capabilities that bypass file permissions")
    sockdir = tmp_path / "wireguard"
    sockdir.mkdir(mode=0o700)
    os.chown(sockdir, 65534, 65534)  # someone else's, and root without DAC override
    res = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
         "wgnest", "check", "--wireguard.uapi-dir", str(sockdir), "--no-probe.enabled"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": str(EXPORTER)})
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.startswith("WGNEST UNKNOWN - cannot read wireguard_uapi (eperm)")
    # CAP_NET_ADMIN does not open a root-only socket: the hint names what does
    assert "needs root: wireguard-go's UAPI sockets are root-only" in res.stdout
    assert "CAP_NET_ADMIN" not in res.stdout
