"""Every PEFT method the product offers, on the real tiny base: init through the cache, a few training steps, the loss
falls, and what was saved loads back to the model training ended with: the native adapter on the cached base, and the
deployable adapter/ on the ORIGINAL base (PiSSA family: converted to plain LoRA).

On an nf4 base (QLoRA, QPiSSA) the deployable adapter on the original fp32 base cannot give the quantized model's
logits exactly: they differ by the base's quantization error. The tests bound that difference by the same base's
quantization error measured before training (the init model against the original base), and check the exact part
separately: QPiSSA's converted adapter on the original base equals the fp32 residual + the trained adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from train_fixtures import BASE, logits as _logits, prompt_ids as _prompt_ids, val_rows as _val_rows

pytestmark = pytest.mark.integration

RANK = 4
SPECS = {  # name -> (InitConfig overrides, TrainConfig overrides)
    "lora": ({"method": "lora"}, {}),
    "rslora": ({"method": "rslora"}, {}),
    "dora": ({"method": "dora"}, {}),
    "loraplus": ({"method": "lora"}, {"loraplus_lr_ratio": 16.0, "lr": 5e-4}),  # LoRA default 2e-3 x16 overshoots
    "pissa": ({"method": "pissa"}, {}),
    "pissa_fast": ({"method": "pissa", "svd_niter": 2}, {}),
    "qlora": ({"method": "qlora"}, {}),
    "qpissa": ({"method": "qpissa"}, {}),
}
QUANTIZED = ("qlora", "qpissa")
PISSA_FAMILY = ("pissa", "pissa_fast", "qpissa")
# fp32 twin of each quantized spec: same cached weights, base not quantized
FULL_PRECISION = {"qlora": "lora", "qpissa": "pissa"}


@dataclass
class Trained:
    entry: Path
    out: Path
    optimizer_steps: list[list[tuple[float, list[tuple[int, ...]]]]]
    """Per optimizer step: (lr, parameter shapes) of each parameter group, as the optimizer saw them."""


def _manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """entry(name) -> the init-cache entry of SPECS[name] (rank 4), from one module-wide LocalStore."""
    from pipelines import init_cache
    from registry.store import LocalStore

    root = tmp_path_factory.mktemp("methods-init")
    store = LocalStore(root / "store")
    entries: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in entries:
            cfg = init_cache.InitConfig(rank=RANK, **SPECS[name][0])
            entries[name] = init_cache.run(cfg, BASE, store, root / "scratch", log=lambda *a: None).path
        return entries[name]

    return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, small_train_config, entry):
    """trained(name) -> Trained: SPECS[name] trained for the small config's 12 steps, once per module."""
    from pipelines import train
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    root = tmp_path_factory.mktemp("methods-trained")
    runs: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in runs:
            steps: list = []

            def record(opt, _args, _kwargs):
                steps.append([(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups])

            hook = register_optimizer_step_pre_hook(record)
            try:
                out = train.run(small_train_config(**SPECS[name][1]), BASE, entry(name), tiny_data.train,
                                tiny_data.val, root / name, log=lambda *a: None)
            finally:
                hook.remove()
            runs[name] = Trained(entry(name), out, steps)
        return runs[name]

    return get


@pytest.mark.parametrize("name", SPECS)
def test_training_lowers_the_loss(trained, name):
    run = trained(name)
    m = _manifest(run.out)
    losses = [p["train_loss"] for p in m["curve"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"\n{name}: lr={m['metrics']['lr']} train loss first3={first:.3f} last3={last:.3f} "
          f"val={m['metrics']['val_loss']}")
    assert len(losses) == 12 and run.optimizer_steps and len(run.optimizer_steps) == 12
    assert last < first - 0.3, f"{name}: loss did not fall ({first:.3f} -> {last:.3f}; curve {losses})"
    assert m["health"]["passed"]
    init = json.loads((run.entry / "manifest.json").read_text())
    assert m["inputs"]["init_key"] == init["key"]
    assert init["config"]["base_quant"] == ("nf4" if name in QUANTIZED else "none")


@pytest.mark.parametrize("name", SPECS)
def test_native_adapter_reloads_on_the_cached_base(trained, tiny_data, name):
    """adapter_native/ on the cached base (residual, nf4 where configured) is the model training ended with."""
    from pipelines.lm import build_model
    from pipelines.train import eval_loss

    run = trained(name)
    native = build_model(BASE, run.entry, adapter=run.out / "adapter_native", trainable=False)
    rows, pad = _val_rows(tiny_data.val)
    assert abs(eval_loss(native, rows, pad) - _manifest(run.out)["metrics"]["val_loss"]) < 1e-4

    ids = _prompt_ids()
    start = build_model(BASE, run.entry, trainable=False)
    assert (_logits(native, ids) - _logits(start, ids)).abs().max() > 1e-3, "training should change the logits"
    base_type = type(native.base_model.model.model.layers[0].mlp.down_proj.get_base_layer()).__name__
    assert base_type == ("Linear4bit" if name in QUANTIZED else "Linear")


@pytest.mark.parametrize("name", [n for n in SPECS if n not in QUANTIZED])
def test_deployable_adapter_on_the_original_base_gives_the_trained_model(trained, tiny_data, name):
    import torch
    from peft import PeftModel
    from pipelines.lm import build_model, load_base
    from pipelines.train import eval_loss

    run = trained(name)
    m = _manifest(run.out)
    deployable = PeftModel.from_pretrained(load_base(BASE), str(run.out / "adapter"))
    rows, pad = _val_rows(tiny_data.val)
    assert abs(eval_loss(deployable, rows, pad) - m["metrics"]["val_loss"]) < 1e-4
    ids = _prompt_ids()
    native = build_model(BASE, run.entry, adapter=run.out / "adapter_native", trainable=False)
    torch.testing.assert_close(_logits(deployable, ids), _logits(native, ids), atol=1e-4, rtol=0)
    cfg = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == (2 * RANK if name in PISSA_FAMILY else RANK)  # PiSSA: converted to plain LoRA of rank 2r


@pytest.mark.parametrize("name", QUANTIZED)
def test_deployable_adapter_on_the_original_base_within_the_quantization_error(trained, entry, name):
    """The trained nf4 model vs adapter/ on the original fp32 base: they differ by the base's nf4 rounding only.

    Bound: the logit difference that the same rounding makes before training (init model on the nf4 base vs the same
    init on the fp32 weights): the same weight perturbation seen through a slightly different network, so the mean
    may grow by at most 1.5x and the max (one token's worst logit, noisier) 2x. The exact part is checked exactly:
    adapter/ on the original base = the fp32 cached weights + the trained adapter.
    """
    import torch
    from peft import PeftModel
    from pipelines.lm import build_model, load_base

    run = trained(name)
    fp32_entry = entry(FULL_PRECISION[name])  # same cached weights, no quantization
    ids = _prompt_ids()
    deployable = _logits(PeftModel.from_pretrained(load_base(BASE), str(run.out / "adapter")), ids)
    fp32_trained = _logits(build_model(BASE, fp32_entry, adapter=run.out / "adapter_native", trainable=False), ids)
    torch.testing.assert_close(deployable, fp32_trained, atol=1e-4, rtol=0)

    nf4_trained = _logits(build_model(BASE, run.entry, adapter=run.out / "adapter_native", trainable=False), ids)
    init_gap = (_logits(build_model(BASE, run.entry, trainable=False), ids)
                - _logits(build_model(BASE, fp32_entry, trainable=False), ids)).abs()
    gap = (nf4_trained - deployable).abs()
    print(f"\n{name}: |nf4 - fp32| logits after training max {gap.max():.3f} mean {gap.mean():.4f}; "
          f"before training max {init_gap.max():.3f} mean {init_gap.mean():.4f}")
    assert init_gap.max() > 1e-3, "the nf4 base should differ from the fp32 one"
    assert gap.mean() <= 1.5 * init_gap.mean() and gap.max() <= 2 * init_gap.max()


def test_loraplus_gives_the_b_matrices_16x_the_learning_rate(trained):
    run = trained("loraplus")
    for k, groups in enumerate(run.optimizer_steps):
        lr_a = {lr for lr, shapes in groups for s in shapes if s[0] == RANK}  # lora_A: (r, in_features)
        lr_b = {lr for lr, shapes in groups for s in shapes if s[-1] == RANK}  # lora_B: (out_features, r)
        assert len(lr_a) == 1 and len(lr_b) == 1, f"step {k + 1}: A and B lrs {lr_a}, {lr_b}"
        assert lr_a.pop() * 16 == pytest.approx(lr_b.pop()), f"step {k + 1}"
    plain = trained("lora").optimizer_steps
    assert all(len({lr for lr, _ in groups}) == 1 for groups in plain), "without LoRA+ every group has the same lr"


def test_qpissa_quantizes_the_residual_and_the_health_check_reads_it_dequantized(entry):
    """QPiSSA's base holds nf4(W - s B0 A0), not nf4(W); adapter_deltas sees the dequantized weight."""
    import torch
    from peft.utils.integrations import dequantize_module_weight
    from pipelines.lm import build_model, load_base
    from pipelines.train import adapter_deltas

    model = build_model(BASE, entry("qpissa"), trainable=False)
    fp32 = build_model(BASE, entry("pissa"), trainable=False)
    w = dict(load_base(BASE).named_parameters())["model.layers.1.mlp.down_proj.weight"]
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    w_res = fp32.base_model.model.model.layers[1].mlp.down_proj.get_base_layer().weight
    deq = dequantize_module_weight(layer.get_base_layer())
    assert type(layer.get_base_layer().weight).__name__ == "Params4bit"
    assert layer.lora_A["default"].weight.dtype == torch.float32
    # nf4 rounding moves W_res by ~10% of its norm here; quantizing W instead would land ~||s B0 A0|| from W_res
    assert (deq - w_res).norm() < 0.5 * (deq - w).norm(), "the quantized base should be the residual, not W"

    def perturbed(m):
        """Scale every B by 1.1 and return the adapter as it was: the health check's reference (the init)."""
        init = {n: (x.lora_A["default"].weight.detach().clone(), x.lora_B["default"].weight.detach().clone())
                for n, x in m.named_modules() if hasattr(x, "lora_A") and "default" in x.lora_A}
        with torch.no_grad():
            for x in m.modules():
                if hasattr(x, "lora_B") and "default" in x.lora_B:
                    x.lora_B["default"].weight.mul_(1.1)
        return init

    q_ratios, f_ratios = adapter_deltas(model, perturbed(model)), adapter_deltas(fp32, perturbed(fp32))
    assert q_ratios.keys() == f_ratios.keys() and len(q_ratios) == 28
    for name, d in q_ratios.items():
        assert d["delta_ratio"] == pytest.approx(f_ratios[name]["delta_ratio"], rel=0.05), name
