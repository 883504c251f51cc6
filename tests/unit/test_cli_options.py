"""The CLI's options come from the typed configs (pipelines/options.py, pipelines.cli.command_options): every field
of every config a command uses has a flag (or is skipped with a reason), every flag is a field or one of the
command's declared inputs, a value given on the command line arrives in that field, and the flags, defaults and
YAML precedence of the hand-written parser they replaced still hold."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.options import Options, _unwrap_optional, field_docs

# Flags that are a command's inputs and outputs, not fields of a config it builds.
INPUTS = {
    ("init-cache",): {"action", "--key", "--base", "--store", "--scratch"},
    ("train",): {"--base", "--store", "--scratch", "--train", "--val", "--out", "--config", "--parent"},
    ("merge",): {"--base", "--adapter", "--out", "--val", "--report-json", "--config", "--expect-golden"},
    ("demo",): {"--workdir", "--summary-json", "--config", "--profile"},
    ("serve",): {"--workdir", "--host", "--port", "--base", "--profile", "--fallback-config", "--auto-canary",
                 "--auto-canary-without-feedback"},
    ("schedules", "serve"): {"--workdir", "--base", "--profile"},
    ("build",): {"--workdir", "--profile", "--json", "--base"},
    ("ingest",): {"--workdir", "--profile", "--json"},
}


def _parsers():
    out = {}

    def walk(p, path=()):
        out[path] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, path + (name,))

    walk(cli.build_parser())
    return out


def _options_of(parser) -> dict[str, argparse.Action]:
    return {(a.option_strings[0] if a.option_strings else a.dest): a for a in parser._actions
            if not isinstance(a, argparse._HelpAction)}


def test_the_commands_with_configs_are_the_ones_listed_here():
    assert set(cli.command_options()) == set(INPUTS)


@pytest.mark.parametrize("path", sorted(INPUTS), ids=" ".join)
def test_every_config_field_has_a_flag_and_every_flag_is_a_field_or_an_input(path):
    parser = _parsers()[path]
    actions = {s: a for a in parser._actions for s in a.option_strings}
    from_configs: set[str] = set()
    for opts in cli.command_options()[path].values():
        for f in dataclasses.fields(opts.cls):
            if f.name in opts.skip:
                assert opts.skip[f.name].strip(), f"{opts.cls.__name__}.{f.name} is skipped without a reason"
                assert not any(a.dest == opts.dest(f.name) for a in parser._actions)
                continue
            for flag in opts.flags_of(f.name):
                assert flag in actions, f"{' '.join(path)}: {opts.cls.__name__}.{f.name} has no {flag}"
                assert actions[flag].dest == opts.dest(f.name)
                from_configs.add(flag)
    everything = set(_options_of(parser))
    declared = {s for s in actions if s in from_configs} | INPUTS[path]
    # every option string of the parser: one of a field's flags or a declared input (first string of each action)
    assert everything - from_configs - INPUTS[path] == set(), "flags that are neither a config field nor an input"
    assert INPUTS[path] <= everything, f"declared inputs missing: {INPUTS[path] - everything}"
    assert from_configs <= declared


def _sample(opts: Options, f: dataclasses.Field):
    """(argv for the field's first flag, the value the config must then hold)."""
    flag = opts.flags_of(f.name)[0]
    tp, _ = _unwrap_optional(typing.get_type_hints(opts.cls)[f.name])
    if f.name in opts.choices:
        value = opts.choices[f.name][-1]
        return [flag, value], value
    if tp is bool:
        default = f.default
        if opts.override or default is True:
            return [f"--no-{flag[2:]}"], False
        return [flag], True
    if typing.get_origin(tp) is list:
        return [flag, "a", flag, "b"], ["a", "b"]
    if typing.get_origin(tp) is tuple:
        return [flag, "a, b"], ("a", "b")
    return {int: ([flag, "7"], 7), float: ([flag, "0.25"], 0.25), str: ([flag, "x-y"], "x-y"),
            Path: ([flag, "x/y.jsonl"], Path("x/y.jsonl"))}[tp]


REQUIRED = {("train",): ["--train", "t", "--val", "v", "--out", "o"], ("merge",): ["--adapter", "a", "--out", "o",
                                                                                    "--val", "v"],
            ("init-cache",): ["warm"], ("build",): ["--family", "f", "--train", "t", "--val", "v"],
            ("ingest",): ["--family", "f"]}


@pytest.mark.parametrize("path", sorted(INPUTS), ids=" ".join)
def test_a_value_given_on_the_command_line_arrives_in_its_field(path):
    parser = cli.build_parser()
    for opts in cli.command_options()[path].values():
        for f in opts.fields():
            argv, expected = _sample(opts, f)
            args = parser.parse_args([*path, *REQUIRED.get(path, []), *argv])
            got = opts.given(args)
            assert got[f.name] == expected, f"{' '.join(argv)} -> {opts.cls.__name__}.{f.name} = {got.get(f.name)!r}"


def test_without_flags_the_configs_are_their_defaults_and_a_yaml_holds(tmp_path):
    from pipelines.config import load
    from pipelines.init_cache import InitConfig
    from pipelines.merge_quantize import MergeConfig
    from pipelines.schedules import ScheduleConfig
    from pipelines.serve import EngineSpec
    from pipelines.train import TrainConfig

    p, opts = cli.build_parser(), cli.command_options()
    for path in (("init-cache",), ("train",)):
        assert opts[path]["init"].build(p.parse_args([*path, *REQUIRED[path]])) == InitConfig()
    for path in (("demo",), ("serve",)):
        assert opts[path]["engine"].build(p.parse_args(list(path))) == EngineSpec()
    assert opts["schedules", "serve"]["schedule"].build(p.parse_args(["schedules", "serve"])) == ScheduleConfig()

    (tmp_path / "t.yaml").write_text("steps: 5\nlr: 0.01\n")
    yaml_cfg = load(TrainConfig, tmp_path / "t.yaml")
    train = opts["train",]["train"]
    assert train.build(p.parse_args(["train", *REQUIRED["train",]]), base=yaml_cfg) == yaml_cfg  # the YAML holds
    got = train.build(p.parse_args(["train", *REQUIRED["train",], "--steps", "9", "--packing"]), base=yaml_cfg)
    assert (got.steps, got.lr, got.packing) == (9, 0.01, True)  # a given flag wins, the rest is the YAML's
    merge = opts["merge",]["merge"]
    assert merge.build(p.parse_args(["merge", *REQUIRED["merge",]]), base=MergeConfig(quantize="int8")).quantize == \
        "int8"
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):  # the dataclass validates what flags set
        train.build(p.parse_args(["train", *REQUIRED["train",], "--steps", "0"]), base=yaml_cfg)


# The hand-written parser's flags and defaults (before the CLI was generated), which must keep working.
OLD_DEFAULTS = {
    ("init-cache",): {"--method": "pissa", "--rank": 8, "--alpha": 16.0, "--svd-niter": None, "--device": "cpu",
                      "--init-device": "cpu", "--base-quant": "none", "--targets": None},
    ("train",): {"--method": "pissa", "--rank": 8, "--alpha": 16.0, "--svd-niter": None, "--init-device": "cpu",
                 "--base-quant": "none", "--targets": None, "--steps": None, "--device": None, "--precision": None,
                 "--packing": None, "--checkpoint-every": None},
    ("merge",): {"--quantize": None},
    ("demo",): {"--engine": "builtin", "--vllm-url": [], "--vllm-launch": False, "--vllm-python": None,
                "--device": "cpu", "--max-loras": 8, "--max-lora-rank": 64},
    ("schedules", "serve"): {"--family": [], "--monitor-interval": 900, "--ppl-interval": 3600,
                             "--retrain-cron": "0 2 * * *", "--data-dir": ""},
}


@pytest.mark.parametrize("path", sorted(OLD_DEFAULTS), ids=" ".join)
def test_the_old_flags_keep_their_defaults(path):
    from pipelines.init_cache import DEFAULT_TARGETS

    parser = _parsers()[path]
    actions = {s: a for a in parser._actions for s in a.option_strings}
    for flag, default in OLD_DEFAULTS[path].items():
        assert flag in actions, flag
        got = actions[flag].default
        if flag == "--targets":  # was "" meaning every Llama linear; now that tuple itself
            assert got == DEFAULT_TARGETS
        elif flag == "--packing":  # was store_true; now --packing/--no-packing, None = the YAML's
            assert got is None and isinstance(actions[flag], argparse.BooleanOptionalAction)
        else:
            assert got == default, (flag, got)
    config = actions.get("--config")
    if path == ("schedules", "serve"):
        assert config.default.endswith("configs/demo.yaml")


def test_choices_come_from_the_registries():
    from pipelines import lm, methods, serve
    from pipelines.train import PRECISIONS

    parsers = _parsers()
    actions = {path: {s: a for a in parsers[path]._actions for s in a.option_strings} for path in INPUTS}
    assert actions["train",]["--method"].choices == methods.CHOICES == actions["init-cache",]["--method"].choices
    assert actions["merge",]["--quantize"].choices == lm.SCHEMES
    assert actions["train",]["--precision"].choices == PRECISIONS
    assert actions["serve",]["--engine"].choices == serve.ENGINES


def test_help_is_the_field_docstring():
    from pipelines.train import TrainConfig

    docs = field_docs(TrainConfig)
    assert docs["steps"] == "Optimizer steps."
    (steps,) = [a for a in _parsers()["train",]._actions if "--steps" in a.option_strings]
    assert steps.help.startswith("Optimizer steps.") and "150" in steps.help


# -- Options itself ----------------------------------------------------------------------------------------------

@dataclass
class Sample:
    name: str = "a"
    """The name."""
    size: int | None = None
    tags: tuple[str, ...] = ("x",)
    extra: dict = field(default_factory=dict)


def test_a_field_without_a_command_line_form_must_be_skipped_with_a_reason():
    with pytest.raises(TypeError, match=r"Sample.extra: no command-line form .* skip it"):
        Options(Sample).add_to(argparse.ArgumentParser())
    p = argparse.ArgumentParser()
    opts = Options(Sample, skip={"extra": "a mapping"})
    opts.add_to(p)
    assert opts.build(p.parse_args(["--size", "3", "--tags", "p,q"])) == Sample(size=3, tags=("p", "q"))
    assert opts.build(p.parse_args([])) == Sample()


def test_options_naming_no_field_are_refused():
    with pytest.raises(TypeError, match="flags names no field: nmae"):
        Options(Sample, flags={"nmae": ("--n",)})


# -- what the CLI imports ----------------------------------------------------------------------------------------

def test_the_cli_imports_neither_infra_nor_prefect():
    """ARCHITECTURE.md: Prefect only in the flow layer (pipelines/flows.py, pipelines/schedules.py) and infra/; the
    CLI reaches the deployments through pipelines.schedules, inside the command. Checked on the source (every import
    statement, function-level ones included) and on a process that builds the whole parser."""
    import ast
    import subprocess
    import sys

    from pipelines.config import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "pipelines" / "cli.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("infra", "prefect")}, imported
    code = ("import sys; from pipelines import cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'infra', 'torch', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # --help stays instant: no Prefect, MLflow or torch to build the parser


def test_an_empty_targets_flag_still_means_every_llama_linear():
    from pipelines.init_cache import DEFAULT_TARGETS

    args = cli.build_parser().parse_args(["init-cache", "warm", "--targets", ""])
    assert cli._init_cfg(args).target_modules == DEFAULT_TARGETS
    args = cli.build_parser().parse_args(["init-cache", "warm", "--targets", "q_proj, v_proj"])
    assert cli._init_cfg(args).target_modules == ("q_proj", "v_proj")
