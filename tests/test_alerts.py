"""The Prometheus rules (alerts/wgnest.rules.yml, alerts/compat-mindflavor.rules.yml), their
promtool unit tests, the runbook and the documented runbook base."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import EXPORTED_METRICS
from tests.rules_for_test import Sample, input_series, scrape_samples, shortened_rules

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "wgnest.rules.yml"
RULE_TESTS = REPO / "alerts" / "tests" / "wgnest_test.yml"
COMPAT_RULES = REPO / "alerts" / "compat-mindflavor.rules.yml"
COMPAT_TESTS = REPO / "alerts" / "tests" / "compat_mindflavor_test.yml"
SEED_SCRAPE = REPO / "alerts" / "tests" / "scrapes" / "seed-lab.prom"
RUNBOOK = REPO / "docs" / "runbook.md"
README = REPO / "README.md"
# The documented runbook base: runbook_url is `<base>#<anchor>`, the base defaults to the
# runbook shipped in the source tree and is replaced by this one documented command.
RUNBOOK_BASE = "docs/runbook.md"
RUNBOOK_URL = RUNBOOK_BASE + "#"
RUNBOOK_SED = 'sed "s|runbook_url: docs/runbook.md#|runbook_url: $RUNBOOK_BASE#|"'
SEVERITIES = ("critical", "warning", "info")  # the monitoring-mixin convention

EXPECTED_ALERTS = {
    "WireGuardTunnelNested": "critical",
    "WireGuardRoutingLoop": "critical",
    "WireGuardLatencyAnomaly": "warning",
    "WireGuardHandshakeStale": "warning",
    "WgnestCollectorFailing": "warning",
    "WgnestSnapshotStale": "warning",
    "WgnestExporterDown": "warning",
}

DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
RECORDING_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")
FLEET_RULES = {
    "instance:wireguard_peers:count", "instance:wireguard_peer_nested:sum",
    "instance:wireguard_peer_nesting_allowed:sum", "instance:wireguard_peer_routing_loop:sum",
    "instance:wireguard_peer_latency_anomaly:sum",
}
# MindFlavor/prometheus_wireguard_exporter's names -> wgnest's series they are recorded from.
COMPAT_NAMES = {
    "wireguard_sent_bytes_total": "wireguard_peer_transmit_bytes_total",
    "wireguard_received_bytes_total": "wireguard_peer_receive_bytes_total",
    "wireguard_latest_handshake_seconds": "wireguard_peer_last_handshake_seconds",
}
RECORDING_REF = re.compile(r"\b[a-zA-Z_]\w*:\w+:\w+\b")
METRIC_REF = re.compile(r"\b(?:wireguard|wgnest)_\w+")


def promtool() -> str:
    """promtool's path. Missing promtool fails the test under CI, skips it elsewhere."""
    path = shutil.which("promtool")
    if path:
        return path
    message = ("promtool not found: install Debian's `prometheus` package "
               "(apt-get install --no-install-recommends prometheus)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts(path: Path = RULES) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in load_rules(path) if "alert" in r}


def recording_rules(path: Path = RULES) -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in load_rules(path) if "record" in r}


def groups(path: Path = RULES) -> dict[str, list[dict[str, Any]]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {g["name"]: g["rules"] for g in doc["groups"]}


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings (and explicit <a id/name>) of a document."""
    anchors: set[str] = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def metric_refs(text: str) -> tuple[set[str], set[str]]:
    """(exporter metric names, recording rule names) an expression or template refers to."""
    recorded = set(RECORDING_REF.findall(text))
    rest = RECORDING_REF.sub(" ", text)
    return set(METRIC_REF.findall(rest)), recorded


# ------------------------------------------------------------------------------ promtool


def test_promtool_check_rules_is_clean() -> None:
    result = run_promtool("check", "rules", str(RULES.relative_to(REPO)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output, output
    assert "warning" not in output.lower(), output  # promtool's lint findings


@pytest.mark.parametrize("tests", [RULE_TESTS, COMPAT_TESTS], ids=lambda p: p.name)
def test_promtool_unit_tests_pass(tests: Path) -> None:
    result = run_promtool("test", "rules", str(tests.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_check_compat_rules_is_clean() -> None:
    result = run_promtool("check", "rules", str(COMPAT_RULES.relative_to(REPO)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output, output


def test_missing_promtool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool not found"):
        promtool()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="promtool not found"):
        promtool()


# ----------------------------------------------------------------------------- the rules


def test_exactly_the_expected_alerts() -> None:
    assert {name: rule["labels"]["severity"] for name, rule in alerts().items()} \
        == EXPECTED_ALERTS


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_is_complete(name: str) -> None:
    rule = alerts()[name]
    assert DURATION.match(str(rule.get("for", ""))), f"{name}: needs a `for:` duration"
    assert rule["for"] not in ("0s", "0m"), f"{name}: `for:` must not be zero"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}, set(annotations)
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{name}: annotation {key} missing"
    assert annotations["runbook_url"] == RUNBOOK_URL + name.lower(), annotations["runbook_url"]


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_summary_is_static_and_description_has_the_details(name: str) -> None:
    """Mixin convention: a summary that is the same for every instance of the alert (it
    groups and dedupes in notifications), the specifics in the description."""
    annotations = alerts()[name]["annotations"]
    summary = annotations["summary"]
    assert "{{" not in summary, summary
    assert "$" not in summary, summary
    assert "\n" not in summary, summary
    assert len(summary) <= 80, summary
    assert summary.endswith("."), summary
    assert "$labels.instance" in annotations["description"]


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_runbook_url_anchor_exists(name: str) -> None:
    anchor = alerts()[name]["annotations"]["runbook_url"].split("#", 1)[1]
    assert anchor == name.lower()
    assert anchor in github_anchors(RUNBOOK.read_text(encoding="utf-8")), \
        f"docs/runbook.md has no section for #{anchor}"


def test_runbook_internal_links_resolve() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "the runbook should cross-reference its sections"
    assert links <= github_anchors(text), links - github_anchors(text)


def test_runbook_covers_the_fix_commands() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    for needle in ("wgnest check", "ip route get", "mark", "ipproto udp", "sport", "dport",
                   "ip rule", "FwMark = 51820", "wg set wg1 fwmark 51820", "ip route add",
                   "suppress_prefixlength", "--allow-nesting wg2:wg1"):
        assert needle in text, f"runbook does not mention {needle!r}"


def test_production_durations() -> None:
    rules = alerts()
    assert rules["WireGuardTunnelNested"]["for"] == "5m"
    assert rules["WireGuardHandshakeStale"]["for"] == "5m"
    assert "> 180" in rules["WireGuardHandshakeStale"]["expr"]


def test_nesting_alert_respects_allowed_and_names_the_fix() -> None:
    rule = alerts()["WireGuardTunnelNested"]
    expr = " ".join(rule["expr"].split())
    allowed = "(wireguard_peer_nesting_allowed == 1)"
    assert f"unless on (job, instance, netns, device, public_key) {allowed}" in expr
    assert "group_left" in expr
    assert "wireguard_peer_suggested_fwmark" in expr
    description = rule["annotations"]["description"]
    for needle in ("$labels.device", "$labels.public_key", "$labels.outer_device",
                   "FwMark = ", "to the [Interface]", "wg set",
                   "host route for the endpoint via the underlay"):
        assert needle in description


def test_stale_handshake_ignores_never_handshaked_peers() -> None:
    expr = " ".join(alerts()["WireGuardHandshakeStale"]["expr"].split())
    assert "wireguard_peer_last_handshake_seconds > 0" in expr


def test_exporter_down_matches_wgnest_jobs() -> None:
    assert alerts()["WgnestExporterDown"]["expr"].strip() == 'up{job=~".*wgnest.*"} == 0'


def test_recording_rule_names() -> None:
    names = recording_rules()
    assert names, "no recording rules"
    for name in names:
        assert RECORDING_NAME.match(name), f"{name}: not level:metric:operations"
    for q in ("p50", "p90", "p99"):
        assert f"device_public_key_path:wireguard_probe_rtt_seconds:{q}_rate5m" in names
    assert "device_public_key_path:wireguard_probe_packets_lost:ratio_rate5m" in names


def test_fleet_rules_are_per_instance() -> None:
    """One series per (job, instance): what a global Prometheus federates."""
    fleet = {r["record"]: r for r in groups()["wgnest.fleet"]}
    assert set(fleet) == FLEET_RULES
    for name, rule in fleet.items():
        assert name.startswith("instance:"), name
        by = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
        assert by, name
        assert {x.strip() for x in by[0].split(",")} == {"job", "instance"}, name
        assert rule["expr"].lstrip().startswith(("sum by", "count by")), name
        # every wgnest instance has a series, 0 when there is nothing to count
        expr = " ".join(rule["expr"].split())
        assert expr.endswith("or 0 * group by (job, instance) (wgnest_build_info)"), name


def test_rules_use_only_exported_metrics() -> None:
    recorded = set(recording_rules())
    for rule in load_rules():
        texts = [rule["expr"], *rule.get("annotations", {}).values()]
        for text in texts:
            metrics, records = metric_refs(str(text))
            assert metrics <= EXPORTED_METRICS, metrics - EXPORTED_METRICS
            assert records <= recorded, records - recorded


# ----------------------------------------------------------------- the promtool unit tests


def test_unit_tests_cover_every_alert_and_recording_rule() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["../wgnest.rules.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    exprs: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
            for expected in check.get("exp_alerts") or []:
                assert set(expected["exp_annotations"]) == {"summary", "description",
                                                            "runbook_url"}
                assert "severity" in expected["exp_labels"]
        exprs |= {check["expr"] for check in case.get("promql_expr_test", [])}
    assert fires == set(EXPECTED_ALERTS), "alerts never tested firing"
    assert silent == set(EXPECTED_ALERTS), "alerts never tested silent"
    assert set(recording_rules()) <= exprs, set(recording_rules()) - exprs


# --------------------------------------------------------------------- shortened_rules


def test_shortened_rules_rewrites_every_for(tmp_path: Path) -> None:
    dst = tmp_path / "rules.yml"
    shortened_rules(RULES, dst, "30s")
    original = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    copy = yaml.safe_load(dst.read_text(encoding="utf-8"))
    assert [g["name"] for g in copy["groups"]] == [g["name"] for g in original["groups"]]
    for g_orig, g_copy in zip(original["groups"], copy["groups"], strict=True):
        for r_orig, r_copy in zip(g_orig["rules"], g_copy["rules"], strict=True):
            if "alert" in r_orig:
                assert r_copy["for"] == "30s"
                r_copy["for"] = r_orig["for"]
            assert r_copy == r_orig  # nothing else changed
    assert "for: 5m" in RULES.read_text(encoding="utf-8"), "the source must stay untouched"


def test_shortened_rules_default_is_zero(tmp_path: Path) -> None:
    dst = tmp_path / "rules.yml"
    shortened_rules(RULES, dst)
    fors = {r["for"] for r in load_rules(dst) if "alert" in r}
    assert fors == {"0s"}


def test_shortened_rules_output_is_valid(tmp_path: Path) -> None:
    dst = tmp_path / "rules.yml"
    shortened_rules(RULES, dst, "1s")
    result = run_promtool("check", "rules", str(dst))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("bad", ["", "5", "five minutes", "5 m", "-1m"])
def test_shortened_rules_rejects_bad_durations(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        shortened_rules(RULES, tmp_path / "rules.yml", bad)


# ------------------------------------------------------------------------ runbook base


def test_no_made_up_public_addresses() -> None:
    """runbook_url defaults to the runbook shipped here; no invented project address."""
    for path in (RULES, COMPAT_RULES, RUNBOOK, REPO / "dashboards" / "wgnest.json"):
        assert "github.com/wgnest" not in path.read_text(encoding="utf-8"), path


def test_runbook_base_command_is_documented() -> None:
    header = RULES.read_text(encoding="utf-8").split("groups:", 1)[0]
    assert RUNBOOK_SED in header
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Alerts and dashboard", 1)[1].split("\n## ", 1)[0]
    assert RUNBOOK_SED in section, "README's alerts section must show the runbook base step"


def test_runbook_base_rewrites_every_url(tmp_path: Path) -> None:
    """The documented step, run as documented: every runbook_url then starts with the base
    the user set and still ends in the alert's anchor; nothing else changes."""
    base = "https://runbooks.example.org/wgnest/runbook.md"
    dst = tmp_path / "wgnest.rules.yml"
    with RULES.open("rb") as src, dst.open("wb") as out:
        subprocess.run(["sh", "-c", RUNBOOK_SED], stdin=src, stdout=out, check=True,
                       env={**os.environ, "RUNBOOK_BASE": base}, timeout=30)
    rewritten = alerts(dst)
    assert set(rewritten) == set(EXPECTED_ALERTS)
    for name, rule in rewritten.items():
        assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}"
        original = alerts()[name]
        rule["annotations"]["runbook_url"] = original["annotations"]["runbook_url"]
        assert rule == original
    assert recording_rules(dst) == recording_rules()
    result = run_promtool("check", "rules", str(dst))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------- MindFlavor compatibility


def test_compat_rules_produce_the_legacy_names() -> None:
    """Deliberately colon-less: the legacy exporter's names, recorded from wgnest's."""
    rules = recording_rules(COMPAT_RULES)
    assert set(rules) == {*COMPAT_NAMES, "wireguard_peers_total"}
    assert not alerts(COMPAT_RULES)
    for legacy, source in COMPAT_NAMES.items():
        expr = rules[legacy]["expr"]
        metrics, records = metric_refs(expr)
        assert metrics == {source, "wireguard_peer_info"}, metrics
        assert not records
        assert '"interface", "$1", "device", "(.*)"' in expr
        assert "group_left (allowed_ips, friendly_name)" in expr
        assert "sum without (device)" in expr
    assert "colon" in COMPAT_RULES.read_text(encoding="utf-8").split("groups:", 1)[0], \
        "the file must say why it breaks the naming convention"
    assert not set(rules) & set(recording_rules()), "compat rules are a separate, opt-in file"
    assert not set(rules) & EXPORTED_METRICS


def test_compat_unit_tests_cover_every_rule() -> None:
    doc = yaml.safe_load(COMPAT_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["../compat-mindflavor.rules.yml"]
    exprs = {c["expr"] for case in doc["tests"] for c in case.get("promql_expr_test", [])}
    assert set(recording_rules(COMPAT_RULES)) <= exprs


def mindflavor_expected(samples: list[Sample], job: str, instance: str
                        ) -> dict[str, list[tuple[dict[str, str], float]]]:
    """What MindFlavor's exporter (default flags) would export for the peers of a wgnest
    scrape, stated independently of the rules: legacy name -> [(labels, value)]."""
    info = {(s[1]["device"], s[1]["public_key"]): s[1] for s in samples
            if s[0] == "wireguard_peer_info"}
    out: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in COMPAT_NAMES}
    for legacy, source in COMPAT_NAMES.items():
        for name, labels, value in samples:
            if name != source:
                continue
            peer = info[(labels["device"], labels["public_key"])]
            legacy_labels = {"job": job, "instance": instance, "interface": labels["device"],
                             "public_key": labels["public_key"],
                             "allowed_ips": peer.get("allowed_ips") or "(none)"}
            if peer.get("name"):
                legacy_labels["friendly_name"] = peer["name"]
            out[legacy].append((legacy_labels, value))
    per_device: dict[str, int] = {}
    for device, _key in info:
        per_device[device] = per_device.get(device, 0) + 1
    out["wireguard_peers_total"] = [
        ({"job": job, "instance": instance, "interface": d}, float(n))
        for d, n in sorted(per_device.items())]
    return out


def compat_promtool_test(samples: list[Sample], job: str, instance: str) -> dict[str, Any]:
    """A promtool unit test: the scrape as input series, MindFlavor's series as expected."""
    from tests.rules_for_test import series_selector

    expected = mindflavor_expected(samples, job, instance)
    return {
        "rule_files": [str(COMPAT_RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "name": f"real scrape of {instance}",
            "interval": "1m",
            "input_series": input_series(samples, job, instance),
            "promql_expr_test": [
                {"expr": name, "eval_time": "5m",
                 "exp_samples": [{"labels": series_selector(name, labels), "value": value}
                                 for labels, value in series]}
                for name, series in expected.items()],
        }],
    }


def run_compat_on_scrape(text: str, tmp_path: Path, job: str = "wgnest",
                         instance: str = "gw1:9586") -> dict[str, Any]:
    samples = scrape_samples(text)
    doc = compat_promtool_test(samples, job, instance)
    path = tmp_path / "compat_real_scrape_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000), encoding="utf-8")
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    return doc


def test_compat_rules_on_a_real_scrape(tmp_path: Path) -> None:
    """A real /metrics body of `wgnest serve` in the seed lab (w0 full tunnel, w1 nested, w1's
    peer named in its wg-quick file) through the compat rules in promtool."""
    doc = run_compat_on_scrape(SEED_SCRAPE.read_text(encoding="utf-8"), tmp_path)
    checks = {c["expr"]: c["exp_samples"] for c in doc["tests"][0]["promql_expr_test"]}
    sent = checks["wireguard_sent_bytes_total"]
    assert len(sent) == 2  # both peers of the lab
    assert any('friendly_name="site-b"' in s["labels"] for s in sent)
    assert any("friendly_name" not in s["labels"] for s in sent)
    assert all('interface="' in s["labels"] and "device=" not in s["labels"] for s in sent)
    assert any('allowed_ips="10.202.0.0/24,fd02::/64"' in s["labels"] for s in sent)


# -------------------------------------------------------------------------- README: Fleet


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def fleet_configs() -> dict[str, dict[str, Any]]:
    """The Prometheus configurations the README's Fleet section shows: "federation" (the
    global Prometheus) and "remote_write" (a site Prometheus)."""
    blocks = re.findall(r"```yaml\n(.*?)```", readme_section("Fleet"), re.DOTALL)
    out: dict[str, dict[str, Any]] = {}
    for block in blocks:
        doc = yaml.safe_load(block)
        out["remote_write" if "remote_write" in doc else "federation"] = doc
    return out


def test_readme_fleet_section_shows_federation_and_remote_write() -> None:
    configs = fleet_configs()
    assert set(configs) == {"federation", "remote_write"}
    job = configs["federation"]["scrape_configs"][0]
    assert job["metrics_path"] == "/federate"
    assert job["honor_labels"] is True
    assert "wgnest" not in job["job_name"], "would be matched by WgnestExporterDown"
    match = job["params"]["match[]"]
    assert '{__name__=~"instance:wireguard_.+"}' in match
    assert "wgnest_build_info" in match  # the dashboard's job/instance variables
    fleet = {r["record"] for r in groups()["wgnest.fleet"]}
    assert all(re.fullmatch("instance:wireguard_.+", name) for name in fleet)
    site = configs["remote_write"]
    keep = site["remote_write"][0]["write_relabel_configs"][0]
    assert keep["action"] == "keep"
    assert all(re.fullmatch(keep["regex"], name) for name in fleet | {"wgnest_build_info"})


@pytest.mark.parametrize("name", ["federation", "remote_write"])
def test_readme_fleet_configs_are_valid(name: str, tmp_path: Path) -> None:
    doc = fleet_configs()[name]
    if "rule_files" in doc:
        doc["rule_files"] = [str(RULES)]
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = run_promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
