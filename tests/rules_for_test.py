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
