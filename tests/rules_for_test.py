"""A copy of the alert rules with every `for:` shortened, for end-to-end tests.

The shipped alerts/wgnest.rules.yml keeps production durations; an e2e test that cannot wait
five minutes loads the copy this writes instead:

    shortened_rules(REPO / "alerts/wgnest.rules.yml", tmp_path / "rules.yml", "0s")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# A Prometheus duration: one or more <number><unit>, units largest first (1h30m, 0s, 500ms).
_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")


def _check_duration(value: str) -> None:
    if not value or not _DURATION.match(value):
        raise ValueError(f"not a Prometheus duration: {value!r}")


def shortened_rules(src: Path, dst: Path, for_: str = "0s") -> None:
    """Write `src` to `dst` with the `for:` of every alerting rule set to `for_`.

    Alerting rules without `for:` get one too, so every alert waits exactly `for_`.
    Everything else (expressions, labels, annotations, recording rules) is kept as is.
    """
    _check_duration(for_)
    doc: Any = yaml.safe_load(Path(src).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise ValueError(f"{src}: not a Prometheus rule file (no `groups` list)")
    for group in doc["groups"]:
        for rule in group.get("rules") or []:
            if "alert" in rule:
                rule["for"] = for_
    Path(dst).write_text(
        yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000),
        encoding="utf-8")


# ------------------------------------------------------------- real scrapes as test input

Sample = tuple[str, dict[str, str], float]


def scrape_samples(text: str) -> list[Sample]:
    """(series name, labels, value) of every sample of a /metrics body, as Prometheus stores
    them; prometheus_client's optional `_created` series are dropped (see metric_names)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.metric_names import OPTIONAL_SUFFIXES

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith(OPTIONAL_SUFFIXES)]


def series_selector(name: str, labels: dict[str, str]) -> str:
    """`name{a="x",b="y"}` with the label values escaped as PromQL strings."""
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    inner = ",".join(f"{k}={quote(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def promtool_value(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Inf" if value > 0 else "-Inf"
    return repr(value)


def input_series(samples: list[Sample], job: str, instance: str,
                 steps: int = 10) -> list[dict[str, str]]:
    """promtool `input_series` for a scrape: every sample held for `steps` intervals, with the
    `job` and `instance` labels Prometheus adds to a scraped series."""
    return [{"series": series_selector(name, {**labels, "job": job, "instance": instance}),
             "values": f"{promtool_value(value)}x{steps}"}
            for name, labels, value in samples]
