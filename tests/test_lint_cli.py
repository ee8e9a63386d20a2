"""`wgnest lint` on the command line: flags, and `--refuse` exit codes for a wg-quick hook."""

from __future__ import annotations

import argparse

import pytest

from tests.test_cli import wgnest
from wgnest.analysis.nagios import Nagios
from wgnest.runtime import lint as lint_cli
from wgnest.runtime.options import build_parser


def test_flags() -> None:
    args = build_parser().parse_args(["lint", "--refuse", "--config-dir", "/tmp/x",
                                      "--allow-nesting", "wg1:wg0", "wg1", "/etc/x/wg2.conf"])
    assert (args.command, args.refuse, args.configs) == ("lint", True,
                                                         ["wg1", "/etc/x/wg2.conf"])
    assert args.allow == [("wg1", "wg0")]


def test_bad_format_is_one_line_and_exit_2() -> None:
    res = wgnest("lint", "--format", "yaml")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize(("code", "refuse", "expected"), [
    (Nagios.CRITICAL, True, 2), (Nagios.WARNING, True, 0), (Nagios.UNKNOWN, True, 0),
    (Nagios.OK, True, 0), (Nagios.WARNING, False, 1), (Nagios.UNKNOWN, False, 3),
])
def test_refuse_fails_only_on_nesting(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], code: Nagios,
                                      refuse: bool, expected: int) -> None:
    monkeypatch.setattr(lint_cli, "_run", lambda args: (code, "WGNEST report\n"))
    assert lint_cli.run_lint(argparse.Namespace(refuse=refuse)) == expected
    out = capsys.readouterr()
    assert out.out == "WGNEST report\n"
    assert ("refusing" in out.err) == (expected == 2)


def test_refuse_never_stops_an_up_it_cannot_judge(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: argparse.Namespace) -> tuple[Nagios, str]:
        raise RuntimeError("netlink gone")

    monkeypatch.setattr(lint_cli, "_run", broken)
    assert lint_cli.run_lint(argparse.Namespace(refuse=True)) == 0
    assert "cannot predict (netlink gone); not refusing" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        lint_cli.run_lint(argparse.Namespace(refuse=False))


def test_missing_config_is_unknown(tmp_path: object) -> None:
    res = wgnest("lint", "--config-dir", str(tmp_path), "nosuch", "--no-probe.enabled")
    assert res.returncode == 2  # an unknown flag: lint does not probe
    res = wgnest("lint", "--config-dir", str(tmp_path), "nosuch")
    assert res.returncode == 3, res.stderr
    assert "nosuch.conf: cannot read" in res.stdout
