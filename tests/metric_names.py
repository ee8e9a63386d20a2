"""The metric names wgnest exports: the contract the dashboard, the alert rules and the
exporter share.

`METRIC_LABELS` maps every series name as Prometheus stores it (counters with `_total`,
histograms as `_bucket`/`_sum`/`_count`) to its label names, without the `job` and
`instance` Prometheus adds and without a histogram's `le`. `EXPORTED_METRICS` is the set of
those names; compare it with a real scrape after dropping prometheus_client's optional
`_created` series (see OPTIONAL_SUFFIXES).
"""

from __future__ import annotations

from types import MappingProxyType

_PEER = ("device", "public_key")
_PROBE = ("device", "public_key", "path")
_COLLECTOR = ("collector",)

METRIC_LABELS = MappingProxyType({
    # devices
    "wireguard_device_info": ("device", "public_key"),
    "wireguard_device_fwmark": ("device", "fwmark"),
    "wireguard_device_listen_port": ("device",),
    "wireguard_device_mtu_bytes": ("device",),
    # peers
    "wireguard_peer_info": ("device", "public_key", "endpoint", "name", "allowed_ips"),
    "wireguard_peer_allowed_ips_info": ("device", "public_key", "allowed_ips", "family"),
    "wireguard_peer_receive_bytes_total": _PEER,
    "wireguard_peer_transmit_bytes_total": _PEER,
    "wireguard_peer_last_handshake_seconds": _PEER,
    "wireguard_peer_handshake_age_seconds": _PEER,
    # where the transport goes
    "wireguard_peer_endpoint_route_info": (
        "device", "public_key", "endpoint", "egress_device", "table", "gateway"),
    "wireguard_peer_nested": ("device", "public_key", "outer_device"),
    "wireguard_peer_routing_loop": _PEER,
    "wireguard_peer_nesting_allowed": _PEER,
    "wireguard_peer_suggested_fwmark": (*_PEER, "fwmark"),
    "wireguard_peer_nesting_mtu_cost_bytes": _PEER,
    # probes
    "wireguard_probe_rtt_seconds_bucket": _PROBE,
    "wireguard_probe_rtt_seconds_sum": _PROBE,
    "wireguard_probe_rtt_seconds_count": _PROBE,
    "wireguard_probe_packets_sent_total": _PROBE,
    "wireguard_probe_packets_received_total": _PROBE,
    "wireguard_peer_latency_overhead_ratio": _PEER,
    "wireguard_peer_rtt_seconds": _PROBE,
    "wireguard_peer_latency_anomaly": _PEER,
    # the exporter itself
    "wgnest_collector_success": _COLLECTOR,
    "wgnest_collector_duration_seconds": _COLLECTOR,
    "wgnest_snapshot_timestamp_seconds": (),
    "wgnest_refresh_interval_seconds": (),
    "wgnest_uapi_stale_sockets": (),
    "wgnest_build_info": ("version",),
    "wgnest_errors_total": ("reason",),
    "wgnest_probe_send_errors_total": ("reason",),
    "wgnest_probe_flows": (),
    "wgnest_probe_flows_per_round": (),
    "wgnest_probe_targets_skipped": ("reason",),
})

EXPORTED_METRICS: frozenset[str] = frozenset(METRIC_LABELS)

# Metric families of type histogram and counter, by family name (as the client libraries
# and the exposition format's `# TYPE` lines name them).
HISTOGRAMS: frozenset[str] = frozenset({"wireguard_probe_rtt_seconds"})
COUNTERS: frozenset[str] = frozenset({
    "wireguard_peer_receive_bytes",
    "wireguard_peer_transmit_bytes",
    "wireguard_probe_packets_sent",
    "wireguard_probe_packets_received",
    "wgnest_errors",
    "wgnest_probe_send_errors",
})

# Values of the fixed-set labels.
COLLECTORS: tuple[str, ...] = (
    "wireguard_kernel", "wireguard_uapi", "links", "rules", "route_lookup", "udp_sockets",
    "probe", "refresh")
PROBE_PATHS: tuple[str, ...] = ("tunnel", "transport", "direct")

# Series a client library may add on its own; not part of the contract.
OPTIONAL_SUFFIXES: tuple[str, ...] = ("_created",)
