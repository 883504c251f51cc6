"""The language-model helpers every stage shares: load the base, build the training model from an init-cache entry,
tokenize and collate prompt/response rows, teacher-forced logits, losses and perplexity, and quantized loading.

Stages import this module and not each other (init_cache, train, merge_quantize and the monitor jobs all need a base
model, tokenized rows or a quantized load); it imports no stage. Heavy libraries (torch, transformers, peft,
bitsandbytes) are imported inside each function.

Run:  python -c "from pipelines import lm; print(lm.load_base('models/tiny-llama').num_parameters())"
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines import manifest
from pipelines.data import Example

# -- the base and the model a stage trains or evaluates ------------------------------------------------------------


def load_base(base_path: Path, dtype: str = "float32"):
    """Load the base model, with an error that says what to do when the path is wrong."""
    import torch
    from transformers import AutoModelForCausalLM

    base_path = Path(base_path)
    if not (base_path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {base_path} has no config.json; pass the directory of a causal LM saved with "
            f"save_pretrained (the project's own is models/tiny-llama)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    except ValueError as e:
        raise ValueError(f"{base_path} is not a causal language model transformers can load: {e}") from None
    return model


def require_bitsandbytes(base_quant: str) -> None:
    """Fail before any work when a quantized base is asked for on a machine without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"base_quant {base_quant} (QLoRA / QPiSSA) needs bitsandbytes, which is not installed on "
                           f"this machine; pip install bitsandbytes, or use base_quant none (--base-quant none)"
                           ) from None


def _apply_residual(model, entry: Path) -> None:
    import torch
    from safetensors.torch import load_file

    residual_file = Path(entry) / "residual.safetensors"
    if not residual_file.is_file():
        return
    residual = load_file(str(residual_file))
    params = dict(model.named_parameters())
    unknown = sorted(set(residual) - set(params))
    if unknown:
        raise ValueError(f"cached residual has tensors {unknown[:3]} the base lacks; the entry is for another base")
    with torch.no_grad():
        for name, value in residual.items():
            if params[name].shape != value.shape:
                raise ValueError(f"cached residual {name} has shape {tuple(value.shape)}, base has "
                                 f"{tuple(params[name].shape)}; the entry is for another base")
            params[name].copy_(value)


def build_model(base_path: Path, entry: Path, adapter: Path | None = None, trainable: bool = True):
    """Base + an init-cache entry's residual + an adapter (the entry's initial one, or a trained one from it).

    `adapter` is how warm starts work: the champion's native adapter was trained on this same residual.
    An entry with base_quant nf4 gives a bitsandbytes nf4 base (PiSSA: the residual quantized, after the SVD ran in
    full precision) on the CPU, compute dtype float32, with an fp32 adapter; move it with .to(device), never to a dtype.
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    base_quant = manifest.read(entry)["config"].get("base_quant", "none")  # entries from before it: none
    if base_quant == "none":
        model = load_base(base_path)
        _apply_residual(model, entry)
    else:
        require_bitsandbytes(base_quant)
        if not (Path(entry) / "residual.safetensors").is_file():
            model = quantize(Path(base_path), base_quant)
        else:  # bitsandbytes quantizes while loading: save the residual model, load it quantized
            with tempfile.TemporaryDirectory(prefix="adapterops-residual-") as tmp:
                full = load_base(base_path)
                _apply_residual(full, entry)
                full.save_pretrained(tmp)
                del full
                model = quantize(Path(tmp), base_quant)
        if trainable:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, str(adapter or Path(entry) / "initial_adapter"), is_trainable=trainable)


# -- rows: tokenized prompt/response pairs ---------------------------------------------------------------------------


def tokenize(examples: list[Example], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) per example: prompt + response + EOS, truncated to max_len, labels -100 on the prompt
    (response-only loss); an example whose prompt alone takes max_len - 4 tokens or more is dropped."""
    out = []
    for e in examples:
        p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) >= max_len - 4:
            continue
        ids = (p + r)[:max_len]
        labels = ([-100] * len(p) + r)[:max_len]
        out.append((ids, labels))
    if not out:
        raise ValueError(f"every example's prompt is longer than max_len={max_len} tokens; raise max_len")
    return out


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """One example per row, right-padded: (ids, labels, attention mask)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


# -- logits, losses, perplexity --------------------------------------------------------------------------------------


def device_of(model):
    return next(model.parameters()).device


def sequence_logits(model, rows, pad_id: int, batch_size: int = 16):
    """(float32 logits [N, T, V], token mask [N, T], labels [N, T]) of teacher-forced rows, on the model's device."""
    import torch

    ids, labels, mask = (t.to(device_of(model)) for t in collate(rows, pad_id))
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i : i + batch_size], attention_mask=mask[i : i + batch_size])
                            .logits.float() for i in range(0, len(rows), batch_size)])
    return logits, mask.bool(), labels


def response_loss(logits, labels) -> float:
    """Mean response-token NLL from teacher-forced logits (pipelines.train.eval_loss, without a second forward)."""
    import torch

    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                   labels[:, 1:].reshape(-1), ignore_index=-100))


def prompt_logits(model, tokenizer, prompts: list[str]):
    """Logits of right-padded prompts, tokenized exactly as serving.pool.AdapterPool.prompt_logits does."""
    import torch

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right")
    dev = device_of(model)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev)).logits.float()
    return logits, enc.attention_mask.to(dev)


def reference_perplexity(model, tokenizer, text_path: Path, windows: int, width: int = 128) -> float:
    """Perplexity on the tail of a book (held out from the base's pretraining, never in adapter data)."""
    import torch

    text = Path(text_path).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.96):]
    ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = min(windows, (len(ids) - 1) // width)
    if n < 1:
        raise ValueError(f"reference text {text_path} is too short for one {width}-token window")
    batch = torch.stack([ids[i * width : (i + 1) * width + 1] for i in range(n)]).to(device_of(model))
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    return float(torch.exp(nll))


# -- quantized loading -----------------------------------------------------------------------------------------------


def _nf4(dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=getattr(torch, dtype))


def _int8(dtype: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8: its own compute dtype


@dataclass(frozen=True)
class Quantizer:
    """A quantization scheme: how to load a model with it, and the default bounds of its merge gates
    (merge_quantize.GateConfig.quant; a config file may override them)."""

    config: Callable[[str], object]
    """Compute dtype name -> the transformers quantization_config that loads a saved model quantized."""
    kl_mean: float
    """Default bound on the mean per-token KL(merged || quantized), nats."""
    kl_p99: float
    top1: float
    """Default minimum top-1 agreement with the merged model."""


# llama.cpp reports KL ~0.0014 (8-bit) and ~0.031 (4-bit) on LLaMA-3-8B. Small models quantize worse (fewer weights
# share each block's scale): on our 4.2M-parameter base clean merges measure nf4 KL 0.028-0.049 with top-1 0.79-0.91,
# int8 KL ~0.0007 with top-1 0.965-0.978. KL is the primary bound (a few times the clean value, far below a broken
# scale's KL >> 0.5); top-1 bounds sit below the clean spread, since near-ties flip.
QUANTIZERS: dict[str, Quantizer] = {
    "nf4": Quantizer(_nf4, kl_mean=0.08, kl_p99=0.6, top1=0.7),
    "int8": Quantizer(_int8, kl_mean=0.005, kl_p99=0.08, top1=0.93),
}
"""bitsandbytes schemes (both run on the CPU). Adding a scheme is one entry here."""
SCHEMES = (*QUANTIZERS, "none")


class SchemeUnavailable(RuntimeError):
    """A quantization scheme this machine cannot run (bitsandbytes missing)."""


def require_scheme(scheme: str) -> None:
    """Fail before any work when `scheme` cannot run here (bitsandbytes missing)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is not one of {SCHEMES}")
    if scheme == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SchemeUnavailable(f"quantization scheme {scheme} needs bitsandbytes, which is not installed; "
                                f"pip install bitsandbytes or pass --quantize none") from None


def quantize(merged_dir: Path, scheme: str, device: str = "cpu", dtype: str = "float32"):
    """Load a saved model quantized with bitsandbytes (nf4: compute in `dtype`; int8: LLM.int8)."""
    from transformers import AutoModelForCausalLM

    require_scheme(scheme)
    if scheme == "none":
        raise ValueError("quantize() needs a quantization scheme; with 'none' load the model as it is")
    return AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=QUANTIZERS[scheme].config(dtype),
                                                device_map=device)
