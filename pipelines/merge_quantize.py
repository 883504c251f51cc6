"""Stage 3, merge and quantize behind logit regression gates.

Run:  adapterops merge --base models/tiny-llama --adapter RUN/adapter --quantize nf4 --out DIR --report-json F

The gates judge what ships: the merged/ and quantized/ directories are written first, loaded back from disk, and
compared with the reference, i.e. what was trained (the PEFT adapter applied on the fly to the base it was trained
on) and, for a rebuild, the golden logits stored with the version. One implementation (`verify`) serves the pipeline
(`run`), re-checking an existing output, and the planted-regression tests. On teacher-forced validation sequences:
- merged vs unmerged: cosine, max-abs difference (dtype-aware tolerance), top-1 agreement (logits), and every merged
  weight against the weight the trained adapter implies (each adapted linear probed through the unmerged PEFT
  module with the identity matrix, every other tensor equal to the base's);
- quantized vs merged: mean and p99 per-token KL and top-1 agreement, thresholds per scheme;
- forgetting: perplexity of the merged model on a reference text no adapter trains on, vs the base;
- task: validation loss of the merged model within epsilon of the unmerged adapter's;
- golden (rebuilds, `expect_golden`): the merged model's logits on the version's stored golden prompts.
Logit comparisons are monitoring.logit_stats.compare_logits / serving.parity.compare_to_golden, the same code as the
serving parity check. A failing gate raises GateFailed after writing the report: the version is blocked.

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

from pipelines import lm, manifest
from pipelines.data import REFERENCE_TEXT, DataError, read_jsonl

WEIGHT_GATE = "merged_weights_max_rel"


@dataclass
class QuantThresholds:
    kl_mean: float
    """Mean per-token KL(merged || quantized), nats."""
    kl_p99: float
    top1: float
    """Minimum top-1 agreement with the merged model."""


def _default_quant() -> dict[str, QuantThresholds]:
    """Each quantizer's default bounds (pipelines.lm.QUANTIZERS, where they are justified)."""
    return {name: QuantThresholds(kl_mean=q.kl_mean, kl_p99=q.kl_p99, top1=q.top1) for name, q in lm.QUANTIZERS.items()}


@dataclass
class GateConfig:
    merged_min_cosine: float = 0.99999
    merged_max_abs_fp32: float = 1e-3
    """Merging changes only summation order: fp32 differences stay ~1e-5 on logits of magnitude ~10."""
    merged_max_abs_bf16: float = 0.25
    merged_min_top1_fp32: float = 0.995
    """Not 1.0: exact ties between the top two logits may flip under rounding."""
    merged_min_top1_bf16: float = 0.97
    """bf16 rounding moves logits by up to ~0.1-0.25, and many positions of a small model have top-2 gaps below
    that: clean bf16 merges of every method measured top-1 agreement 0.982-0.992 on the tiny base (0.995 rejected
    all of them). Real regressions (a dropped module, a sign flip, a wrong base) fall far lower, and the weight gate
    still bounds the merge itself."""
    merged_weight_rel_fp32: float = 1e-5
    """Per tensor, max |shipped merged weight - weight the trained adapter implies| / max |implied weight|. A correct
    fp32 merge differs from the probed map only by summation order: clean merges of every method measure <= 6e-8 on
    the tiny base (about 1 ulp), so 1e-5 (~80 ulps) leaves two orders of margin. It is the gate that sees a 1% error
    in ONE adapter weight (~3e-5..1e-3 here), which moves logits by 3e-5..8e-4, below merged_max_abs_fp32."""
    merged_weight_rel_bf16: float = 0.02
    """bf16 keeps 8 significant bits: one rounding of a weight is up to 2^-8 = 0.4% of it, so a correct bf16 merge
    differs from the probed map by a few ulps of the largest weight; 0.02 is ~5 ulps. A 1% change of one adapter
    weight is below bf16 resolution and cannot be told from rounding."""
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
    device: str = "cpu"
    """Where to merge and evaluate (cpu, cuda, cuda:1); not part of the output's fingerprint (results agree to
    rounding, and the gates judge them either way)."""

    def __post_init__(self) -> None:
        if self.quantize not in lm.SCHEMES:
            raise ValueError(f"quantize {self.quantize!r} is not one of {lm.SCHEMES}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32 or bfloat16")
        if self.eval_examples < 1 or self.golden_prompts < 1:
            raise ValueError("eval_examples and golden_prompts must be >= 1")

    def fingerprint_config(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "device"}


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


# -- the reference: what was trained ------------------------------------------------------------------------------

@dataclass
class Reference:
    """What the trained adapter computes on the base it was trained on; every gate compares an artifact with it."""

    rows: list
    """Tokenized validation rows (teacher-forced) the logit gates run on."""
    logits: object
    mask: object
    val_loss: float
    base_ppl: float
    golden_prompts: list[str]
    golden_logits: object
    golden_mask: object
    weights: dict
    """Merged-model parameter name -> the weight the trained adapter implies (probed, or the base's)."""
    reference_text: Path
    old_rows: list | None = None
    champion_old_loss: float | None = None


def _check_inputs(base_path: Path, adapter_dir: Path, val_data: Path, reference_text: Path) -> list:
    """Validate what the merge reads, before any model is loaded; returns the validation examples."""
    from registry.hashing import model_weights_hash

    from registry.binding import check_binding

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    check_adapter_files(adapter_dir)
    try:
        examples = read_jsonl(Path(val_data))
    except UnicodeDecodeError as e:
        raise DataError(f"the gates' prompt set {val_data} is not UTF-8 text (byte at offset {e.start}); pass --val "
                        "a UTF-8 prompt/response JSONL") from None
    except DataError as e:
        raise DataError(f"the gates' prompt set is unusable: {e}; pass --val a prompt/response JSONL (the training "
                        f"run's validation split)") from None
    if not examples:
        raise DataError(f"the gates' prompt set {val_data} holds no examples; pass --val a non-empty prompt/response "
                        f"JSONL (the training run's validation split)")
    if not Path(reference_text).is_file():
        raise FileNotFoundError(f"reference text {reference_text} (forgetting gate) does not exist")
    have = model_weights_hash(Path(base_path))
    if check_binding(adapter_dir, have, "merge") is not None:
        return examples  # the binding inside the directory is authoritative
    trained = adapter_dir.parent / manifest.MANIFEST  # an old training output: adapter/ next to its manifest.json
    if trained.is_file():
        try:
            m = json.loads(trained.read_text())
        except ValueError:
            raise ValueError(f"{trained} (the training manifest beside the adapter) is not valid JSON; restore the "
                             "training output") from None
        want = m.get("inputs", {}).get("base_sha256") if m.get("kind") == "adapter" else None
        if want and want != have:
            raise ValueError(f"adapter {adapter_dir} was trained on base sha256:{want[:12]} (its {trained}), but "
                             f"{base_path} is sha256:{have[:12]}; merge it into the base it was trained on")
    return examples


def check_adapter_files(adapter_dir: Path) -> None:
    """adapter_config.json is a JSON object and every *.safetensors file has a readable header, before any model is
    built (PEFT would fail deep inside with a bare JSON or safetensors error)."""
    from safetensors import SafetensorError, safe_open

    cfg_path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not a valid adapter config ({' '.join(str(e).split())[:120]}); restore "
                         "the adapter directory from its training output") from None
    weights = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{adapter_dir} holds no *.safetensors weights; pass a saved PEFT adapter directory")
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{w} is not readable safetensors ({' '.join(str(e).split())[:120]}): truncated or "
                             "damaged; restore the adapter directory from its training output") from None


def _expected_weights(peft_model) -> dict:
    """Merged-model parameter name -> the weight the unmerged adapter implies.

    Each adapted linear is probed with the identity matrix through the unmerged PEFT module (its own forward: LoRA,
    rsLoRA scaling, DoRA's magnitude normalisation), so the reference does not share code with the merge. Every
    other tensor must be the base's.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    adapted = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    with torch.no_grad():
        for name, module in adapted.items():
            base = module.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                raise ValueError(f"adapted layer {name} is a {type(base).__name__}; only nn.Linear layers are merged")
            eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
            zero = torch.zeros(1, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
            out[f"{name}.weight"] = (module(eye) - module(zero)).T.contiguous()  # y = x W^T + b
        for pname, p in inner.named_parameters():
            owner = next((n for n in adapted if pname.startswith(f"{n}.")), None)
            if owner is None:
                out[pname] = p.detach()
            elif pname == f"{owner}.base_layer.bias":
                out[f"{owner}.bias"] = p.detach()
    return out


def reference(cfg: MergeConfig, base_path: Path, adapter_dir: Path, examples: list, tokenizer,
              reference_text: Path = REFERENCE_TEXT, old_val_data: Path | None = None,
              champion_adapter: Path | None = None) -> Reference:
    """Run the trained adapter, unmerged, on the gates' inputs (refuses NaN weights and a base it does not fit)."""
    import torch
    from peft import PeftConfig, PeftModel

    pad = tokenizer.pad_token_id
    rows = lm.tokenize(examples[: cfg.eval_examples], tokenizer, cfg.max_len)
    base = lm.load_base(Path(base_path), cfg.dtype).to(cfg.device).eval()
    base_ppl = lm.reference_perplexity(base, tokenizer, reference_text, cfg.reference_windows)
    PeftConfig.from_pretrained(str(adapter_dir))  # clear error for a malformed config before touching weights
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"adapter {adapter_dir} does not fit base {base_path} (shapes or module names differ): "
                         f"{e}") from None
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            what = f"adapter {adapter_dir}" if "lora_" in n else f"base {base_path}"
            raise ValueError(f"{what} has non-finite values in {n}; it cannot be merged")
    logits, mask, labels = lm.sequence_logits(model, rows, pad)
    golden_prompts = [e.prompt for e in examples[: cfg.golden_prompts]]
    golden_logits, golden_mask = lm.prompt_logits(model, tokenizer, golden_prompts)
    ref = Reference(rows=rows, logits=logits, mask=mask, val_loss=lm.response_loss(logits, labels), base_ppl=base_ppl,
                    golden_prompts=golden_prompts, golden_logits=golden_logits, golden_mask=golden_mask,
                    weights=_expected_weights(model), reference_text=Path(reference_text))
    del model, base
    if old_val_data is not None:
        ref.old_rows = lm.tokenize(read_jsonl(Path(old_val_data))[: cfg.eval_examples * 4], tokenizer, cfg.max_len)
        champion = PeftModel.from_pretrained(lm.load_base(Path(base_path), cfg.dtype).to(cfg.device),
                                             str(champion_adapter)).eval()
        old_logits, _, old_labels = lm.sequence_logits(champion, ref.old_rows, pad)
        ref.champion_old_loss = lm.response_loss(old_logits, old_labels)
        del champion, old_logits
    return ref


# -- the artifact: what ships ---------------------------------------------------------------------------------------

def build(cfg: MergeConfig, base_path: Path, adapter_dir: Path, dest: Path, tokenizer) -> dict[str, float]:
    """Merge `adapter_dir` into the base and write dest/merged (and dest/quantized); returns seconds per step."""
    from peft import PeftModel

    seconds = {}
    t = time.time()
    base = lm.load_base(Path(base_path), cfg.dtype).to(cfg.device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    merged.save_pretrained(dest / "merged", safe_serialization=True)
    tokenizer.save_pretrained(dest / "merged")
    del merged, base
    seconds["merge"] = time.time() - t
    if cfg.quantize != "none":
        t = time.time()
        qmodel = lm.quantize(dest / "merged", cfg.quantize, cfg.device, cfg.dtype)
        qmodel.save_pretrained(dest / "quantized")
        tokenizer.save_pretrained(dest / "quantized")
        del qmodel
        seconds["quantize"] = time.time() - t
    return seconds


def _weight_gate(shipped, expected: dict) -> tuple[float, str | None]:
    """(worst max|shipped - expected| / max|expected| over tensors, where); inf for missing, extra or reshaped ones."""
    worst, where = 0.0, None
    params = dict(shipped.named_parameters())
    for name in sorted(set(params) | set(expected)):
        if name not in params or name not in expected or params[name].shape != expected[name].shape:
            return float("inf"), name
        a, e = params[name].detach().float(), expected[name].float()
        rel = float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))
        if not math.isfinite(rel):
            return float("inf"), name
        if rel > worst:
            worst, where = rel, name
    return worst, where


def verify(cfg: MergeConfig, ref: Reference, artifact: Path, tokenizer, expect_golden: Path | None = None) -> dict:
    """Gate the artifact in `artifact` (merged/, quantized/ when cfg.quantize != none) against the reference.

    Loads what ships from disk. `expect_golden`: a version's stored golden logits that the merged model must reproduce
    (a rebuild of the same version). Returns {"gates", "measured", "kl_histogram", "seconds"}; writes nothing.
    """
    import torch
    from monitoring.logit_stats import compare_logits
    from serving.parity import compare_to_golden, load_golden
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    g, pad = cfg.gates, tokenizer.pad_token_id
    fp32 = cfg.dtype == "float32"
    merged = AutoModelForCausalLM.from_pretrained(artifact / "merged", dtype=getattr(torch, cfg.dtype))
    merged = merged.to(cfg.device).eval()
    weight_rel, weight_where = _weight_gate(merged, ref.weights)
    merged_logits, _, labels = lm.sequence_logits(merged, ref.rows, pad)
    merged_ppl = lm.reference_perplexity(merged, tokenizer, ref.reference_text, cfg.reference_windows)
    mv = compare_logits(ref.logits, merged_logits, ref.mask)
    merged_val = lm.response_loss(merged_logits, labels)
    gates = [
        _gate("merged_cosine", mv.cosine, ">=", g.merged_min_cosine),
        _gate("merged_max_abs", mv.max_abs, "<=", g.merged_max_abs_fp32 if fp32 else g.merged_max_abs_bf16),
        _gate("merged_top1", mv.top1_agreement, ">=", g.merged_min_top1_fp32 if fp32 else g.merged_min_top1_bf16),
        _gate(WEIGHT_GATE, weight_rel, "<=", g.merged_weight_rel_fp32 if fp32 else g.merged_weight_rel_bf16),
        _gate("forgetting_ppl_rise", merged_ppl / ref.base_ppl - 1, "<=", g.forgetting_max_rise),
        _gate("task_val_loss_delta", abs(merged_val - ref.val_loss), "<=", g.task_max_delta),
    ]
    measured = {"merged_vs_unmerged": mv.as_dict(), "merged_weights_worst_tensor": weight_where,
                "base_reference_ppl": ref.base_ppl, "merged_reference_ppl": merged_ppl,
                "unmerged_val_loss": ref.val_loss, "merged_val_loss": merged_val}
    if ref.old_rows is not None:
        old_logits, _, old_labels = lm.sequence_logits(merged, ref.old_rows, pad)
        old_loss = lm.response_loss(old_logits, old_labels)
        del old_logits
        gates.append(_gate("old_categories_loss_rise", old_loss / ref.champion_old_loss - 1, "<=",
                           g.old_task_max_rise))
        measured.update(old_categories_loss=old_loss, champion_old_categories_loss=ref.champion_old_loss)
    if expect_golden is not None:
        golden = load_golden(Path(expect_golden))
        logits, mask = lm.prompt_logits(merged, tokenizer, golden.prompts)
        gc = compare_to_golden(golden.logits, golden.mask, logits, mask, g.merged_min_cosine,
                               g.merged_max_abs_fp32 if fp32 else g.merged_max_abs_bf16,
                               g.merged_min_top1_fp32 if fp32 else g.merged_min_top1_bf16)
        if "cosine" not in gc:  # another tokenizer / prompt set: nothing comparable, the rebuild does not match
            gc.update(cosine=-1.0, max_abs=float("inf"), top1_agreement=0.0)
        gates += [_gate("golden_cosine", gc["cosine"], ">=", g.merged_min_cosine),
                  _gate("golden_max_abs", gc["max_abs"], "<=", gc["thresholds"]["max_abs"]),
                  _gate("golden_top1", gc["top1_agreement"], ">=", gc["thresholds"]["min_top1"])]
        measured["golden"] = {"path": str(expect_golden), **{k: v for k, v in gc.items() if k != "thresholds"}}
    kl_hist = None
    if cfg.quantize != "none":
        qmodel = AutoModelForCausalLM.from_pretrained(artifact / "quantized", device_map=cfg.device)  # what ships
        q_logits, _, _ = lm.sequence_logits(qmodel, ref.rows, pad)
        del qmodel
        qv = compare_logits(merged_logits, q_logits, ref.mask)
        th = g.quant[cfg.quantize]
        gates += [_gate(f"{cfg.quantize}_kl_mean", qv.kl_mean, "<=", th.kl_mean),
                  _gate(f"{cfg.quantize}_kl_p99", qv.kl_p99, "<=", th.kl_p99),
                  _gate(f"{cfg.quantize}_top1", qv.top1_agreement, ">=", th.top1)]
        measured[f"{cfg.quantize}_vs_merged"] = qv.as_dict()
        la, lq = merged_logits[ref.mask].log_softmax(-1), q_logits[ref.mask].log_softmax(-1)
        kl = (la.exp() * (la - lq)).sum(-1).clamp_min(0).cpu()
        counts, edges = torch.histogram(kl, bins=12)
        kl_hist = {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges[:-1]]}
    return {"gates": gates, "measured": measured, "kl_histogram": kl_hist, "seconds": {"gates": time.time() - t0}}


def check(cfg: MergeConfig, base_path: Path, adapter_dir: Path, val_data: Path, artifact: Path,
          reference_text: Path = REFERENCE_TEXT, expect_golden: Path | None = None) -> dict:
    """Re-gate an existing output directory (or any dir with merged/ and quantized/) against the trained adapter.

    What the planted-regression suite runs after corrupting an artifact; returns the report dict (see `verify`) plus
    "passed". The version's own golden logits (artifact/golden/) are compared unless `expect_golden` names others.
    """
    from serving.parity import GOLDEN_FILE
    from transformers import AutoTokenizer

    adapter_dir, artifact = Path(adapter_dir), Path(artifact)
    examples = _check_inputs(Path(base_path), adapter_dir, Path(val_data), Path(reference_text))
    if expect_golden is None and (artifact / "golden" / GOLDEN_FILE).is_file():
        expect_golden = artifact / "golden" / GOLDEN_FILE
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ref = reference(cfg, Path(base_path), adapter_dir, examples, tokenizer, reference_text)
    report = verify(cfg, ref, artifact, tokenizer, expect_golden)
    return {"passed": all(x["passed"] for x in report["gates"]), **report}


def run(cfg: MergeConfig, base_path: Path, adapter_dir: Path, val_data: Path, out: Path,
        reference_text: Path = REFERENCE_TEXT, old_val_data: Path | None = None,
        champion_adapter: Path | None = None, expect_golden: Path | None = None, log=print) -> Path:
    """Merge, quantize, gate. Returns `out`; raises GateFailed (report written to `out`) when a gate fails.

    With `old_val_data` and `champion_adapter` (retraining), a forgetting gate on the old categories is added: on the
    same old-category validation rows, the merged model's loss may not exceed the champion's by more than the bound.
    With `expect_golden` (rebuilding a version: its golden/parity_golden.safetensors), the rebuilt merged model must
    reproduce those logits (golden_* gates).
    """
    from registry.hashing import model_weights_hash, sha256_file, tree_hash
    from serving.parity import GOLDEN_FILE, save_golden
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if (old_val_data is None) != (champion_adapter is None):
        raise ValueError("old_val_data and champion_adapter go together: pass both (retraining) or neither")
    if expect_golden is not None and not Path(expect_golden).is_file():
        raise FileNotFoundError(f"golden logits {expect_golden} to rebuild against do not exist; pass the version's "
                                f"golden/{GOLDEN_FILE}")
    lm.require_scheme(cfg.quantize)
    examples = _check_inputs(Path(base_path), adapter_dir, Path(val_data), Path(reference_text))
    inputs = {"base_sha256": model_weights_hash(Path(base_path)), "adapter_sha256": tree_hash(adapter_dir),
              "val_sha256": sha256_file(Path(val_data)), "reference_sha256": sha256_file(Path(reference_text)),
              "old_val_sha256": sha256_file(Path(old_val_data)) if old_val_data else None,
              "champion_adapter_sha256": tree_hash(Path(champion_adapter)) if champion_adapter else None,
              "expect_golden_sha256": sha256_file(Path(expect_golden)) if expect_golden else None}
    config = cfg.fingerprint_config()
    fp = manifest.fingerprint("merged", config, inputs)
    if (existing := manifest.reusable(out, "merged", fp)) is not None:
        log(f"merge: {out} already holds this merge (manifest matches); reusing it")
        if not existing["gates_passed"]:
            raise GateFailed(json.loads((Path(out) / "gates.json").read_text()), Path(out) / "gates.json")
        return Path(out)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ref = reference(cfg, Path(base_path), adapter_dir, examples, tokenizer, reference_text, old_val_data,
                    champion_adapter)
    seconds = {"reference": time.time() - t0}
    with manifest.staging(out) as tmp:
        seconds.update(build(cfg, Path(base_path), adapter_dir, tmp, tokenizer))
        result = verify(cfg, ref, tmp, tokenizer, expect_golden)
        seconds.update(result["seconds"])
        gates = result["gates"]
        (tmp / "golden").mkdir()
        save_golden(tmp / "golden" / GOLDEN_FILE, ref.golden_prompts, ref.golden_logits.cpu(), ref.golden_mask.cpu())
        report = {"adapter": str(adapter_dir), "quantize": cfg.quantize, "passed": all(x["passed"] for x in gates),
                  "gates": gates, "measured": result["measured"], "kl_histogram": result["kl_histogram"],
                  "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        (tmp / "gates.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report_md(report, result["kl_histogram"], tmp / "gates.md")
        manifest.write(tmp, "merged", config, inputs, gates_passed=report["passed"], gates=gates,
                       adapter_path=str(adapter_dir), base_path=str(base_path), device=cfg.device)
    verdict = "PASS" if report["passed"] else "FAIL"
    summary = ", ".join(f"{x['name']}={x['value']:.4g}" for x in gates)
    log(f"merge: gates {verdict} ({summary})")
    if not report["passed"]:
        raise GateFailed(report, Path(out) / "gates.json")
    return Path(out)
