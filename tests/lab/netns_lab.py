"""Labs for `--netns` (issue 13): WireGuard devices spread over several network namespaces,
seen by a wgnest that runs in the host's root namespace.

On top of the seed lab (router, client, two wireguard-go servers, see lab.py):

    client (A) ──veth── behind (B)     B's default route is A; A forwards and masquerades, so
      │ wg-quick full tunnel to s1     B's transport to s2 is routed into A's tunnel: nested
    router ──veth── plain (C)          a direct device, nothing in between
           ──veth── hidden (H…)        no /run/netns name: only its processes hold it, with
                                       their own mount namespace and a private tmpfs on
                                       /var/run/wireguard (a container); optionally their own
                                       UTS namespace and /etc/hostname

Devices in named namespaces are brought up with the real `wg-quick up` (daemonized
wireguard-go, its UAPI socket in the shared /var/run/wireguard); devices in hidden namespaces
run a foreground wireguard-go whose socket only /proc/PID/root/var/run/wireguard shows.
Everything made is removed again (NetnsLab.close), even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.lab.lab import REPO, UAPI_DIR, Host, Lab, Server, daemon_pids, genkey, run

Sample = tuple[str, dict[str, str], float]


@dataclass
class Hidden:
    """A network namespace without a /run/netns name, held by `holder` (a `sleep` exec'd under
    a unique name, so its comm is `comm`), with a private mount namespace and, when
    `hostname` is set, a private UTS namespace whose /etc/hostname says so."""

    holder: subprocess.Popen[str]
    comm: str
    hostname: str
    dev: str  # veth towards the router, inside the namespace
    v4: str
    router_v4: str

    @property
    def pid(self) -> int:
        return self.holder.pid

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def label(self) -> str:
        """The netns label the contract gives it: the hostname, else the holder's comm."""
        return self.hostname or self.comm

    @property
    def uapi_dir(self) -> Path:
        """Its private /var/run/wireguard, seen from the host. Not /proc/PID/root/var/run/...:
        /var/run is the absolute symlink /run, which resolves in the *reader's* root, so
        that path is the host's directory. (The lab's mount namespaces share the host's tree,
        so the host's resolution of the symlink holds inside them.)"""
        return Path(f"/proc/{self.pid}/root") / os.path.realpath(UAPI_DIR).lstrip("/")

    def inode(self) -> int:
        return os.stat(self.path).st_ino


@dataclass
class Device:
    """A wireguard-go device of the lab outside the client namespace."""

    name: str
    netns: str  # the label wgnest should give its namespace
    public: str  # the device's own key
    server: Server  # its only peer
    tunnel_v4: str
    pids: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def parse_metrics(text: str) -> list[Sample]:
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def select(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s[0] == name and labels.items() <= s[1].items()]


@dataclass
class NetnsLab(Lab):
    hidden_namespaces: list[Hidden] = field(default_factory=list)
    devices: dict[str, Device] = field(default_factory=dict)  # by namespace label + name
    serve_url: str = ""

    # ---- named namespaces ---------------------------------------------------------------
    def behind(self, gateway: Host, role: str, net: int, outer: str) -> Host:
        """A namespace whose only link is a veth to `gateway`, its default route. The gateway
        forwards and masquerades what it sends into its tunnel `outer` (its server accepts
        only the gateway's tunnel address) or to the router."""
        ns = self._ns(role)
        inner, near = f"{self.tag}{role}i", f"{self.tag}{role}o"
        run("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", near,
            "netns", gateway.ns)
        host = Host(ns, inner, f"192.168.{net}.2", "", f"192.168.{net}.1", "")  # IPv4 only
        for n, dev, v4 in ((ns, inner, host.v4), (gateway.ns, near, host.router_v4)):
            run("ip", "addr", "add", f"{v4}/24", "dev", dev, ns=n)
            run("ip", "link", "set", dev, "up", ns=n)
        run("ip", "route", "add", "default", "via", host.router_v4, ns=ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=gateway.ns)
        run("nft", "-f", "-", ns=gateway.ns, input=(
            "table ip labfwd {\n chain post {\n  type nat hook postrouting priority 100;\n"
            f'  ip saddr 192.168.{net}.0/24 oifname {{ "{outer}", "{gateway.dev}" }} '
            "masquerade\n }\n}\n"))
        self.hosts[role] = host
        return host

    def plain(self, role: str, net: int) -> Host:
        """A namespace on the router, like the client, with nothing else in its way."""
        return self._attach(role, net)

    def quick_device(self, host: Host, index: int, srv: Server, allowed: str) -> Device:
        """A wg-quick tunnel (index as in Lab.client_config) to `srv`, up in `host`'s
        namespace: a daemonized wireguard-go with its socket in the shared UAPI directory."""
        name, conf = self.client_config(index, srv, allowed)
        try:
            run("wg-quick", "up", str(conf), ns=host.ns)
        finally:
            pids = daemon_pids(name)
            self.pids.extend(pids)
        dev = Device(name, host.ns, self.public_keys[name], srv,
                     f"10.20{srv.name[-1]}.0.{10 + index}", pids)
        self.devices[f"{host.ns}/{name}"] = dev
        return dev

    def delete_namespace(self, ns: str) -> None:
        """Stop the wireguard-go of every device in `ns` (SIGTERM by pid: it removes its own
        socket), then delete the namespace."""
        for key, dev in list(self.devices.items()):
            if dev.netns != ns:
                continue
            for pid in dev.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while any(Path(f"/proc/{pid}").exists() for pid in dev.pids):
                assert time.monotonic() < deadline, f"wireguard-go of {dev.name} still runs"
                time.sleep(0.05)
            del self.devices[key]
        run("ip", "netns", "del", ns)
        self.namespaces.remove(ns)

    # ---- hidden namespaces (containers) ---------------------------------------------------
    def hidden(self, role: str, net: int, *, hostname: str = "") -> Hidden:
        """A namespace only a process holds, joined to the router by a veth."""
        comm = f"{self.tag}{role}"[:15]
        holder_bin = self.workdir / comm
        holder_bin.symlink_to(Path(run("sh", "-c", "command -v sleep").stdout.strip()))
        ready = self.workdir / f"{comm}.ready"
        script = f"mount -t tmpfs -o mode=0755 wgnest {UAPI_DIR} && "
        flags = ["--net", "--mount", "--propagation", "private"]
        if hostname:
            flags.append("--uts")
            (self.workdir / f"{comm}.hostname").write_text(hostname + "\n")
            script += (f"hostname {hostname} && "
                       f"mount --bind {self.workdir / f'{comm}.hostname'} /etc/hostname && ")
        script += f"ip link set lo up && touch {ready} && exec {holder_bin} infinity"
        holder = subprocess.Popen(["unshare", *flags, "--", "sh", "-c", script],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.extra_procs.append(holder)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if holder.poll() is not None or time.monotonic() > deadline:
                err = holder.stderr.read() if holder.stderr else ""
                raise RuntimeError(f"hidden namespace {comm} did not start: {err}")
            time.sleep(0.02)
        inner, outer = f"{self.tag}{role}i", f"{self.tag}{role}o"
        h = Hidden(holder, comm, hostname, inner, f"198.18.{net}.2", f"198.18.{net}.1")
        self.hidden_namespaces.append(h)
        run("ip", "link", "add", inner, "netns", str(h.pid), "type", "veth", "peer", outer,
            "netns", self.router)
        run("ip", "addr", "add", f"{h.router_v4}/24", "dev", outer, ns=self.router)
        run("ip", "link", "set", outer, "up", ns=self.router)
        self.hrun(h, "ip", "addr", "add", f"{h.v4}/24", "dev", inner)
        self.hrun(h, "ip", "link", "set", inner, "up")
        self.hrun(h, "ip", "route", "add", "default", "via", h.router_v4)
        return h

    def hrun(self, h: Hidden, *cmd: str, check: bool = True, input: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in `h`'s network, mount (and UTS) namespaces."""
        return subprocess.run(self._nsenter(h) + list(cmd), check=check, capture_output=True,
                              text=True, input=input, timeout=30)

    @staticmethod
    def _nsenter(h: Hidden) -> list[str]:
        return ["nsenter", "-t", str(h.pid), "-n", "-m", *(["-u"] if h.hostname else []),
                "--"]

    def hidden_device(self, h: Hidden, name: str, srv: Server, host_octet: int) -> Device:
        """A foreground wireguard-go `name` in `h` with one peer, `srv` (which learns it back)
        at 10.20N.0.<host_octet>. Its UAPI socket is only in h's private /var/run/wireguard."""
        proc = subprocess.Popen([*self._nsenter(h), "wireguard-go", "-f", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
        self.extra_procs.append(proc)  # nsenter execs: proc.pid is wireguard-go's pid
        deadline = time.monotonic() + 10
        while not (h.uapi_dir / f"{name}.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go {name} in {h.comm} did not start")
            time.sleep(0.02)
        private, public = genkey()
        self.private_keys.append(private)
        keyfile = self.workdir / f"{h.comm}-{name}.key"
        keyfile.write_text(private + "\n")
        keyfile.chmod(0o600)
        n = srv.name[-1]
        v4 = f"10.20{n}.0.{host_octet}"
        self.add_server_peer(srv, public, v4, f"fd0{n}::{host_octet}")
        self.hrun(h, "wg", "set", name, "private-key", str(keyfile), "peer", srv.public,
                  "allowed-ips", f"10.20{n}.0.0/24", "endpoint", f"{srv.host.v4}:{srv.port}")
        self.hrun(h, "ip", "addr", "add", f"{v4}/24", "dev", name)
        self.hrun(h, "ip", "link", "set", name, "up")
        dev = Device(name, h.label, public, srv, v4, [proc.pid])
        self.devices[f"{h.label}/{name}"] = dev
        return dev

    def stop_hidden(self, h: Hidden) -> None:
        """End a hidden namespace: SIGTERM its devices' wireguard-go and its holder, by pid;
        the namespace, its mounts and sockets go with its last process."""
        procs = [p for p in self.extra_procs if p.pid in {
            pid for d in self.devices.values() if d.netns == h.label for pid in d.pids}]
        for proc in [*procs, h.holder]:
            proc.terminate()
            proc.wait(timeout=10)
        self.devices = {k: d for k, d in self.devices.items() if d.netns != h.label}

    # ---- ground truth ---------------------------------------------------------------------
    def transfer(self, ns: str, name: str) -> tuple[int, int]:
        """(received, sent) bytes of `name`'s single peer, as wg shows them."""
        line = run("wg", "show", name, "transfer", ns=ns).stdout.split()
        return int(line[1]), int(line[2])

    def hping(self, h: Hidden, address: str, count: int = 1) -> bool:
        return self.hrun(h, "ping", "-c", str(count), "-i", "0.2", "-W", "2", address,
                         check=False).returncode == 0

    # ---- wgnest in the host's root namespace -----------------------------------------------
    def host_wgnest(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO / "exporter")}
        return subprocess.run([sys.executable, "-m", "wgnest", *args], capture_output=True,
                              text=True, env=env, timeout=120, check=False)

    def host_check(self, *args: str) -> tuple[int, dict[str, Any]]:
        res = self.host_wgnest("check", "--format", "json", "--config-dir", str(self.workdir),
                               "--no-probe.enabled", *args)
        assert res.stdout, f"rc {res.returncode}: {res.stderr[-3000:]}"
        doc: dict[str, Any] = json.loads(res.stdout)
        return res.returncode, doc

    def host_serve(self, *args: str) -> subprocess.Popen[str]:
        """`wgnest serve` in the root namespace on a free loopback port (self.serve_url)."""
        env = {**os.environ, "PYTHONPATH": str(REPO / "exporter")}
        port = free_port()
        self.serve_url = f"http://127.0.0.1:{port}"
        log = self.serve_log = self.workdir / "serve.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "wgnest", "serve", "--web.listen-address",
             f"127.0.0.1:{port}", "--config-dir", str(self.workdir), "--log.level", "debug",
             *args], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, text=True)
        self.extra_procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.get("/-/healthy")[0] == 200:
                    return proc
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"wgnest serve did not start: {log.read_text()[-3000:]}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.serve_url + path, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def scrape(self) -> tuple[str, list[Sample]]:
        status, body = self.get("/metrics")
        assert status == 200, body[:500]
        text = body.decode()
        return text, parse_metrics(text)

    # ---- cleanup ----------------------------------------------------------------------
    def close(self) -> None:
        """Lab.close stops every process (the holders too: a hidden namespace, its mounts and
        its sockets go with its last process), then waits until the holders are gone."""
        try:
            super().close()
        finally:
            for h in self.hidden_namespaces:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.holder.wait(timeout=5)
