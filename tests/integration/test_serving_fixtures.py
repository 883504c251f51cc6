"""Shared pieces of the serving integration tests: real LoRA adapters on the tiny base, a running server."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "models" / "tiny-llama"
PROMPTS = ["### Customer: where is my order?\n### Agent:", "### Customer: I want a refund\n### Agent:",
           "### Customer: hi\n### Agent:"]


def make_adapter(dest: Path, seed: int, std: float = 0.2) -> Path:
    """A real PEFT LoRA adapter on the tiny base, with random non-zero lora_B (so it changes the outputs)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(dest)
    return dest


def scaled_copy(src: Path, dest: Path, factor: float) -> Path:
    """The same adapter with lora_B scaled: a planted train/serve mismatch."""
    shutil.copytree(src, dest)
    f = dest / "adapter_model.safetensors"
    tensors = {k: (v * factor if "lora_B" in k else v) for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f))
    return dest


def training_side_logits(adapter_dir: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits as a training run would compute them: its own base + PeftModel, right-padded prompts."""
    tok = AutoTokenizer.from_pretrained(BASE)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(adapter_dir)).eval()
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.float(), batch.attention_mask


def register_version(reg, family: str, adapter_dir: Path, golden: bool = True) -> str:
    """Register a real adapter (with golden logits next to it, so the parity check runs) as a new version of
    `family` in a real MLflow registry; returns the version."""
    from registry.hashing import model_weights_hash
    from serving.parity import GOLDEN_FILE, save_golden

    if golden and not (adapter_dir / GOLDEN_FILE).is_file():
        save_golden(adapter_dir / GOLDEN_FILE, PROMPTS, *training_side_logits(adapter_dir, PROMPTS))
    run_id = reg.create_run("serving-tests")
    return reg.register(family, run_id, {"adapter": adapter_dir}, {"base_sha256": model_weights_hash(BASE)},
                        True).version


@contextlib.contextmanager
def running(app):
    from serving.app import BackgroundServer

    server = BackgroundServer(app)
    url = server.start(timeout=30)
    try:
        yield url
    finally:
        server.stop()
