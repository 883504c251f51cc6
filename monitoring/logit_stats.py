"""Logit statistics: the one implementation used by the merge gates, the serving parity check and the monitors.

Two kinds of numbers live here:
- per-request statistics (`request_stats`) that serving logs for every request and the drift monitors test;
- logit comparisons (`compare_logits`) between two models on the same tokens, used by the merge/quantize
  gates and by the train/serve parity check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so light importers (the CLI, drift tests) stay fast
    import torch

# Names of the per-request statistics, in the order monitors report them. Serving writes these columns,
# the drift monitors read them; keeping them here avoids magic strings spread across packages.
REQUEST_STATS = ("prompt_nll", "gen_entropy", "gen_max_prob")


STATS_TOP_K = 20
"""The generation statistics use each step's top-k log-probabilities only (k = 20, what vLLM returns at most), so an
engine that sees the top-k alone (vLLM over HTTP) and one that sees the full logits (the built-in engine, the
registration-time reference) compute the same numbers, and the monitors compare like with like."""


def topk_entropy(top_logprobs) -> float:
    """Entropy (nats) of the distribution that keeps the top-k probabilities and lumps the rest into one outcome.

    A lower bound of the full entropy that needs only the top-k log-probabilities; exact when they hold all the mass.
    """
    import math

    ps = [math.exp(lp) for lp in top_logprobs if lp is not None and math.isfinite(lp)]
    h = -sum(p * math.log(p) for p in ps if p > 0.0)
    rest = 1.0 - sum(ps)
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return h


def stats_from_logprobs(prompt_token_logprobs, gen_top_logprobs) -> dict:
    """REQUEST_STATS from log-probabilities alone.

    prompt_token_logprobs: log p(token_t | tokens < t) for the prompt's tokens t >= 1;
    gen_top_logprobs: per generated step, the top-k log-probabilities of the next-token distribution, best first.
    """
    import math

    lps = [lp for lp in prompt_token_logprobs if lp is not None]
    out = {"prompt_nll": -sum(lps) / len(lps) if lps else float("nan")}
    steps = [top for top in gen_top_logprobs if top]
    if steps:
        out["gen_entropy"] = sum(topk_entropy(top) for top in steps) / len(steps)
        out["gen_max_prob"] = sum(math.exp(max(top)) for top in steps) / len(steps)
    else:
        out["gen_entropy"] = float("nan")
        out["gen_max_prob"] = float("nan")
    return out


def request_stats(prompt_logits: torch.Tensor, prompt_ids: torch.Tensor, gen_logits: torch.Tensor | None,
                  top_k: int = STATS_TOP_K) -> dict:
    """Per-request statistics from full logits (the same numbers stats_from_logprobs gives from the top-k).

    prompt_logits: [T, V] logits at prompt positions (position t predicts token t+1);
    prompt_ids: [T] prompt token ids; gen_logits: [G, V] logits that produced each generated token, or None.

    prompt_nll: mean NLL of the prompt's tokens under the served model (how unusual the input is to it);
    gen_entropy / gen_max_prob: mean entropy (over the top-k, tail lumped: topk_entropy) and mean top-1
    probability of the next-token distributions while generating (how unsure the model is about its own answer).
    """
    import torch

    out = {}
    if prompt_ids.numel() >= 2:
        logp = torch.log_softmax(prompt_logits[:-1].float(), dim=-1)
        nll = -logp.gather(-1, prompt_ids[1:].unsqueeze(-1)).squeeze(-1)
        out["prompt_nll"] = float(nll.mean())
    else:
        out["prompt_nll"] = float("nan")
    if gen_logits is not None and gen_logits.shape[0] > 0:
        logp = torch.log_softmax(gen_logits.float(), dim=-1)
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values.double()
        p = top.exp()
        h = -(p * top).sum(-1)
        rest = (1.0 - p.sum(-1)).clamp_min(0.0)
        h = h - torch.where(rest > 1e-12, rest * torch.log(rest.clamp_min(1e-300)), torch.zeros_like(rest))
        out["gen_entropy"] = float(h.mean())
        out["gen_max_prob"] = float(p[:, 0].mean())
    else:
        out["gen_entropy"] = float("nan")
        out["gen_max_prob"] = float("nan")
    return out


def response_nll(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Mean NLL of ids[start:] given everything before, from logits [T, V] over ids [T]."""
    import torch

    if ids.numel() - start < 1 or start < 1:
        return float("nan")
    logp = torch.log_softmax(logits[start - 1 : -1].float(), dim=-1)
    return float(-logp.gather(-1, ids[start:].unsqueeze(-1)).squeeze(-1).mean())


@dataclass
class LogitComparison:
    """How far logits `b` are from reference logits `a` over the same valid token positions."""

    cosine: float
    """Mean cosine similarity of the logit vectors, per position."""
    max_abs: float
    """Largest absolute logit difference anywhere."""
    top1_agreement: float
    """Fraction of positions whose argmax token agrees."""
    kl_mean: float
    """Mean per-token KL(softmax(a) || softmax(b)), nats."""
    kl_p99: float
    """99th percentile of the per-token KL."""
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> LogitComparison:
    """Compare logits [..., V] of a reference `a` and a candidate `b`; `mask` [...] selects valid positions.

    NaN anywhere in the candidate is reported as the worst possible values, never as a pass.
    """
    import torch

    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; compare the same prompts")
    a = a.float().reshape(-1, a.shape[-1])
    b = b.float().reshape(-1, b.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        a, b = a[keep], b[keep]
    if a.shape[0] == 0:
        raise ValueError("no valid token positions to compare")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return LogitComparison(cosine=-1.0, max_abs=float("inf"), top1_agreement=0.0, kl_mean=float("inf"),
                               kl_p99=float("inf"), positions=a.shape[0])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0.0)
    return LogitComparison(
        cosine=float(cos.mean()),
        max_abs=float((a - b).abs().max()),
        top1_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)) if kl.numel() > 1 else float(kl.max()),
        positions=a.shape[0],
    )
