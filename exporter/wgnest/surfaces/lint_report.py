"""`wgnest lint` output: the verdict line and the devices in `wgnest check`'s own text and
JSON, as the host would be once the config is up, with what wg-quick would do and the lines
to add before `up`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from wgnest.analysis.fixes import FixKind
from wgnest.analysis.nagios import CheckResult, Nagios
from wgnest.analysis.paths import PathVerdict, PeerPath
from wgnest.analysis.predict import Lint
from wgnest.model.wgquick import ConfigFailure
from wgnest.surfaces.report import path_notes, peer_line, render_json

Entry = Lint | ConfigFailure
MARK = {"run": "[#]", "evaluated": "[#]", "skipped": "[-]", "ignored": "[-]",
        "not_evaluated": "[?]", "fails": "[!]"}
OUTCOME = {"skipped": "skipped", "ignored": "ignored", "not_evaluated": "NOT EVALUATED",
           "fails": "FAILS", "evaluated": "evaluated"}


def entry_result(entry: Entry) -> CheckResult:
    if isinstance(entry, ConfigFailure):
        return CheckResult(Nagios.UNKNOWN, f"{entry.path}: {entry.message}")
    return entry.result


def overall(entries: Sequence[Entry], empty: str) -> CheckResult:
    """CRITICAL when any config would nest or loop, then UNKNOWN, WARNING, OK."""
    if not entries:
        return CheckResult(Nagios.OK, empty)
    results = [entry_result(e) for e in entries]
    for code in (Nagios.CRITICAL, Nagios.UNKNOWN, Nagios.WARNING):
        worst = [r.summary for r in results if r.code == code]
        if worst:
            return CheckResult(code, "; ".join(worst))
    return CheckResult(Nagios.OK, "; ".join(r.summary for r in results))


def _predicted(text: str) -> str:
    return text.replace("the kernel routes", "the kernel would route")


def _fix_lines(lint: Lint, p: PeerPath) -> list[str]:
    lines, fix = path_notes(p)
    if fix is None:
        return lines
    own = p.device == lint.config.name
    where = lint.config.path if own else f"{p.device}'s config"
    if fix.kind == FixKind.FWMARK:
        lines.append(f"    fix: in the [Interface] section of {where}:  {fix.config_lines[0]}   "
                     f"({_predicted(fix.explanation)})")
        if not own:
            lines.append(f"         or at runtime, once {lint.config.name} is up: "
                         f"{fix.commands[0]}")
        return lines
    lines.append(f"    fix ({fix.kind}): {_predicted(fix.explanation)}")
    lines.extend(f"         {c}" for c in fix.config_lines or fix.commands)
    return lines


def _plan_lines(lint: Lint) -> list[str]:
    plan = lint.plan
    if plan is None:
        return []
    out = [f"lint {lint.config.path}: what `wg-quick up {lint.config.name}` would do now"]
    for step in plan.steps:
        label = OUTCOME.get(step.outcome, "")
        note = ": ".join(x for x in (label, step.note) if x)
        out.append(f"  {MARK.get(step.outcome, '[#]')} {step.command}"
                   + (f"   ({note})" if note else ""))
    out.extend(f"  ignored: {why}" for why in plan.ignored)
    out.extend(f"  collision: {why}" for why in plan.collisions)
    out.extend(f"  unknown: {h.phase} = {h.command} (line {h.line}): not evaluated; the "
               "prediction assumes it changes no routing" for h in plan.unknown)
    out.extend(f"  not predicted: {d.flow.dst} mark {d.flow.mark}: the kernel routes it "
               f"{d.kernel} now, the model says {d.model}" for d in lint.disagreements)
    return out


def _lint_text(lint: Lint) -> list[str]:
    out = _plan_lines(lint)
    if lint.plan is None:
        return out
    if lint.plan.failure:
        out.append(f"  wg-quick up would FAIL: {lint.plan.failure}")
        if lint.plan.cleanup:
            out.append("  and its cleanup would delete rules of running tunnels: "
                       + ", ".join(f"`{r}`" for r in lint.plan.cleanup))
        out.append("the host after that failed `wg-quick up`:")
    snap, name = lint.snapshot, lint.config.name
    for dev in snap.devices:
        mark = f"{dev.fwmark:#x}" if dev.fwmark else "off"
        state = " (once up)" if dev.name == name else ""
        port = dev.listen_port or "random"
        out.append(f"{dev.name}  {dev.implementation}{state}  fwmark {mark}  listen {port}"
                   f"  mtu {dev.mtu}  peers {len(dev.peers)}")
        nested = any(p.device == name and p.verdict in (PathVerdict.NESTED, PathVerdict.LOOP)
                     for p in lint.paths)  # then the MTU line of the path says it
        if dev.name == name and lint.mtu_fits and lint.plan is not None and not nested:
            fit = lint.mtu_fits
            verdict = ("too big: its packets would be fragmented on the way"
                       if dev.mtu > fit else "it fits" if dev.mtu == fit
                       else f"`MTU = {fit}` would use all of it")
            out.append(f"  MTU: wg-quick sets {dev.mtu} ({lint.plan.mtu_reason}); {fit} fits "
                       f"through the path its transport takes (out via {lint.mtu_via}): "
                       f"{verdict}")
        for p in lint.paths:
            if p.device == dev.name:
                line = peer_line(p)
                if p in lint.captured:
                    line += f"   <- captured by {name}"
                out.append(line)
                out.extend(_fix_lines(lint, p))
    if lint.lines:
        out.append(f"before `wg-quick up`, add to the [Interface] section of "
                   f"{lint.config.path}:")
        out.extend(f"  {line}" for line in lint.lines)
        for fix in lint.fixes:
            seen = (f"{fix.verdict} via {fix.egress}" if fix.verdict is not None
                    else "not linted (placeholders to fill in)")
            out.append(f"  for {fix.device}: {_predicted(fix.explanation)}; linted with "
                       f"{'it' if len(fix.lines) == 1 else 'them'}: {seen}")
        if lint.with_lines is not None:
            out.append(f"checked: with these lines, wgnest lint predicts "
                       f"{lint.with_lines.code.name} - {lint.with_lines.summary}")
    return out


def render_lint_text(entries: Sequence[Entry], empty: str) -> str:
    verdict = overall(entries, empty)
    out = [f"WGNEST {verdict.code.name} - {verdict.summary}"]
    for entry in entries:
        if isinstance(entry, ConfigFailure):
            out.append(f"lint {entry.path}: {entry.message}")
        else:
            out.extend(_lint_text(entry))
    return "\n".join(out) + "\n"


def lint_json(lint: Lint) -> dict[str, Any]:
    """One config: `wgnest check`'s JSON of the host once up, with what lint adds."""
    config = lint.config
    doc: dict[str, Any] = json.loads(render_json(lint.snapshot, lint.paths))
    res = lint.result
    doc.update(status=res.code.name.lower(), exit_code=int(res.code), summary=res.summary)
    for dev in doc["devices"]:
        dev["predicted"] = dev["name"] == config.name
    captured = {(p.device, p.public_key) for p in lint.captured}
    fixes = {(f.device, f.public_key): f for f in lint.fixes}
    for peer in doc["peers"]:
        key = (peer["device"], peer["public_key"])
        peer["captured"] = key in captured
        if peer.get("fix"):
            fix = peer["fix"]
            fix["proof_once_up"], fix["proof"] = fix["proof"], "lint"
            checked = fixes.get(key) if peer["device"] == config.name else None
            fix["verified"] = checked.checked if checked is not None else (
                fix["proof_once_up"] != "none")
    plan = lint.plan
    doc["config"] = {
        "name": config.name, "path": config.path, "table": config.table,
        "fwmark": config.fwmark, "listen_port": config.listen_port, "mtu": config.mtu,
        "addresses": [f"{a}/{n}" for a, n in config.addresses], "dns": list(config.dns),
        "save_config": config.save_config, "problems": list(config.problems),
        "peers": [{"public_key": p.public_key, "endpoint": str(p.endpoint or ""),
                   "endpoint_text": p.endpoint_text,
                   "allowed_ips": [str(n) for n in p.allowed_ips]} for p in config.peers],
    }
    doc["wg_quick"] = None if plan is None else {
        "implementation": plan.device.implementation, "fwmark": plan.device.fwmark,
        "table": plan.table, "mtu": plan.device.mtu, "mtu_reason": plan.mtu_reason,
        "failure": plan.failure, "ignored": list(plan.ignored),
        "collisions": list(plan.collisions),
        "steps": [dataclasses.asdict(s) for s in plan.steps],
        "mtu_fits": lint.mtu_fits, "mtu_via": lint.mtu_via,
    }
    doc["unknown"] = [dataclasses.asdict(h) for h in (plan.unknown if plan else ())]
    doc["captures"] = [{"device": p.device, "public_key": p.public_key, "outer": p.outer,
                        "verdict": str(p.verdict)} for p in lint.captured]
    doc["before_up"] = {
        "file": config.path, "lines": list(lint.lines),
        "fixes": [dataclasses.asdict(f) for f in lint.fixes],
        "status": lint.with_lines.code.name.lower() if lint.with_lines else None,
        "summary": lint.with_lines.summary if lint.with_lines else None,
    }
    doc["disagreements"] = [{"flow": {"dst": str(d.flow.dst), "mark": d.flow.mark,
                                      "sport": d.flow.sport, "dport": d.flow.dport},
                             "kernel": d.kernel, "model": d.model} for d in lint.disagreements]
    doc["warnings"] = list(lint.warnings)
    return doc


def render_lint_json(entries: Sequence[Entry], empty: str, taken_at: float) -> str:
    verdict = overall(entries, empty)
    configs = []
    for entry in entries:
        if isinstance(entry, ConfigFailure):
            res = entry_result(entry)
            configs.append({"config": {"path": entry.path}, "status": "unknown",
                            "exit_code": int(res.code), "summary": res.summary,
                            "devices": [], "peers": [], "errors": [entry.message]})
        else:
            configs.append(lint_json(entry))
    doc = {"status": verdict.code.name.lower(), "exit_code": int(verdict.code),
           "summary": verdict.summary, "taken_at": taken_at, "configs": configs}
    return json.dumps(doc, indent=2) + "\n"
