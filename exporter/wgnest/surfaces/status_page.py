"""The status page at `/`: plain server-rendered HTML a person reads, no external assets."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from wgnest import __version__
from wgnest.analysis.fixes import FixKind
from wgnest.analysis.latency import PeerLatency
from wgnest.analysis.nagios import check_result
from wgnest.analysis.paths import PathVerdict, PeerPath
from wgnest.model.failures import SourceFailure
from wgnest.model.host import Snapshot
from wgnest.surfaces.report import PROOF_TEXT, latency_parts, netns_failures, whole

# what html.escape(quote=True) replaces, without importing html (its entities table is
# 0.3 MiB of serve's memory, for a page it may never serve)
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                          "'": "&#x27;"})


def escape(text: str) -> str:
    """`text` safe in HTML text and quoted attributes, as html.escape makes it."""
    return text.translate(_ESCAPES)


FOLD_ABOVE = 20  # healthy peers of a device shown unfolded up to this many

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:80em}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.6em 0 .4em}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:.35em .6em;
border-bottom:1px solid #ddd;vertical-align:top} th{background:#f4f4f4;font-weight:600}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
.ok{color:#1a7f37} .warn{color:#9a6700} .crit{color:#cf222e;font-weight:600}
.banner{padding:.6em 1em;border-radius:6px;margin:1em 0;font-weight:600}
.b0{background:#dafbe1} .b1{background:#fff8c5} .b2{background:#ffebe9} .b3{background:#eee}
.fix{margin:.3em 0 0;color:#333} small{color:#666} .lat{white-space:nowrap}
.lat small{white-space:normal;display:block;max-width:16em}
"""


def _verdict_cell(p: PeerPath) -> str:
    if p.verdict == PathVerdict.DIRECT:
        return '<span class="ok">direct</span>'
    if p.verdict == PathVerdict.NESTED:
        cls, word = ("warn", "nested (allowed)") if p.allowed else ("crit", "NESTED")
        return f'<span class="{cls}">{word} in {escape(p.outer)}</span>'
    if p.verdict == PathVerdict.LOOP:
        return '<span class="crit">ROUTING LOOP</span>'
    extra = f": {escape(p.error)}" if p.error else ""
    return f'<span class="warn">{escape(p.verdict.replace("_", " "))}{extra}</span>'


def _fix_cell(p: PeerPath) -> str:
    fix = p.fix
    if fix is None or (p.verdict == PathVerdict.NESTED and p.allowed):
        return ""
    proof = escape(PROOF_TEXT[fix.proof])
    rule = (f"<br><small>captured by <code>{escape(p.captured_by)}</code></small>"
            if p.captured_by else "")
    if fix.kind == FixKind.FWMARK:
        return (f'<div class="fix">add to <code>[Interface]</code> of {escape(p.device)}: '
                f"<code>{escape(fix.config_lines[0])}</code><br><small>now: "
                f"<code>{escape(fix.commands[0])}</code> ({escape(fix.explanation)}; {proof})"
                f"</small>{rule}</div>")
    commands = "<br>".join(f"<code>{escape(c)}</code>" for c in fix.commands)
    hooks = "<br>".join(f"<code>{escape(c)}</code>" for c in fix.config_lines)
    return (f'<div class="fix">{commands}<br><small>{escape(fix.explanation)} ({proof})'
            f"</small>{rule}" + (f"<br><small>wg-quick:</small><br>{hooks}" if hooks else "")
            + "</div>")


def _path_cell(p: PeerPath) -> str:
    if not p.egress:
        return ""
    bits = [f"via <b>{escape(p.egress)}</b>"]
    if p.table:
        bits.append(f"table {escape(p.table)}")
    if p.gateway:
        bits.append(f"gw {escape(p.gateway)}")
    chain = " &rarr; ".join(escape(x) for x in p.chain)
    return " ".join(bits) + (f"<br><small>{chain}</small>" if len(p.chain) > 2 else "")


def _latency_cell(lat: PeerLatency | None) -> str:
    if lat is None or not lat.paths:
        return ""
    text = "<br>".join(escape(part) for part in latency_parts(lat))
    if lat.anomaly:
        text += f'<br><span class="crit">anomaly</span> <small>{escape(lat.reason)}</small>'
    elif lat.ratio is not None:
        text += f"<br><small>&times;{lat.ratio:.2f} of direct</small>"
    return text


_HEADER = ("<tr><th>peer</th><th>endpoint</th><th>transport path</th><th>verdict</th>"
           "<th>latency</th><th>fix</th></tr>")
# A filter box without frameworks or external assets: hides the rows whose text lacks it.
_FILTER = ('<p><input id="q" type="search" placeholder="filter peers: name, key, endpoint, '
           'device" size="48" oninput="for(const r of document.querySelectorAll(\'tr[data-q]\'))'
           'r.hidden=!r.dataset.q.includes(this.value.toLowerCase())"></p>')


def _row(p: PeerPath, names: Mapping[str, str], lat: PeerLatency | None,
         device: bool = False) -> str:
    name = names.get(p.public_key, "")
    label = f"{escape(name)}<br><small>{escape(p.public_key)}</small>" if name else (
        f"<small>{escape(p.public_key)}</small>")
    if device:  # in the problems table, which device's peer it is
        label = f'<a href="#dev-{escape(p.device)}">{escape(p.device)}</a><br>{label}'

    q = escape(f"{name} {p.public_key} {p.endpoint} {p.device}".lower())
    return (f'<tr data-q="{q}"><td>{label}</td><td>{escape(p.endpoint) or "<small>none</small>"}'
            f"</td><td>{_path_cell(p)}</td><td>{_verdict_cell(p)}</td>"
            f'<td class="lat">{_latency_cell(lat)}</td><td>{_fix_cell(p)}</td></tr>')


def _problem(p: PeerPath, lat: PeerLatency | None) -> bool:
    """Nested (undeclared), looping, unroutable or unknown, or slower than it should be."""
    quiet = p.verdict in (PathVerdict.DIRECT, PathVerdict.NO_ENDPOINT) or (
        p.verdict == PathVerdict.NESTED and p.allowed)
    return not quiet or (lat is not None and lat.anomaly)


def _devices(snap: Snapshot, by_device: Mapping[str, list[PeerPath]], names: Mapping[str, str],
             lats: Mapping[tuple[str, str], PeerLatency], netns: str = "") -> list[str]:
    out = []
    anchor = f"{netns}/" if netns else ""
    for d in snap.devices:
        mark = f"{d.fwmark} ({d.fwmark:#x})" if d.fwmark else "none"
        mine = by_device.get(d.name, [])
        healthy = [p for p in mine if not _problem(p, lats.get((p.device, p.public_key)))]
        counts = ", ".join(f"{n} {verdict.replace('_', ' ')}" for verdict, n in sorted(
            Counter(p.verdict for p in mine).items()))
        level = "h3" if netns else "h2"
        out.append(f'<{level} id="dev-{escape(anchor + d.name)}">{escape(d.name)}</{level}>'
                   f"<p><small>{escape(d.implementation)} &middot; fwmark {mark} &middot; "
                   f"listen port {d.listen_port} &middot; MTU {d.mtu} &middot; {len(mine)} "
                   f"peers{': ' + counts if counts else ''}</small></p>")
        if healthy:
            fold = " open" if len(healthy) <= FOLD_ABOVE else ""
            out.append(f"<details{fold}><summary>{len(healthy)} healthy peers</summary>"
                       f"<table>{_HEADER}")
            out.extend(_row(p, names, lats.get((p.device, p.public_key))) for p in healthy)
            out.append("</table></details>")
    return out


def render_netns(views: Sequence[tuple[str, str, Snapshot, Sequence[PeerPath]]],
                 failures: Sequence[SourceFailure], names: Mapping[str, str],
                 telemetry_path: str = "/metrics",
                 latency: Mapping[tuple[str, str], PeerLatency] | None = None, own: str = "",
                 prober: SourceFailure | None = None) -> str:
    """--netns other than self: the problems of every namespace first (device shown as
    NETNS/DEVICE), then each namespace with its devices. `latency` is namespace `own`'s."""
    everything = netns_failures(views, failures)
    snap, paths = whole(views, everything)
    lats = latency or {}
    v = check_result(snap, paths, latency, prober)
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken_at))
    out = [_head(telemetry_path),
           f'<div class="banner b{int(v.code)}">{v.code.name}: {escape(v.summary)}</div>',
           f"<small>snapshot {taken} &middot; {len(views)} network namespaces</small>", _FILTER]
    problems = [(n, p) for n, _path, _snap, ns_paths in views for p in ns_paths
                if _problem(p, lats.get((p.device, p.public_key)) if n == own else None)]
    if problems:
        out.append(f"<h2>Problems ({len(problems)})</h2><table>{_HEADER}")
        out.extend(_row(dataclasses.replace(p, device=f"{n}/{p.device}"), names,
                        lats.get((p.device, p.public_key)) if n == own else None, device=True)
                   for n, p in problems)
        out.append("</table>")
    for name, path, ns_snap, ns_paths in views:
        by_device: dict[str, list[PeerPath]] = {}
        for p in ns_paths:
            by_device.setdefault(p.device, []).append(p)
        where = escape(path) if path else "wgnest's own"
        out.append(f'<h2 id="netns-{escape(name)}">netns {escape(name)}</h2>'
                   f"<p><small>{where} &middot; {len(ns_snap.devices)} devices</small></p>")
        out += _devices(ns_snap, by_device, names, lats if name == own else {}, name)
        if not ns_snap.devices:
            out.append("<p>No WireGuard devices in this network namespace.</p>")
    for failure in (*everything, *([prober] if prober else [])):
        out.append(f'<p class="warn">source {escape(str(failure))}</p>')
    return "\n".join(out) + "</body></html>"


def _head(telemetry_path: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>wgnest</title>"
            f"<style>{STYLE}</style></head><body><h1>wgnest</h1><small>where each WireGuard "
            f"tunnel's packets really go &middot; v{escape(__version__)} &middot; "
            f'<a href="{escape(telemetry_path)}">metrics</a></small>')


def render(snap: Snapshot | None, paths: Sequence[PeerPath], names: Mapping[str, str],
           telemetry_path: str = "/metrics",
           latency: Mapping[tuple[str, str], PeerLatency] | None = None,
           prober: SourceFailure | None = None) -> str:
    """Problems first (nested, loops, anomalies, unroutable, unknown), then each device with
    its healthy peers folded and counted: a 10,000-peer gateway stays readable."""
    head = _head(telemetry_path)
    if snap is None:
        return head + "<p>First snapshot not taken yet.</p></body></html>"
    lats = latency or {}
    v = check_result(snap, paths, latency, prober)
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken_at))
    out = [head, f'<div class="banner b{int(v.code)}">{v.code.name}: {escape(v.summary)}</div>',
           f"<small>snapshot {taken}</small>", _FILTER]
    by_device: dict[str, list[PeerPath]] = {}
    for p in paths:
        by_device.setdefault(p.device, []).append(p)
    problems = [p for p in paths if _problem(p, lats.get((p.device, p.public_key)))]
    if problems:
        out.append(f"<h2>Problems ({len(problems)})</h2><table>{_HEADER}")
        out.extend(_row(p, names, lats.get((p.device, p.public_key)), device=True)
                   for p in problems)
        out.append("</table>")
    out += _devices(snap, by_device, names, lats)
    if not snap.devices:
        out.append("<p>No WireGuard devices in this network namespace.</p>")
    for failure in (*snap.failures, *([prober] if prober else [])):
        out.append(f'<p class="warn">source {escape(str(failure))}</p>')
    return "\n".join(out) + "</body></html>"
