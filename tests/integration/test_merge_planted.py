"""Planted regressions: every corrupted artifact is caught, no clean merge of any method is rejected.

The plants (bench/planted_regressions.py builds them; its docstring says what failure each models) corrupt the step
between the trained adapter and the shipped artifact; `merge_quantize.check` re-gates the artifact against the TRUE
adapter and the version's golden logits, with the gates as shipped. Rates are reported by
`python -m bench.run planted_regressions`, not asserted here as numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.planted_regressions import (BASE, MERGE_PLANTS, QUANT_PLANTS, SENSITIVITY_ONLY, caught_by, make_wrong_base,
                                       merge_config, plant)
from pipelines import methods

pytestmark = pytest.mark.integration

METHODS = tuple(methods.METHODS)


def _quiet(*_a):
    pass


@pytest.fixture(scope="module")
def wrong_base(tmp_path_factory) -> Path:
    return make_wrong_base(tmp_path_factory.mktemp("wrong") / "base")


@pytest.fixture(scope="module")
def clean(trained, tiny_data, tmp_path_factory):
    """clean(method, scheme) -> output dir of a clean `run` (which must pass), merged once per module."""
    from pipelines import merge_quantize as mq

    root = tmp_path_factory.mktemp("clean")
    outs: dict[tuple[str, str], Path] = {}

    def get(method: str, scheme: str) -> Path:
        if (method, scheme) not in outs:
            adapter = trained(method) / "adapter"
            outs[method, scheme] = mq.run(merge_config(scheme), BASE, adapter, tiny_data.val,
                                          root / f"{method}-{scheme}", log=_quiet)
        return outs[method, scheme]

    return get


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_clean_merge_is_never_rejected(clean, trained, tiny_data, method, scheme):
    from pipelines import merge_quantize as mq

    out = clean(method, scheme)  # raises GateFailed on a false reject
    assert json.loads((out / "gates.json").read_text())["passed"]
    recheck = mq.check(merge_config(scheme), BASE, trained(method) / "adapter", tiny_data.val, out)
    assert recheck["passed"], caught_by(recheck)
    names = {g["name"] for g in recheck["gates"]}
    assert {mq.WEIGHT_GATE, "golden_max_abs", f"{scheme}_kl_mean"} <= names  # the golden and weight checks ran


@pytest.mark.parametrize("name", MERGE_PLANTS)
@pytest.mark.parametrize("method", METHODS)
def test_planted_merge_regression_is_caught(clean, trained, tiny_data, wrong_base, tmp_path, method, name):
    from pipelines import merge_quantize as mq

    cfg = merge_config("nf4")
    adapter = trained(method) / "adapter"
    artifact = plant(name, cfg, adapter, clean(method, "nf4"), tmp_path, wrong_base)
    report = mq.check(cfg, BASE, adapter, tiny_data.val, artifact)
    failed = caught_by(report)
    print(f"\n{method}/{name}: caught by {failed}")
    assert not report["passed"] and failed, f"{method}/{name} was not caught: {report['gates']}"
    assert mq.WEIGHT_GATE in failed  # every merge plant changes a shipped weight
    if name not in ("weight_x1.01_max", "weight_x1.01_rand"):
        # larger plants move the logits past the logit tolerances as well; a 1% change of one weight need not
        assert {"merged_max_abs", "golden_max_abs"} & set(failed), failed


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_corrupted_quantization_scale_is_caught(clean, trained, tiny_data, tmp_path, method, scheme):
    from pipelines import merge_quantize as mq

    cfg = merge_config(scheme)
    adapter = trained(method) / "adapter"
    for name in QUANT_PLANTS:
        if name in SENSITIVITY_ONLY:
            continue
        report = mq.check(cfg, BASE, adapter, tiny_data.val, plant(name, cfg, adapter, clean(method, scheme),
                                                                   tmp_path, tmp_path))
        failed = caught_by(report)
        assert f"{scheme}_kl_mean" in failed, f"{method}/{scheme}/{name} not caught: {report['gates']}"
        assert not {"merged_max_abs", mq.WEIGHT_GATE} & set(failed)  # the merged model itself is intact


def test_adapter_with_a_manifest_is_refused_on_another_base(trained, tiny_data, wrong_base, tmp_path):
    from pipelines import merge_quantize as mq

    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"was trained on base sha256:\w{12}.*merge it into the base it was trained"):
        mq.run(merge_config("none"), wrong_base, trained("lora") / "adapter", tiny_data.val, out, log=_quiet)
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()
