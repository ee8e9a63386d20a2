"""Command line: `wgnest check` (one-shot diagnosis) and `wgnest serve` (the exporter)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from wgnest.analysis.host import diagnose_host
from wgnest.analysis.nagios import Nagios, check_result
from wgnest.analysis.selection import reported
from wgnest.host_snapshot import HostReader
from wgnest.runtime.options import build_parser, netns_from, reported_from
from wgnest.runtime.probing import measure_latency
from wgnest.sources.wg_kernel import preload_kernel_wireguard
from wgnest.surfaces.report import (
    netns_failures,
    render_json,
    render_json_netns,
    render_text,
    render_text_netns,
    whole,
)


def run_check(args: argparse.Namespace) -> int:
    spec = netns_from(args)
    reader = HostReader(spec, uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    try:
        host = reader.take()
    finally:
        reader.close()
    analysed = diagnose_host(host, set(args.allow))
    only = reported_from(args)
    views = [(ns.name, ns.path, *reported(ns.snapshot, analysed[ns.name], only))
             for ns in host.reported()]
    own = next((v for v in views if not v[1]), None)
    latency, probes = measure_latency(args, own[2], own[3]) if args.probe and own else (
        None, None)
    prober = probes.failure if probes is not None else None
    if host.labelled:
        name = own[0] if own else ""
        if args.format == "json":
            sys.stdout.write(render_json_netns(views, host.failures, latency, name, prober))
        else:
            sys.stdout.write(render_text_netns(views, host.failures, args.config_dir, latency,
                                               name, prober))
        snap, paths = whole(views, netns_failures(views, host.failures))
        return int(check_result(snap, paths, latency, prober).code)
    _name, _path, snap, paths = views[0]
    if host.failures:  # where a moved device's socket could not be looked for
        snap = dataclasses.replace(snap, failures=(*snap.failures, *host.failures))
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
    # and on the handlers too: pyroute2 sets its logger's level to 0 when it is imported,
    # which may be after this (it is imported only for a kernel WireGuard device)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries(floor))


class _QuietLibraries(logging.Filter):
    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= self.floor
                or record.name.partition(".")[0] not in QUIET_LIBRARIES)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    preload_kernel_wireguard()  # not in a read's deadline: importing pyroute2 takes a while
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
