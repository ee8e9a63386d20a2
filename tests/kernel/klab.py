"""Labs of kernel WireGuard devices, for the kernel stage's guest (see stage.py).

KernelLab is tests.lab.lab.Lab with its servers made by the kernel (`ip link add type
wireguard` + `wg set`) instead of wireguard-go; the client tunnels are brought up by the real
`wg-quick up` as in the userspace labs, which with the module loaded makes kernel devices.
Everything is removed again by Lab.close() (namespaces take their devices with them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.lab.lab import REPO, Host, Lab, Server, http_get, run

WGNEST = REPO / ".venv" / "bin" / "wgnest"
# The guest runs Python ~10-80x slower than the host: one wgnest process takes tens of seconds.
WGNEST_TIMEOUT = 300.0
# ... and a namespace's read, whose deadline is the UAPI timeout + 1 s (2 s by default), can
# take longer than that there (seen on CI with `--netns all`: a namespace left out as a
# timeout). The guest's checks are about what is read, so they wait for it.
READ_TIMEOUT = "60s"


def wgnest(*args: str, ns: str | None, timeout: float = WGNEST_TIMEOUT
           ) -> subprocess.CompletedProcess[str]:
    """`wgnest ARGS` in namespace `ns` (None: the namespace this test runs in, the guest's
    root)."""
    return run(str(WGNEST), *args, ns=ns, check=False, timeout=timeout)


def check_json(ns: str | None, config_dir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """`wgnest check --format json --no-probe.enabled` in `ns` (None: the guest's root
    namespace), with the guest's read deadline: (exit code, document)."""
    res = wgnest("check", "--format", "json", "--no-probe.enabled", "--wireguard.uapi-timeout",
                 READ_TIMEOUT, "--config-dir", str(config_dir), *args, ns=ns)
    assert res.stdout, f"exit {res.returncode}: {res.stderr[-2000:]}"
    return res.returncode, json.loads(res.stdout)


def peer_of(doc: dict[str, Any], device: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in doc["peers"] if p["device"] == device]
    assert len(found) == 1, (device, [p["device"] for p in doc["peers"]])
    return found[0]


def netns_of(doc: dict[str, Any], netns: str) -> dict[str, Any]:
    """The entry of namespace `netns` in a `check --format json --netns ...` document (not
    self), with its own "devices" and "peers" (peer_of works on it)."""
    found: list[dict[str, Any]] = [n for n in doc["namespaces"] if n["netns"] == netns]
    assert len(found) == 1, (netns, [n["netns"] for n in doc["namespaces"]])
    return found[0]


def link_kind(ns: str, name: str) -> str:
    """The kind of link `name` as the kernel reports it (`wireguard` for a kernel device,
    `tun` for wireguard-go's)."""
    doc = json.loads(run("ip", "-d", "-j", "link", "show", name, ns=ns).stdout)
    return str(doc[0].get("linkinfo", {}).get("info_kind", ""))


class KernelLab(Lab):
    """The userspace lab's topology with kernel WireGuard servers."""

    def _server_device(self, host: Host, srv: Server) -> None:
        """A kernel WireGuard device: removed with its namespace."""
        run("ip", "link", "add", srv.name, "type", "wireguard", ns=host.ns)

    def serve(self, *args: str, port: int = 9586) -> subprocess.Popen[str]:
        """`wgnest serve` in the client namespace on its loopback, with a start-up deadline
        the guest's slow Python needs; logs go to a file."""
        log = self.serve_log = self.workdir / "serve.log"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.client.ns, str(WGNEST), "serve",
             "--web.listen-address", f"127.0.0.1:{port}", "--config-dir", str(self.workdir),
             "--log.level", "debug", *args],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=dict(os.environ), text=True)
        self.extra_procs.append(proc)
        deadline = time.monotonic() + WGNEST_TIMEOUT
        while time.monotonic() < deadline:
            try:
                status, _ = http_get(self.client.ns, f"http://127.0.0.1:{port}/-/healthy")
                if status == 200:
                    return proc
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"wgnest serve did not start: {log.read_text()[-2000:]}")
