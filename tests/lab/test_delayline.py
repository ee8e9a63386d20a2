"""Lab test for the TUN delay line: A <-> R <-> B, delay added in R."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lab.delayline import delayed

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(
        not Path("/dev/net/tun").exists(), reason="/dev/net/tun missing (no TUN support)"
    ),
]

DELAY_MS = 10.0
TOLERANCE_MS = 2.0

RTT_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


@dataclass
class Lab:
    a: str
    r: str
    b: str
    if_ra: str  # R's interface towards A
    if_rb: str  # R's interface towards B
    b4: str
    b6: str
    delay_dev: str
    namespaces: list[str] = field(default_factory=list)


@dataclass
class Rtt:
    min: float
    avg: float
    max: float
    mdev: float


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True)


def ns_sh(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args)


def ping(ns: str, dst: str, count: int = 5) -> Rtt:
    family = "-6" if ":" in dst else "-4"
    out = ns_sh(ns, "ping", family, "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", dst)
    m = RTT_RE.search(out.stdout)
    assert m, f"cannot parse ping output: {out.stdout!r}"
    return Rtt(*(float(x) for x in m.groups()))


def warm_up(ns: str, dst: str, attempts: int = 5) -> None:
    """Resolve neighbours along the path; tolerate the first packets being lost."""
    family = "-6" if ":" in dst else "-4"
    for _ in range(attempts):
        cmd = ["ip", "netns", "exec", ns, "ping", family, "-n", "-q", "-c", "1", "-W", "1", dst]
        if subprocess.run(cmd, check=False, capture_output=True).returncode == 0:
            return
    pytest.fail(f"{dst} unreachable from {ns}")


def _kill_ns_processes(ns: str) -> None:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in res.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = secrets.token_hex(2)
    lab = Lab(
        a=f"dlA{tag}",
        r=f"dlR{tag}",
        b=f"dlB{tag}",
        if_ra=f"dlra{tag}",
        if_rb=f"dlrb{tag}",
        b4="198.18.2.1",
        b6="fd00:d1:2::1",
        delay_dev=f"dly{tag}",
    )
    if_ar, if_br = f"dlar{tag}", f"dlbr{tag}"
    try:
        for ns in (lab.a, lab.r, lab.b):
            sh("ip", "netns", "add", ns)
            lab.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # no DAD: tentative link-local addresses make the first forwarded v6 packets vanish
            for conf in ("all", "default"):
                ns_sh(ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{conf}.accept_dad=0")
        # veths are created directly inside the namespaces: nothing ever touches the host ns
        sh("ip", "link", "add", if_ar, "netns", lab.a, "type", "veth",
           "peer", "name", lab.if_ra, "netns", lab.r)  # fmt: skip
        sh("ip", "link", "add", if_br, "netns", lab.b, "type", "veth",
           "peer", "name", lab.if_rb, "netns", lab.r)  # fmt: skip
        ns_sh(lab.r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        ns_sh(lab.r, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        for ns, dev, v4, v6 in (
            (lab.a, if_ar, "198.18.1.1/24", "fd00:d1:1::1/64"),
            (lab.r, lab.if_ra, "198.18.1.254/24", "fd00:d1:1::fe/64"),
            (lab.r, lab.if_rb, "198.18.2.254/24", "fd00:d1:2::fe/64"),
            (lab.b, if_br, f"{lab.b4}/24", f"{lab.b6}/64"),
        ):
            sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", lab.a, "route", "add", "default", "via", "198.18.1.254")
        sh("ip", "-n", lab.a, "-6", "route", "add", "default", "via", "fd00:d1:1::fe")
        sh("ip", "-n", lab.b, "route", "add", "default", "via", "198.18.2.254")
        sh("ip", "-n", lab.b, "-6", "route", "add", "default", "via", "fd00:d1:2::fe")
        yield lab
    finally:
        for ns in lab.namespaces:
            _kill_ns_processes(ns)
        for ns in lab.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        listed = subprocess.run(
            ["ip", "netns", "list"], check=False, capture_output=True, text=True
        ).stdout.split()
        leftover = [ns for ns in lab.namespaces if ns in listed]
        assert not leftover, f"namespaces not deleted: {leftover}"


def _rules(ns: str) -> str:
    return sh("ip", "-n", ns, "rule", "list").stdout + sh("ip", "-n", ns, "-6", "rule").stdout


def test_delay_adds_twice_the_one_way_delay_to_rtt(lab: Lab) -> None:
    targets = (lab.b4, lab.b6)
    for dst in targets:
        warm_up(lab.a, dst)
    before = {dst: ping(lab.a, dst) for dst in targets}
    for dst, rtt in before.items():
        assert rtt.avg < 2.0, f"baseline RTT to {dst} too high: {rtt}"
    rules_before = _rules(lab.r)

    with delayed(lab.r, lab.delay_dev, DELAY_MS, (lab.if_ra, lab.if_rb)) as pid:
        assert Path(f"/proc/{pid}").exists()
        for dst in targets:
            warm_up(lab.a, dst)
        during = {dst: ping(lab.a, dst) for dst in targets}

    for dst in targets:
        # min, not avg: one host scheduling spike in 5 pings must not fail the test
        added = during[dst].min - before[dst].min
        print(f"{dst}: before={before[dst]} during={during[dst]} added={added:.3f} ms")
        assert abs(added - 2 * DELAY_MS) <= TOLERANCE_MS, (
            f"RTT to {dst} grew by {added:.3f} ms, expected {2 * DELAY_MS} ± {TOLERANCE_MS}"
        )

    assert not Path(f"/proc/{pid}").exists(), "delay process still alive after context exit"
    link = subprocess.run(
        ["ip", "-n", lab.r, "link", "show", "dev", lab.delay_dev],
        check=False,
        capture_output=True,
    )
    assert link.returncode != 0, "TUN device still present after context exit"
    assert _rules(lab.r) == rules_before, "policy rules not cleaned up"
    for dst in targets:
        after = ping(lab.a, dst)
        print(f"{dst}: after={after}")
        assert after.avg < 2.0, f"RTT to {dst} did not recover: {after}"


def _fail_inside_delay(lab: Lab, pids: list[int]) -> None:
    with delayed(lab.r, lab.delay_dev, DELAY_MS, (lab.if_ra, lab.if_rb)) as pid:
        pids.append(pid)
        raise RuntimeError("boom")


def test_cleanup_on_exception(lab: Lab) -> None:
    rules_before = _rules(lab.r)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        _fail_inside_delay(lab, pids)
    assert len(pids) == 1
    assert not Path(f"/proc/{pids[0]}").exists(), "delay process survived the exception"
    link = subprocess.run(
        ["ip", "-n", lab.r, "link", "show", "dev", lab.delay_dev],
        check=False,
        capture_output=True,
    )
    assert link.returncode != 0, "TUN device still present"
    assert _rules(lab.r) == rules_before
    warm_up(lab.a, lab.b4)
    assert ping(lab.a, lab.b4, count=2).avg < 2.0
