"""Network namespaces: which ones exist (named under /run/netns, and those of running
processes, so containers are found without configuration), a readable label for each, and a
worker thread inside each one.

A netlink or UDP socket belongs to the namespace of the thread that opened it, and setns()
moves only the calling thread: each namespace gets one thread that enters it once and then
runs every read of that namespace, so the sources work there unchanged. Entering needs
CAP_SYS_ADMIN; reading /proc/PID/ns of another user's process needs CAP_SYS_PTRACE.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from wgnest.sources.errors import SourceError, reason_for_errno

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
PROC = Path("/proc")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
T = TypeVar("T")
Key = tuple[int, int]  # (st_dev, st_ino) of the namespace's nsfs inode


@dataclass(frozen=True, slots=True)
class Namespace:
    key: Key
    name: str  # the label value
    path: str  # what is opened to enter it
    enter: str = ""  # how a user runs a command there
    uapi_dirs: tuple[Path, ...] = ()  # where its userspace devices' UAPI sockets are
    own: bool = False  # the namespace wgnest runs in (never entered)


@dataclass(frozen=True, slots=True)
class NetnsSpec:
    """--netns: "self", "all", or names and paths."""

    mode: str  # "self", "all" or "list"
    entries: tuple[str, ...] = ()

    @staticmethod
    def parse(values: str | Sequence[str]) -> NetnsSpec:
        items = [values] if isinstance(values, str) else list(values)
        words = [w.strip() for item in items for w in item.split(",") if w.strip()]
        if not words or words == ["self"]:
            return NetnsSpec("self")
        if words == ["all"]:
            return NetnsSpec("all")
        if "self" in words or "all" in words:
            raise ValueError(f"--netns {','.join(words)!r}: 'self' and 'all' stand alone")
        for word in words:
            if not word.startswith("/") and ("/" in word or word in (".", "..")):
                raise ValueError(f"--netns {word!r}: a name under {NETNS_DIR} or an "
                                 "absolute path (/proc/PID/ns/net, /run/netns/NAME)")
        return NetnsSpec("list", tuple(dict.fromkeys(words)))

    @property
    def labelled(self) -> bool:
        return self.mode != "self"


def ns_key(path: str | Path) -> Key:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _own_key() -> Key:
    return ns_key(PROC / "self" / "ns" / "net")


def resolve_in_root(root: Path, path: Path) -> Path:
    """`path` as the processes whose root is `root` see it: symlinks inside are followed
    relative to that root (an absolute link such as /var/run -> /run would otherwise leave
    it for ours)."""
    parts = list(path.relative_to("/").parts)
    done: list[str] = []
    for _hop in range(40):
        if not parts:
            break
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            target = os.readlink(candidate)
        except OSError:
            done.append(part)
            continue
        target_path = Path(target)
        if target_path.is_absolute():
            done = []
            parts = list(target_path.relative_to("/").parts) + parts
        else:
            parts = list(target_path.parts) + parts
    return root.joinpath(*done, *parts)


def _read(path: Path, limit: int = 256) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


@dataclass
class _Group:
    key: Key
    pids: list[int]


def _process_namespaces() -> tuple[dict[Key, list[int]], int]:
    """Namespace key -> pids in it (ascending), and how many processes could not be read
    (without CAP_SYS_PTRACE: other users' processes)."""
    groups: dict[Key, list[int]] = {}
    denied = 0
    try:
        names = os.listdir(PROC)
    except OSError:
        return groups, 0
    proc = str(PROC)
    stat = os.stat
    for name in names:
        if not name.isdigit():
            continue
        try:
            st = stat(f"{proc}/{name}/ns/net")  # str, not Path: this runs for every process
        except PermissionError:
            denied += 1
            continue
        except OSError:
            continue  # exited meanwhile
        groups.setdefault((st.st_dev, st.st_ino), []).append(int(name))
    for pids in groups.values():
        pids.sort()
    return groups, denied


CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21


def has_capability(bit: int) -> bool:
    """Whether this process has the capability in its effective set."""
    for line in _read(PROC / "self" / "status", 1 << 16).splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _host_key(groups: dict[Key, list[int]]) -> Key | None:
    """The initial namespace: the one kernel threads run in (kthreadd is pid 2 when we see
    the initial pid namespace), else pid 1's."""
    if _read(PROC / "2" / "comm").strip() == "kthreadd":
        for key, pids in groups.items():
            if 2 in pids:
                return key
    return next((k for k, pids in groups.items() if 1 in pids), None)


def _same(pid: int, kind: str, mine: Key | None) -> bool:
    try:
        return mine is not None and ns_key(PROC / str(pid) / "ns" / kind) == mine
    except OSError:
        return True  # unknown: treat as shared


def _mine(kind: str) -> Key | None:
    try:
        return ns_key(PROC / "self" / "ns" / kind)
    except OSError:
        return None


def process_label(pids: Sequence[int]) -> str:
    """A container's hostname when its processes have their own UTS namespace, else the
    comm of the oldest process in the namespace."""
    uts = _mine("uts")
    for pid in pids[:1]:
        if not _same(pid, "uts", uts):
            host = _read(resolve_in_root(PROC / str(pid) / "root", Path("/etc/hostname")))
            word = host.strip().split("\n")[0] if host else ""
            if _HOSTNAME.fullmatch(word):
                return word
        comm = _read(PROC / str(pid) / "comm").strip()
        if comm:
            return re.sub(r"[^A-Za-z0-9._-]", "_", comm)
    return ""


def _uapi_dirs(pids: Sequence[int], uapi_dir: Path, shared: bool) -> tuple[Path, ...]:
    """The host's UAPI directory (if the namespace's processes share our mount namespace,
    or none run there: an `ip netns` name), plus the directory each private mount namespace
    among its processes has (reached through /proc/PID/root, never guessed)."""
    mnt = _mine("mnt")
    dirs: list[Path] = [uapi_dir] if shared else []
    seen: set[Key] = set()
    for pid in pids:
        if _same(pid, "mnt", mnt):
            if uapi_dir not in dirs:
                dirs.append(uapi_dir)
            continue
        try:
            key = ns_key(PROC / str(pid) / "ns" / "mnt")
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            dirs.append(resolve_in_root(PROC / str(pid) / "root", uapi_dir))
    # `ip netns exec` gives each process a mount namespace of its own over the same /run:
    # one directory reached several ways is read once
    unique: dict[Key, Path] = {}
    for d in dirs:
        try:
            unique.setdefault(ns_key(d), d)
        except OSError:
            continue  # none there (no userspace device in that container)
    return tuple(unique.values())


def _named() -> dict[Key, str]:
    """Key -> name of every namespace mounted under /run/netns (a file that is no nsfs
    mount is skipped)."""
    out: dict[Key, str] = {}
    try:
        entries = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return out
    nsfs = _own_key()[0]
    for name in entries:
        try:
            key = ns_key(NETNS_DIR / name)
        except OSError:
            continue
        if key[0] == nsfs:
            out.setdefault(key, name)
    return out


def _dedupe(found: list[Namespace]) -> list[Namespace]:
    counts: dict[str, int] = {}
    for ns in found:
        counts[ns.name] = counts.get(ns.name, 0) + 1
    return [ns if counts[ns.name] == 1 else Namespace(
        ns.key, f"{ns.name}-{ns.key[1]}", ns.path, ns.enter, ns.uapi_dirs, ns.own)
        for ns in found]


def discover(spec: NetnsSpec, uapi_dir: Path, *, everything: bool = False
             ) -> tuple[list[Namespace], list[tuple[str, SourceError]]]:
    """The namespaces `spec` selects (`everything`: every one that can be found, for the
    search of a moved device's socket), our own first. Errors are one line each, with the
    --netns entry they concern ("" for none)."""
    errors: list[tuple[str, SourceError]] = []
    own = _own_key()
    named = _named()
    # every namespace, named ones too, may hold processes with a private mount namespace
    # (a container runtime's): their UAPI directories are found through them
    groups, denied = _process_namespaces()
    host = _host_key(groups)

    def make(key: Key, path: str) -> Namespace:
        pids = groups.get(key, [])
        if key == own:
            name = named.get(key) or ("host" if key == host else process_label(pids) or "self")
            return Namespace(key, name, path, "", (uapi_dir,), own=True)
        if key in named:
            name = named[key]
            enter = f"ip netns exec {name}"
        elif key == host:
            name, enter = "host", "nsenter -t 1 -n"
        else:
            name = process_label(pids) or f"netns-{key[1]}"
            enter = f"nsenter -t {pids[0]} -n" if pids else f"nsenter --net={path}"
        return Namespace(key, name, path, enter, _uapi_dirs(pids, uapi_dir, not pids))

    def path_of(key: Key) -> str:
        if key in named:
            return str(NETNS_DIR / named[key])
        pids = groups.get(key)
        return str(PROC / str(pids[0]) / "ns" / "net") if pids else ""

    found: list[Namespace] = [make(own, "")]
    if spec.mode == "all" or everything:
        keys = list(dict.fromkeys([*named, *sorted(groups, key=lambda k: groups[k][0])]))
        found += [make(k, path_of(k)) for k in keys if k != own]
        if denied and not has_capability(CAP_SYS_PTRACE):
            errors.append(("", SourceError(
                "some processes' namespaces are unreadable (/proc/PID/ns/net of another "
                "user's process needs CAP_SYS_PTRACE): containers among them are not seen",
                "eperm")))
    if spec.mode == "list":
        selected: list[Namespace] = []
        for entry in spec.entries:
            path = entry if entry.startswith("/") else str(NETNS_DIR / entry)
            try:
                key = ns_key(path)
            except OSError as exc:
                errors.append((entry, SourceError(f"--netns {entry}: {exc.strerror}",
                                                  reason_for_errno(exc.errno))))
                continue
            if key[0] != own[0]:
                errors.append((entry, SourceError(f"--netns {entry}: not a network namespace",
                                                  "enodev")))
                continue
            ns = make(key, path if key != own else "")
            if key not in named and not groups.get(key) and entry.startswith("/"):
                ns = Namespace(key, Path(entry).name if key != own else ns.name, path,
                               f"nsenter --net={path}", ns.uapi_dirs, ns.own)
            selected.append(ns)
        if everything:
            chosen = {ns.key for ns in selected}
            selected += [ns for ns in found if ns.key not in chosen]
        found = selected
    seen: set[Key] = set()
    unique = [ns for ns in found if not (ns.key in seen or seen.add(ns.key))]  # type: ignore[func-returns-value]
    return _dedupe(unique), errors


_libc = ctypes.CDLL(None, use_errno=True)


def enter(path: str, key: Key) -> None:
    """Move the calling thread into the namespace at `path`, and check it is `key`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror}", reason_for_errno(exc.errno)) from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            hint = " (entering a namespace needs CAP_SYS_ADMIN)" if code == errno.EPERM else ""
            raise SourceError(f"{path}: setns: {os.strerror(code)}{hint}",
                              reason_for_errno(code))
    finally:
        os.close(fd)
    if ns_key(PROC / "thread-self" / "ns" / "net") != key:
        raise SourceError(f"{path}: a different namespace than found (it was replaced)",
                          "enodev")


class Worker:
    """One daemon thread inside one namespace, running the jobs given to it in order."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self._jobs: queue.SimpleQueue[tuple[Future[object], Callable[[], object]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=f"wgnest-netns-{ns.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed: SourceError | None = None
        if not self.ns.own:
            try:
                enter(self.ns.path, self.ns.key)
            except SourceError as exc:
                failed = exc
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            if failed is not None:
                future.set_exception(failed)
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                future.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, fn))  # type: ignore[arg-type]
        return future

    def close(self) -> None:
        self._jobs.put(None)
