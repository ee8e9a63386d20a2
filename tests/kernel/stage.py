"""The kernel stage, host side: boot Debian's own kernel under QEMU (TCG) with virtme-ng, once,
and run tests/kernel/ inside it against real kernel WireGuard devices.

    .venv/bin/python tests/kernel/stage.py [pytest args...]     (or: make kernel-test)

1. The kernel: the package `linux-image-amd64` depends on (linux-image-6.x-amd64) is fetched
   with `apt-get download`, unpacked with `dpkg-deb -x` into the cache (WGNEST_KERNEL_CACHE,
   default .cache/kernel in the repository; the guest hides /var/cache), pruned of drivers a
   headless guest never loads, and `depmod`ed there. A cached version is never fetched again.
2. The boot: `vng --run VMLINUZ --disable-kvm` (TCG: nested KVM hangs on some hosts). The
   guest's root is the host's filesystem over 9p, read-only; virtme-ng links the cached
   modules into the guest's /lib/modules. Only the result directory is writable.
3. The guest runs tests/kernel/guest_init.sh: loads wireguard, tun and veth, runs the
   project's own .venv/bin/pytest on tests/kernel/, and writes its exit code and log to the
   result directory. This script exits with that code.

When QEMU or the kernel cannot be had here, the stage is skipped (exit 0) with the reason,
except on CI (CI=true), where that fails. A VM that outlives WGNEST_KERNEL_TIMEOUT seconds
(default 1200) is killed by its pid; no qemu process is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
CACHE = Path(os.environ.get("WGNEST_KERNEL_CACHE") or REPO / ".cache" / "kernel")
TIMEOUT = float(os.environ.get("WGNEST_KERNEL_TIMEOUT") or 1200)
MEMORY = os.environ.get("WGNEST_KERNEL_MEMORY") or "2G"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
META_PACKAGE = "linux-image-amd64"
BOOTED = "wgnest-kernel-guest: booted"  # guest_init.sh prints this first
# Module trees a headless guest with 9p, virtio and networking never needs (~250 MB).
PRUNE = ("sound", "drivers/gpu", "drivers/media", "drivers/net/wireless",
         "drivers/net/ethernet", "drivers/infiniband", "drivers/scsi", "drivers/usb",
         "drivers/iio", "drivers/staging", "drivers/bluetooth", "net/wireless", "net/mac80211")
SUMMARY = re.compile(r"^=+ .*\b(passed|failed|error|errors|skipped|no tests ran)\b.* =+$")


class Skip(Exception):
    """The stage cannot run on this machine (never raised on CI: there it is a failure)."""


def say(text: str) -> None:
    print(f"kernel stage: {text}", flush=True)


def udevd() -> str | None:
    for path in ("/usr/lib/systemd/systemd-udevd", "/lib/systemd/systemd-udevd"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("udevd")


def missing_prerequisites() -> str:
    """Why the stage cannot run here, or ""."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and WireGuard devices in the guest)"
    if not (BIN / "vng").exists() or not (BIN / "pytest").exists():
        return f"needs virtme-ng and pytest in {BIN} (make venv installs the test extra)"
    tools = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod", "modprobe": "kmod",
             "busybox": "busybox-static", "apt-get": "apt", "dpkg-deb": "dpkg",
             "file": "file"}
    for tool, package in tools.items():
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"needs {tool} (Debian package {package}; make test installs it)"
    if udevd() is None:
        return "needs systemd-udevd (Debian package udev): the guest's script I/O ports"
    busybox = shutil.which("busybox", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    busybox = busybox or "busybox"
    if "statically linked" not in run(["file", "-L", busybox]).stdout:
        return "needs a static busybox for virtme-ng's initramfs (Debian package busybox-static)"
    try:
        qemu = run(["qemu-system-x86_64", "--version"], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"qemu-system-x86_64 cannot run: {exc}"
    if qemu.returncode != 0:
        return f"qemu-system-x86_64 cannot run: {qemu.stderr.strip()[:200]}"
    return ""


def run(argv: list[str], cwd: Path | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def kernel_package() -> str:
    """The versioned image package the meta package depends on, e.g. linux-image-6.1.0-57-amd64."""
    for attempt in range(2):
        res = run(["apt-cache", "depends", META_PACKAGE])
        found = re.findall(r"Depends: (linux-image-\S+)", res.stdout)
        if found:
            return found[0]
        if attempt == 0:
            run(["apt-get", "update", "-qq"], timeout=300)  # a machine that never ran it
    raise Skip(f"apt-cache depends {META_PACKAGE} names no kernel package: "
               f"{(res.stderr or res.stdout).strip()[:300]}")


def cached_versions() -> list[str]:
    """Complete cached kernel trees, oldest first."""
    if not CACHE.is_dir():
        return []
    trees = [p for p in CACHE.iterdir() if (p / ".complete").exists()]
    return [p.name for p in sorted(trees, key=lambda p: p.stat().st_mtime)]


def fetch_kernel() -> tuple[Path, str]:
    """(vmlinuz, version) of Debian's current kernel, from the cache or fetched into it."""
    try:
        version = kernel_package().removeprefix("linux-image-")
    except (Skip, OSError, subprocess.TimeoutExpired) as exc:
        cached = cached_versions()
        if not cached:
            raise Skip(f"no kernel in {CACHE} and none can be found: {exc}") from None
        version = cached[-1]
        say(f"cannot ask apt for the current kernel ({exc}); using cached {version}")
    tree = CACHE / version
    vmlinuz = tree / "boot" / f"vmlinuz-{version}"
    if (tree / ".complete").exists() and vmlinuz.exists():
        say(f"kernel {version} from the cache ({tree})")
        return vmlinuz, version
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".fetch-") as tmp:
        work = Path(tmp)
        got = run(["apt-get", "download", f"linux-image-{version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise Skip(f"apt-get download linux-image-{version} failed: "
                       f"{got.stderr.strip()[-300:]}")
        root = work / "root"
        unpacked = run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        if unpacked.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {debs[0].name}: {unpacked.stderr.strip()}")
        kernel = root / "lib" / "modules" / version / "kernel"
        for sub in PRUNE:
            shutil.rmtree(kernel / sub, ignore_errors=True)
        depmod = shutil.which("depmod", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        dep = run([depmod or "depmod", "-b", str(root), version])
        if dep.returncode != 0:
            raise RuntimeError(f"depmod -b {root} {version}: {dep.stderr.strip()}")
        (root / ".complete").write_text(f"{debs[0].name}\n")
        shutil.rmtree(tree, ignore_errors=True)
        root.rename(tree)
    for old in cached_versions():
        if old != version:  # Debian moved on: the previous kernel is not needed again
            shutil.rmtree(CACHE / old, ignore_errors=True)
    say(f"kernel {version} fetched into {tree} in {time.monotonic() - started:.1f} s")
    return vmlinuz, version


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def qemu_pid(pidfile: Path) -> int:
    try:
        pid = int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return 0
    return pid if b"qemu" in argv0 else 0


def kill_vm(proc: subprocess.Popen[str], pidfile: Path) -> list[int]:
    """Kill the VM: qemu by its pid first, so that vng reaps it and exits; then whatever is
    left of vng's session (its own process group). Returns the pids killed."""
    killed = []
    pid = qemu_pid(pidfile)
    if pid and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        killed.append(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything vng left behind, or vng itself
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pid and alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and alive(pid):
        raise RuntimeError(f"qemu pid {pid} survived SIGKILL")
    return killed


class Console:
    """Copies the guest's output to ours, line by line, noting when the guest came up."""

    def __init__(self, stream: IO[str], log: Path) -> None:
        self.booted_at: float | None = None
        self.tail: list[str] = []
        self.summary = ""
        self._thread = threading.Thread(target=self._pump, args=(stream, log), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str], log: Path) -> None:
        with log.open("w") as out:
            for line in stream:
                if self.booted_at is None and line.startswith(BOOTED):
                    self.booted_at = time.monotonic()
                if SUMMARY.match(line.strip()):
                    self.summary = line.strip()
                self.tail = [*self.tail[-40:], line]
                out.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()

    def join(self) -> None:
        self._thread.join(timeout=10)


def boot(vmlinuz: Path, pytest_args: list[str]) -> int:
    result = Path(tempfile.mkdtemp(prefix="wgnest-kstage-"))
    result.chmod(0o755)
    (result / "pytest-args").write_text("".join(f"{a}\n" for a in pytest_args))
    pidfile = result / "qemu.pid"
    cpus = str(min(4, os.cpu_count() or 1))
    argv = [str(BIN / "vng"), "--run", str(vmlinuz), "--disable-kvm", "--cpus", cpus,
            "--memory", MEMORY, "--rwdir", str(result), f"--qemu-opts=-pidfile {pidfile}",
            "--", f"bash {REPO}/tests/kernel/guest_init.sh {result}"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    say(f"booting {vmlinuz.name} (TCG, {cpus} vCPUs, {MEMORY}), timeout {TIMEOUT:.0f} s")
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    console = Console(proc.stdout, result / "console.log")  # type: ignore[arg-type]
    timed_out = False
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        killed = kill_vm(proc, pidfile)
        console.join()
    ended = time.monotonic()
    booted = console.booted_at
    if booted is not None:
        say(f"boot {booted - started:.1f} s, guest stage {ended - booted:.1f} s, "
            f"total {ended - started:.1f} s")
    if timed_out:
        say(f"FAILED: the VM ran past {TIMEOUT:.0f} s; killed qemu pid(s) {killed or '-'}; "
            f"guest logs in {result}")
        return 1
    rc_file = result / "rc"
    if booted is None:
        tail = "".join(console.tail[-15:]).strip()
        raise Skip(f"QEMU/virtme-ng did not boot the kernel (vng exit {proc.returncode}):\n"
                   f"{tail}")
    if not rc_file.exists():
        say(f"FAILED: the guest stopped before pytest finished (vng exit {proc.returncode}); "
            f"console log in {result / 'console.log'}")
        return 1
    rc = int(rc_file.read_text().strip() or 1)
    say(f"guest pytest exit code {rc}: {console.summary or '(no summary line)'}")
    if rc == 0:
        shutil.rmtree(result, ignore_errors=True)
    else:
        say(f"guest logs kept in {result}")
    return rc


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    # A SIGTERM (make interrupted, CI cancelled) unwinds like Ctrl-C, so the VM is killed.
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    try:
        why = missing_prerequisites()
        if why:
            raise Skip(why)
        vmlinuz, _version = fetch_kernel()
        # The guest's Python is ~10-80x slower and its root is read-only: compile the
        # project's modules here, once, instead of in every guest process.
        run([sys.executable, "-m", "compileall", "-q", "-j0", str(REPO / "exporter"),
             str(REPO / "tests")])
        rc = boot(vmlinuz, argv)
    except KeyboardInterrupt:
        say("interrupted; the VM was killed")
        return 130
    except Skip as exc:
        if ON_CI:
            say(f"FAILED (CI=true, so this is not skipped): {exc}")
            return 1
        say(f"SKIPPED: {exc}")
        return 0
    say(f"done in {time.monotonic() - started:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
