"""Helpers for `wgnest lint` labs: write a client config without bringing it up, bring it up
later (optionally with the environment a PreUp hook needs), and compare a lint prediction
with a `wgnest check` diagnosis device by device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.lab.lab import REPO, Lab, Server, daemon_pids, run


def write_config(lab: Lab, index: int, srv: Server, allowed: str, *, v6: bool = False,
                 extra: str = "", peer_extra: str = "") -> tuple[str, Path]:
    """The config lab.client_tunnel would write (the server learns the peer), not up yet."""
    return lab.client_config(index, srv, allowed, v6=v6, extra=extra, peer_extra=peer_extra)


def env() -> dict[str, str]:
    """What `wgnest` needs to run from the source tree (wg-quick passes it to its hooks)."""
    return {**os.environ, "PYTHONPATH": str(REPO / "exporter")}


def hook(lab: Lab) -> str:
    """The PreUp line the README documents, with this interpreter and the lab's config dir."""
    return f"PreUp = {sys.executable} -m wgnest lint --refuse --config-dir {lab.workdir} %i"


def up(lab: Lab, name: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        return run("wg-quick", "up", str(lab.workdir / f"{name}.conf"), ns=lab.client.ns,
                   env=env(), check=check)
    finally:
        lab.pids.extend(daemon_pids(name))


def lint_json(lab: Lab, *args: str) -> tuple[int, dict[str, Any]]:
    res = lab.wgnest("lint", "--format", "json", "--config-dir", str(lab.workdir), *args)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def device_view(doc: dict[str, Any]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Per peer: what a prediction must get right (verdict, outer device, egress, table,
    chain, the fix and where it sends the transport, the MTU)."""
    out = {}
    for p in doc["peers"]:
        fix = p.get("fix") or {}
        out[(p["device"], p["public_key"])] = (
            p["verdict"], p["outer"], p["egress"], p["table"], tuple(p["chain"]),
            fix.get("kind"), fix.get("fwmark"), tuple(fix.get("commands") or ()),
            tuple(fix.get("config_lines") or ()), fix.get("resulting_egress"),
            fix.get("proof_once_up", fix.get("proof")),
            (p.get("mtu") or {}).get("usable_mtu"), p["captured_by"])
    return out


def devices(doc: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {d["name"]: (d["fwmark"], d["mtu"], d["implementation"]) for d in doc["devices"]}
