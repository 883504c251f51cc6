"""pipelines.fast_dora plugs into PEFT's LoraVariant slot (no patched forward) and keeps PEFT's values, gradients
and merge, on bias-free and biased layers. The tiny-model gradient test is in
tests/integration/test_pipelines_train_resume.py."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32, bias=False)
        self.down = torch.nn.Linear(32, 8, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def _models(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=True,
                                              lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model, copy.deepcopy(model)


def _loss_and_grads(model, x):
    model.train()
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_fast_variant_sits_in_peft_slot_and_keeps_values_and_gradients():
    from pipelines import fast_dora

    peft_model, fast = _models()
    assert fast_dora.enable(fast) == 2 and fast_dora.enable(fast) == 0
    layers = [m for m in fast.modules() if hasattr(m, "lora_variant") and m.lora_variant]
    assert len(layers) == 2
    for layer in layers:
        assert type(layer.lora_variant["default"]) is fast_dora.variant_class()
        assert "forward" not in vars(layer) and "forward" not in vars(layer.lora_magnitude_vector["default"])
    x = torch.randn(5, 3, 16)
    up_out = fast.base_model.model.up(x)
    assert type(up_out.grad_fn).__name__.startswith("DoraOut")  # the bias-free layer's one-Function output
    (l1, g1), (l2, g2) = _loss_and_grads(peft_model, x), _loss_and_grads(fast, x)
    assert l2 == pytest.approx(l1, rel=1e-6)
    assert g1.keys() == g2.keys() and sum("lora_magnitude" in n for n in g1) == 2
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)


def test_dropout_falls_back_to_peft_and_merge_is_peft_s():
    from pipelines import fast_dora

    peft_model, fast = _models(dropout=0.1)
    fast_dora.enable(fast)
    x = torch.randn(4, 16)
    torch.manual_seed(1)
    a = peft_model(x)
    torch.manual_seed(1)
    b = fast(x)
    torch.testing.assert_close(b, a)  # the same dropout mask through PEFT's own path
    fast.eval()
    before = fast(x)
    merged = fast.merge_and_unload()
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_the_fast_variant_compiles_without_graph_breaks(monkeypatch):
    """torch.compile (aot_eager: no C compiler needed) traces the variant in one graph, with PEFT's gradients."""
    import torch._dynamo as dynamo

    from pipelines import fast_dora

    monkeypatch.setattr(fast_dora, "_FUNCTIONS", None)  # as in a fresh process: enable() must build them
    peft_model, fast = _models()
    fast_dora.enable(fast)
    dynamo.reset()
    dynamo.utils.counters.clear()
    x = torch.randn(5, 3, 16)
    _, want = _loss_and_grads(peft_model, x)
    fast.train()
    fast.zero_grad()
    torch.compile(fast, backend="aot_eager")(x).pow(2).mean().backward()
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6)
