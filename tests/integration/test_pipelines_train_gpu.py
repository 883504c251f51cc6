"""The CUDA paths of the init cache and the trainer (bf16 base under autocast, packed rows, fused AdamW): skipped on a
machine without a GPU (CI), run on a lent one with `pytest -m gpu`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.integration, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


def test_layer_by_layer_pissa_init_on_cuda_matches_cpu(tmp_path):
    from safetensors.torch import load_file

    from pipelines.init_cache import InitConfig, compute

    got = {}
    for device in ("cpu", "cuda"):
        out = compute(BASE, InitConfig(method="pissa", rank=8, device=device), tmp_path / device, log=lambda *a: None)
        got[device] = load_file(str(out / "residual.safetensors"))
    assert got["cpu"].keys() == got["cuda"].keys()
    for name, value in got["cpu"].items():
        assert got["cuda"][name].device.type == "cpu"  # stored on the CPU whatever the device
        # cuSOLVER and LAPACK reach the same decomposition by other routes: measured differences reach ~1.2e-4 of
        # the largest weight (H200), from directions whose singular values nearly tie at the rank-r cut
        torch.testing.assert_close(got["cuda"][name], value, rtol=0, atol=1e-3 * float(value.abs().max()))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_packed_training_on_cuda_saves_an_fp32_adapter_that_reloads(method, init_entry, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import lm, train
    from pipelines.data import read_jsonl

    cfg = train.TrainConfig(steps=20, batch_size=2, max_len=256, packing=True, eval_every=20, device="cuda")
    out = train.run(cfg, BASE, init_entry(method), tiny_data.train, tiny_data.val, tmp_path / method,
                    log=lambda *a: None)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["metrics"]["device"], m["metrics"]["precision"]) == ("cuda", "bf16")
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"]
    assert m["metrics"]["padding_fraction"] < 0.1

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    rows = lm.tokenize(read_jsonl(tiny_data.val), AutoTokenizer.from_pretrained(BASE), cfg.max_len)
    fp32_val = train.eval_loss(model, rows, AutoTokenizer.from_pretrained(BASE).pad_token_id)
    # trained and evaluated in bf16 on the GPU, re-evaluated in fp32 on the CPU: close, not equal
    assert fp32_val == pytest.approx(m["metrics"]["val_loss"], rel=0.03)


def test_liger_patches_stay_on_their_model_instance():
    """fast_train.apply_liger patches one model: Liger's own patching also rebinds names in transformers' modeling
    module (RoPE, RMSNorm and MLP classes), after which any model built later in the process, a CPU one too, would
    run Triton kernels. Those names are put back; the patched model keeps Liger's RoPE and computes the same loss."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama as ml

    from pipelines import fast_train

    before = (ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).cuda()
    ids = torch.randint(5, 4000, (2, 64), device="cuda")
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert fast_train.apply_liger(model) is None
    assert (ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP) == before
    attn = model.model.layers[0].self_attn
    assert attn.forward.__func__.__globals__["apply_rotary_pos_emb"] is not before[0]  # Liger's, on this instance
    assert type(model.model.layers[0].input_layernorm).forward is not model.model.layers[0].input_layernorm.forward
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(want, rel=1e-3)
        later = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)  # on the CPU: plain modules
        assert type(later.model.norm) is before[1]
        later(input_ids=ids.cpu())


def test_sync_free_head_loss_matches_cross_entropy_and_never_syncs():
    """fast_train.fused_head_loss (Liger's cross-entropy kernel in our chunk loop): the same sum and gradient as
    torch's cross-entropy over the full logits (ignored targets included), computed without one device-to-host
    sync in its forward or backward; in several chunks of rows it is the same."""
    pytest.importorskip("liger_kernel")
    from pipelines import fast_train

    torch.manual_seed(0)
    head = torch.nn.Linear(256, 5000, bias=False).cuda().to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 5000, (700,), device="cuda")
    target[::7] = -100
    ref_h = hidden.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_h @ head.weight.float().t(), target, reduction="sum")
    (ref / 3).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fast_train.fused_head_loss(head, hidden, target)
        (loss / 3).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=2e-3)
    err = (hidden.grad.float() - ref_h.grad).norm() / ref_h.grad.norm()
    assert float(err) < 2e-2
    budget = fast_train.HEAD_CHUNK_BYTES
    fast_train.HEAD_CHUNK_BYTES = 128 * 5000 * 2  # chunks of 128 rows: 6 chunks, the last one short
    try:
        h2 = hidden.detach().clone().requires_grad_(True)
        chunked = fast_train.fused_head_loss(head, h2, target)
        (chunked / 3).backward()
    finally:
        fast_train.HEAD_CHUNK_BYTES = budget
    assert float(chunked) == pytest.approx(float(loss), rel=1e-4)
    torch.testing.assert_close(h2.grad, hidden.grad)


@pytest.mark.parametrize("method", ["qlora", "qpissa"])
def test_nf4_training_on_cuda(method, init_entry, tiny_data, tmp_path):
    """QLoRA / QPiSSA on the GPU (bitsandbytes nf4 base, bf16 autocast, packed rows, the fast path as run() sets it
    up): the loss falls, the saved adapter is fp32 and, loaded on the full-precision base on the CPU, scores close
    to what training measured on the nf4 base (nf4's own error on the tiny base is a few hundredths of a nat)."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import lm, train
    from pipelines.data import read_jsonl

    cfg = train.TrainConfig(steps=20, batch_size=2, max_len=256, packing=True, eval_every=20, device="cuda")
    logs: list[str] = []
    out = train.run(cfg, BASE, init_entry(method), tiny_data.train, tiny_data.val, tmp_path / method,
                    log=logs.append)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["metrics"]["device"], m["metrics"]["precision"]) == ("cuda", "bf16")
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"]
    assert any("fast path on cuda" in line for line in logs), logs

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    tok = AutoTokenizer.from_pretrained(BASE)
    rows = lm.tokenize(read_jsonl(tiny_data.val), tok, cfg.max_len)
    full_val = train.eval_loss(model, rows, tok.pad_token_id)
    assert full_val == pytest.approx(m["metrics"]["val_loss"], rel=0.1)
