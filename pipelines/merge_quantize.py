"""Stage 3, merge and quantize behind logit regression gates.

Run:  adapterops merge --base models/tiny-llama --adapter RUN/adapter --quantize nf4 --out DIR --report-json F

Gates (one implementation, `monitoring.logit_stats.compare_logits`, shared with the serving parity check), all on
teacher-forced validation sequences:
- merged vs unmerged: cosine, max-abs difference (dtype-aware tolerance), top-1 agreement;
- quantized vs merged: mean and p99 per-token KL and top-1 agreement, thresholds per scheme;
- forgetting: perplexity of the merged model on a reference text no adapter trains on, vs the base;
- task: validation loss of the merged model within epsilon of the unmerged adapter's.
A failing gate raises GateFailed after writing the report: the version is blocked.

Output: merged/ (safetensors + tokenizer), quantized/ (bitsandbytes, reloadable), golden/parity_golden.safetensors
(the unmerged adapter's logits on fixed prompts, stored with the version: serving's parity check and later rebuilds
compare against them), gates.json, gates.md, manifest.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines import manifest
from pipelines.data import REFERENCE_TEXT, read_jsonl

SCHEMES = ("nf4", "int8", "none")


@dataclass
class QuantThresholds:
    kl_mean: float
    """Mean per-token KL(merged || quantized), nats."""
    kl_p99: float
    top1: float
    """Minimum top-1 agreement with the merged model."""


def _default_quant() -> dict[str, QuantThresholds]:
    # llama.cpp reports KL ~0.0014 (8-bit) and ~0.031 (4-bit) on LLaMA-3-8B. Small models quantize worse (fewer
    # weights share each block's scale): on our 4.2M-parameter base clean merges measure nf4 KL 0.028-0.049 with
    # top-1 0.79-0.91, int8 KL ~0.0007 with top-1 0.965-0.978. KL is the primary bound (a few times the clean value,
    # far below a broken scale's KL >> 0.5); top-1 bounds sit below the clean spread, since near-ties flip.
    return {"nf4": QuantThresholds(kl_mean=0.08, kl_p99=0.6, top1=0.7),
            "int8": QuantThresholds(kl_mean=0.005, kl_p99=0.08, top1=0.93)}


@dataclass
class GateConfig:
    merged_min_cosine: float = 0.99999
    merged_max_abs_fp32: float = 1e-3
    """Merging changes only summation order: fp32 differences stay ~1e-5 on logits of magnitude ~10."""
    merged_max_abs_bf16: float = 0.25
    merged_min_top1: float = 0.995
    """Not 1.0: exact ties between the top two logits may flip under rounding."""
    quant: dict[str, QuantThresholds] = field(default_factory=_default_quant)
    forgetting_max_rise: float = 0.05
    """Reference-text perplexity of the merged model may exceed the base's by at most this fraction."""
    task_max_delta: float = 0.01
    """|val loss(merged) - val loss(unmerged adapter)| in nats."""
    old_task_max_rise: float = 0.1
    """Retraining only: val loss on the OLD categories may exceed the champion's by at most this fraction."""


@dataclass
class MergeConfig:
    quantize: str = "nf4"
    """nf4 | int8 | none (bitsandbytes; both run on CPU)."""
    dtype: str = "float32"
    """Merge dtype: float32 or bfloat16."""
    eval_examples: int = 32
    """Validation sequences the gates compare logits on."""
    golden_prompts: int = 16
    """Prompts whose logits are stored with the version (regression + serving parity)."""
    max_len: int = 128
    reference_windows: int = 24
    """128-token windows of the reference text for the forgetting check."""
    gates: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.quantize not in SCHEMES:
            raise ValueError(f"quantize {self.quantize!r} is not one of {SCHEMES}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32 or bfloat16")
        if self.eval_examples < 1 or self.golden_prompts < 1:
            raise ValueError("eval_examples and golden_prompts must be >= 1")


class GateFailed(RuntimeError):
    def __init__(self, report: dict, path: Path | None = None):
        failed = [g for g in report["gates"] if not g["passed"]]
        msg = "; ".join(f"{g['name']} = {g['value']:.6g} (threshold {g['op']} {g['threshold']})" for g in failed)
        super().__init__(f"merge gates failed: {msg}" + (f"; report: {path}" if path else ""))
        self.report = report


def _gate(name: str, value: float, op: str, threshold: float) -> dict:
    ok = value >= threshold if op == ">=" else value <= threshold
    if isinstance(value, float) and math.isnan(value):
        ok = False
    return {"name": name, "value": float(value), "op": op, "threshold": threshold, "passed": bool(ok)}


def _sequence_logits(model, rows, pad_id: int):
    import torch

    from pipelines.train import collate

    ids, labels, mask = collate(rows, pad_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return logits, mask.bool()


def reference_perplexity(model, tokenizer, text_path: Path, windows: int, width: int = 128) -> float:
    """Perplexity on the tail of a book (held out from the base's pretraining, never in adapter data)."""
    import torch

    text = Path(text_path).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.96):]
    ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = min(windows, (len(ids) - 1) // width)
    if n < 1:
        raise ValueError(f"reference text {text_path} is too short for one {width}-token window")
    batch = torch.stack([ids[i * width : (i + 1) * width + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def quantize(merged_dir: Path, scheme: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"quantization scheme {scheme} needs bitsandbytes, which is not installed; "
                           f"pip install bitsandbytes or pass --quantize none") from None
    if scheme == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=qc, device_map="cpu")


def write_report_md(report: dict, kl_hist: dict | None, path: Path) -> None:
    lines = [f"# Gate report: {report['adapter']}", "", f"Verdict: **{'PASS' if report['passed'] else 'FAIL'}**", "",
             "| gate | value | threshold | verdict |", "|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.6g} | {g['op']} {g['threshold']} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} |")
    if kl_hist:
        lines += ["", f"Per-token KL(merged || {report['quantize']}) histogram:", "", "```"]
        peak = max(kl_hist["counts"]) or 1
        for lo, c in zip(kl_hist["edges"], kl_hist["counts"]):
            lines.append(f">= {lo:8.4f} | {'#' * round(40 * c / peak):40s} {c}")
        lines.append("```")
    path.write_text("\n".join(lines) + "\n")


def run(cfg: MergeConfig, base_path: Path, adapter_dir: Path, val_data: Path, out: Path,
        reference_text: Path = REFERENCE_TEXT, old_val_data: Path | None = None,
        champion_adapter: Path | None = None, log=print) -> Path:
    """Merge, quantize, gate. Returns `out`; raises GateFailed (report written to `out`) when a gate fails.

    With `old_val_data` and `champion_adapter` (retraining), a forgetting gate on the old categories is added: on the
    same old-category validation rows, the merged model's loss may not exceed the champion's by more than the bound.
    """
    import torch
    from monitoring.logit_stats import compare_logits
    from peft import PeftConfig, PeftModel
    from registry.hashing import model_weights_hash, sha256_file, tree_hash
    from serving.parity import GOLDEN_FILE, save_golden
    from transformers import AutoTokenizer

    from pipelines.init_cache import load_base
    from pipelines.train import eval_loss, tokenize

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    inputs = {"base_sha256": model_weights_hash(Path(base_path)), "adapter_sha256": tree_hash(adapter_dir),
              "val_sha256": sha256_file(Path(val_data)), "reference_sha256": sha256_file(Path(reference_text)),
              "old_val_sha256": sha256_file(Path(old_val_data)) if old_val_data else None,
              "champion_adapter_sha256": tree_hash(Path(champion_adapter)) if champion_adapter else None}
    if (old_val_data is None) != (champion_adapter is None):
        raise ValueError("old_val_data and champion_adapter go together: pass both (retraining) or neither")
    config = asdict(cfg)
    fp = manifest.fingerprint("merged", config, inputs)
    if (existing := manifest.reusable(out, "merged", fp)) is not None:
        log(f"merge: {out} already holds this merge (manifest matches); reusing it")
        if not existing["gates_passed"]:
            raise GateFailed(json.loads((Path(out) / "gates.json").read_text()), Path(out) / "gates.json")
        return Path(out)
    t0 = time.time()
    seconds = {}
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad = tokenizer.pad_token_id
    examples = read_jsonl(Path(val_data))
    rows = tokenize(examples[: cfg.eval_examples], tokenizer, cfg.max_len)
    golden_prompts = [e.prompt for e in examples[: cfg.golden_prompts]]

    base = load_base(Path(base_path), cfg.dtype)
    base_ppl = reference_perplexity(base, tokenizer, reference_text, cfg.reference_windows)
    PeftConfig.from_pretrained(str(adapter_dir))  # clear error for a malformed config before touching weights
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as e:
        raise ValueError(f"adapter {adapter_dir} does not fit base {base_path} (shapes differ): {e}") from None
    model.eval()
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"adapter {adapter_dir} has non-finite values in {n}; it cannot be merged")
    unmerged_logits, mask = _sequence_logits(model, rows, pad)
    unmerged_val = eval_loss(model, rows, pad)
    # tokenized exactly as serving.pool.AdapterPool.prompt_logits does, so the parity check compares like with like
    enc = tokenizer(golden_prompts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        golden_logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.float()
    seconds["load_and_reference"] = time.time() - t0

    t = time.time()
    merged = model.merge_and_unload()
    merged.eval()
    seconds["merge"] = time.time() - t
    merged_logits, _ = _sequence_logits(merged, rows, pad)
    merged_val = eval_loss(merged, rows, pad)
    merged_ppl = reference_perplexity(merged, tokenizer, reference_text, cfg.reference_windows)
    g = cfg.gates
    mv = compare_logits(unmerged_logits, merged_logits, mask)
    gates = [
        _gate("merged_cosine", mv.cosine, ">=", g.merged_min_cosine),
        _gate("merged_max_abs", mv.max_abs, "<=",
              g.merged_max_abs_fp32 if cfg.dtype == "float32" else g.merged_max_abs_bf16),
        _gate("merged_top1", mv.top1_agreement, ">=", g.merged_min_top1),
        _gate("forgetting_ppl_rise", merged_ppl / base_ppl - 1, "<=", g.forgetting_max_rise),
        _gate("task_val_loss_delta", abs(merged_val - unmerged_val), "<=", g.task_max_delta),
    ]
    if old_val_data is not None:
        old_rows = tokenize(read_jsonl(Path(old_val_data))[: cfg.eval_examples * 4], tokenizer, cfg.max_len)
        old_loss = eval_loss(merged, old_rows, pad)
        champion = PeftModel.from_pretrained(load_base(Path(base_path), cfg.dtype), str(champion_adapter)).eval()
        champion_loss = eval_loss(champion, old_rows, pad)
        del champion
        gates.append(_gate("old_categories_loss_rise", old_loss / champion_loss - 1, "<=", g.old_task_max_rise))
    kl_hist = None
    with manifest.staging(out) as tmp:
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
        if cfg.quantize != "none":
            t = time.time()
            qmodel = quantize(tmp / "merged", cfg.quantize)
            seconds["quantize"] = time.time() - t
            q_logits, _ = _sequence_logits(qmodel, rows, pad)
            qv = compare_logits(merged_logits, q_logits, mask)
            th = g.quant[cfg.quantize]
            gates += [_gate(f"{cfg.quantize}_kl_mean", qv.kl_mean, "<=", th.kl_mean),
                      _gate(f"{cfg.quantize}_kl_p99", qv.kl_p99, "<=", th.kl_p99),
                      _gate(f"{cfg.quantize}_top1", qv.top1_agreement, ">=", th.top1)]
            la, lq = merged_logits[mask].log_softmax(-1), q_logits[mask].log_softmax(-1)
            kl = (la.exp() * (la - lq)).sum(-1).clamp_min(0)
            counts, edges = torch.histogram(kl, bins=12)
            kl_hist = {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges[:-1]]}
            qmodel.save_pretrained(tmp / "quantized")
            tokenizer.save_pretrained(tmp / "quantized")
        (tmp / "golden").mkdir()
        save_golden(tmp / "golden" / GOLDEN_FILE, golden_prompts, golden_logits, enc.attention_mask)
        report = {"adapter": str(adapter_dir), "quantize": cfg.quantize, "passed": all(x["passed"] for x in gates),
                  "gates": gates, "measured": {"merged_vs_unmerged": mv.as_dict(), "base_reference_ppl": base_ppl,
                                               "merged_reference_ppl": merged_ppl, "unmerged_val_loss": unmerged_val,
                                               "merged_val_loss": merged_val},
                  "kl_histogram": kl_hist, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        (tmp / "gates.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report_md(report, kl_hist, tmp / "gates.md")
        manifest.write(tmp, "merged", config, inputs, gates_passed=report["passed"], gates=gates,
                       adapter_path=str(adapter_dir), base_path=str(base_path))
    verdict = "PASS" if report["passed"] else "FAIL"
    summary = ", ".join(f"{x['name']}={x['value']:.4g}" for x in gates)
    log(f"merge: gates {verdict} ({summary})")
    if not report["passed"]:
        raise GateFailed(report, Path(out) / "gates.json")
    return Path(out)
