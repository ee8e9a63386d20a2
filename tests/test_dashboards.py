"""The Grafana dashboards (dashboards/*.json): importable, filtered, built only from metrics
the exporter exports or recording rules alerts/wgnest.rules.yml defines, passing Grafana's
dashboard-linter rules (re-implemented here) and type-checked against Grafana's published
dashboard model (@grafana/schema, with tsc)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import EXPORTED_METRICS, METRIC_LABELS
from tests.test_alerts import RUNBOOK_BASE, promtool

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
DASHBOARD = REPO / "dashboards" / "wgnest.json"
RULES = REPO / "alerts" / "wgnest.rules.yml"
SCHEMA_DIR = REPO / "tools" / "dashboard-schema"
TSC = SCHEMA_DIR / "node_modules" / ".bin" / "tsc"

DS_UID = "${datasource}"
RECORDING = re.compile(r"\b[a-zA-Z_]\w*:\w+:\w+\b")
JOB = 'job=~"$job"'
INSTANCE = 'instance=~"$instance"'
DEVICE = 'device=~"$device"'
STATUS_LINK_FIELD = "${status_scheme}://${__field.labels.instance}/"
STATUS_LINK_ROW = "${status_scheme}://${__data.fields.instance}/"
# The panels with one series (or row) per peer: names, $limit, status page links.
PER_PEER_PANELS = ("Endpoint egress path", "Handshake age", "Transfer", "RTT per path",
                   "Latency overhead ratio", "Latency anomalies", "Probe packet loss",
                   "Probe packets")
FLEET_PANELS = ("Fleet", "Nesting by instance", "Latency anomalies by instance")
# Values used for the variables when a query is run for real (e2e) or parsed by promtool.
QUERY_VALUES = {"job": ".+", "instance": ".+", "device": ".+", "peer": ".*", "limit": "20"}


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows (rows themselves excluded)."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel(title: str) -> dict[str, Any]:
    return next(p for p in panels(load()) if p["title"] == title)


def targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels(load()) for t in p.get("targets", [])]


def target_params() -> list[Any]:
    return [pytest.param(title, expr, id=f"{title}#{i}")
            for i, (title, expr) in enumerate(targets())]


def variables(dashboard: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in (dashboard or load())["templating"]["list"]}


def variable_query(var: dict[str, Any]) -> str:
    query = var.get("query")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query)


def recording_rules() -> dict[str, set[str]]:
    """Recording rule name -> the labels its output keeps (from its outermost `by`)."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                by = re.search(r"\bby\s*\(([^)]*)\)", rule["expr"])
                out[rule["record"]] = (
                    {x.strip() for x in by.group(1).split(",")} - {"le"} if by else set())
    return out


def rule_groups() -> dict[str, str]:
    """Recording rule name -> its group."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["record"]: g["name"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """A query as Grafana sends it with every variable at QUERY_VALUES (All selected)."""
    expr = expr.replace("${__rate_interval}", rate_interval)
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: QUERY_VALUES.get(m.group(1), m.group(0)), expr)


# ====================================================================== a PromQL parser
# Enough of PromQL to walk a query's syntax tree the way Grafana's dashboard-linter walks the
# Prometheus parser's: vector and matrix selectors, calls, aggregations, binary operators and
# their modifiers. promtool is the authority on validity (test_expressions_parse); this only
# has to give the structure of valid queries.

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<dur>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)(?![\w.])
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)
_AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                           "count_values", "bottomk", "topk", "quantile", "limitk",
                           "limit_ratio"})
_PRECEDENCE = {"or": 1, "and": 2, "unless": 2, "==": 3, "!=": 3, "<=": 3, "<": 3, ">=": 3,
               ">": 3, "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6}


class PromQLError(ValueError):
    pass


@dataclass
class Node:
    kind: str  # vector matrix subquery call aggregate binary unary paren number string
    name: str = ""  # metric, function, aggregation or operator
    children: list[Node] = field(default_factory=list)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)
    range: str = ""  # matrix selector / subquery range
    grouping: tuple[str, list[str]] | None = None  # (by|without|on|ignoring, labels)
    include: list[str] | None = None  # group_left/group_right labels


def _unquote(token: str) -> str:
    body = token[1:-1]
    return body if token[0] == "`" else re.sub(r"\\(.)", r"\1", body)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise PromQLError(f"unexpected character {text[pos]!r} at {pos}")
            pos = m.end()
            if m.lastgroup != "ws":
                self.tokens.append((str(m.lastgroup), m.group()))
        self.i = 0

    def peek(self, ahead: int = 0) -> str:
        i = self.i + ahead
        return self.tokens[i][1] if i < len(self.tokens) else ""

    def kind(self) -> str:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> str:
        if self.i >= len(self.tokens):
            raise PromQLError(f"unexpected end, expected {expected or 'more'}")
        text = self.tokens[self.i][1]
        if expected is not None and text != expected:
            raise PromQLError(f"expected {expected!r}, got {text!r}")
        self.i += 1
        return text

    def parse(self) -> Node:
        node = self.expr(1)
        if self.i != len(self.tokens):
            raise PromQLError(f"unexpected {self.peek()!r}")
        return node

    def expr(self, min_prec: int) -> Node:
        lhs = self.unary()
        while True:
            op = self.peek()
            prec = _PRECEDENCE.get(op)
            if prec is None or prec < min_prec or self.kind() not in ("op", "ident"):
                return lhs
            self.take()
            node = Node("binary", op)
            if self.peek() == "bool":
                self.take()
            if self.peek() in ("on", "ignoring"):
                node.grouping = (self.take(), self.labels())
            if self.peek() in ("group_left", "group_right"):
                self.take()
                node.include = self.labels() if self.peek() == "(" else []
            rhs = self.expr(prec if op == "^" else prec + 1)
            node.children = [lhs, rhs]
            lhs = node

    def unary(self) -> Node:
        if self.peek() in ("-", "+") and self.kind() == "op":
            op = self.take()
            return Node("unary", op, [self.expr(6)])
        return self.postfix(self.primary())

    def postfix(self, node: Node) -> Node:
        while True:
            if self.peek() == "[":
                self.take()
                rng = self.take()
                if self.peek() == ":":
                    self.take()
                    if self.peek() != "]":
                        self.take()
                    self.take("]")
                    node = Node("subquery", children=[node], range=rng)
                else:
                    self.take("]")
                    if node.kind != "vector":
                        raise PromQLError("range on a non-selector")
                    node = Node("matrix", children=[node], range=rng)
            elif self.peek() == "offset":
                self.take()
                if self.peek() == "-":
                    self.take()
                self.take()
            elif self.peek() == "@":
                self.take()
                if self.peek() in ("start", "end"):
                    self.take()
                    self.take("(")
                    self.take(")")
                else:
                    self.take()
            else:
                return node

    def labels(self) -> list[str]:
        self.take("(")
        out: list[str] = []
        while self.peek() != ")":
            out.append(self.take())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return out

    def args(self) -> list[Node]:
        self.take("(")
        out: list[Node] = []
        while self.peek() != ")":
            out.append(self.expr(1))
            if self.peek() == ",":
                self.take()
            elif self.peek() != ")":
                raise PromQLError(f"expected ',' or ')', got {self.peek()!r}")
        self.take(")")
        return out

    def selector(self, name: str) -> Node:
        node = Node("vector", name)
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op = self.take(), self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r}")
                if self.kind() != "str":
                    raise PromQLError("matcher value must be a string")
                node.matchers.append((label, op, _unquote(self.take())))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        return node

    def primary(self) -> Node:
        kind, text = self.kind(), self.peek()
        if kind in ("num", "dur") or text in ("Inf", "NaN", "inf", "nan"):
            return Node("number", self.take())
        if kind == "str":
            return Node("string", _unquote(self.take()))
        if text == "(":
            self.take()
            inner = self.expr(1)
            self.take(")")
            return Node("paren", children=[inner])
        if text == "{":
            return self.selector("")
        if kind != "ident":
            raise PromQLError(f"unexpected {text!r}")
        name = self.take()
        if name in _AGGREGATIONS and self.peek() in ("(", "by", "without"):
            node = Node("aggregate", name)
            if self.peek() in ("by", "without"):
                node.grouping = (self.take(), self.labels())
            node.children = self.args()
            if self.peek() in ("by", "without"):
                node.grouping = (self.take(), self.labels())
            return node
        if self.peek() == "(":
            return Node("call", name, self.args())
        return self.selector(name)


def parse_promql(text: str) -> Node:
    return _Parser(text).parse()


def walk(node: Node, parents: tuple[Node, ...] = ()) -> Iterator[tuple[Node, tuple[Node, ...]]]:
    yield node, parents
    for child in node.children:
        yield from walk(child, (*parents, node))


def vector_selectors(node: Node) -> list[Node]:
    return [n for n, _ in walk(node) if n.kind == "vector"]


# ====================================================== Grafana dashboard-linter, rule by rule
# Re-implements github.com/grafana/dashboard-linter's default rules (lint/rule_*.go) on the
# dashboard JSON: same rule names, same panel types, same variable expansion before PromQL
# parsing. Each returns its findings; [] = the rule passes. Where the Go code is looser than
# its documentation (the counter rule tests `selector.String()`, which includes the matchers),
# the documented intent is implemented.

LINT_PANEL_TYPES = ("stat", "singlestat", "graph", "table", "timeseries", "gauge")
DATASOURCE_PANEL_TYPES = ("singlestat", "graph", "table", "timeseries")
RATE_INTERVAL_SAMPLE = "8869990787ms"  # the linter's stand-in for $__rate_interval
LINTER_GLOBALS = {"__rate_interval": RATE_INTERVAL_SAMPLE, "__interval": "4867856611ms",
                  "__interval_ms": "7781188786", "__range_ms": "6737667980",
                  "__range_s": "9397795485", "__range": "6069770749ms", "__auto": "12345ms"}
LABEL_FUNCTIONS = ("label_names", "label_values", "metrics", "query_result")
TEMPLATED_LABEL = re.compile(r"([a-z_]+)\((.+)\)")
VARIABLE = re.compile(r"\$(\w+)|\$\{([^}]+)\}|\[\[([^\[\]]+)\]\]")

# Grafana's unit ids (packages/grafana-data/src/valueFormats/categories.ts), as the linter
# enumerates them.
GRAFANA_UNITS = frozenset(re.findall(r"\S+", """
none string short percent percentunit humidity dB hex0x hex sci locale pixel accMS2 accFS2
accG degree radian grad arcmin arcsec areaM2 areaF2 areaMI2 flops mflops gflops tflops pflops
eflops zflops yflops ppm conppb conngm3 conngNm3 conμgm3 conμgNm3 conmgm3 conmgNm3 congm3
congNm3 conmgdL conmmolL currencyUSD currencyGBP currencyEUR currencyJPY currencyRUB
currencyUAH currencyBRL currencyDKK currencyISK currencyNOK currencySEK currencyCZK
currencyCHF currencyPLN currencyBTC currencymBTC currencyμBTC currencyZAR currencyINR
currencyKRW currencyIDR currencyPHP currencyVND bytes decbytes bits decbits kbytes deckbytes
mbytes decmbytes gbytes decgbytes tbytes dectbytes pbytes decpbytes pps binBps Bps binbps bps
KiBs Kibits KBs Kbits MiBs Mibits MBs Mbits GiBs Gibits GBs Gbits TiBs Tibits TBs Tbits PiBs
Pibits PBs Pbits dateTimeAsIso dateTimeAsIsoNoDateIfToday dateTimeAsUS
dateTimeAsUSNoDateIfToday dateTimeAsLocal dateTimeAsLocalNoDateIfToday dateTimeAsSystem
dateTimeFromNow watt kwatt megwatt gwatt mwatt Wm2 voltamp kvoltamp voltampreact
kvoltampreact watth watthperkg kwatth kwattm amph kamph mamph joule ev amp kamp mamp volt
kvolt mvolt dBm ohm kohm Mohm farad µfarad nfarad pfarad ffarad henry mhenry µhenry lumens
flowgpm flowcms flowcfs flowcfm litreh flowlpm flowmlpm lux forceNm forcekNm forceN forcekN
Hs KHs MHs GHs THs PHs EHs massmg massg masslb masskg masst lengthmm lengthin lengthft
lengthm lengthkm lengthmi pressurembar pressurebar pressurekbar pressurepa pressurehpa
pressurekpa pressurehg pressurepsi radbq radci radgy radrad radsv radmsv radusv radrem
radexpckg radr radsvh radmsvh radusvh rotrpm rothz rotrads rotdegs celsius fahrenheit kelvin
hertz ns µs ms s m h d dtdurationms dtdurations dthms dtdhms timeticks clockms clocks cps ops
reqps rps wps iops cpm opm rpm wpm mps mpm velocityms velocitykmh velocitymph velocityknot
mlitre litre m3 Nm3 dm3 gallons bool bool_yes_no bool_on_off
"""))


def lint_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    """GetPanels(): every panel, rows included, with the panels nested in them."""
    def flat(p: dict[str, Any]) -> list[dict[str, Any]]:
        return [p, *(q for sub in p.get("panels", []) for q in flat(sub))]
    return [q for p in d.get("panels", []) for q in flat(p)]


def datasource_uid(obj: dict[str, Any]) -> str:
    ds = obj.get("datasource")
    if isinstance(ds, dict):
        return str(ds.get("uid", ""))
    return str(ds or "")


def template_value(var: dict[str, Any]) -> str:
    """The value the linter expands a variable to: current value, else first option."""
    def first(v: Any) -> str:
        return str(v[0]) if isinstance(v, list) and v else str(v or "")
    current = first((var.get("current") or {}).get("value"))
    if current:
        return current
    options = var.get("options") or []
    return first(options[0].get("value")) if options else ""


def expand_variables(expr: str, templates: list[dict[str, Any]]) -> str:
    """The linter's expandVariables: outside double-quoted strings, every $var, ${var} and
    [[var]] becomes a sample value (globals, the variable's current value, or its name)."""
    def sample(name: str, templates: list[dict[str, Any]]) -> str:
        base = name.split(":", 1)[0]
        if base in LINTER_GLOBALS:
            return LINTER_GLOBALS[base]
        if base.startswith("__auto_interval"):
            return "10s"
        for var in templates:
            if var.get("name") == base:
                value = template_value(var)
                if value:
                    rest = [t for t in templates if t.get("name") != base]
                    return expand_variables(value, rest)
        return base

    parts = expr.split('"')
    for i in range(0, len(parts), 2):
        parts[i] = VARIABLE.sub(
            lambda m: sample(next(g for g in m.groups() if g), templates), parts[i])
    return '"'.join(parts)


def parse_target(d: dict[str, Any], expr: str) -> Node:
    return parse_promql(expand_variables(expr, d["templating"]["list"]))


def check_template(d: dict[str, Any], name: str) -> list[str]:
    var = next((v for v in d["templating"]["list"] if v.get("name") == name), None)
    if var is None:
        return [f"is missing the {name} template"]
    errors = []
    uid = datasource_uid(var)
    if uid not in ("$datasource", "${datasource}", "$prometheus_datasource",
                   "${prometheus_datasource}"):
        errors.append(f"{name} template should use datasource '$datasource', is '{uid}'")
    if var.get("type") != "query":
        errors.append(f"{name} template should be a Prometheus query, is '{var.get('type')}'")
    if var.get("label") != name.title():
        errors.append(f"{name} template should be labeled '{name.title()}'")
    if not var.get("multi"):
        errors.append(f"{name} template should be a multi select")
    if var.get("allValue") != ".+":
        errors.append(f"{name} template allValue should be '.+', is '{var.get('allValue')}'")
    return errors


def prometheus_templated(d: dict[str, Any]) -> bool:
    ds = [v for v in d["templating"]["list"] if v.get("type") == "datasource"]
    return bool(ds) and ds[0].get("query") == "prometheus"


def rule_template_datasource(d: dict[str, Any]) -> list[str]:
    ds = [v for v in d["templating"]["list"] if v.get("type") == "datasource"]
    if not ds:
        return ["does not have a templated data source"]
    for var in ds:
        query = str(var.get("query", ""))
        names = {f"{query.lower()}_datasource"} | ({"datasource"} if len(ds) == 1 else set())
        labels = {f"{query.title()} data source"} | ({"Data source"} if len(ds) == 1 else set())
        if var.get("name") not in names:
            return [f"templated data source variable named '{var.get('name')}', "
                    f"should be one of {sorted(names)}"]
        if var.get("label") not in labels:
            return [f"templated data source variable labeled '{var.get('label')}', "
                    f"should be one of {sorted(labels)}"]
    return []


def rule_template_job(d: dict[str, Any]) -> list[str]:
    return check_template(d, "job") if prometheus_templated(d) else []


def rule_template_instance(d: dict[str, Any]) -> list[str]:
    return check_template(d, "instance") if prometheus_templated(d) else []


def label_function_argument(query: str) -> tuple[str, str] | None:
    """(function, its PromQL argument) of a templated label query, or None."""
    m = TEMPLATED_LABEL.search(query)
    if not m:
        return None
    func, arg = m.group(1), m.group(2)
    if func == "label_values":  # label_values([selector, ]label)
        depth, cut = 0, -1
        for i, c in enumerate(arg):
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
            elif c == "," and depth == 0:
                cut = i
        if cut < 0 and "," in arg:  # unbalanced: the selector is broken, keep it to report
            cut = arg.rindex(",")
        arg = arg[:cut] if cut >= 0 else ""
    return func, arg.strip()


def rule_template_label_promql(d: dict[str, Any]) -> list[str]:
    if not prometheus_templated(d):
        return []
    errors = []
    for var in d["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = variable_query(var)
        found = label_function_argument(query)
        if found is None or found[0] not in LABEL_FUNCTIONS:
            errors.append(f"template '{var['name']}' invalid templated label '{query}'")
            continue
        if found[1]:
            try:
                parse_target(d, found[1])
            except PromQLError as exc:
                errors.append(f"template '{var['name']}': {exc}")
    return errors


def rule_template_on_time_change_reload(d: dict[str, Any]) -> list[str]:
    return [f"template '{v['name']}' should refresh on time range change (2), is "
            f"{v.get('refresh')}" for v in d["templating"]["list"]
            if v.get("type") == "query" and v.get("refresh") != 2]


def rule_template_unused(d: dict[str, Any]) -> list[str]:
    exprs = [t.get("expr", "") for p in lint_panels(d) for t in p.get("targets", [])]
    errors = []
    for var in d["templating"]["list"]:
        if var.get("type") != "query":
            continue
        name = re.escape(var["name"])
        used = re.compile(rf"\$({name})\b|\$\{{({name}(:[^}}]+)?)\}}|\[\[({name})\]\]")
        if not any(used.search(e) for e in exprs):
            errors.append(f"template '{var['name']}' is not used in any panel")
    return errors


def rule_panel_datasource(d: dict[str, Any]) -> list[str]:
    allowed = {f"${v['name']}" for v in d["templating"]["list"] if v.get("type") == "datasource"}
    allowed |= {f"${{{v['name']}}}" for v in d["templating"]["list"]
                if v.get("type") == "datasource"}
    return [f"panel '{p.get('title')}' does not use a templated datasource, uses "
            f"'{datasource_uid(p)}'" for p in lint_panels(d)
            if p.get("type") in DATASOURCE_PANEL_TYPES and datasource_uid(p) not in allowed]


def rule_panel_title_description(d: dict[str, Any]) -> list[str]:
    return [f"panel with id '{p.get('id')}' has missing title or description"
            for p in lint_panels(d) if p.get("type") in LINT_PANEL_TYPES
            and not (p.get("title") and p.get("description"))]


def configured_unit(p: dict[str, Any]) -> str:
    fc = p.get("fieldConfig") or {}
    unit = ""
    for override in fc.get("overrides") or []:
        for prop in override.get("properties") or []:
            if prop.get("id") == "unit":
                unit = str(prop.get("value"))
    return unit or str((fc.get("defaults") or {}).get("unit") or "")


def has_value_mappings(p: dict[str, Any]) -> bool:
    fc = p.get("fieldConfig") or {}
    for override in fc.get("overrides") or []:
        for prop in override.get("properties") or []:
            if prop.get("id") == "mappings" and prop.get("value") is not None:
                return True
    return (fc.get("defaults") or {}).get("mappings") is not None


def rule_panel_units(d: dict[str, Any]) -> list[str]:
    errors = []
    for p in lint_panels(d):
        if p.get("type") not in LINT_PANEL_TYPES:
            continue
        if p.get("type") == "stat" and ((p.get("options") or {}).get("reduceOptions") or {}
                                        ).get("fields"):
            continue
        if has_value_mappings(p):
            continue
        unit = configured_unit(p)
        if unit not in GRAFANA_UNITS:
            errors.append(f"panel '{p.get('title')}' has no or invalid units defined: '{unit}'")
    return errors


def rule_panel_no_targets(d: dict[str, Any]) -> list[str]:
    return [f"panel '{p.get('title')}' has no targets" for p in lint_panels(d)
            if p.get("type") in LINT_PANEL_TYPES and p.get("targets") is None]


def each_target(d: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, Node | None]]:
    """(panel, expr, parsed expression or None when it does not parse)."""
    for p in lint_panels(d):
        for t in p.get("targets") or []:
            expr = t.get("expr", "")
            try:
                yield p, expr, parse_target(d, expr)
            except PromQLError:
                yield p, expr, None


def rule_target_promql(d: dict[str, Any]) -> list[str]:
    if not prometheus_templated(d):
        return []
    return [f"panel '{p.get('title')}' invalid PromQL query '{expr}'"
            for p, expr, node in each_target(d) if node is None]


def rule_target_rate_interval(d: dict[str, Any]) -> list[str]:
    if not prometheus_templated(d):
        return []
    errors = []
    for p, expr, node in each_target(d):
        for n, parents in walk(node) if node else ():
            if n.kind != "matrix" or n.range == RATE_INTERVAL_SAMPLE or not parents:
                continue
            parent = parents[-1]
            if parent.kind != "call":
                errors.append(f"panel '{p['title']}' '{expr}': $__rate_interval used in "
                              "non-rate function")
            elif parent.name in ("rate", "irate"):
                errors.append(f"panel '{p['title']}' '{expr}': should use $__rate_interval")
    return errors


def required_matcher_rule(label: str) -> Callable[[dict[str, Any]], list[str]]:
    def rule(d: dict[str, Any]) -> list[str]:
        if not prometheus_templated(d):
            return []
        errors = []
        for p, expr, node in each_target(d):
            for sel in vector_selectors(node) if node else ():
                if (label, "=~", f"${label}") not in sel.matchers:
                    errors.append(f"panel '{p['title']}': {sel.name or '{…}'} lacks "
                                  f'{label}=~"${label}" in {expr}')
        return errors
    return rule


def rule_target_counter_agg(d: dict[str, Any]) -> list[str]:
    errors = []
    for p, expr, node in each_target(d):
        for n, parents in walk(node) if node else ():
            if n.kind != "vector" or not n.name.endswith("_total"):
                continue
            ok = (len(parents) >= 2 and parents[-1].kind == "matrix"
                  and parents[-2].kind == "call"
                  and parents[-2].name in ("rate", "irate", "increase"))
            if not ok:
                errors.append(f"panel '{p['title']}': counter {n.name} is not aggregated "
                              f"with rate, irate or increase in {expr}")
    return errors


def rule_target_histogram(d: dict[str, Any]) -> list[str]:
    errors = []
    for p, _expr, node in each_target(d):
        for n, parents in walk(node) if node else ():
            if n.kind == "vector" and "_bucket" in n.name and not any(
                    q.kind == "call" and q.name == "histogram_quantile" for q in parents):
                errors.append(f"panel '{p['title']}': {n.name} outside histogram_quantile")
    return errors


def rule_uneditable_dashboard(d: dict[str, Any]) -> list[str]:
    return ["is editable, it should be set to 'editable: false'"] if d.get("editable") else []


LINT_RULES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "template-datasource-rule": rule_template_datasource,
    "template-job-rule": rule_template_job,
    "template-instance-rule": rule_template_instance,
    "template-label-promql-rule": rule_template_label_promql,
    "template-on-time-change-reload-rule": rule_template_on_time_change_reload,
    "template-unused-rule": rule_template_unused,
    "panel-datasource-rule": rule_panel_datasource,
    "panel-title-description-rule": rule_panel_title_description,
    "panel-units-rule": rule_panel_units,
    "panel-no-targets-rule": rule_panel_no_targets,
    "target-promql-rule": rule_target_promql,
    "target-rate-interval-rule": rule_target_rate_interval,
    "target-job-rule": required_matcher_rule("job"),
    "target-instance-rule": required_matcher_rule("instance"),
    "target-counter-agg-rule": rule_target_counter_agg,
    "target-histogram-rule": rule_target_histogram,
    "uneditable-dashboard-rule": rule_uneditable_dashboard,
}


def first_panel(d: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in lint_panels(d) if p.get("type") == kind)


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    obj[key] = value


# One way to break each rule: the re-implementation must report it.
VIOLATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "template-datasource-rule": lambda d: _set(variables(d)["datasource"], "name", "ds"),
    "template-job-rule": lambda d: _set(variables(d)["job"], "allValue", ".*"),
    "template-instance-rule": lambda d: _set(variables(d)["instance"], "multi", False),
    "template-label-promql-rule": lambda d: _set(
        variables(d)["device"], "query", {"query": "label_values(wireguard_device_info{, device)"}),
    "template-on-time-change-reload-rule": lambda d: _set(variables(d)["device"], "refresh", 1),
    "template-unused-rule": lambda d: d["templating"]["list"].append(
        {**variables(d)["device"], "name": "unused"}),
    "panel-datasource-rule": lambda d: _set(first_panel(d, "timeseries"), "datasource",
                                            {"type": "prometheus", "uid": "prom-1"}),
    "panel-title-description-rule": lambda d: _set(first_panel(d, "table"), "description", ""),
    "panel-units-rule": lambda d: _set(first_panel(d, "timeseries")["fieldConfig"]["defaults"],
                                       "unit", "furlongs") or first_panel(d, "timeseries")[
                                           "fieldConfig"]["defaults"].pop("mappings", None),
    "panel-no-targets-rule": lambda d: first_panel(d, "timeseries").pop("targets"),
    "target-promql-rule": lambda d: _set(first_panel(d, "timeseries")["targets"][0], "expr",
                                         'sum(wgnest_build_info{job=~"$job"'),
    "target-rate-interval-rule": lambda d: _set(
        first_panel(d, "timeseries")["targets"][0], "expr",
        'rate(wgnest_errors_total{job=~"$job", instance=~"$instance"}[5m])'),
    "target-job-rule": lambda d: _set(first_panel(d, "timeseries")["targets"][0], "expr",
                                      'wgnest_build_info{instance=~"$instance"}'),
    "target-instance-rule": lambda d: _set(first_panel(d, "timeseries")["targets"][0], "expr",
                                           'wgnest_build_info{job=~"$job", instance="gw1"}'),
    "target-counter-agg-rule": lambda d: _set(
        first_panel(d, "timeseries")["targets"][0], "expr",
        'wgnest_errors_total{job=~"$job", instance=~"$instance"}'),
    "target-histogram-rule": lambda d: _set(
        first_panel(d, "timeseries")["targets"][0], "expr",
        'sum(wireguard_probe_rtt_seconds_bucket{job=~"$job", instance=~"$instance"})'),
    "uneditable-dashboard-rule": lambda d: _set(d, "editable", True),
}


# ================================================================================= tests
# ------------------------------------------------------------------- the PromQL parser


def test_parser_finds_every_selector_and_its_context() -> None:
    node = parse_promql(
        'topk(20, sum by (job, instance) (rate(a_total{job=~"$job", x="1"}[5m])) '
        '* on (job, instance) group_left (peer) label_replace(b{y!~"z"}, "peer", "$1", '
        '"public_key", "(.{8}).+")) + -c offset 5m unless d[1h:5m] or {__name__="e"} ^ 2')
    sels = {s.name: s.matchers for s in vector_selectors(node)}
    assert sels == {"a_total": [("job", "=~", "$job"), ("x", "=", "1")],
                    "b": [("y", "!~", "z")], "c": [], "d": [], "": [("__name__", "=", "e")]}
    ops = {n.name for n, _ in walk(node) if n.kind == "binary"}
    assert ops == {"*", "+", "unless", "or", "^"}
    joins = [n for n, _ in walk(node) if n.kind == "binary" and n.include is not None]
    assert joins[0].grouping == ("on", ["job", "instance"])
    assert joins[0].include == ["peer"]
    rate = next(p for n, ps in walk(node) if n.name == "a_total" for p in ps[-2:-1])
    assert rate.kind == "call"
    assert rate.name == "rate"
    top = node
    while top.kind == "binary":
        top = top.children[0]
    assert top.kind == "aggregate"
    assert top.name == "topk"


@pytest.mark.parametrize("bad", ['sum(a', 'a{b="c"', 'rate(a[5m]', "a +", 'a{b=c}', "(a[5m])[1m]"])
def test_parser_rejects_broken_queries(bad: str) -> None:
    with pytest.raises(PromQLError):
        parse_promql(bad)


# ---------------------------------------------------------------------------- top level


def test_importable_into_stock_grafana() -> None:
    d = load()
    assert d["id"] is None
    assert d["uid"] == "wgnest-overview"
    assert d["title"]
    assert isinstance(d["schemaVersion"], int)
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    requires = {(r["type"], r["id"]) for r in d["__requires"]}
    assert ("grafana", "grafana") in requires
    assert ("datasource", "prometheus") in requires
    for p in panels(d):
        assert ("panel", p["type"]) in requires, f"__requires lacks panel {p['type']}"
    # every ${VAR_…} placeholder is an import input Grafana asks for, and vice versa
    text = DASHBOARD.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{(VAR_\w+|DS_\w+)\}", text))
    assert used == set(inputs), (used, set(inputs))


def test_datasource_variable() -> None:
    ds = variables()["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"


@pytest.mark.parametrize("name", ["job", "instance", "device"])
def test_query_variable(name: str) -> None:
    var = variables()[name]
    assert var["type"] == "query"
    assert var["datasource"]["uid"] == DS_UID
    query = variable_query(var)
    assert query.startswith("label_values("), query
    assert query.rstrip().endswith(f", {name})"), query
    assert var["multi"] is True
    assert var["includeAll"] is True
    assert var["allValue"] == ".+"
    assert var["refresh"] == 2, "refresh on time range change"


def test_variables_chain() -> None:
    assert JOB in variable_query(variables()["instance"])
    device = variable_query(variables()["device"])
    assert JOB in device
    assert INSTANCE in device
    peer = variable_query(variables()["peer"])
    assert JOB in peer
    assert INSTANCE in peer
    assert DEVICE in peer


def test_peer_variable_by_name() -> None:
    """Peers by their name; All (`.*`) also matches the peers without a name."""
    var = variables()["peer"]
    assert var["type"] == "query"
    assert var["label"] == "Peer"
    assert re.fullmatch(r"label_values\(wireguard_peer_info\{[^}]*\}, name\)",
                        variable_query(var))
    assert var["multi"] is True
    assert var["includeAll"] is True
    assert var["allValue"] == ".*", "All must keep unnamed peers (name=\"\")"
    assert var["refresh"] == 2


def test_limit_variable() -> None:
    var = variables()["limit"]
    assert var["type"] == "custom"
    values = [o["value"] for o in var["options"]]
    assert values == var["query"].split(",")
    assert all(v.isdigit() for v in values)
    assert var["current"]["value"] in values
    assert int(var["current"]["value"]) <= 50, "the default must render on a 10,000-peer host"


def test_not_editable() -> None:
    assert load()["editable"] is False


# -------------------------------------------------------------------------------- panels


def test_panel_ids_are_unique() -> None:
    d = load()
    ids = [p["id"] for p in lint_panels(d)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("panel", list(panels(load())), ids=lambda p: p["title"])
def test_panel_metadata(panel: dict[str, Any]) -> None:
    assert panel["title"].strip()
    assert panel.get("description", "").strip(), "description missing"
    assert panel["fieldConfig"]["defaults"].get("unit"), "fieldConfig.defaults.unit missing"
    assert panel["datasource"]["uid"] == DS_UID
    assert panel["datasource"]["type"] == "prometheus"
    assert panel.get("targets"), "no queries"
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == DS_UID
        assert target["expr"].strip()
    assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


@pytest.mark.parametrize("panel", list(panels(load())), ids=lambda p: p["title"])
def test_every_unit_is_one_of_grafanas(panel: dict[str, Any]) -> None:
    """Stricter than panel-units-rule (which skips panels with value mappings): every unit,
    default or override, is an id from Grafana's unit list."""
    units = [panel["fieldConfig"]["defaults"]["unit"]]
    units += [prop["value"] for o in panel["fieldConfig"]["overrides"]
              for prop in o["properties"] if prop["id"] == "unit"]
    assert set(units) <= GRAFANA_UNITS, set(units) - GRAFANA_UNITS


def test_required_panels_exist() -> None:
    titles = {p["title"] for p in panels(load())}
    for title in ("Tunnels", "Nesting over time", "Endpoint egress path", "Handshake age",
                  "RTT per path", "Latency overhead ratio", "Latency anomalies",
                  "Probe packet loss", "Transfer", "Collector health", *FLEET_PANELS):
        assert title in titles


def test_tunnels_table_columns() -> None:
    tunnels = panel("Tunnels")
    assert tunnels["type"] == "table"
    exprs = " ".join(t["expr"] for t in tunnels["targets"])
    for metric in ("wireguard_device_fwmark", "wireguard_device_mtu_bytes", "wireguard_peer_info",
                   "wireguard_peer_nested", "wireguard_peer_suggested_fwmark"):
        assert metric in exprs
    assert "outer_device" in exprs
    renamed = next(t for t in tunnels["transformations"] if t["id"] == "organize")
    columns = set(renamed["options"]["renameByName"].values())
    assert {"Device", "FwMark", "MTU", "Peers", "Nested peers", "Outer device",
            "Suggested FwMark"} <= columns


def overrides(p: dict[str, Any], column: str) -> dict[str, Any]:
    return {prop["id"]: prop["value"] for o in p["fieldConfig"]["overrides"]
            if o["matcher"] == {"id": "byName", "options": column} for prop in o["properties"]}


def test_fwmarks_as_wg_prints_them(tmp_path: Path) -> None:
    """`wg show` prints fwmark 51820 as 0xca6c and none as off; Grafana's hex0x unit would
    print 0xCA6C. The table shows the exporter's `fwmark` label instead, as wg prints it:
    the dashboard's own queries, evaluated by promtool, carry it to the columns."""
    tunnels = panel("Tunnels")
    org = next(t for t in tunnels["transformations"] if t["id"] == "organize")["options"]
    assert org["renameByName"]["fwmark"] == "FwMark"
    assert org["renameByName"]["suggested_fwmark"] == "Suggested FwMark"
    assert org["excludeByName"]["Value #A"]
    assert org["excludeByName"]["Value #F"]
    assert not overrides(tunnels, "FwMark")  # no number formatting left to disagree with wg
    query = {t["refId"]: substitute(t["expr"]) for t in tunnels["targets"]}
    base = 'job="wgnest",instance="gw1:9586"'
    key = "++8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    series = [
        {"series": f'wireguard_device_fwmark{{{base},device="wg0",fwmark="0xca6c"}}',
         "values": "51820x5"},
        {"series": f'wireguard_device_fwmark{{{base},device="wg1",fwmark="off"}}',
         "values": "0x5"},
        {"series": f'wireguard_peer_nested{{{base},device="wg1",public_key="{key}",'
                   'outer_device="wg0"}', "values": "1x5"},
        {"series": f'wireguard_peer_suggested_fwmark{{{base},device="wg1",public_key="{key}",'
                   'fwmark="0xca6c"}', "values": "51820x5"},
    ]
    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": query["A"], "eval_time": "2m", "exp_samples": [
                {"labels": f'{{{base},device="wg0",fwmark="0xca6c"}}', "value": 51820},
                {"labels": f'{{{base},device="wg1",fwmark="off"}}', "value": 0}]},
            {"expr": query["F"], "eval_time": "2m", "exp_samples": [
                {"labels": f'{{{base},device="wg1",suggested_fwmark="0xca6c"}}',
                 "value": 51820}]},
        ]}]}
    path = tmp_path / "fwmark_test.yml"
    path.write_text(yaml.safe_dump(doc, width=1000), encoding="utf-8")
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{51820:#x}" == "0xca6c"  # what wg prints


def test_rtt_panel_uses_recording_rules() -> None:
    rtt = panel("RTT per path")
    used = {name for t in rtt["targets"] for name in RECORDING.findall(t["expr"])}
    for q in ("p50", "p90", "p99"):
        assert f"device_public_key_path:wireguard_probe_rtt_seconds:{q}_rate5m" in used


@pytest.mark.parametrize("panel", list(panels(load())), ids=lambda p: p["title"])
def test_panels_that_need_recording_rules_say_so(panel: dict[str, Any]) -> None:
    groups = rule_groups()
    used = {groups[n] for t in panel["targets"] for n in RECORDING.findall(t["expr"])}
    description = panel["description"]
    if used:
        assert "recording rules of alerts/wgnest.rules.yml" in description, description
        for group in used:
            assert f"(group {group})" in description, (group, description)
    else:
        assert "recording rule" not in description, "claims rules it does not use"


# ------------------------------------------------------------- peers: names, topk, links


@pytest.mark.parametrize("title", PER_PEER_PANELS)
def test_per_peer_panels_name_peers_and_stay_small(title: str) -> None:
    """Every per-peer query joins the peer's name (short key without one) from
    wireguard_peer_info, filtered by $peer, and keeps only the top $limit series."""
    p = panel(title)
    for t in p["targets"]:
        node = parse_target(load(), t["expr"])
        assert node.kind == "aggregate", t["expr"]
        assert node.name == "topk", t["expr"]
        assert t["expr"].startswith("topk($limit, "), t["expr"]
        joins = [n for n, _ in walk(node) if n.kind == "binary" and n.include == ["peer"]]
        assert joins, f"{title}: no group_left (peer) join"
        assert joins[0].grouping == ("on", ["job", "instance", "netns", "device", "public_key"])
        info = [s for s in vector_selectors(joins[0].children[1])
                if s.name == "wireguard_peer_info"]
        assert info
        assert ("name", "=~", "$peer") in info[0].matchers
        if p["type"] != "table":
            assert "{{peer}}" in t["legendFormat"], t["legendFormat"]
            assert "{{public_key}}" not in t["legendFormat"]


def test_no_legend_shows_raw_public_keys() -> None:
    for p in panels(load()):
        for t in p["targets"]:
            assert "public_key}}" not in t.get("legendFormat", ""), p["title"]


def test_peer_label_is_the_name_or_the_short_key(tmp_path: Path) -> None:
    """The dashboard's own join, evaluated by promtool: a named peer shows its name, an
    unnamed one the first 8 characters of its key and an ellipsis; $peer filters by name."""
    expr = next(t["expr"] for t in panel("Handshake age")["targets"])
    named, unnamed = ("++8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                      "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=")
    base = 'job="wgnest",instance="gw1:9586",device="wg1"'
    series = [
        {"series": f'wireguard_peer_info{{{base},public_key="{named}",name="site-b",'
                   'endpoint="",allowed_ips=""}', "values": "1x5"},
        {"series": f'wireguard_peer_info{{{base},public_key="{unnamed}",name="",'
                   'endpoint="",allowed_ips=""}', "values": "1x5"},
        {"series": f'wireguard_peer_handshake_age_seconds{{{base},public_key="{named}"}}',
         "values": "10x5"},
        {"series": f'wireguard_peer_handshake_age_seconds{{{base},public_key="{unnamed}"}}',
         "values": "20x5"},
    ]

    def sample(key: str, peer: str, value: float) -> dict[str, Any]:
        return {"labels": f'{{{base},public_key="{key}",peer="{peer}"}}', "value": value}

    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": substitute(expr), "eval_time": "2m",
             "exp_samples": [sample(named, "site-b", 10), sample(unnamed, "IiIiIiIi…", 20)]},
            {"expr": substitute(expr).replace('name=~".*"', 'name=~"site-b"'),
             "eval_time": "2m", "exp_samples": [sample(named, "site-b", 10)]},
            {"expr": substitute(expr).replace("topk(20,", "topk(1,"), "eval_time": "2m",
             "exp_samples": [sample(unnamed, "IiIiIiIi…", 20)]},
        ]}]}
    path = tmp_path / "peer_label_test.yml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, width=1000), encoding="utf-8")
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def panel_links(p: dict[str, Any]) -> list[str]:
    links = [link["url"] for link in p["fieldConfig"]["defaults"].get("links", [])]
    links += [link["url"] for o in p["fieldConfig"]["overrides"] for prop in o["properties"]
              if prop["id"] == "links" for link in prop["value"]]
    return links


@pytest.mark.parametrize("panel", [p for p in panels(load())
                                   if p["title"] in (*PER_PEER_PANELS, *FLEET_PANELS)],
                         ids=lambda p: p["title"])
def test_status_page_links(panel: dict[str, Any]) -> None:
    """Every per-peer and per-host panel links to that host's wgnest status page (`/` of the
    scraped address, which is the `instance` label)."""
    expected = STATUS_LINK_ROW if panel["type"] == "table" else STATUS_LINK_FIELD
    assert expected in panel_links(panel)
    if panel["type"] == "table":
        assert "Instance" in {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]
                              if any(prop["id"] == "links" for prop in o["properties"])}


def test_status_scheme_and_runbook_base_are_import_inputs() -> None:
    d = load()
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["VAR_STATUS_SCHEME"] == {**inputs["VAR_STATUS_SCHEME"], "type": "constant",
                                           "value": "http"}
    assert inputs["VAR_RUNBOOK_BASE"]["type"] == "constant"
    assert inputs["VAR_RUNBOOK_BASE"]["value"] == RUNBOOK_BASE, "same base as the alerts"
    v = variables()
    assert v["status_scheme"]["query"] == "${VAR_STATUS_SCHEME}"
    assert v["runbook_base"]["query"] == "${VAR_RUNBOOK_BASE}"
    assert [link["url"] for link in d["links"]] == ["${runbook_base}"]


# --------------------------------------------------------------------------------- fleet


def test_fleet_row_reads_only_per_instance_series() -> None:
    """The fleet row needs nothing but the wgnest.fleet recording rules and
    wgnest_build_info: exactly what a global Prometheus federates."""
    d = load()
    rows = [p for p in d["panels"] if p["type"] == "row"]
    assert rows[0]["title"] == "Fleet"
    assert rows[0]["gridPos"]["y"] == 0
    fleet = [p for p in d["panels"] if p["type"] != "row"
             and p["gridPos"]["y"] < rows[1]["gridPos"]["y"]]
    assert [p["title"] for p in fleet] == list(FLEET_PANELS)
    groups = rule_groups()
    used: set[str] = set()
    for p in fleet:
        for t in p["targets"]:
            names = {s.name for s in vector_selectors(parse_target(d, t["expr"]))}
            assert all(groups.get(n) == "wgnest.fleet" or n == "wgnest_build_info"
                       for n in names), names
            used |= names
    assert {"instance:wireguard_peer_nested:sum", "instance:wireguard_peer_routing_loop:sum",
            "instance:wireguard_peer_latency_anomaly:sum"} <= used


# ----------------------------------------------------------------------------- queries


@pytest.mark.parametrize(("title", "expr"), target_params())
def test_every_selector_is_filtered(title: str, expr: str) -> None:
    records = recording_rules()
    sels = vector_selectors(parse_target(load(), expr))
    assert sels, f"{title}: no metric in {expr}"
    for sel in sels:
        assert ("job", "=~", "$job") in sel.matchers, f"{title}: {sel.name} lacks the job filter"
        assert ("instance", "=~", "$instance") in sel.matchers, \
            f"{title}: {sel.name} lacks the instance filter"
        labels = records.get(sel.name) or set(METRIC_LABELS.get(sel.name, ()))
        if "device" in labels:
            assert ("device", "=~", "$device") in sel.matchers, \
                f"{title}: {sel.name} lacks the device filter"


def test_metric_names_are_exported_or_recorded() -> None:
    known = EXPORTED_METRICS | set(recording_rules())
    d = load()
    for _title, expr in targets():
        names = {s.name for s in vector_selectors(parse_target(d, expr))}
        assert names, expr
        assert names <= known, f"unknown metrics {names - known} in {expr}"
    for var in variables().values():
        if var["type"] == "query":
            found = label_function_argument(variable_query(var))
            assert found, var["name"]
            names = {s.name for s in vector_selectors(parse_promql(found[1]))}
            assert names, var["name"]
            assert names <= known, (var["name"], names)


def test_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every query and every variable's selector, with the variables expanded
    as Grafana's linter does and as Grafana sends them (All selected)."""
    d = load()
    exprs = [expr for _title, expr in targets()]
    exprs += [found[1] for v in variables().values() if v["type"] == "query"
              if (found := label_function_argument(variable_query(v))) and found[1]]
    rules = []
    for i, expr in enumerate(exprs):
        rules.append({"record": f"dashboard:query_{i}:check", "expr": substitute(expr)})
        linted = expand_variables(expr, d["templating"]["list"])
        rules.append({"record": f"dashboard:linted_{i}:check",
                      "expr": re.sub(r"\$\w+", ".+", linted)})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]},
                                   allow_unicode=True), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------- Grafana's dashboard-linter


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
@pytest.mark.parametrize("rule", sorted(LINT_RULES))
def test_grafana_dashboard_linter_rule(rule: str, path: Path) -> None:
    assert LINT_RULES[rule](load(path)) == []


@pytest.mark.parametrize("rule", sorted(LINT_RULES))
def test_linter_rule_catches_a_violation(rule: str) -> None:
    broken = load()
    VIOLATIONS[rule](broken)
    assert LINT_RULES[rule](broken), f"{rule} did not notice the violation"


# ------------------------------------------------------- Grafana's published dashboard model


def tsc() -> Path:
    """tsc from tools/dashboard-schema (npm ci there installs @grafana/schema and TypeScript,
    pinned by its package-lock.json). Missing: fails under CI, skips elsewhere."""
    if TSC.exists() and (SCHEMA_DIR / "node_modules" / "@grafana" / "schema").is_dir():
        return TSC
    message = ("tsc not found at tools/dashboard-schema/node_modules/.bin/tsc: run "
               "`npm ci --prefix tools/dashboard-schema` (make test does)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def typecheck(dashboards: dict[str, dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """`tsc --noEmit` on each dashboard as `const dashboard: DashboardJson = <json>;`."""
    compiler = tsc()
    work = Path(tempfile.mkdtemp(prefix=".check-", dir=SCHEMA_DIR))
    try:
        files = ["../dashboard-model.ts"]
        for name, doc in dashboards.items():
            ts = work / f"{name}.ts"
            ts.write_text("import type { DashboardJson } from '../dashboard-model.js';\n"
                          f"export const dashboard: DashboardJson = "
                          f"{json.dumps(doc, indent=1, ensure_ascii=False)};\n", encoding="utf-8")
            files.append(ts.name)
        (work / "tsconfig.json").write_text(json.dumps(
            {"extends": "../tsconfig.json", "files": files}), encoding="utf-8")
        return subprocess.run([str(compiler), "-p", str(work / "tsconfig.json")],
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_dashboards_match_grafanas_dashboard_model() -> None:
    result = typecheck({p.stem: load(p) for p in DASHBOARDS})
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_check_rejects_what_grafana_would_not_load() -> None:
    broken = load()
    timeseries = first_panel(broken, "timeseries")
    timeseries["options"]["legend"]["displayMode"] = "sideways"
    first_panel(broken, "table")["options"]["pageSizee"] = 10
    broken["graphTooltip"] = "shared"
    result = typecheck({"broken": broken})
    assert result.returncode != 0
    assert '"sideways"' in result.stdout
    assert '"pageSizee"' in result.stdout
    assert "DashboardCursorSync" in result.stdout  # graphTooltip is 0, 1 or 2


def test_missing_tsc_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.TSC", tmp_path / "no-tsc")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="npm ci --prefix tools/dashboard-schema"):
        tsc()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="tsc not found"):
        tsc()
