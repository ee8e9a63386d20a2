"""`wgnest serve`: the composition root of the exporter (sources, refresher, prober, HTTP)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from wgnest import status_page
from wgnest.peer_names import PeerNamesError, load_peer_names
from wgnest.refresher import Refresher
from wgnest.snapshot import Reader, take
from wgnest.web import serve
from wgnest.webconfig import WebConfigError, load_web_config

log = logging.getLogger("wgnest")


def add_serve_arguments(p: argparse.ArgumentParser,
                        common: Callable[[argparse.ArgumentParser], None]) -> None:
    common(p)
    p.add_argument("--web.listen-address", dest="listen", default=":9586",
                   help="address to listen on (default :9586)")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics")
    p.add_argument("--web.config.file", dest="web_config", type=Path, default=None,
                   help="exporter-toolkit web config (TLS, basic auth)")
    p.add_argument("--refresh.interval", dest="refresh_interval", type=_positive, default=5.0,
                   help="seconds between snapshots (default 5)")
    p.add_argument("--wireguard.peer-file", dest="peer_file", type=Path, default=None,
                   help="TOML file of peer names ([[peer]] public_key, name)")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


class _Pages:
    def __init__(self, refresher: Refresher, names: dict[str, str], telemetry_path: str) -> None:
        self.refresher, self.names, self.telemetry_path = refresher, names, telemetry_path

    def metrics(self) -> bytes:
        state = self.refresher.state
        return state.exposition if state is not None else b""

    def status_page(self) -> str:
        state = self.refresher.state
        if state is None:
            return status_page.render(None, [], self.names, self.telemetry_path)
        return status_page.render(state.snapshot, state.paths, self.names, self.telemetry_path)


def run_serve(args: argparse.Namespace) -> int:
    try:
        web_config = load_web_config(args.web_config) if args.web_config else None
        names, warnings = load_peer_names(args.config_dir, args.peer_file)
    except (WebConfigError, PeerNamesError) as exc:
        sys.stderr.write(f"wgnest: {exc}\n")
        return 2
    for warning in warnings:
        log.warning("peer names: %s", warning)
    if os.geteuid() == 0:
        log.info("running as root; CAP_NET_ADMIN (+ root for UAPI sockets) is all it needs")
    reader = Reader(uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    refresher = Refresher(lambda: take(reader), args.refresh_interval, set(args.allow),
                          lambda: names)
    refresher.refresh_once()
    pages = _Pages(refresher, names, args.telemetry_path)
    try:
        server = serve(args.listen, pages, args.telemetry_path, web_config)
    except (ValueError, OSError, WebConfigError) as exc:
        sys.stderr.write(f"wgnest: cannot listen on {args.listen}: {exc}\n")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    refresher.start()
    log.warning("wgnest serving on %s (port %d)", args.listen, server.port)
    stop.wait()
    server.shutdown()
    refresher.stop()
    reader.close()
    return 0
