"""Command line: `wgnest check` (one-shot diagnosis) and `wgnest serve` (the exporter)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from wgnest.analysis.nagios import Nagios, check_result
from wgnest.analysis.paths import diagnose
from wgnest.analysis.selection import reported
from wgnest.runtime.options import build_parser, reported_from
from wgnest.runtime.probing import measure_latency
from wgnest.snapshot import Reader, take
from wgnest.surfaces.report import render_json, render_text


def run_check(args: argparse.Namespace) -> int:
    reader = Reader(uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    try:
        snap = take(reader)
    finally:
        reader.close()
    snap, paths = reported(snap, diagnose(snap, set(args.allow)), reported_from(args))
    latency, probes = measure_latency(args, snap, paths) if args.probe else (None, None)
    prober = probes.failure if probes is not None else None
    if args.format == "json":
        sys.stdout.write(render_json(snap, paths, latency, prober))
    else:
        sys.stdout.write(render_text(snap, paths, args.config_dir, latency, prober))
    return int(check_result(snap, paths, latency, prober).code)


# Libraries whose debug output is no one's business: pyroute2 logs every decoded netlink
# reply at debug, a kernel device's private key among them; asyncio (pyroute2 runs an event
# loop per call) a line for each loop it makes.
QUIET_LIBRARIES = ("pyroute2", "asyncio")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    floor = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(floor)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "check":
            return run_check(args)
        if args.command == "lint":
            from wgnest.runtime.lint import run_lint

            return run_lint(args)
        from wgnest.runtime.serve import run_serve

        return run_serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logging.getLogger("wgnest").debug("fatal", exc_info=True)
        sys.stderr.write(f"wgnest: {exc}\n")
        return int(Nagios.UNKNOWN)
