"""Real network labs: namespaces joined by veth to a router, wireguard-go servers, client
tunnels brought up with the real `wg-quick up`. Everything a Lab makes it removes again
(namespaces, wireguard-go processes by pid, UAPI sockets), even when a test fails.

Topology (addresses are per lab and only exist inside its namespaces):

    client ──veth── router ──veth── server1 (wireguard-go, NAT to the router side)
                           └─veth── server2 (wireguard-go)
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
UAPI_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block (this thread only) inside network namespace `ns`. Sockets made in the
    block stay in that namespace afterwards, so a test can talk to its lab's loopback."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{ns}", "rb") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


def http_get(ns: str, url: str, timeout: float = 5.0, **kwargs: Any) -> tuple[int, bytes]:
    """GET `url` from inside `ns`. Returns (status, body); HTTP errors are returned too."""
    with in_netns(ns):
        try:
            with urllib.request.urlopen(url, timeout=timeout, **kwargs) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


def run(*cmd: str, ns: str | None = None, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input,
                          env=env, timeout=timeout)


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def uapi_set(device: str, body: str, timeout: float = 10.0) -> None:
    """Configure a userspace WireGuard device over its UAPI socket (`set=1`; keys in hex):
    much faster than one `wg set` per peer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(UAPI_DIR / f"{device}.sock"))
        sock.sendall(f"set=1\n{body}\n".encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    if answer != b"errno=0\n\n":
        raise RuntimeError(f"UAPI set on {device} failed: {answer[:200]!r}")


def missing_prerequisites() -> str:
    """Why lab tests cannot run here, or "" when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, TUN, policy routing)"
    for tool in ("ip", "wg", "wg-quick", "wireguard-go", "nft"):
        if shutil.which(tool) is None:
            return f"lab tests need {tool} (make test installs it)"
    if not Path("/dev/net/tun").exists():
        return "lab tests need /dev/net/tun"
    return ""


L = TypeVar("L", bound="Lab")


@contextlib.contextmanager
def built(lab: L, servers: int = 2) -> Iterator[L]:
    """`lab` built, for a fixture to yield; removed afterwards, always, with everything the
    test added. A failing command shows as an assertion with its stderr."""
    try:
        lab.build(servers)
        yield lab
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None
    finally:
        lab.close()


def _link_local_settled(ns: str, dev: str, timeout: float = 10.0) -> None:
    """Wait until `dev` has its final link-local address: the host's routes are then
    what they stay for the test."""
    deadline = time.monotonic() + timeout
    while True:
        out = run("ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link", ns=ns).stdout
        if out and "tentative" not in out:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ns}/{dev}: no final link-local address in {timeout:.0f} s")
        time.sleep(0.01)


def genkey() -> tuple[str, str]:
    private = run("wg", "genkey").stdout.strip()
    public = run("wg", "pubkey", input=private + "\n").stdout.strip()
    return private, public


def daemon_pids(name: str) -> list[int]:
    """pids of wireguard-go processes serving interface `name` (wg-quick daemonizes them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"wireguard-go") and name.encode() in argv[1:]:
            pids.append(int(proc.name))
    return pids


@dataclass
class Host:
    ns: str
    dev: str  # the veth towards the router
    v4: str  # address on the link to the router
    v6: str
    router_v4: str
    router_v6: str


@dataclass
class Server:
    host: Host
    name: str  # wireguard-go interface
    private: str
    public: str
    tunnel_v4: str  # server's tunnel address, e.g. 10.201.0.1
    tunnel_v6: str
    port: int = 51820
    pid: int = 0


@dataclass
class Lab:
    tag: str = field(default_factory=lambda: "wn" + secrets.token_hex(2))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wgnest-lab-")))
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)  # WireGuard names (UAPI sockets)
    pids: list[int] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    servers: dict[str, Server] = field(default_factory=dict)
    extra_procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    public_keys: dict[str, str] = field(default_factory=dict)  # client tunnel -> its key
    private_keys: list[str] = field(default_factory=list)  # every private key of the lab
    serve_log: Path | None = None

    # ---- topology -------------------------------------------------------------------
    def build(self, servers: int = 2) -> Lab:
        self.router = self._ns("r")
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.router)
        run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=self.router)
        self.client = self._attach("c", 1)
        for i in range(1, servers + 1):
            host = self._attach(f"s{i}", i + 1)
            self.servers[f"s{i}"] = self._server(host, i)
        return self

    def _ns(self, role: str) -> str:
        ns = f"{self.tag}{role}"
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
        # No DAD: a kernel-made link-local address would otherwise turn from tentative to
        # final (adding its local route) a second or two later, in the middle of a test.
        for conf in ("all", "default"):
            run("sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0", ns=ns)
        return ns

    def _attach(self, role: str, net: int) -> Host:
        ns = self._ns(role)
        inner, outer = f"{self.tag}{role}i", f"{self.tag}{role}o"
        run("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", outer,
            "netns", self.router)
        host = Host(ns, inner, f"198.18.{net}.2", f"fd00:{net}::2", f"198.18.{net}.1",
                    f"fd00:{net}::1")
        for n, dev, v4, v6 in ((ns, inner, host.v4, host.v6),
                               (self.router, outer, host.router_v4, host.router_v6)):
            run("ip", "addr", "add", f"{v4}/24", "dev", dev, ns=n)
            run("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad", ns=n)
            run("ip", "link", "set", dev, "up", ns=n)
        run("ip", "route", "add", "default", "via", host.router_v4, ns=ns)
        run("ip", "-6", "route", "add", "default", "via", host.router_v6, ns=ns)
        for n, dev in ((ns, inner), (self.router, outer)):
            _link_local_settled(n, dev)
        self.hosts[role] = host
        return host

    def _server(self, host: Host, i: int) -> Server:
        """A WireGuard server in `host`: its device (see _server_device), key, port,
        addresses, forwarding and NAT."""
        name = f"{self.tag}s{i}"
        private, public = genkey()
        self.private_keys.append(private)
        srv = Server(host, name, private, public, f"10.20{i}.0.1", f"fd0{i}::1")
        self._server_device(host, srv)
        keyfile = self.workdir / f"{name}.key"
        keyfile.write_text(private + "\n")
        keyfile.chmod(0o600)
        run("wg", "set", name, "listen-port", str(srv.port), "private-key", str(keyfile),
            ns=host.ns)
        run("ip", "addr", "add", f"{srv.tunnel_v4}/24", "dev", name, ns=host.ns)
        run("ip", "-6", "addr", "add", f"{srv.tunnel_v6}/64", "dev", name, "nodad", ns=host.ns)
        run("ip", "link", "set", name, "up", ns=host.ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=host.ns)
        run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=host.ns)
        # Masquerade what leaves towards the router: the far server then sees this
        # server's address as the source of a nested tunnel.
        run("nft", "-f", "-", ns=host.ns, input=(
            "table inet labnat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            f'  oifname "{host.dev}" masquerade\n }}\n}}\n'))
        return srv

    def _server_device(self, host: Host, srv: Server) -> None:
        """The server's device: wireguard-go, its pid and UAPI socket remembered for close()."""
        name = srv.name
        self.interfaces.append(name)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, "wireguard-go", "-f", name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
        self.extra_procs.append(proc)
        deadline = time.monotonic() + 10
        while not (UAPI_DIR / f"{name}.sock").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"wireguard-go {name} did not start")
            time.sleep(0.02)
        srv.pid = next(iter(daemon_pids(name)), proc.pid)
        self.pids.append(srv.pid)

    def assert_no_private_key(self, *texts: str | bytes) -> None:
        """No private key of the lab, in base64 or hex, in any of `texts`."""
        for private in self.private_keys:
            for form in (private, base64.b64decode(private).hex()):
                for text in texts:
                    hit = (form.encode() if isinstance(text, bytes) else form) in text
                    assert not hit, "a private key: " + "".join(
                        line.replace(form, "<PRIVATE KEY>")[:300] + "\n"
                        for line in str(text).splitlines() if form in line)[:900]

    # ---- tunnels ----------------------------------------------------------------------
    def add_server_peer(self, srv: Server, public: str, v4: str, v6: str) -> None:
        run("wg", "set", srv.name, "peer", public, "allowed-ips", f"{v4}/32,{v6}/128",
            ns=srv.host.ns)

    def client_tunnel(self, index: int, srv: Server, allowed: str, *, v6: bool = False,
                      extra: str = "", peer_extra: str = "") -> str:
        """Write a wg-quick config for client tunnel `index` to `srv` and bring it up with
        wg-quick in the client namespace. Returns the interface name."""
        name, conf = self.client_config(index, srv, allowed, v6=v6, extra=extra,
                                        peer_extra=peer_extra)
        try:
            run("wg-quick", "up", str(conf), ns=self.client.ns)
        finally:
            self.pids.extend(daemon_pids(name))
        return name

    def client_config(self, index: int, srv: Server, allowed: str, *, v6: bool = False,
                      extra: str = "", peer_extra: str = "") -> tuple[str, Path]:
        """Write the wg-quick config of client tunnel `index` (the server learns the peer),
        without bringing it up. Returns (interface name, config path)."""
        name = f"{self.tag}w{index}"
        private, public = genkey()
        self.private_keys.append(private)
        n = srv.name[-1]
        v4, v6addr = f"10.20{n}.0.{10 + index}", f"fd0{n}::{10 + index}"
        self.add_server_peer(srv, public, v4, v6addr)
        ep = f"[{srv.host.v6}]:{srv.port}" if v6 else f"{srv.host.v4}:{srv.port}"
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            f"[Interface]\nPrivateKey = {private}\nAddress = {v4}/24, {v6addr}/64\n{extra}\n"
            f"[Peer]\nPublicKey = {srv.public}\nAllowedIPs = {allowed}\nEndpoint = {ep}\n"
            f"{peer_extra}\n")
        conf.chmod(0o600)
        self.interfaces.append(name)
        self.public_keys[name] = public
        return name, conf

    def wg_down(self, name: str) -> None:
        run("wg-quick", "down", str(self.workdir / f"{name}.conf"), ns=self.client.ns)

    def ping(self, ns: str, address: str, count: int = 1) -> bool:
        six = ["-6"] if ":" in address else []
        return run("ping", *six, "-c", str(count), "-i", "0.2", "-W", "2", address, ns=ns,
                   check=False).returncode == 0

    def server_view(self, srv: Server) -> dict[str, str]:
        """Endpoint of every peer as the server itself sees it: public key -> endpoint."""
        out = run("wg", "show", srv.name, "endpoints", ns=srv.host.ns).stdout
        return dict(line.split("\t") for line in out.splitlines() if "\t" in line)

    def wgnest(self, *args: str, ns: str | None = None, check: bool = False
               ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO / "exporter")}
        return run(sys.executable, "-m", "wgnest", *args, ns=ns or self.client.ns, env=env,
                   check=check, timeout=60)

    def check_json(self, *args: str) -> tuple[int, dict[str, Any]]:
        res = self.wgnest("check", "--format", "json", "--config-dir", str(self.workdir), *args)
        assert res.stdout, res.stderr
        return res.returncode, json.loads(res.stdout)

    def serve(self, *args: str, port: int = 9586) -> subprocess.Popen[str]:
        """Start `wgnest serve` in the client namespace on its loopback; logs go to a file."""
        env = {**os.environ, "PYTHONPATH": str(REPO / "exporter")}
        log = self.serve_log = self.workdir / "serve.log"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.client.ns, sys.executable, "-m", "wgnest", "serve",
             "--web.listen-address", f"127.0.0.1:{port}", "--config-dir", str(self.workdir),
             "--log.level", "debug", *args],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, text=True)
        self.extra_procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                status, _ = http_get(self.client.ns, f"http://127.0.0.1:{port}/-/healthy")
                if status == 200:
                    return proc
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"wgnest serve did not start: {log.read_text()[-2000:]}")

    # ---- cleanup ----------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.extra_procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for name in self.interfaces:
            self.pids.extend(daemon_pids(name))
        for pid in set(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.extra_procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        for name in self.interfaces:
            for suffix in (".sock", ".name"):
                with contextlib.suppress(FileNotFoundError):
                    (UAPI_DIR / f"{name}{suffix}").unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)
