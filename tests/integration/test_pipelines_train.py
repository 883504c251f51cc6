"""Training on the real tiny base with real PEFT: the loss falls for every method, what is saved loads back to the same
model (PiSSA's converted adapter on the ORIGINAL base included), reruns are reused, warm starts respect the init, and
health checks stop broken runs without leaving an output directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import methods
from train_fixtures import BASE, logits as _logits, prompt_ids as _prompt_ids, val_rows as _val_rows

pytestmark = pytest.mark.integration

METHODS = tuple(methods.METHODS)


def _quiet(*_a):
    pass


def _manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def _no_output_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind by a failed run"
    assert not out.with_name(f".{out.name}.partial").exists(), "a staging directory was left behind"


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss(trained, method):
    out = trained(method)
    m = _manifest(out)
    losses = [p["train_loss"] for p in m["curve"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"\n{method}: lr={m['metrics']['lr']} train loss first3={first:.3f} last3={last:.3f} "
          f"val={m['metrics']['val_loss']} base_val={m['metrics']['base_val_loss']}")
    assert len(losses) == 12 and m["metrics"]["steps"] == 12
    assert last < first - 0.3, f"{method}: loss did not fall ({first:.3f} -> {last:.3f}; curve {losses})"
    assert m["health"]["passed"] and m["method"] == method and m["kind"] == "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter_native" / "adapter_model.safetensors").is_file()
    if m["metrics"]["base_val_loss"] is not None:  # lora methods: the adapter beats the base on its own task
        assert m["metrics"]["val_loss"] < m["metrics"]["base_val_loss"]


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_onto_the_original_base(trained, init_entry, tiny_data, method):
    """adapter/ on the ORIGINAL base gives the model training ended with (its final val loss, the native logits)."""
    import torch
    from peft import PeftModel
    from pipelines.lm import build_model, load_base
    from pipelines.train import eval_loss

    out = trained(method)
    m = _manifest(out)
    deployable = PeftModel.from_pretrained(load_base(BASE), str(out / "adapter")).eval()
    rows, pad = _val_rows(tiny_data.val)
    assert abs(eval_loss(deployable, rows, pad) - m["metrics"]["val_loss"]) < 1e-4

    ids = _prompt_ids()
    native = build_model(BASE, init_entry(method), adapter=out / "adapter_native", trainable=False)
    got, want = _logits(deployable, ids), _logits(native, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - _logits(load_base(BASE), ids)).abs().max() > 1e-3, "the adapter should change the base's logits"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    if method == "pissa":  # converted to plain LoRA of rank 2r against the original base
        assert cfg["r"] == 2 * m["rank"] and not (out / "adapter" / "residual.safetensors").exists()
    else:
        assert cfg["r"] == m["rank"]
        assert cfg["use_dora"] is (method == "dora") and cfg["use_rslora"] is (method == "rslora")


def test_rerun_with_identical_inputs_is_reused(trained, init_entry, tiny_data, small_train_config):
    from pipelines import train

    out = trained("lora")
    before = _manifest(out)
    messages: list[str] = []
    again = train.run(small_train_config(), BASE, init_entry("lora"), tiny_data.train, tiny_data.val, out,
                      log=messages.append)
    assert again == out
    assert _manifest(out)["created"] == before["created"]
    assert any("reusing" in msg for msg in messages), messages


def test_warm_start_from_a_parent(trained, init_entry, tiny_data, small_train_config, tmp_path):
    from pipelines import train

    parent = trained("pissa")
    out = train.run(small_train_config(steps=6, eval_every=6), BASE, init_entry("pissa"), tiny_data.train,
                    tiny_data.val, tmp_path / "child", parent=parent, log=_quiet)
    child, pm = _manifest(out), _manifest(parent)
    assert child["inputs"]["parent"] == pm["fingerprint"] and child["parent_path"] == str(parent)
    # it continues from the trained adapter, not from the init: its first batches already score like the parent's end
    assert child["curve"][0]["train_loss"] < pm["curve"][0]["train_loss"] - 0.3
    print(f"\nwarm start: parent first/last loss {pm['curve'][0]['train_loss']}/{pm['curve'][-1]['train_loss']}, "
          f"child first {child['curve'][0]['train_loss']}")


def test_warm_start_refuses_a_parent_from_another_init(trained, init_entry, tiny_data, small_train_config, tmp_path):
    from pipelines import train

    out = tmp_path / "child"
    with pytest.raises(ValueError, match="warm-start only from the same init"):
        train.run(small_train_config(steps=2), BASE, init_entry("lora"), tiny_data.train, tiny_data.val, out,
                  parent=trained("pissa"), log=_quiet)
    _no_output_left(out)


def test_health_check_fails_on_delta_ratio(init_entry, tiny_data, small_train_config, tmp_path):
    from pipelines import train

    out = tmp_path / "run"
    cfg = small_train_config(steps=4, health=train.HealthConfig(max_delta_ratio=1e-9))
    with pytest.raises(train.HealthCheckFailed, match="delta_ratio") as err:
        train.run(cfg, BASE, init_entry("lora"), tiny_data.train, tiny_data.val, out, log=_quiet)
    failed = {c["name"]: c for c in err.value.report["checks"] if not c["passed"]}
    assert set(failed) == {"delta_ratio"}, failed
    assert failed["delta_ratio"]["value"] > 1e-9 and failed["delta_ratio"]["threshold"] == 1e-9
    assert failed["delta_ratio"]["where"].endswith("_proj")
    _no_output_left(out)


def test_health_check_fails_on_a_diverging_loss(init_entry, tiny_data, small_train_config, tmp_path):
    from pipelines import train

    out = tmp_path / "run"
    # B's learning rate 0.5 * 1e4 (LoRA+ ratio) blows the weights up within a few steps
    cfg = small_train_config(steps=8, lr=0.5, loraplus_lr_ratio=1e4, warmup_ratio=0.0)
    with pytest.raises(train.HealthCheckFailed, match="finite_loss") as err:
        train.run(cfg, BASE, init_entry("lora"), tiny_data.train, tiny_data.val, out, log=_quiet)
    (check,) = [c for c in err.value.report["checks"] if not c["passed"]]
    assert check["name"] == "finite_loss" and check["where"].startswith("step ")
    _no_output_left(out)
