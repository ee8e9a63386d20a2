"""End to end: real Prometheus and Alertmanager (Debian packages) on the client namespace's
loopback scrape `wgnest serve` in the seed lab, load the shipped rules (with `for:` shortened
in a copy) and page a webhook in this test."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import REPO, Lab, http_get, in_netns
from tests.rules_for_test import shortened_rules
from tests.test_dashboards import substitute as dashboard_substitute

pytestmark = [pytest.mark.lab, pytest.mark.e2e]
PROM, AM, HOOK, EXPORTER = 19090, 19093, 19099, 9586


class Webhook:
    """Alertmanager webhook receiver listening inside the lab namespace."""

    def __init__(self, ns: str) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.extend(json.loads(body)["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        with in_netns(ns):
            self.server = HTTPServer(("127.0.0.1", HOOK), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for alert in list(self.alerts):
                if pred(alert):
                    return alert
            time.sleep(0.2)
        raise AssertionError(f"no matching alert in {timeout}s; got {self.alerts}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(lab: Lab, *argv: str) -> subprocess.Popen[bytes]:
    log = (lab.workdir / f"{Path(argv[0]).name}.log").open("w")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.client.ns, *argv],
                            stdout=log, stderr=subprocess.STDOUT)
    lab.extra_procs.append(proc)
    return proc


def wait_http(lab: Lab, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_get(lab.client.ns, url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def query(lab: Lab, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{PROM}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(lab.client.ns, url)
    doc = json.loads(body)
    assert status == 200, (expr, doc)
    assert doc["status"] == "success", (expr, doc)
    return list(doc["data"]["result"])


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    doc = json.loads((REPO / "dashboards" / "wgnest.json").read_text())

    def walk(panel: dict[str, Any]) -> Iterator[tuple[str, str]]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", "?"), target["expr"]
        for sub in panel.get("panels", []):
            yield from walk(sub)

    for panel in doc["panels"]:
        yield from walk(panel)


def substitute(expr: str) -> str:
    """The query as Grafana sends it with All selected (tests.test_dashboards.QUERY_VALUES)."""
    return dashboard_substitute(expr, rate_interval="30s")


@pytest.fixture
def stack(lab: Lab) -> Iterator[tuple[Lab, Webhook]]:
    if not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")):
        pytest.fail("prometheus and prometheus-alertmanager are needed (make test installs them)")
    rules = lab.workdir / "rules.yml"
    shortened_rules(REPO / "alerts" / "wgnest.rules.yml", rules, "0s")
    (lab.workdir / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{AM}"]}]}]},
        "scrape_configs": [{"job_name": "wgnest",
                            "static_configs": [{"targets": [f"127.0.0.1:{EXPORTER}"]}]}],
    }))
    (lab.workdir / "alertmanager.yml").write_text(json.dumps({
        "route": {"receiver": "hook", "group_by": ["alertname", "device"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [
            {"url": f"http://127.0.0.1:{HOOK}/hook", "send_resolved": True}]}],
    }))
    hook = Webhook(lab.client.ns)
    try:
        start(lab, "prometheus-alertmanager", f"--config.file={lab.workdir}/alertmanager.yml",
              f"--storage.path={lab.workdir}/am", f"--web.listen-address=127.0.0.1:{AM}",
              "--cluster.listen-address=")
        start(lab, "prometheus", f"--config.file={lab.workdir}/prometheus.yml",
              f"--storage.tsdb.path={lab.workdir}/tsdb", f"--web.listen-address=127.0.0.1:{PROM}")
        wait_http(lab, f"http://127.0.0.1:{AM}/-/ready")
        wait_http(lab, f"http://127.0.0.1:{PROM}/-/ready")
        yield lab, hook
    finally:
        hook.close()


def test_nesting_pages_then_resolves_and_dashboard_queries_answer(
        stack: tuple[Lab, Webhook]) -> None:
    lab, hook = stack
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    w0 = lab.client_tunnel(0, s1, "0.0.0.0/0")
    w1 = lab.client_tunnel(1, s2, "10.202.0.0/24, fd02::/64", peer_extra="PersistentKeepalive = 1")
    assert lab.ping(lab.client.ns, s2.tunnel_v4)
    lab.serve("--refresh.interval", "0.5", "--probe.histograms", port=EXPORTER)

    def nested(alert: dict[str, Any]) -> bool:
        return (alert["labels"]["alertname"] == "WireGuardTunnelNested"
                and alert["status"] == "firing")

    alert = hook.wait(nested, timeout=60)
    assert alert["labels"]["device"] == w1
    assert alert["labels"]["outer_device"] == w0
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "WireGuard transport routed into another tunnel."
    assert "FwMark = 51820" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#wireguardtunnelnested"

    # Every dashboard query answers from this Prometheus (variables substituted).
    deadline = time.monotonic() + 60
    empty: list[str] = []
    while time.monotonic() < deadline:
        empty = [f"{title}: {expr}" for title, expr in dashboard_exprs()
                 if not query(lab, substitute(expr))]
        if not empty:
            break
        time.sleep(2)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    with pytest.raises(AssertionError):  # a query on a metric that does not exist fails
        assert query(lab, 'wireguard_no_such_metric{job=~".+"}')

    # Apply the fix the alert names; the alert resolves at the webhook.
    from tests.lab.lab import run

    run("wg", "set", w1, "fwmark", "51820", ns=lab.client.ns)

    def resolved(alert: dict[str, Any]) -> bool:
        return (alert["labels"]["alertname"] == "WireGuardTunnelNested"
                and alert["status"] == "resolved" and alert["labels"]["device"] == w1)

    hook.wait(resolved, timeout=60)
