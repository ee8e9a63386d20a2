"""Every flag of `wgnest check` and `wgnest serve`, and the one parser that holds them."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NoReturn

from wgnest import __version__
from wgnest.analysis.paths import parse_allow
from wgnest.model.host import IPAddress
from wgnest.probe.targets import parse_probe_target

UNITS = {"ms": 0.001, "s": 1.0, "": 1.0}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"wgnest: {message} (see --help)\n")


def duration(value: str) -> float:
    """`5ms`, `1.5s` or `0.005` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|)\s*", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (e.g. 5ms, 1s)")
    return float(m[1]) * UNITS[m[2]]


def positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


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


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nesting", dest="allow", action="append", type=_allow, default=[],
                   metavar="INNER:OUTER",
                   help="declare nesting intentional: report it, never alarm (repeatable)")
    p.add_argument("--config-dir", dest="config_dir", type=Path, default=Path("/etc/wireguard"),
                   help="where wg-quick configs live (for fix hints and peer names)")
    p.add_argument("--wireguard.uapi-dir", dest="uapi_dir", type=Path,
                   default=Path("/var/run/wireguard"), help="userspace WireGuard socket directory")
    p.add_argument("--wireguard.uapi-timeout", dest="uapi_timeout", type=float, default=1.0,
                   help="seconds one UAPI read may take")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warning", "error"])


def add_probe_arguments(p: argparse.ArgumentParser, interval: float) -> None:
    p.add_argument("--probe.enabled", dest="probe", action=argparse.BooleanOptionalAction,
                   default=True, help="measure latency per tunnel with ICMP echo")
    p.add_argument("--probe.interval", dest="probe_interval", type=duration, default=interval)
    p.add_argument("--probe.timeout", dest="probe_timeout", type=duration, default=1.0)
    p.add_argument("--probe.target", dest="probe_targets", action="append", type=_target,
                   default=[], metavar="DEVICE[:PUBKEY]=IP",
                   help="address inside the tunnel to probe (default: the peer's single-host "
                        "allowed IP, when it has one)")
    p.add_argument("--anomaly.ratio", dest="anomaly_ratio", type=float, default=1.5,
                   help="flag a peer whose tunnel RTT is this many times the direct RTT")
    p.add_argument("--anomaly.min-excess", dest="anomaly_min_excess", type=duration,
                   default=0.005, help="... and at least this much slower (default 5ms)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web.listen-address", dest="listen", default=":9586",
                   help="address to listen on (default :9586)")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics")
    p.add_argument("--web.config.file", dest="web_config", type=Path, default=None,
                   help="exporter-toolkit web config (TLS, basic auth)")
    p.add_argument("--refresh.interval", dest="refresh_interval", type=positive, default=5.0,
                   help="seconds between snapshots (default 5)")
    p.add_argument("--wireguard.peer-file", dest="peer_file", type=Path, default=None,
                   help="TOML file of peer names ([[peer]] public_key, name)")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="wgnest", description=description)
    parser.add_argument("--version", action="version", version=f"wgnest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="diagnose this host once (Nagios exit codes)")
    check.add_argument("--format", choices=["text", "json"], default="text")
    check.add_argument("--probe.count", dest="probe_count", type=int, default=3,
                       help="echo requests per path before judging latency (default 3)")
    add_common(check)
    add_probe_arguments(check, interval=0.2)
    serve = sub.add_parser("serve", help="run the Prometheus exporter")
    add_common(serve)
    add_serve_arguments(serve)
    add_probe_arguments(serve, interval=1.0)
    return parser
