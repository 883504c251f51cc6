"""Stage 2, training: a PEFT adapter trained from a cached init (or warm-started from a parent adapter).

Run:  adapterops train --base models/tiny-llama --init-entry DIR --train train.jsonl --val val.jsonl --out DIR

Output directory: adapter/ (PEFT format, deployable on the ORIGINAL base: PiSSA is exported converted to plain
LoRA), adapter_native/ (the adapter as trained, on the cached residual; what a warm start continues from),
manifest.json (config, input hashes, metrics, loss curve, health report).

Loss is on response tokens only. Batches are grouped by length so little compute goes to padding.
Health checks fail the run (HealthCheckFailed, with the report) instead of shipping a broken adapter.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines import manifest
from pipelines.data import Example, category_counts, read_jsonl

# Method-aware defaults. PiSSA starts from the principal components (large, non-zero A and B), so full LoRA learning
# rates overshoot; it gets a lower rate and a longer warm-up. rsLoRA scales by alpha/sqrt(r) (larger than alpha/r).
DEFAULT_LR = {"lora": 2e-3, "rslora": 1e-3, "dora": 2e-3, "pissa": 1e-3}
DEFAULT_WARMUP = {"lora": 0.05, "rslora": 0.05, "dora": 0.05, "pissa": 0.1}


@dataclass
class HealthConfig:
    """Thresholds of the checks that fail a run; defaults are loose on purpose (a false fail blocks a retrain)."""

    max_delta_ratio: float = 0.5
    """Largest allowed ||dW||_F / ||W||_F per module: above it the adapter overpowers the base."""
    min_effective_rank_frac: float = 0.1
    """Effective rank (exp of the entropy of the singular values) of each dW must reach this fraction of r."""
    max_val_over_best: float = 1.5
    """Final validation loss may not exceed this multiple of the best validation loss seen (divergence)."""
    max_val_train_gap: float = 2.0
    """Final validation loss minus final training loss, in nats."""


@dataclass
class TrainConfig:
    """How to train. `lr` and `warmup_ratio` default by method (see DEFAULT_LR / DEFAULT_WARMUP)."""

    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    grad_accum: int = 1
    """Micro-batches per optimizer step: effective batch = batch_size * grad_accum."""
    max_len: int = 128
    """Tokens per example (prompt + response, truncated); longer costs time quadratically in attention."""
    lr: float | None = None
    loraplus_lr_ratio: float = 1.0
    """LoRA+: learning rate of B = lr * ratio (the paper suggests 16); 1 = plain LoRA."""
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    eval_every: int = 50
    early_stopping_patience: int = 0
    """Evaluations without improvement before stopping; 0 = never stop early."""
    seed: int = 0
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


class HealthCheckFailed(RuntimeError):
    def __init__(self, report: dict):
        failed = [c for c in report["checks"] if not c["passed"]]
        lines = "; ".join(f"{c['name']}: {c['value']} vs threshold {c['threshold']} ({c.get('where', '')})"
                          for c in failed)
        super().__init__(f"training health check failed: {lines}. Lower the learning rate or fix the data.")
        self.report = report


def tokenize(examples: list[Example], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
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


def length_grouped_batches(n_tokens: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within mega-batches of 16 batches by length, then shuffle the batches."""
    idx = list(range(len(n_tokens)))
    rng.shuffle(idx)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(idx), mega):
        chunk = sorted(idx[i : i + mega], key=lambda j: n_tokens[j])
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
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


def batch_loss(model, ids, labels, mask):
    """Sum of response-token NLL and the token count (so means are exact across batches)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def eval_loss(model, rows, pad_id: int, batch_size: int = 16) -> float:
    """Mean response-token NLL of `rows` under `model` (used by training and by the merge gates)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            loss, n = batch_loss(model, *collate([rows[i] for i in order[k : k + batch_size]], pad_id))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def adapter_deltas(peft_model, initial: dict | None = None) -> dict[str, dict]:
    """Per LoRA module: ||dW||_F / ||W||_F and the effective rank of dW (relative to the initial adapter)."""
    import torch

    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        A = module.lora_A["default"].weight.detach().float()
        B = module.lora_B["default"].weight.detach().float()
        s = module.scaling["default"]
        delta = s * (B @ A)
        base_w = module.get_base_layer().weight.detach().float()
        if initial is not None and name in initial:
            A0, B0 = initial[name]
            init_prod = s * (B0 @ A0)
            delta = delta - init_prod
            base_w = base_w + init_prod  # PiSSA: the original W = W_res + s * B0 A0
        sv = torch.linalg.svdvals(delta)
        p = sv / sv.sum() if float(sv.sum()) > 0 else sv
        erank = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if float(sv.sum()) > 0 else 0.0
        out[name] = {"delta_ratio": float(delta.norm() / base_w.norm()), "effective_rank": erank,
                     "finite": bool(torch.isfinite(A).all() and torch.isfinite(B).all())}
    return out


def health_report(peft_model, initial, cfg: TrainConfig, rank: int, train_loss: float, val_loss: float,
                  best_val: float, trainable: int) -> dict:
    h = cfg.health
    deltas = adapter_deltas(peft_model, initial)
    worst_ratio = max(deltas.items(), key=lambda kv: kv[1]["delta_ratio"])
    worst_rank = min(deltas.items(), key=lambda kv: kv[1]["effective_rank"])
    nonfinite = [n for n, d in deltas.items() if not d["finite"]]
    checks = [
        {"name": "trainable_parameters", "value": trainable, "threshold": "> 0", "passed": trainable > 0},
        {"name": "finite_loss", "value": train_loss, "threshold": "finite",
         "passed": math.isfinite(train_loss) and math.isfinite(val_loss)},
        {"name": "finite_weights", "value": len(nonfinite), "threshold": 0, "passed": not nonfinite,
         "where": ", ".join(nonfinite[:3])},
        {"name": "delta_ratio", "value": round(worst_ratio[1]["delta_ratio"], 5), "threshold": h.max_delta_ratio,
         "passed": worst_ratio[1]["delta_ratio"] <= h.max_delta_ratio, "where": worst_ratio[0]},
        {"name": "effective_rank", "value": round(worst_rank[1]["effective_rank"], 3),
         "threshold": round(h.min_effective_rank_frac * rank, 3),
         "passed": worst_rank[1]["effective_rank"] >= h.min_effective_rank_frac * rank, "where": worst_rank[0]},
        {"name": "val_over_best", "value": round(val_loss / best_val, 4) if best_val > 0 else None,
         "threshold": h.max_val_over_best, "passed": val_loss <= h.max_val_over_best * best_val},
        {"name": "val_train_gap", "value": round(val_loss - train_loss, 4), "threshold": h.max_val_train_gap,
         "passed": val_loss - train_loss <= h.max_val_train_gap},
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def run(cfg: TrainConfig, base_path: Path, init_entry: Path, train_data: Path, val_data: Path, out: Path,
        parent: Path | None = None, log=print) -> Path:
    """Train an adapter; `parent` is a previous training output to warm-start from (same init entry)."""
    import torch
    from registry.hashing import model_weights_hash, sha256_file
    from transformers import AutoTokenizer

    from pipelines.init_cache import build_model

    init_manifest = manifest.read(init_entry)
    method = init_manifest["config"]["method"]
    rank = init_manifest["config"]["rank"]
    inputs = {
        "base_sha256": model_weights_hash(Path(base_path)),
        "init_key": init_manifest["key"],
        "train_sha256": sha256_file(Path(train_data)),
        "val_sha256": sha256_file(Path(val_data)),
        "parent": manifest.read(parent)["fingerprint"] if parent else None,
    }
    if inputs["base_sha256"] != init_manifest["base_sha256"]:
        raise ValueError(f"init entry {init_entry} was computed for base sha256:{init_manifest['base_sha256'][:12]}, "
                         f"but {base_path} is sha256:{inputs['base_sha256'][:12]}; warm the cache for this base")
    if parent is not None:
        pm = manifest.read(parent)
        if pm["inputs"]["init_key"] != init_manifest["key"]:
            raise ValueError(f"parent adapter {parent} started from init {pm['inputs']['init_key']}, not "
                             f"{init_manifest['key']}; warm-start only from the same init (method, rank, base)")
    config = asdict(cfg)
    fp = manifest.fingerprint("adapter", config, inputs)
    if manifest.reusable(out, "adapter", fp) is not None:
        log(f"train: {out} already holds this adapter (manifest matches); reusing it")
        return Path(out)

    lr = cfg.lr or DEFAULT_LR[method]
    warmup = cfg.warmup_ratio if cfg.warmup_ratio is not None else DEFAULT_WARMUP[method]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_examples, val_examples = read_jsonl(train_data), read_jsonl(val_data)
    train_rows = tokenize(train_examples, tokenizer, cfg.max_len)
    val_rows = tokenize(val_examples, tokenizer, cfg.max_len)
    model = build_model(Path(base_path), Path(init_entry), adapter=(Path(parent) / "adapter_native") if parent else None)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    initial = None
    if method == "pissa" or parent is not None:
        initial = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
                   for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if trainable == 0:
        raise HealthCheckFailed({"passed": False, "checks": [{"name": "trainable_parameters", "value": 0,
                                                              "threshold": "> 0", "passed": False}]})
    b_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    opt = torch.optim.AdamW([{"params": other, "lr_mult": 1.0},
                             {"params": b_params, "lr_mult": cfg.loraplus_lr_ratio}],
                            lr=lr, weight_decay=cfg.weight_decay)
    warmup_steps = max(1, int(warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, cfg.steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    rng = random.Random(cfg.seed)
    lengths = [len(ids) for ids, _ in train_rows]
    queue: list[list[int]] = []
    curve, evals = [], []
    best_val, bad_evals, pad_id = float("inf"), 0, tokenizer.pad_token_id
    t0, tokens_seen, padded_seen = time.time(), 0, 0
    train_loss = float("nan")
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_mult"]
        step_loss, step_tokens = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            if not queue:
                queue = length_grouped_batches(lengths, cfg.batch_size, rng)
            ids, labels, mask = collate([train_rows[i] for i in queue.pop()], pad_id)
            loss_sum, n = batch_loss(model, ids, labels, mask)
            (loss_sum / max(n, 1) / cfg.grad_accum).backward()
            step_loss += float(loss_sum.detach())
            step_tokens += n
            tokens_seen += int(mask.sum())
            padded_seen += mask.numel()
        train_loss = step_loss / max(step_tokens, 1)
        if not math.isfinite(train_loss):
            report = {"passed": False, "checks": [{"name": "finite_loss", "value": train_loss, "threshold": "finite",
                                                   "passed": False, "where": f"step {step + 1}"}]}
            raise HealthCheckFailed(report)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        curve.append({"step": step + 1, "train_loss": round(train_loss, 5), "lr": lr_at(step)})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = eval_loss(model, val_rows, pad_id)
            evals.append({"step": step + 1, "val_loss": round(val, 5)})
            log(f"train {method}: step {step + 1}/{cfg.steps} loss {train_loss:.3f} val {val:.3f} "
                f"({time.time() - t0:.0f}s)")
            if val < best_val - 1e-4:
                best_val, bad_evals = val, 0
            else:
                bad_evals += 1
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    log(f"train: early stop at step {step + 1} (no val improvement in {bad_evals} evals)")
                    break
    val_loss = evals[-1]["val_loss"] if evals else eval_loss(model, val_rows, pad_id)
    base_val = None
    with model.disable_adapter():
        if method != "pissa":
            base_val = eval_loss(model, val_rows, pad_id)
    health = health_report(model, initial, cfg, rank, train_loss, val_loss, best_val, trainable)
    seconds = time.time() - t0
    metrics = {
        "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5), "best_val_loss": round(best_val, 5),
        "base_val_loss": round(base_val, 5) if base_val is not None else None,
        "steps": len(curve), "seconds": round(seconds, 2), "lr": lr, "warmup_ratio": warmup,
        "trainable_parameters": trainable, "total_parameters": total,
        "tokens_per_second": round(tokens_seen / max(seconds, 1e-9), 1),
        "padding_fraction": round(1 - tokens_seen / max(padded_seen, 1), 4),
        "train_examples": len(train_rows), "val_examples": len(val_rows),
    }
    if not health["passed"]:
        raise HealthCheckFailed(health)
    with manifest.staging(out) as tmp:
        model.save_pretrained(tmp / "adapter_native")
        if method == "pissa":
            with tempfile.TemporaryDirectory() as scratch:
                init_copy = Path(scratch) / "pissa_init"
                shutil.copytree(Path(init_entry) / "initial_adapter", init_copy)  # PEFT rewrites its config
                model.save_pretrained(tmp / "adapter", path_initial_model_for_weight_conversion=str(init_copy))
        else:
            shutil.copytree(tmp / "adapter_native", tmp / "adapter")
        manifest.write(tmp, "adapter", config, inputs, method=method, rank=rank, metrics=metrics, curve=curve,
                       evals=evals, health=health, data={"train_categories": category_counts(train_examples)},
                       base_path=str(base_path), parent_path=str(parent) if parent else None)
    log(f"train: wrote {out} (val loss {val_loss:.3f}, {metrics['tokens_per_second']:.0f} tok/s)")
    return Path(out)
