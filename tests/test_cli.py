"""The command line: bad input gets one clear line and the documented exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wgnest.runtime.cli import main
from wgnest.runtime.options import build_parser

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


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--refresh.interval", "inf", "'inf' is not a duration"),
    ("--refresh.interval", "1e-9", "'1e-9' is not a duration"),
    ("--refresh.interval", "0", "'0' is out of range: from 100ms to 1h"),
    ("--refresh.interval", "0.01", "'0.01' is out of range: from 100ms to 1h"),
    ("--wireguard.uapi-timeout", "nan", "'nan' is not a duration"),
    ("--wireguard.uapi-timeout", "inf", "'inf' is not a duration"),
    ("--wireguard.uapi-timeout", "0", "'0' is out of range: from 10ms to 1m"),
    ("--wireguard.uapi-timeout", "-1", "'-1' is not a duration"),
    ("--probe.timeout", "2m", "'2m' is out of range: from 10ms to 1m"),
    ("--anomaly.ratio", "nan", "'nan' is out of range: from 1 to 1000"),
    ("--refresh.interval", "1s\x1b[31m", "'1s\\x1b[31m' is not a duration"),
])
def test_out_of_range_flags_are_refused_at_start(flag: str, value: str, message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", f"{flag}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert message in err
    assert "\x1b" not in err  # control characters are escaped, never printed


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5s", 1.5), ("2", 2.0), ("1h", 3600.0)])
def test_durations_as_prometheus_spells_them(value: str, seconds: float) -> None:
    args = build_parser().parse_args(["serve", "--refresh.interval", value,
                                      "--wireguard.uapi-timeout", "250ms"])
    assert args.refresh_interval == seconds
    assert args.uapi_timeout == 0.25


def test_library_loggers_stay_quiet_at_debug() -> None:
    """--log.level debug never lets pyroute2 print decoded netlink replies (a kernel
    device's private key among them), nor asyncio a line per event loop pyroute2 makes."""
    import logging

    from wgnest.runtime.cli import configure_logging

    configure_logging("debug")
    for name in ("pyroute2", "pyroute2.netlink.nlsocket", "asyncio"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name


def test_library_debug_stays_out_even_when_the_library_resets_its_level() -> None:
    """pyroute2 sets its logger's level to 0 when it is imported, which now happens after
    the logging is set up (only for a kernel WireGuard device): its debug lines (decoded
    replies, private keys among them) still never reach the log; wgnest's own do."""
    from tests.fresh_python import run_fresh

    code = ("import logging\n"
            "from wgnest.runtime.cli import configure_logging\n"
            "configure_logging('debug')\n"
            "logging.getLogger('pyroute2').setLevel(0)\n"
            "logging.getLogger('pyroute2.netlink.core').debug('WGDEVICE_A_PRIVATE_KEY')\n"
            "logging.getLogger('pyroute2').warning('a pyroute2 warning')\n"
            "logging.getLogger('wgnest.sources').debug('wgnest debug')\n")
    out = run_fresh(code)
    assert "PRIVATE_KEY" not in out.stderr
    assert "a pyroute2 warning" in out.stderr
    assert "wgnest debug" in out.stderr


def test_pyroute2_is_loaded_up_front_only_where_the_kernel_has_wireguard(
        tmp_path: Path) -> None:
    from wgnest.sources.wg_kernel import preload_kernel_wireguard

    assert preload_kernel_wireguard(tmp_path / "absent") is False
    assert preload_kernel_wireguard(tmp_path) is True  # (a module directory: it is loaded)


def test_version_names_python_and_every_dependency(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("wgnest 0.")
    for name in ("python", "prometheus-client", "pyroute2", "icmplib", "h11", "bcrypt"):
        assert f"  {name}: " in out
    assert "not installed" not in out


def test_readme_flags_table_lists_every_flag() -> None:
    """The README's flags table stays current: every option of every command is in it."""
    import argparse

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Flags", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = {opt for cmd in sub.choices.values() for a in cmd._actions
               for opt in a.option_strings if opt.startswith("--") and opt != "--help"
               and f"`{opt}" not in table and f"{opt}`" not in table
               and f", `{opt}" not in table}
    assert not missing, f"README flags table lacks {sorted(missing)}"
