"""Command line: `wgnest check` (one-shot diagnosis) and `wgnest serve` (the exporter)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from wgnest import __version__
from wgnest.analysis.paths import PeerPath, diagnose, parse_allow
from wgnest.model import Snapshot
from wgnest.runtime.probing import add_probe_arguments, make_prober
from wgnest.snapshot import Reader, take
from wgnest.surfaces.probe_metrics import PeerLatency, peer_latencies
from wgnest.surfaces.report import UNKNOWN, render_json, render_text, verdict


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"wgnest: {message} (see --help)\n")


def _allow(value: str) -> tuple[str, str]:
    try:
        return parse_allow(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wgnest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wgnest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="diagnose this host once (Nagios exit codes)")
    check.add_argument("--format", choices=["text", "json"], default="text")
    check.add_argument("--probe.count", dest="probe_count", type=int, default=3,
                       help="echo requests per path before judging latency (default 3)")
    _common(check)
    add_probe_arguments(check, interval=0.2)
    from wgnest.runtime.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="run the Prometheus exporter"), _common)
    return parser


def run_check(args: argparse.Namespace) -> int:
    reader = Reader(uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    try:
        snap = take(reader)
    finally:
        reader.close()
    paths = diagnose(snap, set(args.allow))
    latency = measure_latency(args, snap, paths) if args.probe else None
    if args.format == "json":
        sys.stdout.write(render_json(snap, paths, latency))
    else:
        sys.stdout.write(render_text(snap, paths, args.config_dir, latency))
    return verdict(snap, paths, latency).code


def measure_latency(args: argparse.Namespace, snap: Snapshot, paths: list[PeerPath]
                    ) -> dict[tuple[str, str], PeerLatency] | None:
    """Probe every path `--probe.count` times, then judge each peer's latency."""
    prober = make_prober(args, lambda: (snap, paths))
    if prober.disabled_reason:
        logging.getLogger("wgnest").warning("latency not measured: %s", prober.disabled_reason)
        return None
    try:
        for i in range(max(1, args.probe_count)):
            if i:
                time.sleep(args.probe_interval)
            prober.run_once()
        probes = prober.snapshot()
    finally:
        prober.stop()
    if not probes.series:
        return None
    return peer_latencies(probes, [(p.device, p.public_key) for p in paths],
                          args.anomaly_ratio, args.anomaly_min_excess)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "check":
            return run_check(args)
        from wgnest.runtime.serve import run_serve

        return run_serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logging.getLogger("wgnest").debug("fatal", exc_info=True)
        sys.stderr.write(f"wgnest: {exc}\n")
        return UNKNOWN
