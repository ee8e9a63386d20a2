"""--netns without the capabilities it needs: entering another namespace takes CAP_SYS_ADMIN
(setns). Without it every other namespace is reported unreadable, in one line naming the
capability and as `wgnest_collector_success{collector="netns"} 0`, never a crash; wgnest's
own namespace is still read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.lab import REPO, built
from tests.lab.netns_lab import NetnsLab, free_port, parse_metrics, select

pytestmark = pytest.mark.lab
WITHOUT_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin"]


@pytest.fixture
def nlab() -> Iterator[NetnsLab]:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop a capability")
    with built(NetnsLab(), servers=1) as made:
        yield made


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "exporter")}


def test_check_without_cap_sys_admin_says_which_namespaces_and_why(nlab: NetnsLab) -> None:
    s1 = nlab.servers["s1"]
    res = subprocess.run(
        [*WITHOUT_SYS_ADMIN, sys.executable, "-m", "wgnest", "check", "--format", "json",
         "--no-probe.enabled", "--netns", f"{nlab.client.ns},{s1.host.ns}"],
        capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout)
    assert res.returncode == 3, doc["summary"]  # UNKNOWN: the namespaces asked for are unread
    failed = {e["netns"]: e for e in doc["errors"] if e["collector"] == "netns"}
    assert set(failed) == {nlab.client.ns, s1.host.ns}, doc["errors"]
    for error in failed.values():
        assert error["reason"] == "eperm"
        assert "CAP_SYS_ADMIN" in error["message"]
        assert "\n" not in error["message"]
    # with the capability the same command reads both
    ok = nlab.host_check("--netns", f"{nlab.client.ns},{s1.host.ns}")[1]
    assert {ns["netns"] for ns in ok["namespaces"]} == {nlab.client.ns, s1.host.ns}


def test_serve_without_cap_sys_admin_keeps_serving_its_own_namespace(nlab: NetnsLab) -> None:
    s1 = nlab.servers["s1"]
    port = free_port()
    log = nlab.workdir / "serve-nocap.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*WITHOUT_SYS_ADMIN, sys.executable, "-m", "wgnest", "serve", "--netns", "all",
             "--no-probe.enabled", "--refresh.interval=200ms", "--web.listen-address",
             f"127.0.0.1:{port}", "--log.level", "info"],
            stdout=subprocess.DEVNULL, stderr=out, env=_env(), text=True)
    nlab.extra_procs.append(proc)
    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            if select(parse_metrics(text), "wgnest_collector_success", netns=s1.host.ns):
                break
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    samples = parse_metrics(text)
    (denied,) = select(samples, "wgnest_collector_success", collector="netns",
                       netns=s1.host.ns)
    assert denied[2] == 0
    # its own namespace is still read, and the lab's namespace has no WireGuard series
    own = [labels for _n, labels, _v in select(samples, "wgnest_netns_info")
           if labels["path"] == ""]
    assert len(own) == 1
    assert not [name for name, labels, _v in samples if name.startswith("wireguard_")
                and labels.get("netns") == s1.host.ns]
    time.sleep(1.0)  # several more refreshes: the failure is logged once, when it starts
    lines = [ln for ln in log.read_text().splitlines() if f"netns {s1.host.ns}:" in ln]
    assert len(lines) == 1, lines
    assert "CAP_SYS_ADMIN" in lines[0]
    assert "Traceback" not in log.read_text()


def test_a_namespace_with_stuck_uapi_sockets_does_not_hold_up_the_others(
        nlab: NetnsLab) -> None:
    """Two UAPI sockets in one namespace that accept and never answer (a daemon stopped):
    read one after the other they take twice the UAPI timeout; the check waits only one
    timeout and a second, reports that namespace late, and has every other one."""
    s1 = nlab.servers["s1"]
    slow = nlab.plain("slow", 7).ns
    names = [f"{nlab.tag}st{i}" for i in range(2)]
    listener = (
        "import socket,sys,time\n"
        "socks=[]\n"
        "for path in sys.argv[1:]:\n"
        "    s=socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8); socks.append(s)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    paths = []
    for name in names:
        subprocess.run(["ip", "-n", slow, "tuntap", "add", "name", name, "mode", "tun"],
                       check=True)
        paths.append(str(Path("/var/run/wireguard") / f"{name}.sock"))
    nlab.interfaces.extend(names)  # their sockets are removed with the lab
    proc = subprocess.Popen(["ip", "netns", "exec", slow, sys.executable, "-c", listener,
                             *paths], stdout=subprocess.PIPE, text=True)
    nlab.extra_procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    began = time.monotonic()
    code, doc = nlab.host_check("--netns", f"{slow},{s1.host.ns}",
                                "--wireguard.uapi-timeout=2s")
    took = time.monotonic() - began
    assert took < 2 * 2.0, f"waited {took:.1f}s: as long as the slow namespace"
    late = [e for e in doc["errors"] if e["netns"] == slow]
    assert [e["reason"] for e in late] == ["timeout"], doc["errors"]
    got = {ns["netns"]: ns for ns in doc["namespaces"]}
    assert slow not in got
    assert [d["name"] for d in got[s1.host.ns]["devices"]] == [s1.name], got
    assert code == 1, doc["summary"]  # WARNING: a namespace is missing, nothing is nested
