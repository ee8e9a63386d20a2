"""Command line: `wgnest check` (one-shot diagnosis) and `wgnest serve` (the exporter)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from wgnest import __version__
from wgnest.analysis.paths import diagnose, parse_allow
from wgnest.report import UNKNOWN, render_json, render_text, verdict
from wgnest.snapshot import Reader, take


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
    p.add_argument("--log.level", dest="log_level", default="warning",
                   choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wgnest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wgnest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="diagnose this host once (Nagios exit codes)")
    check.add_argument("--format", choices=["text", "json"], default="text")
    _common(check)
    from wgnest.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="run the Prometheus exporter"), _common)
    return parser


def run_check(args: argparse.Namespace) -> int:
    reader = Reader(uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    try:
        snap = take(reader)
    finally:
        reader.close()
    paths = diagnose(snap, set(args.allow))
    if args.format == "json":
        sys.stdout.write(render_json(snap, paths))
    else:
        sys.stdout.write(render_text(snap, paths, args.config_dir))
    return verdict(snap, paths).code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "check":
            return run_check(args)
        from wgnest.serve import run_serve

        return run_serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logging.getLogger("wgnest").debug("fatal", exc_info=True)
        sys.stderr.write(f"wgnest: {exc}\n")
        return UNKNOWN
