"""The Prometheus rules (alerts/wgnest.rules.yml), their promtool unit tests and the runbook."""

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
from tests.rules_for_test import shortened_rules

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "wgnest.rules.yml"
RULE_TESTS = REPO / "alerts" / "tests" / "wgnest_test.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/wgnest/wgnest/blob/main/docs/runbook.md#"

EXPECTED_ALERTS = {
    "WireGuardTunnelNested": "page",
    "WireGuardRoutingLoop": "page",
    "WireGuardLatencyAnomaly": "warning",
    "WireGuardHandshakeStale": "warning",
    "WgnestCollectorFailing": "warning",
    "WgnestSnapshotStale": "warning",
    "WgnestExporterDown": "warning",
}

DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
RECORDING_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")
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


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in load_rules() if "alert" in r}


def recording_rules() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in load_rules() if "record" in r}


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


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


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
    assert rule["labels"]["severity"] in ("page", "warning")
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{name}: annotation {key} missing"
    assert annotations["runbook_url"].startswith(RUNBOOK_URL), annotations["runbook_url"]


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
    assert "unless on (job, instance, device, public_key) (wireguard_peer_nesting_allowed == 1)" \
        in expr
    assert "group_left" in expr
    assert "wireguard_peer_suggested_fwmark" in expr
    summary = rule["annotations"]["summary"]
    for needle in ("$labels.device", "$labels.public_key", "$labels.outer_device",
                   "FwMark = ", "to [Interface] of", "route the endpoint via the underlay"):
        assert needle in summary


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
