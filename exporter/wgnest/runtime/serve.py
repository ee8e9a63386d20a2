"""`wgnest serve`: the composition root of the exporter (sources, refresher, prober, HTTP)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from wgnest.analysis.latency import peer_latencies
from wgnest.host_snapshot import HostReader
from wgnest.model.probes import ProbeSnapshot
from wgnest.probe.prober import Prober
from wgnest.runtime.malloc import tune_malloc
from wgnest.runtime.options import netns_from, reported_from
from wgnest.runtime.probing import Current, make_prober
from wgnest.runtime.refresher import Refresher
from wgnest.runtime.web import Server, serve, serve_socket, systemd_sockets
from wgnest.runtime.webconfig import WebConfig, WebConfigError, load_web_config
from wgnest.sources.peer_names import PeerNamesError, load_peer_names
from wgnest.surfaces import status_page
from wgnest.surfaces.exposition import exposition, with_label
from wgnest.surfaces.gzipped import Member, gzip_chunks
from wgnest.surfaces.probe_metrics import ProbeLines, probe_families, probe_text

log = logging.getLogger("wgnest")


class Reloadable:
    """The inputs SIGHUP reloads: the peer names and the web config. A reload that fails
    keeps the old ones and says why in one line, as smokeping_prober does."""

    def __init__(self, args: argparse.Namespace, names: dict[str, str],
                 web_config: WebConfig | None) -> None:
        self.args, self.names, self.web_config = args, names, web_config

    def reload(self, servers: list[Server]) -> None:  # on the main thread, never a handler
        try:
            web_config = load_web_config(self.args.web_config) if self.args.web_config else None
            names, warnings = load_peer_names(self.args.config_dir, self.args.peer_file,
                                              names_flag=self.args.peer_names)
        except (WebConfigError, PeerNamesError) as exc:
            log.error("reload (SIGHUP) failed, keeping the previous configuration: %s", exc)
            return
        for warning in warnings:
            log.warning("peer names: %s", warning)
        for server in servers:
            server.reload(web_config)  # TLS, users and headers for the next connections
        self.names, self.web_config = names, web_config  # one reference each: atomic
        log.info("reloaded (SIGHUP): %d peer names%s", len(names),
                 ", web config " + str(self.args.web_config) if self.args.web_config else "")


class _Pages:
    """What the HTTP surface serves; reads the latest state, never waits on a source."""

    def __init__(self, args: argparse.Namespace, refresher: Refresher, config: Reloadable,
                 prober: Prober | None) -> None:
        self.args, self.refresher, self.config, self.prober = args, refresher, config, prober

    def metrics(self) -> bytes:
        """Rendered by the refresher (probe metrics included), kept compressed: a scrape
        without gzip inflates it (10,000 peers: 13 MB, in a thread)."""
        state = self.refresher.state
        return state.exposition if state is not None else b""

    def metrics_gzip(self) -> Member:
        """What a scrape with gzip gets: the very bytes the refresher kept, in chunks."""
        state = self.refresher.state
        return state.gzipped if state is not None else gzip_chunks(())

    def status_page(self) -> str:
        state = self.refresher.state
        if state is None:
            return status_page.render(None, [], self.config.names, self.args.telemetry_path)
        probes = self.prober.snapshot() if self.prober is not None else None
        latency = {} if probes is None else peer_latencies(
            probes, [(p.device, p.public_key) for p in state.paths], self.args.anomaly_ratio,
            self.args.anomaly_min_excess)
        failure = probes.failure if probes is not None else None
        if state.labelled:
            own = next((v.name for v in state.views if not v.path), "")
            return status_page.render_netns(
                [(v.name, v.path, v.snapshot, v.paths) for v in state.views], (),
                self.config.names, self.args.telemetry_path, latency, own, failure)
        return status_page.render(state.snapshot, state.paths, self.config.names,
                                  self.args.telemetry_path, latency, failure)


def _probe_metrics(args: argparse.Namespace) -> Callable[[ProbeSnapshot, str | None], bytes]:
    lines = ProbeLines()  # only the refresh thread renders

    def render(probes: ProbeSnapshot, netns: str | None) -> bytes:
        if netns is None and not args.probe_histograms:  # the defaults: lines reused
            return probe_text(probes, args.anomaly_ratio, args.anomaly_min_excess, lines)
        families = probe_families(probes, args.anomaly_ratio, args.anomaly_min_excess,
                                  args.probe_histograms)
        return exposition(families if netns is None else with_label(families, "netns", netns))

    return render


def _given(sock: socket.socket) -> socket.socket:
    return sock


def _addresses(args: argparse.Namespace) -> list[str]:
    if args.systemd_socket:
        return ["systemd socket"] * len(args.systemd_sockets)
    return list(args.listen or [":9586"])


def _listen(args: argparse.Namespace, pages: _Pages, web_config: WebConfig | None
            ) -> list[Server]:
    """One server per --web.listen-address (default :9586), or per socket systemd passed
    with --web.systemd-socket. Every one is up, or none (ValueError/OSError names it)."""
    servers: list[Server] = []
    try:
        if args.systemd_socket:
            args.systemd_sockets = systemd_sockets()
            for sock in args.systemd_sockets:
                servers.append(serve_socket(functools.partial(_given, sock), pages,
                                            args.telemetry_path, web_config))
            return servers
        for listen in _addresses(args):
            try:
                servers.append(serve(listen, pages, args.telemetry_path, web_config))
            except (ValueError, OSError) as exc:
                raise type(exc)(f"cannot listen on {listen}: {exc}") from None
        return servers
    except BaseException:
        for server in servers:
            server.shutdown()
        raise


def run_serve(args: argparse.Namespace) -> int:
    tune_malloc()  # before any thread starts
    try:
        web_config = load_web_config(args.web_config) if args.web_config else None
        names, warnings = load_peer_names(args.config_dir, args.peer_file,
                                          names_flag=args.peer_names)
    except (WebConfigError, PeerNamesError) as exc:
        sys.stderr.write(f"wgnest: {exc}\n")
        return 2
    for warning in warnings:
        log.warning("peer names: %s", warning)
    try:
        spec = netns_from(args)
    except ValueError as exc:
        sys.stderr.write(f"wgnest: {exc}\n")
        return 2
    if os.geteuid() == 0:
        extra = (", and --netns CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other users' "
                 "/proc/PID/ns)" if spec.labelled else "")
        log.warning("running as root: only reading wireguard-go's root-only UAPI sockets needs "
                    "it; kernel WireGuard needs just CAP_NET_ADMIN and CAP_NET_RAW%s "
                    "(see exporter/systemd/wgnest.service)", extra)
    reader = HostReader(spec, uapi_dir=args.uapi_dir, uapi_timeout=args.uapi_timeout)
    prober: Prober | None = None
    refresher: Refresher

    def current() -> Current | None:
        """The newest state, with the probe state its metrics were rendered from: the
        plan's anomaly verdicts reuse it instead of copying the prober's series again."""
        state = refresher.state
        return (state.snapshot, state.paths, state.probes) if state is not None else None

    if args.probe:
        prober = make_prober(args, current)
        if prober.disabled_reason:
            log.warning("latency probes are off: %s", prober.disabled_reason)
    config = Reloadable(args, names, web_config)
    refresher = Refresher(reader.take, args.refresh_interval, set(args.allow),
                          lambda: config.names, prober.snapshot if prober is not None else None,
                          _probe_metrics(args), reported_from(args))
    refresher.refresh_once()
    pages = _Pages(args, refresher, config, prober)
    try:
        servers = _listen(args, pages, web_config)
    except (ValueError, OSError, WebConfigError) as exc:
        sys.stderr.write(f"wgnest: {exc}\n")
        return 2
    stop, hangup = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (hangup if signum == signal.SIGHUP else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    refresher.start(after_a_refresh=True)
    if prober is not None:
        prober.start()
    for where, server in zip(_addresses(args), servers, strict=True):
        log.info("wgnest serving on %s (port %d)", where, server.port)
    while not stop.wait(0.2):
        if hangup.is_set():
            hangup.clear()
            config.reload(servers)
    # Exit within ~1.5 s even when a refresh waits on a stuck source or a probe round on
    # silent targets: ask every thread to stop first, then wait on one shared deadline.
    deadline = time.monotonic() + 1.5
    for server in servers:
        server.shutdown()
    if prober is not None:
        prober.stop(timeout=0)
    refresher.stop(timeout=max(0.0, deadline - time.monotonic()))
    if prober is not None:
        prober.stop(timeout=max(0.0, deadline - time.monotonic()))
    reader.close()
    return 0
