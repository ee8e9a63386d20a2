"""End to end, a fleet of two: two lab hosts (the client namespace with a nested tunnel and the
second server's namespace), each running `wgnest serve` on its own veth address, scraped by one
Prometheus in the router namespace that loads the shipped rules and the MindFlavor
compatibility rules; a second Prometheus federates it with the README's configuration. The
dashboard's fleet panels return both instances on both, the compatibility rules produce
MindFlavor's names from the live series, and promtool checks them on each host's real scrape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import REPO, Lab, http_get
from tests.rules_for_test import shortened_rules
from tests.test_alerts import COMPAT_RULES, fleet_configs, run_compat_on_scrape
from tests.test_dashboards import FLEET_PANELS, load, panels, substitute

pytestmark = [pytest.mark.lab, pytest.mark.e2e]
SITE, GLOBAL, EXPORTER = 19190, 19191, 9586
WAIT = 60.0  # seconds, for every condition below


def start(lab: Lab, ns: str, name: str, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv in namespace `ns`; the lab ends it (by pid) and removes its files."""
    log = (lab.workdir / f"{name}.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(REPO / "exporter")}
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    lab.extra_procs.append(proc)
    return proc


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    """probe() until it returns something truthy (OSError counts as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as exc:
            last = exc
        if last and not isinstance(last, OSError):
            return last
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def serve(lab: Lab, ns: str, address: str, config_dir: Path, name: str) -> str:
    """`wgnest serve` in `ns` listening on `address`; returns the scrape target."""
    target = f"{address}:{EXPORTER}"
    start(lab, ns, name, sys.executable, "-m", "wgnest", "serve", "--web.listen-address",
          target, "--config-dir", str(config_dir), "--refresh.interval", "0.5")
    wait_for(f"wgnest on {target}",
             lambda: http_get(ns, f"http://{target}/-/healthy", timeout=2)[0] == 200)
    return target


def query(lab: Lab, port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(lab.router, url)
    doc = json.loads(body)
    assert status == 200, (expr, doc)
    assert doc["status"] == "success", (expr, doc)
    return list(doc["data"]["result"])


def fleet_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(load())
            if p["title"] in FLEET_PANELS for t in p["targets"]]


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Lab, dict[str, str]]]:
    """One lab for the module: two wgnest hosts and the site and global Prometheus;
    name -> scrape target. Everything it starts is ended by pid, its namespaces removed."""
    lab = Lab()
    try:
        lab.build()
        yield lab, _fleet(lab)
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None
    finally:
        lab.close()


def _fleet(lab: Lab) -> dict[str, str]:
    s1, s2 = lab.servers["s1"], lab.servers["s2"]
    lab.client_tunnel(0, s1, "0.0.0.0/0")
    lab.client_tunnel(1, s2, "10.202.0.0/24, fd02::/64",
                      peer_extra="PersistentKeepalive = 1\n# friendly_name = site-b")
    assert lab.ping(lab.client.ns, s2.tunnel_v4)
    empty = Path(tempfile.mkdtemp(dir=lab.workdir))  # no names on the server host
    hosts = {"client": serve(lab, lab.client.ns, lab.client.v4, lab.workdir, "wgnest-client"),
             "server": serve(lab, s2.host.ns, s2.host.v4, empty, "wgnest-server")}

    rules = lab.workdir / "wgnest.rules.yml"
    shortened_rules(REPO / "alerts" / "wgnest.rules.yml", rules, "0s")
    site = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules), str(COMPAT_RULES)],
            "scrape_configs": [{"job_name": "wgnest",
                                "static_configs": [{"targets": sorted(hosts.values())}]}]}
    federation = fleet_configs()["federation"]  # exactly the README's, but for the targets
    federation["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    federation["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{SITE}"]}]
    for name, config, port in (("site", site, SITE), ("global", federation, GLOBAL)):
        (lab.workdir / f"{name}.yml").write_text(json.dumps(config))
        start(lab, lab.router, f"prometheus-{name}", "prometheus",
              f"--config.file={lab.workdir}/{name}.yml",
              f"--storage.tsdb.path={lab.workdir}/tsdb-{name}",
              f"--web.listen-address=127.0.0.1:{port}")
    for port in (SITE, GLOBAL):
        wait_for(f"prometheus :{port}", lambda port=port: http_get(
            lab.router, f"http://127.0.0.1:{port}/-/ready", timeout=2)[0] == 200)
    return hosts


def test_fleet_panels_show_both_hosts_on_site_and_global_prometheus(
        fleet: tuple[Lab, dict[str, str]]) -> None:
    lab, hosts = fleet
    both = set(hosts.values())
    for port in (SITE, GLOBAL):
        def complete(port: int = port) -> list[str]:
            missing = []
            for title, expr in fleet_exprs():
                got = {r["metric"].get("instance") for r in query(lab, port, substitute(expr))}
                if got != both:
                    missing.append(f"{title}: {expr} -> {sorted(map(str, got))}")
            return missing
        wait_for(f"fleet panels on :{port}", lambda c=complete: not c() or None)
        assert complete() == []

    # the values: one nested peer on the client host, none on the server host
    nested = {r["metric"]["instance"]: float(r["value"][1])
              for r in query(lab, GLOBAL, 'instance:wireguard_peer_nested:sum{job="wgnest"}')}
    assert nested == {hosts["client"]: 1.0, hosts["server"]: 0.0}
    peers = {r["metric"]["instance"]: float(r["value"][1])
             for r in query(lab, SITE, "instance:wireguard_peers:count")}
    assert peers[hosts["client"]] == 2.0
    assert peers[hosts["server"]] >= 1.0
    # the global Prometheus holds the fleet series, not the per-peer ones
    assert query(lab, GLOBAL, "wireguard_peer_info") == []


def test_mindflavor_names_from_live_series_and_real_scrapes(
        fleet: tuple[Lab, dict[str, str]], tmp_path: Path) -> None:
    lab, hosts = fleet
    client = lab.client
    w1 = f"{lab.tag}w1"
    site_b = lab.servers["s2"].public

    def sent_by_both() -> list[dict[str, Any]] | None:
        found = query(lab, SITE, "wireguard_sent_bytes_total")
        return found if {x["metric"]["instance"] for x in found} == set(hosts.values()) else None

    sent = wait_for("recorded wireguard_sent_bytes_total of both hosts", sent_by_both)
    named = [x["metric"] for x in sent if x["metric"].get("friendly_name") == "site-b"]
    assert named == [{"__name__": "wireguard_sent_bytes_total", "job": "wgnest",
                      "instance": hosts["client"], "interface": w1, "public_key": site_b,
                      "allowed_ips": "10.202.0.0/24,fd02::/64", "friendly_name": "site-b"}]
    for series in sent:
        assert "device" not in series["metric"]
        assert set(series["metric"]) <= {"__name__", "job", "instance", "interface",
                                         "public_key", "allowed_ips", "friendly_name"}
    # a query written for MindFlavor's exporter, unchanged
    def received() -> list[dict[str, Any]]:
        lab.ping(client.ns, lab.servers["s2"].tunnel_v4, count=2)  # traffic through w1
        return query(lab, SITE, "sum by (interface) (rate(wireguard_received_bytes_total"
                                '{friendly_name="site-b"}[10s])) > 0')

    traffic = wait_for("rate() on the legacy name", received)
    assert [r["metric"]["interface"] for r in traffic] == [w1]
    handshakes = query(lab, SITE, f'wireguard_latest_handshake_seconds{{interface="{w1}"}}')
    assert len(handshakes) == 1
    assert float(handshakes[0]["value"][1]) > time.time() - 600
    per_interface = query(lab, SITE, f'wireguard_peers_total{{instance="{hosts["client"]}"}}')
    assert {r["metric"]["interface"]: r["value"][1] for r in per_interface} == {
        f"{lab.tag}w0": "1", w1: "1"}

    # promtool on each host's real scrape: MindFlavor's series exactly, values included
    for name, target in hosts.items():
        ns = client.ns if name == "client" else lab.servers["s2"].host.ns
        status, body = http_get(ns, f"http://{target}/metrics")
        assert status == 200
        work = tmp_path / name
        work.mkdir()
        run_compat_on_scrape(body.decode(), work, instance=target)
