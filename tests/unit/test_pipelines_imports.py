"""The stages share model code through pipelines.lm instead of importing each other (docs/ARCHITECTURE.md); that no
import cycle exists anywhere is tests/unit/test_import_rules.py's."""

from __future__ import annotations

STAGES = ("init_cache", "train", "merge_quantize", "register", "reference")
"""The lifecycle's stage modules: each may use pipelines.lm, manifest, data, ..., never another stage."""


def import_graph() -> dict[str, set[str]]:
    """pipelines/ module -> the pipelines modules it imports (anywhere in its body), from the one import reader of
    tests/unit/test_import_rules.py (which also proves there is no cycle between any of our modules)."""
    from test_import_rules import import_graph as all_modules

    graph = all_modules()
    return {name.split(".", 1)[1]: {t.split(".", 1)[1] for t in edges if t.startswith("pipelines.")}
            for name, edges in graph.items() if name.startswith("pipelines.")}


def test_stages_do_not_import_each_other():
    graph = import_graph()
    assert "lm" in graph and graph["init_cache"], "the import graph looks empty"
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
