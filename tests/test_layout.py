"""The code's shape, checked over the whole tree: pipeline/ is a plain library (it imports
nothing from flows/, stores/ or reports/, and importing it loads neither Prefect nor zarr), and
no module of pipeline/ or flows/ grows into a god file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500
"""About 500: a module past it holds more than one concern."""


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", _modules("pipeline"), ids=lambda p: p.name)
def test_pipeline_imports_no_wiring_layer(path):
    bad = sorted(n for n in _imported(path) if n.split(".")[0] in {"flows", "stores", "reports", "prefect", "zarr"})
    assert not bad, f"{path.relative_to(REPO)} imports {bad}; pipeline/ takes arrays and configs, not stores or flows"


def test_importing_every_pipeline_module_loads_neither_prefect_nor_zarr():
    names = [f"pipeline.{p.stem}" for p in _modules("pipeline") if p.stem != "__init__"]
    code = (f"import sys; [__import__(n) for n in {names!r}]; "
            "print(sorted(m for m in ('prefect', 'zarr', 'flows', 'stores', 'reports') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", _modules("pipeline") + _modules("flows"), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_about_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines; split it by responsibility"


def test_reports_never_import_prefect():
    for path in _modules("reports"):
        assert not any(n.split(".")[0] == "prefect" for n in _imported(path)), path.name
