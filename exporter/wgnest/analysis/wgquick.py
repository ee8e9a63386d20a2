"""What `wg-quick up` would do to this host's routing, step by step, from its own source
(wg-quick/linux.bash, cmd_up): PreUp hooks, the device (kernel or the userspace fallback),
`wg setconf` (FwMark, ListenPort, peers), the addresses, set_mtu_up, then add_route for
every allowed IP, most specific first:

- `Table = off`: no route at all;
- `Table = N`: `ip route add IP dev IF table N` for each one, /0 included, and no rule;
- otherwise a non-default prefix goes to main (unless a route of the device in main already
  covers it: `ip route show dev IF match IP`), and a /0 takes add_default: the device's
  FwMark as the table, or the first table from 51820 up holding no route (then `wg set IF
  fwmark T`), `ip route add /0 dev IF table T`, `ip rule add not fwmark T table T`,
  `ip rule add table main suppress_prefixlength 0` (each rule without a priority, so the
  kernel gives it one below the second rule of the list);
- PostUp hooks. Hooks are evaluated only when they are plain `ip rule add` / `ip route
  add|replace` lines (analysis/ipcmd.py); any other hook is reported, never guessed at.

DNS (resolvconf), SaveConfig and the nftables marking rules change no route lookup: ignored.
A step that would fail (a route that already exists, an unknown device) is where wg-quick
stops and removes the device again: the plan says so and predicts nothing more.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from wgnest.analysis.fib import Fib
from wgnest.analysis.ipcmd import RouteAdd, RuleAdd, is_lint_hook, parse_ip_command
from wgnest.model.host import LOOKUP, Device, IPNetwork, Link, Peer, Rule, table_name
from wgnest.model.routing import RT_TABLE_LOCAL, RT_TABLE_MAIN, RTN_LOCAL, Address, Route
from wgnest.model.wgquick import Hook, WgQuickConfig

FIRST_TABLE = 51820
OVERHEAD = 80  # set_mtu_up: the device gets the path's MTU minus 80
METRIC = {4: 0, 6: 1024}  # `ip route add` without a metric
CONNECTED_METRIC = {4: 0, 6: 256}  # the kernel's route for an address's prefix


@dataclass(frozen=True, slots=True)
class Step:
    command: str  # as wg-quick would print it after `[#] `
    outcome: str  # run, skipped, fails, evaluated, not_evaluated, ignored
    note: str = ""


@dataclass
class State:
    """The routing state a plan changes (copied; the host's own is never touched)."""

    rules: list[Rule]
    routes: list[Route]
    links: list[Link]
    addresses: list[Address]
    groups: dict[int, int] = field(default_factory=dict)

    def copy(self) -> State:
        return State(list(self.rules), list(self.routes), list(self.links),
                     list(self.addresses), dict(self.groups))

    def fib(self) -> Fib:
        return Fib(self.rules, self.routes, self.links, self.addresses, self.groups)

    def link_named(self, name: str) -> Link | None:
        return next((link for link in self.links if link.name == name), None)

    def default_priority(self, family: int) -> int:
        """fib_default_rule_pref: one below the second rule of the list, or 0."""
        ordered = sorted((r for r in self.rules if r.family == family),
                         key=lambda r: r.priority)
        return ordered[1].priority - 1 if len(ordered) > 1 and ordered[1].priority else 0

    def add_rule(self, rule: Rule) -> Rule:
        if rule.priority < 0:
            rule = dataclasses.replace(rule, priority=self.default_priority(rule.family))
        # after every rule of the same priority, as fib_nl_newrule inserts it
        at = max((i + 1 for i, r in enumerate(self.rules)
                  if r.family == rule.family and r.priority <= rule.priority), default=0)
        self.rules.insert(at, rule)
        return rule

    def clash(self, route: Route) -> Route | None:
        """The route `ip route add` (NLM_F_EXCL) would collide with: same table, prefix,
        tos and metric."""
        return next((r for r in self.routes if r.table == route.table and r.dst == route.dst
                     and r.tos == route.tos and r.metric == route.metric), None)

    def add_route(self, route: Route, replace: bool = False) -> Route | None:
        """Add it; returns the existing route it collides with (then nothing is added)."""
        old = self.clash(route)
        if old is not None and not replace:
            return old
        if old is not None:
            self.routes.remove(old)
        self.routes.append(route)
        return None

    def table_used(self, table: int) -> list[Route]:
        return [r for r in self.routes if r.table == table]


@dataclass(frozen=True, slots=True)
class Plan:
    config: WgQuickConfig
    device: Device  # as `wg show` would show it once up
    link: Link
    steps: tuple[Step, ...]
    state: State  # the routing state once up (or once wg-quick gave up and cleaned up)
    table: int = 0  # the policy table of a /0 (auto) or the custom table; 0: none
    failure: str = ""  # why `wg-quick up` would stop ("" : it would succeed)
    cleanup: tuple[str, ...] = ()  # rules of others its cleanup after a failure deletes
    unknown: tuple[Hook, ...] = ()  # hooks it cannot evaluate
    ignored: tuple[str, ...] = ()
    collisions: tuple[str, ...] = ()
    mtu_reason: str = ""


def _ip(family: int) -> str:
    return f"ip -{family}"


def _owner(links: Mapping[int, Link], routes: Iterable[Route]) -> str:
    names = sorted({links[r.oif].name for r in routes if r.oif in links})
    return ", ".join(names) if names else "no device"


class _Planner:
    def __init__(self, config: WgQuickConfig, now: State, devices: Sequence[Device],
                 implementation: str, tables: Mapping[str, int]) -> None:
        self.config, self.now, self.state, self.devices = config, now, now.copy(), devices
        self.implementation, self.tables = implementation, tables
        self.steps: list[Step] = []
        self.unknown: list[Hook] = []
        self.collisions: list[str] = []
        self.failure = ""
        self.configured = False  # `wg setconf` done: the device has its FwMark and peers
        self.fwmark = config.fwmark
        self.table = 0
        index = max((link.index for link in now.links), default=0) + 1
        kind = "wireguard" if implementation == "kernel" else "tun"
        self.link = Link(index, config.name, kind, 0, False)

    def step(self, command: str, outcome: str = "run", note: str = "") -> None:
        self.steps.append(Step(command, outcome, note))

    def fail(self, command: str, why: str) -> None:
        self.step(command, "fails", why)
        self.failure = f"`{command}` would fail: {why}; wg-quick stops and removes " \
                       f"{self.config.name} again"

    # ---- hooks ----------------------------------------------------------------------
    def hooks(self, phase: str) -> None:
        for hook in self.config.hooks:
            if hook.phase != phase or self.failure:
                continue
            command = hook.command.replace("%i", self.config.name)
            label = f"{phase} = {hook.command}"
            if is_lint_hook(command):
                self.step(label, "ignored", "wgnest lint itself: changes no routing")
                continue
            op = parse_ip_command(command, self.tables)
            if op is None:
                self.unknown.append(hook)
                self.step(label, "not_evaluated",
                          "not a plain `ip rule add` / `ip route add` line: wgnest cannot "
                          "know what it does to routing and assumes nothing")
                continue
            self.apply(op, command)

    def apply(self, op: RuleAdd | RouteAdd, command: str) -> None:
        if isinstance(op, RuleAdd):
            rule = self.state.add_rule(op.rule)
            self.step(command, "evaluated", f"rule `{rule}`")
            return
        route = op.route
        if op.dev:
            link = self.state.link_named(op.dev)
            if link is None:
                self.fail(command, f"Cannot find device \"{op.dev}\"")
                return
            route = dataclasses.replace(route, oif=link.index)
        elif route.gateway:
            gw = ipaddress.ip_address(route.gateway)
            near = self.state.fib().table_route(gw.version, RT_TABLE_MAIN, gw)
            if near is None or near.gateway or not near.oif:
                self.fail(command, "Nexthop has invalid gateway")
                return
            route = dataclasses.replace(route, oif=near.oif)
        old = self.state.add_route(route, op.replace)
        if old is not None:
            self.fail(command, "RTNETLINK answers: File exists")
            return
        self.step(command, "evaluated")

    # ---- the device -----------------------------------------------------------------
    def addresses(self) -> None:
        for text, plen in self.config.addresses:
            address = ipaddress.ip_address(text)
            self.state.addresses.append(Address(self.link.index, address, plen))
            self.state.routes.append(Route(
                RT_TABLE_LOCAL, ipaddress.ip_network(f"{address}/{address.max_prefixlen}"),
                self.link.index, route_type=RTN_LOCAL, prefsrc=str(address)))
            self.step(f"{_ip(address.version)} address add {text}/{plen} dev "
                      f"{self.config.name}")

    def connected_routes(self) -> None:
        """The prefix route of each address, added when the link comes up."""
        for address in [a for a in self.state.addresses if a.ifindex == self.link.index]:
            if address.prefixlen == address.address.max_prefixlen:
                continue
            route = Route(RT_TABLE_MAIN, address.network, self.link.index,
                          metric=CONNECTED_METRIC[address.address.version],
                          prefsrc=str(address.address) if address.address.version == 4 else "")
            if self.state.clash(route) is None:
                self.state.routes.append(route)

    def mtu(self) -> tuple[int, str]:
        if self.config.mtu:
            return self.config.mtu, f"MTU = {self.config.mtu} in the config"
        fib = self.state.fib()
        best: tuple[int, str] | None = None
        for peer in self.config.peers:
            ep = peer.endpoint
            if ep is None or ep.scope_id:  # a scoped endpoint fails wg-quick's regex
                continue
            found = fib.mtu_towards(ep.address)
            if found is not None and (best is None or found[0] > best[0]):
                best = (found[0], f"`ip route get {ep.address}` goes via {found[1]}, mtu "
                                  f"{found[0]}")
        if best is None:
            default = fib.main_default(4)
            link = next((x for x in self.state.links if default and x.index == default.oif),
                        None)
            if default is not None and (default.mtu or link is not None):
                mtu = default.mtu or (link.mtu if link else 0)
                best = (mtu, f"`ip route show default` goes via "
                             f"{link.name if link else '?'}, mtu {mtu}")
        if best is None:
            best = (1500, "no route to any endpoint nor a default route: 1500")
        return best[0] - OVERHEAD, f"{best[1]}, minus {OVERHEAD}"

    # ---- routes ---------------------------------------------------------------------
    def allowed_ips(self) -> list[IPNetwork]:
        nets = {n for p in self.config.peers for n in p.allowed_ips}
        # `sort -nr -k 2 -t /`: by prefix length, longest first (ties: reversed text)
        return sorted(nets, key=lambda n: (n.prefixlen, str(n)), reverse=True)

    def add_route(self, net: IPNetwork) -> None:
        config, family = self.config, net.version
        dev = config.name
        if config.table == "off":
            return
        if not config.auto_table:
            command = f"{_ip(family)} route add {net} dev {dev} table {config.table}"
            if not config.table_id:
                self.fail(command, f"table \"{config.table}\" is not a number nor a name "
                                   "ip knows")
                return
            self.table = config.table_id
            self._route(command, Route(config.table_id, net, self.link.index,
                                       metric=METRIC[family]))
        elif net.prefixlen == 0:
            self.add_default(net)
        else:
            covering = [r for r in self.state.routes if r.table == RT_TABLE_MAIN
                        and r.oif == self.link.index and r.dst.version == family
                        and r.dst.prefixlen <= net.prefixlen
                        and net.network_address in r.dst]
            command = f"{_ip(family)} route add {net} dev {dev}"
            if covering:
                self.step(command, "skipped", f"`ip route show dev {dev} match {net}` finds "
                                              f"{covering[0].dst}")
                return
            self._route(command, Route(RT_TABLE_MAIN, net, self.link.index,
                                       metric=METRIC[family]))

    def _route(self, command: str, route: Route) -> None:
        old = self.state.add_route(route)
        if old is not None:
            links = {link.index: link for link in self.state.links}
            self.fail(command, f"RTNETLINK answers: File exists (table "
                               f"{table_name(route.table)} already has {old.dst} via "
                               f"{_owner(links, [old])})")
        else:
            self.step(command)

    def add_default(self, net: IPNetwork) -> None:
        family, dev = net.version, self.config.name
        if not self.fwmark:
            table = FIRST_TABLE
            while self.state.table_used(table):
                table += 1
            self.fwmark = table
            self.step(f"wg set {dev} fwmark {table}", note=f"table {table}: the first from "
                                                           f"{FIRST_TABLE} up without routes")
        table = self.table = self.fwmark
        self._route(f"{_ip(family)} route add {net} dev {dev} table {table}",
                    Route(table, net, self.link.index, metric=METRIC[family]))
        if self.failure:
            return
        mark = self.state.add_rule(Rule(family, -1, table, LOOKUP, table, 0xFFFFFFFF,
                                        invert=True))
        self.step(f"{_ip(family)} rule add not fwmark {table} table {table}",
                  note=f"rule `{mark}`")
        main = self.state.add_rule(Rule(family, -1, RT_TABLE_MAIN, LOOKUP,
                                        suppress_prefixlength=0))
        self.step(f"{_ip(family)} rule add table main suppress_prefixlength 0",
                  note=f"rule `{main}`")

    def check_collisions(self, full: bool) -> None:
        links = {link.index: link for link in self.state.links}
        config = self.config
        if not config.auto_table and config.table_id:
            used = self.state.table_used(config.table_id)
            if used:
                self.collisions.append(
                    f"Table = {config.table}: table {table_name(config.table_id)} already "
                    f"holds routes of {_owner(links, used)}; this tunnel's routes join them")
            rules = [r for r in self.state.rules if r.action == LOOKUP
                     and r.table == config.table_id and config.table_id != RT_TABLE_MAIN]
            if rules:
                self.collisions.append(
                    f"Table = {config.table}: rule `{rules[0]}` already looks up table "
                    f"{config.table_id}: this tunnel's routes take effect for every packet "
                    "it selects")
        if config.auto_table and full and config.fwmark:
            used = self.state.table_used(config.fwmark)
            if used:
                self.collisions.append(
                    f"FwMark = {config.fwmark}: wg-quick puts the default route in table "
                    f"{config.fwmark}, which already holds routes of {_owner(links, used)}")
            for d in self.devices:
                if d.fwmark == config.fwmark and any(
                        n.prefixlen == 0 for p in d.peers for n in p.allowed_ips):
                    self.collisions.append(
                        f"FwMark = {config.fwmark} is already the mark of the full tunnel "
                        f"{d.name}: each tunnel's transport bypasses the other's table")

    def run(self) -> Plan:
        config = self.config
        self.hooks("PreUp")
        if not self.failure:
            self.step(f"ip link add {config.name} type wireguard"
                      if self.implementation == "kernel" else
                      f"wireguard-go {config.name}", note=f"a {self.implementation} device")
        setconf = f"wg setconf {config.name} /dev/fd/63"
        if config.problems and not self.failure:
            self.fail(setconf, config.problems[0])
        elif not self.failure:
            mark = f"fwmark {config.fwmark}" if config.fwmark else "no fwmark"
            port = f"listen port {config.listen_port}" if config.listen_port else \
                "a random listen port"
            count = f"{len(config.peers)} peer" + ("" if len(config.peers) == 1 else "s")
            self.step(setconf, note=f"{mark}, {port}, {count}")
        self.configured = not self.failure
        nets = self.allowed_ips()
        full = any(n.prefixlen == 0 for n in nets)
        self.check_collisions(full)
        if not self.failure:
            self.addresses()
        mtu, reason = self.mtu() if not self.failure else (0, "")
        link = dataclasses.replace(self.link, mtu=mtu, up=not self.failure)
        if not self.failure:
            self.state.links.append(link)
            self.step(f"ip link set mtu {mtu} up dev {config.name}", note=reason)
            self.connected_routes()
            if config.dns:
                self.step(f"resolvconf -a {config.name}", "ignored", "DNS: no routing effect")
        for net in nets:
            if self.failure:
                break
            self.add_route(net)
        if not self.failure:
            self.hooks("PostUp")
        ignored = []
        if config.dns:
            ignored.append("DNS (resolvconf): changes no route lookup")
        if config.save_config:
            ignored.append("SaveConfig: only matters at `wg-quick down`")
        if full and config.auto_table:
            ignored.append("the nftables rules add_default installs (they mark replies "
                           "and drop spoofed packets; no route lookup changes)")
        peers = tuple(Peer(p.public_key, p.endpoint, p.allowed_ips, 0.0, 0, 0,
                           p.persistent_keepalive) for p in config.peers)
        device = Device(config.name, link.index, self.implementation, "", config.listen_port,
                        self.fwmark, mtu, peers)
        cleanup = self.clean_up(full) if self.failure else ()
        return Plan(config, device, link, tuple(self.steps), self.state, self.table,
                    self.failure, cleanup, tuple(self.unknown), tuple(ignored),
                    tuple(self.collisions), reason)

    def clean_up(self, full: bool) -> tuple[str, ...]:
        """del_if, run by wg-quick's trap when a step fails: with an automatic table, a mark
        and a /0 among the allowed IPs it deletes every rule looking up that table and every
        `lookup main suppress_prefixlength 0` rule — other tunnels' too — then the device.
        Returns the rules it deletes that were there before."""
        state, index = self.state, self.link.index
        gone: list[Rule] = []
        if self.configured and self.config.auto_table and self.fwmark and full:
            table = self.fwmark
            gone = [r for r in state.rules if r.action == LOOKUP and (
                r.table == table or (r.table == RT_TABLE_MAIN and r.src is None
                                     and r.suppress_prefixlength == 0))]
            state.rules = [r for r in state.rules if r not in gone]
        state.links = [x for x in state.links if x.index != index]
        state.addresses = [a for a in state.addresses if a.ifindex != index]
        state.routes = [r for r in state.routes if r.oif != index]
        before = set(self.now.rules)
        return tuple(str(r) for r in gone if r in before)


def plan(config: WgQuickConfig, now: State, devices: Sequence[Device], implementation: str,
         tables: Mapping[str, int]) -> Plan:
    """What `wg-quick up CONFIG` would do, applied to a copy of `now`."""
    return _Planner(config, now, devices, implementation, tables).run()
