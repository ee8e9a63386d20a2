"""The Grafana dashboard (dashboards/wgnest.json): importable, filtered, and built only from
metrics the exporter exports or recording rules alerts/wgnest.rules.yml defines."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import EXPORTED_METRICS, METRIC_LABELS
from tests.test_alerts import promtool

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboards" / "wgnest.json"
RULES = REPO / "alerts" / "wgnest.rules.yml"

DS_UID = "${datasource}"
METRIC = re.compile(r"\b(?:wireguard|wgnest)_\w+")
RECORDING = re.compile(r"\b[a-zA-Z_]\w*:\w+:\w+\b")
SELECTOR_AFTER = re.compile(r"\s*(\{[^}]*\})?")
JOB = 'job=~"$job"'
INSTANCE = 'instance=~"$instance"'
DEVICE = 'device=~"$device"'


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows (rows themselves excluded)."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels(load()) for t in p.get("targets", [])]


def target_params() -> list[Any]:
    return [pytest.param(title, expr, id=f"{title}#{i}")
            for i, (title, expr) in enumerate(targets())]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in load()["templating"]["list"]}


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


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric or recording rule name, its `{...}` selector or "") for every reference."""
    recorded = list(RECORDING.finditer(expr))
    metrics = [m for m in METRIC.finditer(expr)
               if not any(r.start() <= m.start() < r.end() for r in recorded)]
    found: list[tuple[str, str]] = []
    for match in recorded + metrics:
        sel = SELECTOR_AFTER.match(expr, match.end())
        found.append((match.group(0), (sel.group(1) if sel else None) or ""))
    return found


# ----------------------------------------------------------------------------- top level


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
    for panel in panels(d):
        assert ("panel", panel["type"]) in requires, f"__requires lacks panel {panel['type']}"


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


# -------------------------------------------------------------------------------- panels


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels(load())]
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


def test_required_panels_exist() -> None:
    titles = {p["title"] for p in panels(load())}
    for title in ("Tunnels", "Nesting over time", "Endpoint egress path", "Handshake age",
                  "RTT per path", "Latency overhead ratio", "Latency anomalies",
                  "Probe packet loss", "Transfer", "Collector health"):
        assert title in titles


def test_tunnels_table_columns() -> None:
    tunnels = next(p for p in panels(load()) if p["title"] == "Tunnels")
    assert tunnels["type"] == "table"
    exprs = " ".join(t["expr"] for t in tunnels["targets"])
    for metric in ("wireguard_device_fwmark", "wireguard_device_mtu_bytes", "wireguard_peer_info",
                   "wireguard_peer_nested", "wireguard_peer_suggested_fwmark"):
        assert metric in exprs
    assert "outer_device" in exprs
    renamed = next(t for t in tunnels["transformations"] if t["id"] == "organize")
    columns = set(renamed["options"]["renameByName"].values())
    assert {"Device", "FwMark", "MTU", "Peers", "Nested peers", "Outer device",
            "Suggested fix"} <= columns


def test_rtt_panel_uses_recording_rules() -> None:
    rtt = next(p for p in panels(load()) if p["title"] == "RTT per path")
    used = {name for t in rtt["targets"] for name in RECORDING.findall(t["expr"])}
    for q in ("p50", "p90", "p99"):
        assert f"device_public_key_path:wireguard_probe_rtt_seconds:{q}_rate5m" in used


# ----------------------------------------------------------------------------- queries


@pytest.mark.parametrize(("title", "expr"), target_params())
def test_rate_interval(title: str, expr: str) -> None:
    ranges = re.findall(r"\[([^\]]*)\]", expr)
    assert all(r == "$__rate_interval" for r in ranges), f"{title}: {ranges}"
    calls = len(re.findall(r"\b(?:rate|irate|increase|delta|idelta|deriv)\s*\(", expr))
    assert calls <= len(ranges), f"{title}: a rate/increase without [$__rate_interval]"


@pytest.mark.parametrize(("title", "expr"), target_params())
def test_every_selector_is_filtered(title: str, expr: str) -> None:
    records = recording_rules()
    refs = selectors(expr)
    assert refs, f"{title}: no metric in {expr}"
    for name, selector in refs:
        assert JOB in selector, f"{title}: {name}{selector} lacks the job filter"
        assert INSTANCE in selector, f"{title}: {name}{selector} lacks the instance filter"
        labels = records.get(name) or set(METRIC_LABELS.get(name, ()))
        if "device" in labels:
            assert DEVICE in selector, f"{title}: {name}{selector} lacks the device filter"


def test_metric_names_are_exported_or_recorded() -> None:
    known = EXPORTED_METRICS | set(recording_rules())
    texts = [expr for _title, expr in targets()]
    texts += [variable_query(v) for v in variables().values() if v["type"] == "query"]
    for text in texts:
        names = set(RECORDING.findall(text)) | set(METRIC.findall(RECORDING.sub(" ", text)))
        assert names, text
        assert names <= known, f"unknown metrics {names - known} in {text}"


def test_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every query, with the Grafana variables substituted."""
    exprs = [expr for _title, expr in targets()]
    subst = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+", "$device": ".+"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}:check", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
                    encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
