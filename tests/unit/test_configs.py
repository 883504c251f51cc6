"""Every shipped YAML loads into its dataclass; `pipelines.config.from_dict` errors name the key, the path and the fix.

No model and no MLflow/Prefect/transformers: only the config dataclasses (pipelines.demo pulls in monitoring.drift,
which imports torch and scipy, so this module costs a few seconds of imports).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from pipelines.config import CONFIG_DIR, ConfigError, from_dict, load, load_yaml
from pipelines.demo import DemoConfig, TrafficConfig, load_config
from pipelines.init_cache import DEFAULT_TARGETS, InitConfig
from pipelines.merge_quantize import GateConfig, MergeConfig, QuantThresholds
from pipelines.train import HealthConfig, TrainConfig

ALL_YAML = sorted(p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
HEADER_CLASS = re.compile(r"([\w/]+)\.py:\s*(\w+)")


def _rel(p: Path) -> str:
    return p.relative_to(CONFIG_DIR).as_posix()


def _is_demo(path: Path) -> bool:
    return path.name == "demo.yaml" or path.name.startswith("demo-")


def _header_dataclass(path: Path):
    """The dataclass a YAML's leading comment block names as `package/module.py: ClassName`, else None."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if m := HEADER_CLASS.search(line):
            module = importlib.import_module(m.group(1).replace("/", "."))
            cls = getattr(module, m.group(2))
            if dataclasses.is_dataclass(cls):
                return cls
    return None


def _same(expected, actual) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        return expected == pytest.approx(actual)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(_same(e, a) for e, a in zip(expected, actual))
    return expected == actual


def _leaves(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, data


# -- the shipped YAML files --------------------------------------------------------------------------------------

def test_configs_dir_has_the_demo_config():
    assert CONFIG_DIR / "demo.yaml" in ALL_YAML


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_loads_into_its_dataclass(path):
    if _is_demo(path):
        cfg = load_config(path)
        assert isinstance(cfg, DemoConfig)
        return
    if path.parent.name == "profiles":
        from pipelines.profile import Profile, load_profile

        assert isinstance(load_profile(path, env={}), Profile)  # ${VAR:-default} values at their defaults
        return
    cls = _header_dataclass(path)
    if cls is None:
        data = yaml.safe_load(path.read_text())
        assert data is None or isinstance(data, dict), f"{_rel(path)}: top level must be a mapping"
        warnings.warn(f"{_rel(path)} names no dataclass in its header comment; only checked that it parses")
        return
    assert isinstance(load(cls, path), cls)


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_value_reaches_the_dataclass(path):
    """No key is silently dropped or rewritten: each YAML leaf equals the loaded config's field."""
    if path.parent.name == "profiles":
        pytest.skip("profiles expand ${VAR:-default} placeholders; covered by tests/unit/test_infra_files.py")
    if not _is_demo(path) and _header_dataclass(path) is None:
        pytest.skip("no dataclass to compare against")
    cfg = load_config(path) if _is_demo(path) else load(_header_dataclass(path), path)
    loaded = dataclasses.asdict(cfg)
    for keys, value in _leaves(load_yaml(path)):
        actual = loaded
        for k in keys:
            actual = actual[k]
        assert _same(value, actual), f"{_rel(path)}: {'.'.join(keys)} = {value!r} in YAML, {actual!r} loaded"


def test_demo_yaml_section_comments_name_the_right_dataclass():
    """`init:  # pipelines/init_cache.py: InitConfig` must match DemoConfig's field type (comments that lie rot)."""
    hints = typing.get_type_hints(DemoConfig)
    checked = 0
    for line in (CONFIG_DIR / "demo.yaml").read_text().splitlines():
        m = re.match(r"^(\w+):.*#.*?([\w/]+)\.py:\s*(\w+)", line)
        if m:
            section, cls_name = m.group(1), m.group(3)
            assert hints[section].__name__ == cls_name, f"demo.yaml's {section} comment names {cls_name}"
            checked += 1
    assert checked >= 4


def test_demo_yaml_overrides_defaults_the_story_depends_on():
    cfg = load_config(CONFIG_DIR / "demo.yaml")
    assert cfg.init.method == "pissa" and cfg.init.target_modules == DEFAULT_TARGETS
    assert cfg.bad.steps == 80 and cfg.bad.eval_every == 40
    assert cfg.merge.gates.forgetting_max_rise == pytest.approx(1.5)
    assert cfg.merge.gates.quant["nf4"] == GateConfig().quant["nf4"]  # untouched nested defaults survive
    assert cfg.rollout.steps == (0.1, 0.25, 0.5, 1.0)


def test_load_config_none_means_the_default_file():
    assert load_config(None) == load_config(CONFIG_DIR / "demo.yaml")


# -- load_yaml / load ---------------------------------------------------------------------------------------------

def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_load_yaml_invalid_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(f)


def test_load_yaml_top_level_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(f)


def test_load_yaml_empty_file_is_an_empty_mapping(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert load_yaml(f) == {}
    assert load(InitConfig, f) == InitConfig()


def test_load_section_and_error_location(tmp_path):
    f = tmp_path / "stages.yaml"
    f.write_text("init:\n  rank: 4\nmerge:\n  quantize: int8\n  bogus: 1\n")
    assert load(InitConfig, f, section="init").rank == 4
    assert load(TrainConfig, f, section="absent") == TrainConfig()
    with pytest.raises(ConfigError, match=r"stages\.yaml:merge: unknown key\(s\) bogus"):
        load(MergeConfig, f, section="merge")


# -- from_dict: unknown keys --------------------------------------------------------------------------------------

def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        from_dict(InitConfig, {"rnak": 4})
    msg = str(e.value)
    assert "rnak" in msg and "InitConfig" in msg
    for name in (f.name for f in dataclasses.fields(InitConfig)):
        assert name in msg


def test_several_unknown_keys_are_all_named_sorted():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) aaa, zzz for TrainConfig"):
        from_dict(TrainConfig, {"zzz": 1, "aaa": 2, "steps": 10})


@pytest.mark.parametrize(
    ("data", "path", "key", "cls"),
    [
        ({"init": {"rnak": 4}}, "config.init", "rnak", "InitConfig"),
        ({"train_v1": {"health": {"nope": 1}}}, "config.train_v1.health", "nope", "HealthConfig"),
        ({"merge": {"gates": {"bogus": 1}}}, "config.merge.gates", "bogus", "GateConfig"),
        ({"merge": {"gates": {"quant": {"nf4": {"kl_mean": 1, "kl_p99": 1, "top1": 1, "x": 0}}}}},
         "config.merge.gates.quant.nf4", "x", "QuantThresholds"),
        ({"traffic": {"client": 2}}, "config.traffic", "client", "TrafficConfig"),
    ],
)
def test_nested_unknown_key_message_has_the_full_path(data, path, key, cls):
    with pytest.raises(ConfigError) as e:
        from_dict(DemoConfig, data)
    msg = str(e.value)
    assert msg.startswith(f"{path}: unknown key(s) {key} for {cls}")
    assert "valid keys are" in msg


def test_where_prefix_is_used():
    with pytest.raises(ConfigError, match=r"^my\.yaml\.init: unknown key"):
        from_dict(DemoConfig, {"init": {"x": 1}}, where="my.yaml")


# -- from_dict: types ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cls", "data", "expected"),
    [
        (InitConfig, {"rank": "8"}, r"config\.rank: expected int, got '8'"),
        (InitConfig, {"rank": True}, r"config\.rank: expected int, got True"),
        (InitConfig, {"rank": 2.5}, r"config\.rank: expected int, got 2\.5"),
        (InitConfig, {"method": 3}, r"config\.method: expected str, got 3"),
        (InitConfig, {"target_modules": "q_proj"}, r"config\.target_modules: expected a list, got 'q_proj'"),
        (InitConfig, {"target_modules": ["q_proj", 3]}, r"config\.target_modules: expected str, got 3"),
        (InitConfig, {"svd_niter": "x"}, r"config\.svd_niter: expected int"),
        (DemoConfig, {"traffic": {"clients": "four"}}, r"config\.traffic\.clients: expected int, got 'four'"),
        (DemoConfig, {"base": None}, r"config\.base: expected str, got None"),
        (MergeConfig, {"gates": {"quant": []}}, r"config\.gates\.quant: expected a mapping"),
    ],
)
def test_wrong_type_names_the_field_path(cls, data, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict(cls, data)


def test_coercions_that_are_allowed():
    cfg = from_dict(InitConfig, {"alpha": 32, "target_modules": ["q_proj", "v_proj"], "svd_niter": None})
    assert cfg.alpha == 32.0 and isinstance(cfg.alpha, float)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert from_dict(InitConfig, {"svd_niter": 4}).svd_niter == 4
    assert from_dict(TrainConfig, {"lr": 0.001}).lr == pytest.approx(1e-3)
    assert from_dict(TrainConfig, None) == TrainConfig()
    q = from_dict(MergeConfig, {"gates": {"quant": {"nf4": {"kl_mean": 1, "kl_p99": 2, "top1": 0.5}}}}).gates.quant
    assert q == {"nf4": QuantThresholds(kl_mean=1.0, kl_p99=2.0, top1=0.5)}


def test_round_trip_through_asdict():
    cfg = load_config(CONFIG_DIR / "demo.yaml")
    assert from_dict(DemoConfig, dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("value", ["x", True, [1]])
def test_float_field_rejects_non_numbers(value):
    with pytest.raises(ConfigError, match=r"config\.alpha: expected float"):
        from_dict(InitConfig, {"alpha": value})


@pytest.mark.parametrize("value", [5, "abc", [1, 2], [["rank", 4]]])
def test_section_that_is_not_a_mapping_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"config\.init: expected a mapping"):
        from_dict(DemoConfig, {"init": value})


# -- from_dict: values checked by __post_init__ ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cls", "data", "expected"),
    [
        (InitConfig, {"method": "bogus"}, r"method 'bogus' is not one of lora, rslora, dora, pissa"),
        (InitConfig, {"rank": 0}, r"rank must be >= 1, got 0"),
        (InitConfig, {"target_modules": []}, r"target_modules is empty"),
        (InitConfig, {"method": "lora", "svd_niter": 4}, r"svd_niter applies to method pissa only"),
        (InitConfig, {"svd_niter": 0}, r"svd_niter"),
        (InitConfig, {"dtype": "float16"}, r"dtype 'float16' is not one of"),
        (TrainConfig, {"steps": 0}, r"steps must be >= 1, got 0"),
        (TrainConfig, {"batch_size": 0}, r"batch_size must be >= 1"),
        (TrainConfig, {"grad_accum": 0}, r"grad_accum must be >= 1"),
        (TrainConfig, {"eval_every": 0}, r"eval_every must be >= 1"),
        (TrainConfig, {"max_len": 8}, r"max_len must be >= 16, got 8"),
        (TrainConfig, {"lr": 1.5}, r"lr must be in \(0, 1\), got 1\.5"),
        (MergeConfig, {"quantize": "fp3"}, r"quantize 'fp3' is not one of"),
        (MergeConfig, {"dtype": "float16"}, r"dtype 'float16' must be float32 or bfloat16"),
        (MergeConfig, {"eval_examples": 0}, r"eval_examples and golden_prompts must be >= 1"),
        (DemoConfig, {"replay_ratio": 1.0}, r"replay_ratio must be in \[0, 1\), got 1\.0"),
    ],
)
def test_invalid_value_is_a_config_error_naming_the_problem(cls, data, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict(cls, data)


def test_nested_invalid_value_names_the_section():
    with pytest.raises(ConfigError, match=r"^config\.merge: quantize 'fp3'"):
        from_dict(DemoConfig, {"merge": {"quantize": "fp3"}})


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: InitConfig(method="bogus"), "method 'bogus'"),
        (lambda: InitConfig(rank=0), "rank must be >= 1"),
        (lambda: TrainConfig(steps=0), "steps must be >= 1"),
        (lambda: MergeConfig(quantize="fp3"), "quantize 'fp3'"),
        (lambda: DemoConfig(replay_ratio=-0.1), "replay_ratio"),
    ],
)
def test_direct_construction_validates(factory, expected):
    with pytest.raises(ValueError, match=expected):
        factory()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_demo_config_rejects_unknown_replay_strategy():
    with pytest.raises(ConfigError, match="replay_strategy"):
        from_dict(DemoConfig, {"replay_strategy": "balanced"})


def test_defaults_construct():
    for cls in (InitConfig, TrainConfig, HealthConfig, MergeConfig, GateConfig, TrafficConfig, DemoConfig):
        assert dataclasses.is_dataclass(cls())
