"""The one-way architecture, enforced: sources -> snapshot -> analysis -> surfaces.

`analysis` and `surfaces` never import the sources, the snapshot builders, the prober or the
runtime (so they stay pure functions over frozen data, testable by hand-built snapshots);
`analysis` never imports `surfaces`; `probe` never imports the runtime or the sources;
`model` imports nothing of wgnest but itself. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "exporter" / "wgnest"
BUILDERS = ("wgnest.snapshot", "wgnest.host_snapshot")
FORBIDDEN = {
    "model": ("wgnest.sources", *BUILDERS, "wgnest.analysis", "wgnest.surfaces",
              "wgnest.probe", "wgnest.runtime", "wgnest.periodic"),
    "analysis": ("wgnest.sources", *BUILDERS, "wgnest.surfaces", "wgnest.probe",
                 "wgnest.runtime", "wgnest.periodic"),
    "surfaces": ("wgnest.sources", *BUILDERS, "wgnest.probe", "wgnest.runtime",
                 "wgnest.periodic"),
    "probe": ("wgnest.sources", *BUILDERS, "wgnest.runtime", "wgnest.surfaces"),
    "sources": (*BUILDERS, "wgnest.analysis", "wgnest.surfaces", "wgnest.probe",
                "wgnest.runtime"),
}
# Outside the standard library, only these may be imported by the pure layers.
THIRD_PARTY = {"model": (), "analysis": (), "surfaces": ("prometheus_client",)}


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute wgnest.* imports")
    return out


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def test_every_layer_exists() -> None:
    for layer in FORBIDDEN:
        assert modules(layer), f"{layer}/ is empty"
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "snapshot.py", "host_snapshot.py",
                     "periodic.py", "lean_imports.py"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_flow_one_way(layer: str) -> None:
    broken = []
    for path in modules(layer):
        for name in imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                broken.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY))
def test_pure_layers_use_only_the_standard_library(layer: str) -> None:
    import sys

    allowed = ("wgnest", "__future__", *THIRD_PARTY[layer])
    broken = []
    for path in modules(layer):
        for name in imports(path):
            top = name.split(".")[0]
            if top not in allowed and top not in sys.stdlib_module_names:
                broken.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_rule_test_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from wgnest.sources.netstate import NetState\n")
    assert "wgnest.sources.netstate" in imports(bad)
