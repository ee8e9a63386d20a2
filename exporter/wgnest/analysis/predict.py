"""`wgnest lint`: a wg-quick config predicted as if `wg-quick up` ran now, in the vocabulary
of `wgnest check` (PeerPath, PathVerdict, Fix, Nagios codes).

The plan (analysis/wgquick.py) is applied to a copy of this host's rules, routes, links and
addresses; every transport flow (the running tunnels' and the new one's) and every
candidate fix is then evaluated by analysis/fib.py over that state, and diagnose() — the
very function `wgnest check` runs on the kernel's answers — turns those answers into paths,
chains, MTU costs and fixes. The evaluation is trusted for a flow only where it agrees with
the kernel's own answer for the state that exists now (`kernel_now`); a flow it disagrees
on, or the kernel has not answered yet (`Lint.missing`: the caller asks and lints again), is
`unknown`, never guessed.

Lines to add before `up` are checked the same way: the config is linted again with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from wgnest.analysis.fib import Fib, agrees, describe
from wgnest.analysis.fixes import FixKind, Proof, capture_of, fix_flows
from wgnest.analysis.flows import transport_flows
from wgnest.analysis.nagios import ESSENTIAL, CheckResult, Nagios
from wgnest.analysis.paths import PathVerdict, PeerPath, diagnose
from wgnest.analysis.rules import RT_TABLE_MAIN, free_priority_below
from wgnest.analysis.view import HostView
from wgnest.analysis.wgquick import Plan, State, plan
from wgnest.model.failures import SourceFailure
from wgnest.model.host import LOOKUP, WG_OVERHEAD, Flow, MainRoute, RouteAnswer, Snapshot
from wgnest.model.routing import Routing
from wgnest.model.wgquick import Hook, WgQuickConfig

HOOK_KEYS = {"preup": "PreUp", "postup": "PostUp", "predown": "PreDown", "postdown": "PostDown"}


@dataclass(frozen=True, slots=True)
class Host:
    """This host now: the snapshot `wgnest check` reads (with the kernel's answers for its
    flows), every table's routes, table names, and what `wg-quick up` would create."""

    snap: Snapshot
    routing: Routing
    tables: Mapping[str, int] = field(default_factory=dict)
    implementation: str = "kernel"
    failures: tuple[SourceFailure, ...] = ()  # of the routing read

    def state(self) -> State:
        return State(list(self.snap.rules), list(self.routing.routes), list(self.snap.links),
                     list(self.routing.addresses), dict(self.routing.groups))


@dataclass(frozen=True, slots=True)
class Disagreement:
    flow: Flow
    kernel: str
    model: str


@dataclass(frozen=True, slots=True)
class LineFix:
    """Lines to add to the config before `wg-quick up`, and the path linted again with them."""

    device: str
    public_key: str
    lines: tuple[str, ...]
    explanation: str
    verdict: PathVerdict | None = None  # of that path, linted with the lines; None: not run
    egress: str = ""
    checked: bool = False  # with the lines that path goes direct and nothing else worsens


@dataclass(frozen=True)
class Lint:
    config: WgQuickConfig
    plan: Plan | None  # None: the interface is already up
    snapshot: Snapshot  # the host as predicted once up
    paths: tuple[PeerPath, ...]
    result: CheckResult
    captured: tuple[PeerPath, ...] = ()  # running tunnels' transports it would capture
    fixes: tuple[LineFix, ...] = ()
    lines: tuple[str, ...] = ()  # every line of `fixes`, once
    with_lines: CheckResult | None = None  # the config linted with all of `lines`
    disagreements: tuple[Disagreement, ...] = ()
    missing: frozenset[Flow] = frozenset()  # flows the kernel must still be asked (now)
    warnings: tuple[str, ...] = ()
    mtu_fits: int = 0  # the largest inner MTU its transport's path carries; 0: unknown
    mtu_via: str = ""  # the device that path leaves by

    @property
    def own(self) -> tuple[PeerPath, ...]:
        return tuple(p for p in self.paths if p.device == self.config.name)

    @property
    def refuse(self) -> bool:
        """It would nest or loop (itself or a running tunnel), undeclared."""
        return self.result.code == Nagios.CRITICAL


class _Evaluator:
    def __init__(self, now: Fib, up: Fib, kernel: Mapping[Flow, RouteAnswer]) -> None:
        self.now, self.up, self.kernel = now, up, kernel
        self.missing: set[Flow] = set()
        self.disagreements: dict[Flow, Disagreement] = {}

    def answers(self, flows: Sequence[Flow]) -> dict[Flow, RouteAnswer]:
        out: dict[Flow, RouteAnswer] = {}
        for flow in dict.fromkeys(flows):
            kernel = self.kernel.get(flow)
            if kernel is None:
                self.missing.add(flow)
                continue
            model = self.now.lookup(flow)
            if not agrees(model, kernel):
                self.disagreements[flow] = Disagreement(
                    flow, describe(kernel, self.now.links), describe(model, self.now.links))
                continue
            out[flow] = self.up.lookup(flow)
        return out


def _explain(path: PeerPath, ev: _Evaluator) -> PeerPath:
    if path.verdict != PathVerdict.UNKNOWN or path.flow is None:
        return path
    why = ev.disagreements.get(path.flow)
    if why is not None:
        return dataclasses.replace(path, error=(
            f"not predicted: the kernel routes this flow {why.kernel} now, but the model of "
            f"this host's routing says {why.model}; it is not trusted for this flow"))
    if path.flow in ev.missing:
        return dataclasses.replace(path, error="not predicted: the kernel's answer for this "
                                               "flow now is unavailable")
    return path


def with_lines(config: WgQuickConfig, lines: Sequence[str]) -> WgQuickConfig:
    """The config with `Key = value` lines added to its [Interface] section."""
    hooks, fwmark = list(config.hooks), config.fwmark
    for line in lines:
        key, _, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "fwmark":
            fwmark = int(value, 16) if value.lower().startswith("0x") else int(value)
        elif key in HOOK_KEYS:
            hooks.append(Hook(HOOK_KEYS[key], value, 0))
    return dataclasses.replace(config, fwmark=fwmark, hooks=tuple(hooks))


def _hooks(commands: Sequence[str]) -> tuple[str, ...]:
    ups = tuple(f"PostUp = {c}" for c in commands)
    downs = tuple(f"PostDown = {c.replace(' add ', ' del ', 1)}" for c in reversed(commands))
    return ups + downs


def _ip(family: int) -> str:
    return "ip -6" if family == 6 else "ip"


def _keep_out(view: HostView, path: PeerPath, name: str) -> tuple[tuple[str, ...], str]:
    """PostUp lines for the new config that keep a running tunnel's transport out of it."""
    flow = path.flow
    ans = view.answer(flow)
    if flow is None or ans is None:
        return (), ""
    fix = path.fix
    if fix is not None and fix.kind != FixKind.FWMARK and fix.proof != Proof.NONE:
        return _hooks(fix.commands), (
            f"keeps {path.device}'s transport (UDP to {path.endpoint}) out of {name}: "
            f"{fix.explanation}")
    family, host = flow.dst.version, f"{flow.dst}/{flow.dst.max_prefixlen}"
    default = view.underlay_default(family)
    route = (f"{_ip(family)} route add {host} "
             f"{f'via {default.gateway} ' if default and default.gateway else ''}"
             f"dev {view.name(default.oif)}") if default is not None else ""
    capture = capture_of(view, flow, ans)
    if capture is None:
        return (), ""
    if capture.action == LOOKUP and capture.table == RT_TABLE_MAIN:
        if not route:
            return (), ""
        return _hooks((route,)), (f"keeps {path.device}'s transport out of {name}: a host "
                                  f"route via the underlay is more specific than {name}'s")
    pref = free_priority_below(view.snap.rules, family, capture.priority)
    if pref is None:
        return (), ""
    rule = (f"{_ip(family)} rule add pref {pref} to {host} ipproto udp dport {flow.dport} "
            "lookup main")
    main = view.main_match(flow.dst)
    direct = main is not None and main.oif and not view.is_tunnel(main.oif)
    commands = (rule,) if direct else ((rule, route) if route else ())
    if not commands:
        return (), ""
    return _hooks(commands), (
        f"keeps {path.device}'s transport out of {name}: rule `{capture}` would capture it; "
        f"a rule at priority {pref} sends it (UDP to port {flow.dport}) to main first")


def _fits(view: HostView, own: Sequence[PeerPath]) -> tuple[int, str]:
    """The largest inner MTU every peer's transport path carries (each tunnel layer adds its
    headers; see paths._mtu), and the device the narrowest one leaves by."""
    links = {link.name: link for link in view.snap.links}
    best: tuple[int, str] | None = None
    for p in own:
        fit = 0
        if p.verdict == PathVerdict.NESTED and p.mtu is not None:
            fit = p.mtu.usable_mtu
        elif p.verdict == PathVerdict.DIRECT and p.flow is not None and p.egress in links:
            fit = links[p.egress].mtu - WG_OVERHEAD[p.flow.dst.version]
        if fit and (best is None or fit < best[0]):
            best = (fit, p.chain[-1] if p.chain else p.egress)
    return best or (0, "")


def _counts(snap: Snapshot, paths: Sequence[PeerPath], failed: bool) -> str:
    when = "after the failed up" if failed else "once up"
    return f"{len(snap.devices)} tunnels, {len(paths)} peers {when}"


def _result(host: Host, config: WgQuickConfig, p: Plan, pred: Snapshot,
            paths: Sequence[PeerPath], captured: Sequence[PeerPath], ev: _Evaluator
            ) -> tuple[CheckResult, tuple[str, ...]]:
    name, counts = config.name, _counts(pred, paths, bool(p.failure))
    broken = [f for f in (*host.snap.failures, *host.failures)
              if f.collector in ESSENTIAL or f.reason == "eperm" or f.collector == "routing"]
    if broken:
        first = broken[0]
        return CheckResult(Nagios.UNKNOWN, f"{name}: cannot read {first.collector} "
                                           f"({first.reason}): {first.message}"), ()
    own = [x for x in paths if x.device == name]
    bad = [x for x in (*own, *captured) if x.alarming]
    nested = sum(x.verdict == PathVerdict.NESTED for x in bad)
    loops = sum(x.verdict == PathVerdict.LOOP for x in bad)
    warnings: list[str] = []
    if p.failure:
        warnings.append(f"wg-quick up would fail: {p.failure}")
    if p.cleanup:
        warnings.append("its cleanup would delete rules of running tunnels: "
                        + ", ".join(f"`{r}`" for r in p.cleanup))
    if p.unknown:
        warnings.append(f"{len(p.unknown)} hook lines not evaluated")
    warnings.extend(p.collisions)
    unknown = sum(x.verdict == PathVerdict.UNKNOWN for x in own)
    if unknown:
        warnings.append(f"{unknown} endpoints whose route is not predicted")
    no_route = sum(x.verdict == PathVerdict.NO_ROUTE for x in own)
    if no_route:
        warnings.append(f"{no_route} endpoints without a route")
    if ev.disagreements and not unknown:
        warnings.append(f"{len(ev.disagreements)} flows the model disagrees with the kernel on")
    if bad:
        caught = (f", {len(captured)} of them running tunnels' transports it captures"
                  if captured else "")
        return CheckResult(Nagios.CRITICAL, f"{name}: {nested} nested, {loops} routing loops"
                                            f"{caught} ({counts})"), tuple(warnings)
    if warnings:
        return CheckResult(Nagios.WARNING, f"{name}: " + "; ".join(warnings) + f" ({counts})"
                           ), tuple(warnings)
    allowed = sum(x.verdict == PathVerdict.NESTED and x.allowed for x in (*own, *captured))
    tail = f", {allowed} nested as allowed" if allowed else ""
    return CheckResult(Nagios.OK, f"{name}: no nesting ({counts}{tail})"), ()


def already_up(host: Host, config: WgQuickConfig) -> Lint:
    return Lint(config, None, host.snap, (), CheckResult(
        Nagios.UNKNOWN, f"{config.name} is already up (wg-quick up would refuse: "
                        f"`{config.name}' already exists): `wgnest check` diagnoses it"))


def lint(host: Host, config: WgQuickConfig, kernel_now: Mapping[Flow, RouteAnswer],
         allow: Collection[tuple[str, str]] = (), *, check_lines: bool = True) -> Lint:
    snap = host.snap
    if any(link.name == config.name for link in snap.links):
        return already_up(host, config)
    now = host.state()
    p = plan(config, now, snap.devices, host.implementation, host.tables)
    ev = _Evaluator(now.fib(), p.state.fib(), kernel_now)
    devices = snap.devices if p.failure else tuple(
        sorted((*snap.devices, p.device), key=lambda d: d.name))
    rules = tuple(sorted(p.state.rules, key=lambda r: (r.family, r.priority)))
    main = tuple(MainRoute(r.dst, r.oif, r.gateway, r.route_type)
                 for r in p.state.routes if r.table == RT_TABLE_MAIN)
    ports = snap.udp_ports
    if ports is not None and p.device.listen_port and not p.failure:
        ports = ports | {(4, p.device.listen_port), (6, p.device.listen_port)}
    lookups = ev.answers(transport_flows(devices))
    base = Snapshot(taken_at=snap.taken_at, devices=devices, links=tuple(p.state.links),
                    rules=rules, main_routes=main, lookups=lookups, udp_ports=ports,
                    failures=snap.failures)
    lookups.update(ev.answers(fix_flows(base)))
    pred = dataclasses.replace(base, lookups=lookups)
    paths = tuple(_explain(x, ev) for x in diagnose(pred, allow))
    # a running tunnel's transport it makes nest or loop, or moves into another tunnel
    alarming_now = {(x.device, x.public_key): x.outer for x in diagnose(snap, allow)
                    if x.alarming}
    captured = tuple(x for x in paths if x.device != config.name and x.alarming
                     and alarming_now.get((x.device, x.public_key)) != x.outer)
    result, warnings = _result(host, config, p, pred, paths, captured, ev)
    fits, via = _fits(HostView(pred), [x for x in paths if x.device == config.name])
    out = Lint(config, p, pred, paths, result, captured,
               disagreements=tuple(ev.disagreements.values()), missing=frozenset(ev.missing),
               warnings=warnings, mtu_fits=fits, mtu_via=via)
    if not check_lines or p.failure:
        return out
    return _check_fixes(host, out, kernel_now, allow)


def _check_fixes(host: Host, out: Lint, kernel_now: Mapping[Flow, RouteAnswer],
                 allow: Collection[tuple[str, str]]) -> Lint:
    config, view = out.config, HostView(out.snapshot)
    wanted: list[tuple[PeerPath, tuple[str, ...], str]] = []
    for path in out.own:
        fix = path.fix
        if path.alarming and fix is not None and fix.config_lines:
            wanted.append((path, fix.config_lines, fix.explanation))
    for path in out.captured:
        lines, why = _keep_out(view, path, config.name)
        if lines:
            wanted.append((path, lines, why))
    fixes: list[LineFix] = []
    missing = set(out.missing)
    fine = {(x.device, x.public_key) for x in out.paths if not x.alarming}
    for path, lines, why in wanted:
        if any("<" in line for line in lines):  # placeholders: nothing to lint
            fixes.append(LineFix(path.device, path.public_key, lines, why))
            continue
        again = lint(host, with_lines(config, lines), kernel_now, allow, check_lines=False)
        missing |= again.missing
        after = next((x for x in again.paths
                      if (x.device, x.public_key) == (path.device, path.public_key)), None)
        worse = any(x.alarming and (x.device, x.public_key) in fine for x in again.paths)
        fixes.append(LineFix(
            path.device, path.public_key, lines, why,
            after.verdict if after else None, after.egress if after else "",
            after is not None and after.verdict == PathVerdict.DIRECT and not worse))
    lines = tuple(dict.fromkeys(line for f in fixes for line in f.lines))
    together = None
    if lines and not any("<" in line for line in lines):
        again = lint(host, with_lines(config, lines), kernel_now, allow, check_lines=False)
        missing |= again.missing
        together = again.result
    return dataclasses.replace(out, fixes=tuple(fixes), lines=lines, with_lines=together,
                               missing=frozenset(missing))
