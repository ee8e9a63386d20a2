"""`wgnest lint [CONFIG ...]`: each wg-quick config predicted as if `wg-quick up` ran now.

Reads this host as `wgnest check` does, plus every routing table; changes nothing. With
`--refuse` the exit code is 2 only when a config would nest or loop (itself, or a running
tunnel it would capture) without `--allow-nesting`, else 0: `PreUp = wgnest lint --refuse %i`
stops such a `wg-quick up` before the interface exists, and never stops one for a reason it
cannot vouch for (a read that failed, a hook it cannot evaluate).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wgnest.analysis.nagios import Nagios
from wgnest.analysis.predict import Host, Lint, lint
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Flow, RouteAnswer
from wgnest.model.routing import Routing
from wgnest.model.wgquick import ConfigFailure
from wgnest.snapshot import Reader, take
from wgnest.sources.errors import SourceError
from wgnest.sources.routing import read_routing
from wgnest.sources.wgquick_config import (
    ConfigError,
    configs_in,
    interface_name,
    predicted_implementation,
    read_config,
    resolve_config,
    table_names,
)
from wgnest.surfaces.lint_report import Entry, overall, render_lint_json, render_lint_text

ROUNDS = 4  # lint, ask the kernel what it still needs to know now, lint again


def add_lint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="a wg-quick config file, or an interface name resolved to "
                        "<--config-dir>/NAME.conf (default: every *.conf there that is not up)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="output format (default text)")
    p.add_argument("--refuse", action="store_true",
                   help="exit 2 when a config would nest or loop undeclared, else 0 (for "
                        "`PreUp = wgnest lint --refuse %%i`)")


def _selected(args: argparse.Namespace, up: set[str]) -> list[Path]:
    if args.configs:
        return [resolve_config(c, args.config_dir) for c in args.configs]
    return [p for p in configs_in(args.config_dir)
            if (name := interface_name(p)) is not None and name not in up]


def _lint_one(host: Host, reader: Reader, path: Path, args: argparse.Namespace) -> Entry:
    try:
        config = read_config(path, dict(host.tables))
    except ConfigError as exc:
        return ConfigFailure(str(path), str(exc))
    kernel: dict[Flow, RouteAnswer] = dict(host.snap.lookups)
    result: Lint = lint(host, config, kernel, set(args.allow))
    for _ in range(ROUNDS):
        ask = [f for f in result.missing if f not in kernel]
        if not ask:
            break
        try:
            kernel.update(reader.lookup.lookup(ask))
        except SourceError:
            break  # the flows stay unknown, and say so
        result = lint(host, config, kernel, set(args.allow))
    return result


def _run(args: argparse.Namespace) -> tuple[Nagios, str]:
    reader = Reader(uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    try:
        snap = take(reader)
        failures: tuple[SourceFailure, ...] = ()
        try:
            routing = read_routing()
        except SourceError as exc:
            routing, failures = Routing(), (exc.failure("routing"),)
        host = Host(snap, routing, table_names(), predicted_implementation(), failures)
        up = {link.name for link in snap.links}
        try:
            paths = _selected(args, up)
        except ConfigError as exc:
            entries: list[Entry] = [ConfigFailure(str(args.config_dir), str(exc))]
        else:
            entries = [_lint_one(host, reader, p, args) for p in paths]
    finally:
        reader.close()
    empty = f"no wg-quick config that is not up in {args.config_dir}"
    if args.format == "json":
        text = render_lint_json(entries, empty, snap.taken_at)
    else:
        text = render_lint_text(entries, empty)
    return overall(entries, empty).code, text


def run_lint(args: argparse.Namespace) -> int:
    try:
        code, text = _run(args)
    except Exception as exc:
        if not args.refuse:
            raise
        sys.stderr.write(f"wgnest lint: cannot predict ({exc}); not refusing\n")
        return 0
    sys.stdout.write(text)
    if not args.refuse:
        return int(code)
    if code == Nagios.CRITICAL:
        sys.stderr.write("wgnest lint: refusing `wg-quick up`: it would nest or loop (declare "
                         "intended nesting with --allow-nesting INNER:OUTER)\n")
        return int(Nagios.CRITICAL)
    return 0
