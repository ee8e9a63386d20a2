"""Inputs that used to hang or balloon `wgnest serve`, and flags out of range, against a
real `wgnest serve` in a network namespace of the test's own (issue 12).

A FIFO or /dev/zero as the peer-names file is refused with one line and exit 2; among the
configs of --config-dir it is skipped with a warning and the exporter starts; every refusal
is timed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hardening.conftest import Figures, child_env, ms, stop_process

pytestmark = pytest.mark.lab


def serve(ns: str, *args: str, timeout: float = 10.0) -> tuple[int | None, str, float]:
    """Run `wgnest serve` until it exits or reports serving: (exit code or None when it
    serves, stderr, seconds)."""
    began = time.monotonic()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "wgnest", "serve",
         "--web.listen-address", "127.0.0.1:9586", "--no-probe.enabled", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=child_env())
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        while time.monotonic() - began < timeout:
            with contextlib.suppress(TypeError):
                lines.extend(proc.stderr.readlines())
            if any("serving on" in line for line in lines):
                return None, "".join(lines), time.monotonic() - began
            if proc.poll() is not None:
                with contextlib.suppress(TypeError):
                    lines.extend(proc.stderr.readlines())
                return proc.returncode, "".join(lines), time.monotonic() - began
            time.sleep(0.02)
        raise AssertionError(f"wgnest serve neither served nor exited in {timeout} s: {lines}")
    finally:
        stop_process(proc)


def fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_bad_peer_file_is_one_line_and_exit_2(netns: str, tmp_path: Path, kind: str,
                                              figures: Figures) -> None:
    if kind == "fifo":
        path = fifo(tmp_path, "peers.toml")
    elif kind == "huge":
        path = tmp_path / "peers.toml"
        path.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    else:
        path = Path("/dev/zero")
    code, err, took = serve(netns, "--wireguard.peer-file", str(path))
    assert code == 2, err
    assert err.strip().count("\n") == 0, err  # one line
    assert str(path) in err
    assert "not a regular file" in err or "larger than" in err
    assert took < 5
    figures(f"peer file {kind}: refused in {ms(took)} (process start included)")


def test_fifo_and_device_in_config_dir_are_skipped_with_a_warning(netns: str, tmp_path: Path,
                                                                  figures: Figures) -> None:
    fifo(tmp_path, "wg0.conf")
    os.symlink("/dev/zero", tmp_path / "wg1.conf")
    (tmp_path / "wg2.conf").write_text(
        "[Interface]\n[Peer]\n# friendly_name = ok\n"
        "PublicKey = " + "A" * 43 + "=\n")
    code, err, took = serve(netns, "--config-dir", str(tmp_path))
    assert code is None, err  # it serves
    assert f"{tmp_path / 'wg0.conf'}: not a regular file" in err
    assert f"{tmp_path / 'wg1.conf'}: not a regular file" in err
    assert took < 5
    figures(f"config dir with a FIFO and /dev/zero: serving after {ms(took)}")


@pytest.mark.parametrize(("flag", "value"), [
    ("--refresh.interval", "inf"), ("--refresh.interval", "1e-9"),
    ("--wireguard.uapi-timeout", "nan"), ("--wireguard.uapi-timeout", "0"),
    ("--wireguard.uapi-timeout", "-1")])
def test_out_of_range_flag_is_refused_before_serving(netns: str, flag: str, value: str) -> None:
    code, err, _ = serve(netns, f"{flag}={value}")
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert flag in err
