"""Train/serve parity: the served adapter must give the logits the training run saw, before it gets any traffic.

    golden = load_golden(adapter_dir / GOLDEN_FILE)            # written next to the adapter at training time
    report = check_parity(pool, "support-assistant@3", golden.prompts, golden.logits, golden.mask)
    report["passed"]   # False blocks the rollout (POST /admin/rollout/start answers 409 with this report)

The comparison (`compare_to_golden`, over monitoring.logit_stats.compare_logits) is also what the merge stage runs
when a version is rebuilt: the rebuild's logits must match the golden logits stored with the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from monitoring.logit_stats import compare_logits

GOLDEN_FILE = "parity_golden.safetensors"
"""File name, inside an adapter directory, of the golden logits the serving side checks against."""


@dataclass
class Golden:
    prompts: list[str]
    logits: torch.Tensor
    """[B, T, V] logits of the right-padded prompts under the trained model."""
    mask: torch.Tensor
    """[B, T] 1 where a token is real, 0 where padding."""


def save_golden(path: Path, prompts: list[str], logits: torch.Tensor, mask: torch.Tensor) -> Path:
    """Write golden logits (and the prompts that made them) as safetensors; returns the path."""
    if logits.shape[:2] != mask.shape or logits.shape[0] != len(prompts):
        raise ValueError(f"golden logits {tuple(logits.shape)}, mask {tuple(mask.shape)} and {len(prompts)} prompts "
                         f"do not line up; pass [B,T,V] logits and a [B,T] mask for B prompts")
    path = Path(path)
    save_file({"logits": logits.float().contiguous().cpu(), "mask": mask.to(torch.int8).contiguous().cpu()},
              str(path), metadata={"prompts": json.dumps(list(prompts))})
    return path


def load_golden(path: Path) -> Golden:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        prompts = json.loads((f.metadata() or {}).get("prompts", "null"))
    if not isinstance(prompts, list):
        raise ValueError(f"{path} holds no prompts in its metadata; write it with serving.parity.save_golden")
    tensors = load_file(str(path))
    return Golden(prompts, tensors["logits"], tensors["mask"])


def compare_to_golden(golden_logits: torch.Tensor, golden_mask: torch.Tensor, logits: torch.Tensor,
                      mask: torch.Tensor, min_cosine: float = 0.9999, max_abs: float = 1e-3,
                      min_top1: float = 1.0) -> dict:
    """Compare candidate logits (served, or a rebuilt version's) with stored golden logits of the same prompts.

    Returns {"passed", "failures", "thresholds", measured cosine/max_abs/top1/KL...}. A different shape or token mask
    (another tokenizer or another prompt set) fails with that reason instead of comparing unlike positions. One
    implementation for the serving parity check and the merge stage's rebuild regression check.
    """
    thresholds = {"min_cosine": min_cosine, "max_abs": max_abs, "min_top1": min_top1}
    golden_mask = golden_mask.bool().to(logits.device)
    if logits.shape != golden_logits.shape or not torch.equal(mask.bool(), golden_mask):
        return {"passed": False, "thresholds": thresholds, "failures": [
            f"logits {tuple(logits.shape)} / token mask do not match the golden {tuple(golden_logits.shape)}: "
            f"the tokenizer, base or prompt set differs from the one the golden logits were made with"]}
    cmp = compare_logits(golden_logits.float().to(logits.device), logits, golden_mask)
    failures = []
    if not cmp.cosine >= min_cosine:
        failures.append(f"cosine {cmp.cosine:.6f} < {min_cosine}")
    if not cmp.max_abs <= max_abs:
        failures.append(f"max |logit difference| {cmp.max_abs:.3g} > {max_abs}")
    if not cmp.top1_agreement >= min_top1:
        failures.append(f"top-1 agreement {cmp.top1_agreement:.4f} < {min_top1}")
    return {"thresholds": thresholds, **cmp.as_dict(), "passed": not failures, "failures": failures}


def check_parity(pool, key: str | None, prompts: list[str], golden_logits: torch.Tensor, golden_mask: torch.Tensor,
                 min_cosine: float = 0.9999, max_abs: float = 1e-3, min_top1: float = 1.0) -> dict:
    """Serve `prompts` through pool[key] and compare with the golden logits; {"passed", measured values, thresholds}."""
    served, mask = pool.prompt_logits(list(prompts), key)
    report = compare_to_golden(golden_logits.cpu(), golden_mask.cpu(), served.cpu(), mask.cpu(), min_cosine,
                               max_abs, min_top1)
    return {"key": key, "prompts": len(prompts), **report}


def golden_token_logprobs(golden: Golden, token_ids: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per golden prompt: log p(token_t | < t) for t >= 1 and the argmax ids, from the golden logits at the tokens
    the engine saw."""
    lps, top1 = [], []
    for i, ids in enumerate(token_ids):
        n = len(ids)
        logp = torch.log_softmax(golden.logits[i, : n - 1].float(), -1)
        tok = torch.tensor(ids[1:], dtype=torch.long)
        lps.append(logp.gather(-1, tok[:, None]).squeeze(-1))
        top1.append(logp.argmax(-1))
    return lps, top1


def check_engine_parity(engine, key: str | None, golden: Golden, max_logprob_abs: float = 1e-3,
                        min_top1: float = 1.0) -> dict:
    """Train/serve parity through any serving.engine.Engine: the engine's log-probabilities of the golden prompts'
    own tokens against those the golden logits give, and the engine's argmax against the golden argmax.

    Log-probs (not full logits) because that is what every engine can return (vLLM gives prompt_logprobs only); a
    LoRA scaling bug (vLLM's rsLoRA one, say) moves them far beyond fp32 noise. A different tokenization (another
    tokenizer or base) fails with that reason rather than comparing unlike positions.
    """
    thresholds = {"max_logprob_abs": max_logprob_abs, "min_top1": min_top1}
    served = engine.prompt_logprobs(list(golden.prompts), key)
    failures = []
    lengths = [int(n) for n in golden.mask.sum(-1).tolist()]
    got = [len(p.token_ids) for p in served]
    if got != lengths:
        return {"key": key, "prompts": len(golden.prompts), "engine": engine.name, "passed": False,
                "thresholds": thresholds,
                "failures": [f"the engine tokenized the golden prompts into {got} tokens, the golden logits hold "
                             f"{lengths}: the tokenizer or base differs from the one the version was trained on"]}
    ref_lp, ref_top1 = golden_token_logprobs(golden, [p.token_ids for p in served])
    diffs, agree, positions = [], 0, 0
    for p, lp, t1 in zip(served, ref_lp, ref_top1):
        mine = torch.tensor(p.logprobs, dtype=torch.float32)
        if not torch.isfinite(mine).all():
            diffs.append(float("inf"))
        elif mine.numel():
            diffs.append(float((mine - lp).abs().max()))
        agree += int((torch.tensor(p.top1_ids) == t1).sum())
        positions += len(p.top1_ids)
    max_abs = max(diffs) if diffs else 0.0
    top1 = agree / positions if positions else 1.0
    if not max_abs <= max_logprob_abs:
        failures.append(f"max |token log-prob difference| {max_abs:.3g} > {max_logprob_abs}")
    if not top1 >= min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {min_top1}")
    return {"key": key, "prompts": len(golden.prompts), "engine": engine.name, "positions": positions,
            "max_logprob_abs": max_abs, "top1_agreement": top1, "thresholds": thresholds,
            "passed": not failures, "failures": failures}
