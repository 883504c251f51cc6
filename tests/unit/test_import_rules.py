"""The import rules of docs/ARCHITECTURE.md, read from the source with ast (module-level and function-level imports
alike): who may import whom, Prefect only in the flow layer and infra/, and no import cycle between our modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("common", "pipelines", "registry", "monitoring", "serving", "infra")
MAY_IMPORT = {
    "common": set(),
    "registry": {"common"},
    "monitoring": {"common"},
    "serving": {"common", "registry", "monitoring"},
    "pipelines": {"common", "registry", "monitoring", "serving"},
    "infra": {"common", "registry", "monitoring", "serving", "pipelines"},
}
"""Package -> the packages of ours it may import (docs/ARCHITECTURE.md, "Packages and who may import whom")."""
PREFECT_IMPORTERS = {"pipelines/flows.py", "pipelines/schedules.py"}
"""The flow layer: the only modules outside infra/ that may import Prefect."""


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of our packages."""
    out = {}
    for pkg in OURS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports anywhere in its body: `import a.b` gives a.b, `from a.b import c` gives a.b
    and a.b.c (c may be a module or a name in it), relative imports resolved against `module`."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".") if node.module else []
            names.add(".".join(base))
            names.update(".".join([*base, a.name]) for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports (a package's __init__ counts as the package)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for imp in imported_names(path, name):
            parts = imp.split(".")
            # the longest prefix that is one of our modules: "pipelines.lm.load_base" -> "pipelines.lm"
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods:
                    if cand != name and cand not in OURS:  # importing a package's __init__ is not an edge
                        edges.add(cand)
                    break
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_relative_function_level_and_package_imports(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("import os\ndef f():\n    from . import lm\n    from .data import read_jsonl\n"
                   "    import registry.store\n    from common.atomic import write_json\n")
    names = imported_names(mod, "pipelines.x")
    assert {"pipelines.lm", "pipelines.data", "registry.store", "common.atomic", "os"} <= names
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "pipelines.lm" in graph["pipelines.init_cache"] and "common.atomic" in graph["monitoring.check"]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_what_it_may(package):
    bad = []
    for name, edges in import_graph().items():
        if name.split(".")[0] != package:
            continue
        for target in sorted(edges):
            other = target.split(".")[0]
            if other != package and other not in MAY_IMPORT[package]:
                bad.append(f"{name} imports {target}")
    allowed = ", ".join(sorted(MAY_IMPORT[package])) or "nothing of ours"
    assert not bad, f"{package}/ may import {allowed} (docs/ARCHITECTURE.md): " + "; ".join(bad)


def test_no_import_cycle_between_our_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, (f"import cycle: {' -> '.join(cycle)}; move what both need into a module both can import "
                           "(model code: pipelines/lm.py; small shared helpers: common/)")


def test_prefect_is_imported_only_by_the_flow_layer_and_infra():
    bad = []
    for name, path in _modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("infra/") or rel in PREFECT_IMPORTERS:
            continue
        if any(n == "prefect" or n.startswith("prefect.") for n in imported_names(path, name)):
            bad.append(rel)
    assert not bad, (f"{bad} import Prefect; only {sorted(PREFECT_IMPORTERS)} and infra/ may: put the Prefect part "
                     "in pipelines/flows.py (tasks, flows) or pipelines/schedules.py (deployments)")


def test_the_base_package_imports_no_third_party_package():
    """common/ is the floor every package stands on: the standard library only, so importing it costs nothing."""
    import sys

    for name, path in _modules().items():
        if name.split(".")[0] != "common":
            continue
        for imp in imported_names(path, name):
            top = imp.split(".")[0]
            assert top in sys.stdlib_module_names or top == "common" or top == "__future__", (
                f"{name} imports {imp}; common/ uses the standard library only")


def test_architecture_md_states_the_rules_the_tests_enforce():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for needle in ("`common/`", "tests/unit/test_import_rules.py", "pipelines/schedules.py"):
        assert needle in text, f"docs/ARCHITECTURE.md does not mention {needle}"


def test_no_long_function_without_a_reason():
    """No function in pipelines/, registry/, monitoring/ or common/ is over 80 lines unless its docstring says why
    (a line starting "Long because")."""
    long = []
    for pkg in ("common", "pipelines", "registry", "monitoring"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    doc = ast.get_docstring(node) or ""
                    if lines > 80 and "Long because" not in doc:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over 80 lines with no reason in their docstring: {long}; split them"
