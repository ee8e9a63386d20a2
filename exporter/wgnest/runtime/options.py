"""Every flag of `wgnest check` and `wgnest serve`, and the one parser that holds them."""

from __future__ import annotations

import argparse
import math
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from wgnest import __version__
from wgnest.analysis.paths import parse_allow
from wgnest.analysis.selection import Reported
from wgnest.model.host import IPAddress
from wgnest.probe.targets import parse_probe_target
from wgnest.sources.netns import NetnsSpec

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
         "y": 31536000.0}
_PART = re.compile(r"([0-9]*\.?[0-9]+)(ms|s|m|h|d|w|y)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"wgnest: {message} (see --help)\n")


def _show(value: str) -> str:
    """A flag value safe to print on one line (control characters escaped)."""
    return repr(value) if value.isprintable() else ascii(value)


def duration(value: str) -> float:
    """A Prometheus duration (`30s`, `500ms`, `1m30s`, `1.5s`) or a bare number of seconds
    -> seconds. Never NaN or infinite."""
    text = value.strip()
    try:
        seconds = float(text) if re.fullmatch(r"[0-9]*\.?[0-9]+", text) else None
    except ValueError:
        seconds = None
    if seconds is None:
        parts = _PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(
                f"{_show(value)} is not a duration (e.g. 500ms, 30s, 1m, or seconds)")
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"{_show(value)} is not a finite duration")
    return seconds


def _text(seconds: float) -> str:
    """Seconds as a Prometheus duration: 0.5 -> 500ms, 3600 -> 1h."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def duration_in(low: float, high: float) -> Callable[[str], float]:
    """A duration flag that must lie in [low, high] seconds."""
    def parse(value: str) -> float:
        seconds = duration(value)
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(
                f"{_show(value)} is out of range: from {_text(low)} to {_text(high)}")
        return seconds

    return parse


def number_in(low: float, high: float, kind: type[float] | type[int] = float
              ) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_show(value)} is not a number") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise argparse.ArgumentTypeError(
                f"{_show(value)} is out of range: from {low:g} to {high:g}")
        return number

    return parse


REFRESH_INTERVAL = duration_in(0.1, 3600.0)
PROBE_INTERVAL = duration_in(0.01, 3600.0)
TIMEOUT = duration_in(0.01, 60.0)
MIN_EXCESS = duration_in(0.0, 10.0)


def _allow(value: str) -> tuple[str, str]:
    try:
        return parse_allow(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target(value: str) -> tuple[tuple[str, str], IPAddress]:
    try:
        return parse_probe_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{_show(value)} is not a regular expression: {exc}"
                                         ) from None


def _netns(value: str) -> str:
    try:
        NetnsSpec.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def netns_from(args: argparse.Namespace) -> NetnsSpec:
    """--netns as given (repeatable, comma-separated); ValueError names a bad mix."""
    return NetnsSpec.parse(args.netns or ["self"])


def add_netns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", dest="netns", action="append", type=_netns, default=[],
                   metavar="self|all|NAME,PATH,...",
                   help="network namespaces to read: self (default: wgnest's own; no netns "
                        "label), all (every /run/netns name and the namespace of every "
                        "process: containers are found), or names under /run/netns and "
                        "paths (/proc/PID/ns/net), comma-separated or repeated. With other "
                        "than self every WireGuard series has a netns label. Entering "
                        "another namespace needs CAP_SYS_ADMIN; seeing other users' "
                        "processes' namespaces CAP_SYS_PTRACE")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nesting", dest="allow", action="append", type=_allow, default=[],
                   metavar="INNER:OUTER",
                   help="declare nesting intentional: report it, never alarm (repeatable)")
    p.add_argument("--config-dir", dest="config_dir", type=Path, default=Path("/etc/wireguard"),
                   help="where wg-quick configs live, for fix hints and peer names (default "
                        "/etc/wireguard)")
    p.add_argument("--wireguard.uapi-dir", dest="uapi_dir", type=Path,
                   default=Path("/var/run/wireguard"),
                   help="userspace WireGuard socket directory (default /var/run/wireguard)")
    p.add_argument("--wireguard.uapi-timeout", dest="uapi_timeout", type=TIMEOUT, default=1.0,
                   help="how long one UAPI read may take, 10ms to 60s (default 1s)")
    p.add_argument("--wireguard.interfaces", dest="interfaces", type=_regex, default=None,
                   metavar="REGEX", help="report only the devices whose name matches (all are "
                                         "still analysed: one can be nested in another)")
    p.add_argument("--wireguard.interfaces-exclude", dest="interfaces_exclude", type=_regex,
                   default=None, metavar="REGEX",
                   help="report no device whose name matches")
    p.add_argument("--wireguard.peers-exclude", dest="peers_exclude", action="append",
                   default=[], metavar="PUBLIC_KEY", help="report no such peer (repeatable)")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log level (default info); libraries log warnings at the most")


def reported_from(args: argparse.Namespace) -> Reported:
    return Reported(args.interfaces, args.interfaces_exclude, frozenset(args.peers_exclude))


def add_probe_arguments(p: argparse.ArgumentParser, interval: float) -> None:
    p.add_argument("--probe.enabled", dest="probe", action=argparse.BooleanOptionalAction,
                   default=True, help="measure latency per tunnel with ICMP echo")
    p.add_argument("--probe.interval", dest="probe_interval", type=PROBE_INTERVAL,
                   default=interval,
                   help=f"time between probe rounds, 10ms to 1h (default {_text(interval)})")
    p.add_argument("--probe.timeout", dest="probe_timeout", type=TIMEOUT, default=1.0,
                   help="how long a round waits for replies, 10ms to 60s (default 1s)")
    p.add_argument("--probe.target", dest="probe_targets", action="append", type=_target,
                   default=[], metavar="DEVICE[:PUBKEY]=IP",
                   help="address inside the tunnel to probe (default: the peer's single-host "
                        "allowed IP, when it has one)")
    p.add_argument("--probe.histograms", dest="probe_histograms",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="also, per peer, a 15-bucket RTT histogram and sent/received counters "
                        "on each of the three paths and the overhead ratio (about 60 series "
                        "a peer; default off: the median RTT of the real path, and of the "
                        "direct one when it differs, at most 2 series a peer)")
    p.add_argument("--probe.max-rate", dest="probe_max_rate", type=number_in(1, 100_000),
                   default=500.0,
                   help="probes per second across all targets, sent evenly; a round takes "
                        "the nested and anomalous peers and the next others in turn (default "
                        "500: about 1.3%% of one core; a client's few paths are all probed "
                        "every round)")
    p.add_argument("--probe.device", dest="probe_device", type=_regex, default=None,
                   metavar="REGEX", help="probe only the devices whose name matches")
    p.add_argument("--probe.peer", dest="probe_peers", action="append", default=[],
                   metavar="PUBLIC_KEY", help="probe only these peers (repeatable)")
    p.add_argument("--anomaly.ratio", dest="anomaly_ratio", type=number_in(1.0, 1000.0),
                   default=1.5, help="flag a peer whose tunnel RTT is this many times the "
                                     "direct RTT, 1 to 1000 (default 1.5)")
    p.add_argument("--anomaly.min-excess", dest="anomaly_min_excess", type=MIN_EXCESS,
                   default=0.005, help="... and at least this much slower, 0 to 10s "
                                       "(default 5ms)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web.listen-address", dest="listen", action="append", default=None,
                   metavar="[HOST]:PORT",
                   help="address to listen on, repeatable (default :9586)")
    p.add_argument("--web.systemd-socket", dest="systemd_socket", action="store_true",
                   help="serve on the sockets systemd passes (socket activation) instead of "
                        "--web.listen-address")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                   help="path of the metrics (default /metrics)")
    p.add_argument("--web.config.file", dest="web_config", type=Path, default=None,
                   help="exporter-toolkit web config: TLS, basic auth, headers (default none)")
    p.add_argument("--refresh.interval", dest="refresh_interval", type=REFRESH_INTERVAL,
                   default=5.0, help="time between snapshots, 100ms to 1h (default 5s)")
    p.add_argument("--wireguard.peer-names", dest="peer_names", default="",
                   metavar="KEY:NAME,...",
                   help="peer names as mdlayher/wireguard_exporter takes them: "
                        "\"keyA:foo,keyB:bar\" (the peer file takes priority)")
    p.add_argument("--wireguard.peer-file", dest="peer_file", type=Path, default=None,
                   help="TOML file of peer names, mdlayher/wireguard_exporter's format "
                        "([[peer]] public_key, name; default none)")


DEPENDENCIES = ("prometheus-client", "pyroute2", "icmplib", "h11", "bcrypt", "PyYAML")


def version_text() -> str:
    """`wgnest 0.1.0`, then Python's version and each dependency's, as exporter-toolkit's
    --version prints its build and Go versions."""
    import importlib.metadata  # (here: its import costs a serving process ~3 MiB)

    lines = [f"wgnest {__version__}", f"  python: {platform.python_version()} "
                                      f"({platform.python_implementation()})"]
    for name in DEPENDENCIES:
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = "not installed"
        lines.append(f"  {name}: {found}")
    return "\n".join(lines)


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit(0)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="wgnest", description=description)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print wgnest's, Python's and the dependencies' versions")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="diagnose this host once (Nagios exit codes)")
    check.add_argument("--format", choices=["text", "json"], default="text",
                       help="output format (default text)")
    check.add_argument("--probe.count", dest="probe_count", type=number_in(1, 1000, int),
                       default=3, help="echo requests per path before judging latency, 1 to "
                                       "1000 (default 3)")
    add_common(check)
    add_netns(check)
    add_probe_arguments(check, interval=0.2)
    serve = sub.add_parser("serve", help="run the Prometheus exporter")
    add_common(serve)
    add_netns(serve)
    add_serve_arguments(serve)
    add_probe_arguments(serve, interval=1.0)
    lint = sub.add_parser("lint", help="predict each wg-quick config as if brought up now")
    add_common(lint)
    from wgnest.runtime.lint import add_lint_arguments

    add_lint_arguments(lint)
    return parser
