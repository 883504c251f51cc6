"""pipelines/ has no import circle: the modules' imports (module-level and inside functions, read with ast) form a
graph without cycles, and the stages share model code through pipelines.lm instead of importing each other
(docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
STAGES = ("init_cache", "train", "merge_quantize", "register", "reference")
"""The lifecycle's stage modules: each may use pipelines.lm, manifest, data, ..., never another stage."""


def pipeline_imports(path: Path, modules: set[str]) -> set[str]:
    """The pipelines modules `path` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = ["pipelines", *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "pipelines":
                base = node.module.split(".")
            else:
                continue
            names = [".".join(base)] + [".".join([*base, a.name]) for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {p.stem: p for p in PIPELINES.glob("*.py") if p.name != "__init__.py"}
    return {name: pipeline_imports(p, set(paths)) for name, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
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


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_function_level_and_relative_imports_are_seen(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from pipelines import lm, manifest\n    from pipelines.train import run\n"
                   "    import pipelines.data\n    from . import flows\n    from .register import run\n")
    assert pipeline_imports(mod, {"lm", "manifest", "train", "data", "flows", "register"}) == {
        "lm", "manifest", "train", "data", "flows", "register"}


def test_pipelines_has_no_import_cycle():
    graph = import_graph()
    assert "lm" in graph and graph["init_cache"], "the import graph looks empty: is PIPELINES right?"
    cycle = find_cycle(graph)
    assert cycle is None, (f"import cycle between pipeline modules: {' -> '.join(cycle)}; move the shared code to "
                           "a module both can import (model helpers: pipelines/lm.py)")


def test_stages_do_not_import_each_other():
    graph = import_graph()
    for stage in STAGES:
        other = sorted(graph[stage] & (set(STAGES) - {stage}))
        assert not other, f"pipelines/{stage}.py imports the stage(s) {other}; share the code through pipelines.lm"


def test_lm_imports_no_stage():
    assert not import_graph()["lm"] & set(STAGES), "pipelines/lm.py must not import a stage"


def test_the_demo_keeps_its_config_names():
    """The demo's config extends the lifecycle's (pipelines/lifecycle.py); pipelines.demo's names stay importable,
    and the production lifecycle config carries none of the demo's fields."""
    import dataclasses

    from pipelines import demo, lifecycle

    assert demo.DemoConfig is lifecycle.DemoConfig and issubclass(demo.DemoConfig, lifecycle.LifecycleConfig)
    assert demo.TrafficConfig is lifecycle.TrafficConfig
    production = {f.name for f in dataclasses.fields(lifecycle.LifecycleConfig)}
    assert not production & {"train_v1", "bad", "traffic"}
    assert set(lifecycle.DEMO_SECTIONS) == {"train_v1", "bad", "traffic"}
    assert type(demo.load_config(None)) is demo.DemoConfig
    assert type(lifecycle.load_config(lifecycle.DEFAULT_CONFIG)) is demo.DemoConfig  # the CLI's demo default
    assert type(lifecycle.load_config(lifecycle.LIFECYCLE_CONFIG)) is lifecycle.LifecycleConfig
