"""Seconds for merge, quantization (nf4, int8) and the gates: `pipelines.merge_quantize.run` end to end.

Run:  python -m bench.run merge_quantize                                  (tiny base on CPU, ~1 min on 2 busy cores)
      python -m bench.run merge_quantize --device cuda --model-size 1b    (~1.1B Llama shape on a GPU; target <= 60 s)

The adapter is a random LoRA (r16, alpha 32, q/k/v/o/gate/up/down; B scaled to 1e-3 of PEFT's random init so the
merged model stays close to its base): timings do not depend on what the adapter learned. `--model-size 1b` builds a
random-weight Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 KV heads,
vocab 32000) in a temp dir, with the tiny base's tokenizer (its 4096 ids are valid in the larger vocab); nothing is
downloaded. Each row is one `run` (hash inputs, reference logits and weight probes, merge + save, quantize + save,
reload and gate) into a fresh output dir; the step seconds come from the run's gates.json. Quantization needs
bitsandbytes; where it is missing those rows are skipped with a note. Needs only torch, transformers, peft (and
safetensors, pyyaml, which they bring): no MLflow, Prefect or bitsandbytes import at module level.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import row, write_result

NAME = "merge_quantize"
REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "models" / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
TARGET_1B_S = 60.0


def build_1b_base(dest: Path, device: str, dtype: str) -> Path:
    """Random-weight Llama of TinyLlama-1.1B's shape, saved (safetensors) with the tiny base's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    config = LlamaConfig(**SHAPE_1B, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    del model
    return dest


def random_lora(base: Path, dest: Path, device: str, rank: int = 16) -> Path:
    """A random LoRA adapter (A and B random, B scaled small) on every linear kind of `base`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipelines.lm import load_base

    torch.manual_seed(1)
    model = load_base(base).to(device)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(1e-3)
    peft_model.save_pretrained(dest)
    del peft_model, model
    return dest


def val_split(dest: Path) -> Path:
    from pipelines import data

    before = data.splits(data.load_bitext(), data.CATEGORIES_BEFORE)
    return data.write_jsonl(data.sample(before["val"], 64, 0), dest)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog=f"python -m bench.run {NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--model-size", default="tiny", choices=["tiny", "1b"],
                   help="tiny: models/tiny-llama; 1b: random-weight TinyLlama-1.1B shape built in a temp dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="merge dtype")
    p.add_argument("--schemes", default="none,nf4,int8", help="comma-separated quantization schemes to time")
    p.add_argument("--repeats", type=int, default=None, help="runs per scheme (default: tiny 3, 1b 1)")
    args = p.parse_args(argv)

    import torch

    from pipelines import lm
    from pipelines import merge_quantize as mq

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    repeats = args.repeats or (3 if args.model_size == "tiny" else 1)
    schemes = args.schemes.split(",")
    for s in schemes:
        if s not in lm.SCHEMES:
            raise SystemExit(f"--schemes: {s!r} is not one of {lm.SCHEMES}")
    d = mq.MergeConfig()
    notes = [f"{args.model_size} base, merge dtype {args.dtype}, device {args.device}; eval {d.eval_examples} "
             f"sequences of <= {d.max_len} tokens, {d.reference_windows} reference "
             f"windows (MergeConfig defaults). Each run writes a fresh output dir (no manifest reuse)."]
    try:
        lm.require_scheme("nf4")  # imports bitsandbytes only here, lazily
    except RuntimeError:
        if any(s != "none" for s in schemes):
            notes.append(f"bitsandbytes is not installed: {', '.join(s for s in schemes if s != 'none')} skipped.")
            schemes = [s for s in schemes if s == "none"]
    rows, quiet = [], (lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        tmp = Path(tmp)
        t = time.time()
        base = TINY_BASE if args.model_size == "tiny" else build_1b_base(tmp / "base-1b", args.device, args.dtype)
        adapter = random_lora(base, tmp / "adapter", args.device)
        val = val_split(tmp / "val.jsonl")
        n_params = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
        print(f"  setup {time.time() - t:.1f}s (base {n_params / 2**20:.0f} MiB on disk)", flush=True)
        if args.device.startswith("cuda"):
            torch.ones(1, device=args.device).sum().item()  # CUDA context outside the timings
        if args.model_size == "tiny":  # imports and first-touch allocations outside the timings
            mq.run(mq.MergeConfig(quantize="none", dtype=args.dtype, device=args.device), base, adapter, val,
                   tmp / "warmup", log=quiet)
        for scheme in schemes:
            cfg = mq.MergeConfig(quantize=scheme, dtype=args.dtype, device=args.device)
            total, steps, verdicts = [], {}, []
            for i in range(repeats):
                out = tmp / f"out-{scheme}-{i}"
                t = time.time()
                try:
                    mq.run(cfg, base, adapter, val, out, log=quiet)
                    verdicts.append("pass")
                except mq.GateFailed as e:
                    verdicts.append("FAIL: " + ", ".join(g["name"] for g in e.report["gates"] if not g["passed"]))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                total.append(time.time() - t)
                for k, v in json.loads((out / "gates.json").read_text())["seconds"].items():
                    steps.setdefault(k, []).append(v)
                shutil.rmtree(out)
            label = f"{args.model_size} {args.device} {args.dtype}"
            rows.append(row(f"{label}: run end to end, quantize {scheme}", total, gates=verdicts[-1]))
            for k, v in steps.items():
                rows.append(row(f"{label}: step {k} (quantize {scheme})", v))
            print(f"  {scheme}: end to end {min(total):.1f}s; " +
                  ", ".join(f"{k} {min(v):.1f}s" for k, v in steps.items()) + f"; gates {verdicts[-1]}", flush=True)
    ratios = []
    if args.model_size == "1b":
        e2e = [r for r in rows if "end to end" in r["case"]]
        ratios = [{"ratio": f"{r['case']} / {TARGET_1B_S:.0f} s target", "value": round(r["median_s"] / TARGET_1B_S, 3),
                   "note": "<= 1 meets the issue's target"} for r in e2e]
    notes.append("Steps: reference = load base, reference perplexity, unmerged logits, golden logits and identity "
                 "probes of every adapted linear; merge = load + merge_and_unload + save; quantize = bitsandbytes load "
                 "+ save; gates = reload what was saved and compare. End to end adds hashing the inputs.")
    result = {"title": "Merge, quantize and gates: seconds",
              "description": "`pipelines.merge_quantize.run` with a random LoRA r16 on all linear kinds.",
              "command": " ".join(["python -m bench.run", NAME, *(argv or [])]),
              "rows": rows, "ratios": ratios, "notes": notes}
    name = NAME if args.model_size == "tiny" and not args.device.startswith("cuda") else f"{NAME}_{args.model_size}_gpu"
    path = write_result(name, result)
    print(f"  wrote {path}")
    return result
