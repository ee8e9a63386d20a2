"""`wgnest check` output: a Nagios-style verdict, human text and JSON, from a diagnosis."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wgnest.analysis.fixes import Fix, FixKind
from wgnest.analysis.latency import PeerLatency
from wgnest.analysis.nagios import Latency, check_result
from wgnest.analysis.paths import PathVerdict, PeerPath
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Device, Peer, Snapshot, peer_index

PROOF_TEXT = {"kernel": "confirmed by the kernel", "rule_order": "proven by the rule order",
              "none": "NOT proven: check it before applying"}


def _config_file(config_dir: Path, device: str) -> str:
    path = config_dir / f"{device}.conf"
    return str(path) if path.exists() else f"{device}'s config"


def _short(key: str) -> str:
    return key[:8] + "…" if len(key) > 9 else key


def peer_line(p: PeerPath) -> str:
    if p.verdict == PathVerdict.NO_ENDPOINT:
        return f"  peer {_short(p.public_key)}  no endpoint (waits for the peer to connect)"
    route = f"via {p.egress or '?'}"
    extras = [f"table {p.table}"] if p.table else []
    if p.gateway:
        extras.append(f"gw {p.gateway}")
    if extras:
        route += f" ({', '.join(extras)})"
    head = f"  peer {_short(p.public_key)}  endpoint {p.endpoint}  {route}  "
    if p.transport_netns:
        head += f"(routed in netns {p.transport_netns})  "
    if p.verdict == PathVerdict.DIRECT:
        return head + "direct"
    if p.verdict == PathVerdict.NESTED:
        state = "nested (allowed)" if p.allowed else "NESTED"
        where = f" of netns {p.outer_netns}" if p.outer_netns else ""
        return head + f"{state} in {p.outer}{where} [{' -> '.join(p.chain)}]"
    if p.verdict == PathVerdict.LOOP:
        return head + f"ROUTING LOOP [{' -> '.join(p.chain)}]"
    return head + f"{p.verdict.upper()}: {p.error}"


def path_notes(p: PeerPath) -> tuple[list[str], Fix | None]:
    """The MTU and capturing-rule lines under a peer, and the fix to show (none for a
    nesting declared intentional)."""
    lines = []
    if p.mtu is not None and p.mtu.cost_bytes:
        lines.append(f"    MTU: {p.device} has {p.mtu.device_mtu}; {p.mtu.usable_mtu} fits through "
                     f"{p.outer}, {p.mtu.direct_mtu} would direct: nesting costs "
                     f"{p.mtu.cost_bytes} bytes")
    if p.captured_by:
        lines.append(f"    captured by rule: {p.captured_by}")
    allowed = p.verdict == PathVerdict.NESTED and p.allowed
    return lines, None if allowed else p.fix


def _fix_lines(p: PeerPath, config_dir: Path) -> list[str]:
    lines, fix = path_notes(p)
    if fix is None:
        return lines
    where = _config_file(config_dir, p.device)
    proof = PROOF_TEXT[fix.proof]
    if fix.kind == FixKind.FWMARK:
        lines.append(f"    fix: add to the [Interface] section of {where}:  "
                     f"{fix.config_lines[0]}")
        lines.append(f"         now, at runtime: {fix.commands[0]}   ({fix.explanation}; "
                     f"{proof})")
        return lines
    lines.append(f"    fix ({fix.kind}, {proof}): {fix.explanation}")
    lines.extend(f"         now: {c}" for c in fix.commands)
    if fix.config_lines:
        lines.append(f"         for wg-quick, in the [Interface] section of {where}:")
        lines.extend(f"           {c}" for c in fix.config_lines)
    return lines


PATH_ORDER = ("tunnel", "transport", "direct")


def rtt_text(seconds: float | None) -> str:
    if seconds is None:
        return "lost"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def latency_parts(lat: PeerLatency) -> list[str]:
    """`tunnel 40.2 ms`, ... in path order."""
    medians = lat.median
    order = sorted(medians, key=lambda p: PATH_ORDER.index(p) if p in PATH_ORDER else 9)
    return [f"{path} {rtt_text(medians[path])}" for path in order]


def _latency_line(lat: PeerLatency | None) -> list[str]:
    if lat is None or not lat.paths:
        return []
    parts = ", ".join(latency_parts(lat))
    tail = f" (x{lat.ratio:.1f} of direct)" if lat.ratio is not None else ""
    if lat.anomaly:
        tail += f"  LATENCY ANOMALY: {lat.reason}"
    return [f"    latency: {parts}{tail}"]


def _device_lines(snap: Snapshot, paths: Sequence[PeerPath], config_dir: Path,
                  latency: Latency | None) -> list[str]:
    out = []
    for dev in snap.devices:
        mark = f"{dev.fwmark:#x}" if dev.fwmark else "off"
        out.append(f"{dev.name}  {dev.implementation}  fwmark {mark}  listen {dev.listen_port}"
                   f"  mtu {dev.mtu}  peers {len(dev.peers)}")
        for p in paths:
            if p.device == dev.name:
                out.append(peer_line(p))
                out.extend(_latency_line((latency or {}).get((p.device, p.public_key))))
                out.extend(_fix_lines(p, config_dir))
    return out


def render_text(snap: Snapshot, paths: Sequence[PeerPath], config_dir: Path,
                latency: Latency | None = None, prober: SourceFailure | None = None) -> str:
    v = check_result(snap, paths, latency, prober)
    out = [f"WGNEST {v.code.name} - {v.summary}"]
    out += _device_lines(snap, paths, config_dir, latency)
    out.extend(f"source {f}" for f in (*snap.failures, *([prober] if prober else [])))
    return "\n".join(out) + "\n"


def failure_json(f: SourceFailure) -> dict[str, str]:
    doc = dataclasses.asdict(f)
    if not f.netns:
        del doc["netns"]
    return doc


def _json(doc: object) -> str:
    import json  # (here: `wgnest check --json` needs it, serve never does)
    return json.dumps(doc, indent=2) + "\n"


def render_json(snap: Snapshot, paths: Sequence[PeerPath], latency: Latency | None = None,
                prober: SourceFailure | None = None) -> str:
    v = check_result(snap, paths, latency, prober)
    doc: dict[str, Any] = {
        "status": v.code.name.lower(),
        "exit_code": int(v.code),
        "summary": v.summary,
        "taken_at": snap.taken_at,
        **_namespace_json(snap, paths, latency),
        "errors": [failure_json(f) for f in (*snap.failures, *([prober] if prober else []))],
    }
    return _json(doc)


def _namespace_json(snap: Snapshot, paths: Sequence[PeerPath], latency: Latency | None
                    ) -> dict[str, Any]:
    peers = peer_index(snap)
    return {
        "devices": [{
            "name": d.name, "ifindex": d.ifindex, "implementation": d.implementation,
            "public_key": d.public_key, "listen_port": d.listen_port, "fwmark": d.fwmark,
            "mtu": d.mtu, "peers": len(d.peers),
        } for d in snap.devices],
        "peers": [_path_json(p, peers.get((p.device, p.public_key)),
                             (latency or {}).get((p.device, p.public_key))) for p in paths],
    }


# --netns other than self: (namespace name, path it is entered by, snapshot, paths)
NetnsReport = tuple[str, str, Snapshot, Sequence[PeerPath]]


def whole(views: Sequence[NetnsReport], failures: Sequence[SourceFailure]
          ) -> tuple[Snapshot, list[PeerPath]]:
    """Every namespace's devices, paths and failures as one, for the one verdict."""
    devices = tuple(d for _n, _p, snap, _paths in views for d in snap.devices)
    taken = max((snap.taken_at for _n, _p, snap, _paths in views), default=0.0)
    return (Snapshot(taken, devices, failures=tuple(failures)),
            [p for _n, _p, _snap, paths in views for p in paths])


def netns_failures(views: Sequence[NetnsReport], host: Sequence[SourceFailure]
                   ) -> list[SourceFailure]:
    """The host's failures, then each namespace's, named by its namespace."""
    return [*host, *(dataclasses.replace(f, netns=name) for name, _p, snap, _paths in views
                     for f in snap.failures)]


def render_text_netns(views: Sequence[NetnsReport], failures: Sequence[SourceFailure],
                      config_dir: Path, latency: Latency | None = None, own: str = "",
                      prober: SourceFailure | None = None) -> str:
    """One block per namespace; `latency` (of the peers of namespace `own`, the one the
    prober runs in) is shown there."""
    snap, paths = whole(views, netns_failures(views, failures))
    v = check_result(snap, paths, latency, prober)
    spaces = "network namespace" if len(views) == 1 else "network namespaces"
    out = [f"WGNEST {v.code.name} - {v.summary} ({len(views)} {spaces})"]
    for name, path, ns_snap, ns_paths in views:
        out.append(f"netns {name}" + (f"  ({path})" if path else "  (wgnest's own)"))
        out += ["  " + line for line in _device_lines(
            ns_snap, ns_paths, config_dir, latency if name == own else None)]
        out.extend(f"  source {f}" for f in ns_snap.failures)
    out.extend(f"source {f}" for f in (*failures, *([prober] if prober else [])))
    return "\n".join(out) + "\n"


def render_json_netns(views: Sequence[NetnsReport], failures: Sequence[SourceFailure],
                      latency: Latency | None = None, own: str = "",
                      prober: SourceFailure | None = None) -> str:
    snap, paths = whole(views, netns_failures(views, failures))
    v = check_result(snap, paths, latency, prober)
    namespaces = []
    for name, path, ns_snap, ns_paths in views:
        body = _namespace_json(ns_snap, ns_paths, latency if name == own else None)
        for peer in body["peers"]:
            peer["netns"] = name
        namespaces.append({"netns": name, "path": path, **body,
                           "errors": [failure_json(f) for f in ns_snap.failures]})
    doc: dict[str, Any] = {
        "status": v.code.name.lower(),
        "exit_code": int(v.code),
        "summary": v.summary,
        "taken_at": snap.taken_at,
        "namespaces": namespaces,
        "errors": [failure_json(f) for f in (*failures, *([prober] if prober else []))],
    }
    return _json(doc)


def _path_json(p: PeerPath, found: tuple[Device, Peer] | None, lat: PeerLatency | None
               ) -> dict[str, Any]:
    doc = dataclasses.asdict(p)
    if lat is not None:
        doc["latency"] = {"median_seconds": dict(lat.median), "loss": dict(lat.loss),
                          "real_path": lat.real_path, "overhead_ratio": lat.ratio,
                          "anomaly": lat.anomaly, "reason": lat.reason}
    doc["alarming"] = p.alarming
    if p.fix is not None:
        doc["fix"]["verified"] = p.fix.verified
    if p.flow is not None:
        doc["flow"] = {"dst": str(p.flow.dst), "mark": p.flow.mark, "sport": p.flow.sport,
                       "dport": p.flow.dport, "proto": "udp", "uid": 0, "oif": p.flow.oif}
    doc["chain"] = list(p.chain)
    if found is not None:
        peer = found[1]
        doc["allowed_ips"] = [str(n) for n in peer.allowed_ips]
        doc["last_handshake"] = peer.last_handshake
        doc["rx_bytes"], doc["tx_bytes"] = peer.rx_bytes, peer.tx_bytes
        doc["persistent_keepalive"] = peer.persistent_keepalive
    return doc
