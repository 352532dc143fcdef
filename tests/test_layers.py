"""The package's layers: a module imports only from its own layer or lower ones, and no modules import each other in
a circle (a cycle makes every module load every other, and a method's code ends up depending on how results are
evaluated). Imports inside functions count too: they run back up just the same, only later."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mmdd"

# Lowest first. A unit is a package (`methods`) or a top-level module (`plan`); it may import its own layer and below.
LAYERS = [
    {"errors", "stage_list"},  # plain data: imports nothing of mmdd's but errors
    {"config_schema", "paths"},
    {"utils"},
    {"models"},
    {"data"},
    {"identity"},  # what names a store and a checkpoint: data and model settings
    {"synthetic"},
    {"evaluate"},
    {"teachers"},
    {"report"},
    {"methods"},
    {"bench", "plan"},
    {"stages"},  # each stage's orchestration
    {"commands"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
FACE = "__init__"  # mmdd/__init__.py registers the config resolvers (mmdd.identity) wherever mmdd is imported


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("mmdd", *parts))


def imported_modules(path: Path) -> set[str]:
    """Every mmdd module `path` imports, at module level or inside a function (`from mmdd.a import b` counts as
    mmdd.a.b where that is a module, else mmdd.a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmdd"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmdd.")}
    return found


MODULES = {module_of(p): p for p in SRC.rglob("*.py")}


def imported_units(path: Path) -> set[str]:
    return {m.split(".")[1] for m in imported_modules(path) if m.count(".") >= 1}


def test_every_unit_has_a_layer():
    assert sorted({unit_of(p) for p in SRC.rglob("*.py")} - set(LAYER) - {FACE}) == []


@pytest.mark.parametrize("unit", sorted(LAYER))
def test_a_unit_imports_no_higher_layer(unit):
    files = sorted(SRC.joinpath(unit).rglob("*.py")) if SRC.joinpath(unit).is_dir() else [SRC / f"{unit}.py"]
    offending = {f"{path.relative_to(SRC)} imports mmdd.{u} (layer {LAYER[u]} > {LAYER[unit]})"
                 for path in files for u in imported_units(path) if u in LAYER and LAYER[u] > LAYER[unit]}
    assert not offending, sorted(offending)


# Inside mmdd.methods, lowest first: the contract, the engine every learned method runs on, then the paradigms (which
# may share each other's pieces: MDM starts from the selection's k-means medoids)
METHOD_LAYERS = [{"base", "context"}, {"engine"}, {"trajectory", "distribution", "selection"}]
METHOD_LAYER = {part: i for i, parts in enumerate(METHOD_LAYERS) for part in parts}


def test_the_method_engine_imports_no_paradigm_and_the_contract_no_engine():
    def part(module: str) -> str | None:
        bits = module.split(".")
        return bits[2] if len(bits) > 2 and bits[1] == "methods" else None

    offending = set()
    for path in sorted((SRC / "methods").rglob("*.py")):
        here = part(module_of(path))
        if here is None:  # the package face re-exports the contract
            continue
        assert here in METHOD_LAYER, f"{path.relative_to(SRC)}: put it in a METHOD_LAYERS part"
        for module in imported_modules(path):
            there = part(module)
            if there in METHOD_LAYER and METHOD_LAYER[there] > METHOD_LAYER[here]:
                offending.add(f"{path.relative_to(SRC)} imports {module}")
    assert not offending, sorted(offending)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle():
    graph = {m: {i for i in imported_modules(p) if i in MODULES and i != m} for m, p in MODULES.items()
             if not m.endswith("__init__") and m != "mmdd"}
    assert circles(graph) == []


def test_the_checker_sees_an_import_and_a_circle():
    assert imported_units(SRC / "evaluate" / "diagnostics.py") >= {"models"}
    assert "mmdd.utils.stopping" in imported_modules(SRC / "utils" / "ddp.py")  # a module-level import
    assert "mmdd.stage_list" in imported_modules(SRC / "utils" / "stopping.py")  # one inside a function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
