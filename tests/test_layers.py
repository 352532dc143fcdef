"""The package's layers: lower packages never import higher ones (a cycle makes every module load every other,
and a method's code ends up depending on how results are evaluated)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mmdd"

# package -> the mmdd packages it must never import
FORBIDDEN = {
    "models": {"data", "synthetic", "teachers", "methods", "evaluate", "report", "bench", "plan", "pipeline", "cli"},
    "data": {"synthetic", "teachers", "methods", "evaluate", "report", "bench", "pipeline", "cli"},
    "synthetic": {"teachers", "methods", "evaluate", "report", "bench", "pipeline", "cli"},
    "evaluate": {"teachers", "methods", "bench", "pipeline", "cli"},
    "teachers": {"methods", "bench", "pipeline", "cli"},
    "methods": {"bench", "pipeline", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmdd."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mmdd.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_no_higher_layer(package):
    offending = {f"{path.relative_to(SRC)} imports mmdd.{p}"
                 for path in sorted((SRC / package).rglob("*.py"))
                 for p in imported_packages(path) & FORBIDDEN[package]}
    assert not offending, sorted(offending)


def test_the_checker_sees_an_import():
    assert imported_packages(SRC / "evaluate" / "diagnostics.py") >= {"models"}
