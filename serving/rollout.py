"""Adapter-level canary rollout: step a challenger's traffic share up, analyse at each step end, promote or roll back.

    ctl = RolloutController(Path("work/rollouts.json"), RolloutConfig(), on_promote=..., on_rollback=...)
    ctl.start("support-assistant", champion="2", challenger="3")
    ctl.weight("support-assistant")              # ("2", "3", 0.05): the router follows this
    ctl.record("support-assistant", "3", request_id, latency_ms=41.0, error=False, response_nll=1.9)
    ctl.record_feedback(request_id, 0.8)

The state lives in one JSON file (atomic replace on every change), so a restarted server resumes the rollout where
it was. Pure Python + numpy/scipy: no model is needed to run or test it.

Statistics, and why they are built this way: a challenger as good as the champion must never be rolled back, yet the
analysis looks at the data at the end of every step, and again at every extension (repeated peeking: a fixed-sample
test at 5% looked at five times rolls back ~14% of equal challengers). So the decision is made valid under any number
of looks by alpha spending: the k-th time a check is actually tested it gets level
    alpha_k = alpha / n_tests * 6 / (pi^2 k^2)        (sum over k = 1, 2, ... of 6 / (pi^2 k^2) is 1),
so by the union bound the chance that any test of any look wrongly fails an equal-or-better challenger is at most
alpha, however long the rollout runs, extended or held (an insufficient check is not a look and spends nothing). The
first look gets 61% of a test's budget: a clearly bad challenger is caught at its smallest traffic share. Each test
is one-sided and fails only when the evidence says the challenger is worse *by more than the configured margin*:
- error rate: an exact binomial test must say the challenger's error rate is above the champion's upper confidence
  bound plus `max_error_rate_delta`; and, whatever the champion does, above the absolute bound `max_error_rate`
  (that one needs challenger samples only). Client-caused errors (record(..., client_error=True): a 4xx such as a
  prompt over the context length) are not the arm's fault and are counted apart, never as samples;
- latency: the challenger's p95 must exceed the threshold max(ratio * champion p95, champion p95 + slack), and a
  one-sided binomial test must say that more than 5% of challenger requests are above that threshold;
- feedback: the challenger's mean must be lower by more than `feedback_margin`, and a one-sided Mann-Whitney U test
  of (challenger + margin) against the champion must be significant (the non-inferiority form of the test, whose
  false-alarm rate at equal arms falls to zero as samples grow, unlike the plain test that stays at alpha);
- response NLL (if an offline baseline was given): mean online NLL / offline NLL above `nll_ratio_max`, with a
  one-sided t-test against that bound.
A check with fewer than `min_samples` per arm is "insufficient" and never fails the rollout, but it never lets it
through either: a step does not hand the challenger more traffic, and the last step does not promote, until both arms
have `min_samples` requests (and, with `require_feedback`, feedback scores); the step is extended instead. So a
rollout whose checks are all "insufficient" pauses at its step rather than promoting (issue 16), and a broken
challenger is caught at its smallest traffic share.
A check that passes while its estimate is beyond its bound (feedback lower by more than the margin, but not
significantly on the few samples an early look has) is "inconclusive": "not rejected" is not evidence of being good
enough, so the step is extended, not advanced or promoted, until the challenger has `hold_inconclusive_until`
samples in that check or the step was held `hold_inconclusive_steps` times (then the test alone decides). Without it, 12-request steps promoted a challenger scored 0.05
against the champion's 0.9 in ~10% of runs (tests/unit/test_serving_rollout.py). A promotion names the checks that
could not be tested ("NOT checked: feedback ..."). The checks are a registry (CHECK_REGISTRY: how each runs, how many
tests it spends alpha on, how its failure and its inconclusive estimate read). bench/canary_eval.py measures the
decision quality.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import stats

from common.atomic import write_json

log = logging.getLogger(__name__)

RUNNING = "running"
ROLLING_BACK = "rolling_back"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
ACTIVE = (RUNNING, ROLLING_BACK)

CHAMPION = "champion"
CHALLENGER = "challenger"

PASS, FAIL, INSUFFICIENT, SKIPPED = "pass", "fail", "insufficient", "skipped"

_MAX_REQUEST_IDS = 100_000  # request_id -> arm map kept for feedback; oldest dropped beyond this
_MAX_FINISHED = 20


class RolloutError(ValueError):
    """A rollout operation that cannot be done in the current state (maps to HTTP 409)."""


class RolloutStateUnavailable(RuntimeError):
    """The shared rollout state's database (serving/rollout_shared.py) cannot be reached; the message names it (maps
    to HTTP 503)."""


@dataclass
class RolloutConfig:
    steps: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    """Challenger traffic share per step, strictly increasing, in (0, 1]."""
    requests_per_step: int = 100
    """Total requests (both arms) that end a step."""
    max_seconds_per_step: float | None = None
    """A step also ends after this long (checked when requests arrive, or on tick())."""
    min_samples: int = 10
    """Per arm, before a comparison counts; fewer -> the check is "insufficient" (never a failure)."""
    max_error_rate_delta: float = 0.05
    """Challenger error rate may exceed the champion's by at most this."""
    latency_p95_ratio: float = 2.0
    latency_slack_ms: float = 100.0
    """Challenger p95 <= max(ratio * champion p95, champion p95 + slack)."""
    feedback_margin: float = 0.05
    alpha: float = 0.05
    """Fail on feedback when the challenger's mean is lower by > margin and the one-sided test is significant."""
    nll_ratio_max: float = 1.5
    """Challenger's mean online response NLL over its offline baseline (only when a baseline is given)."""
    gradual_rollback: bool = False
    """On failure, step traffic down through the steps in reverse instead of cutting to 0."""
    extend_until_min_samples: bool = True
    """Do not raise the challenger's share until both arms have min_samples requests: extend the step instead. (The
    last step never promotes on fewer, whatever this says.)"""
    max_error_rate: float | None = 0.25
    """Absolute bound: the challenger fails when an exact binomial test says its error rate is above this, whatever
    the champion's (a champion with few samples cannot excuse a broken challenger). None: no absolute bound."""
    require_feedback: bool = False
    """Do not promote until the feedback check has min_samples scores per arm (extend the step instead). Turn it on
    where users' feedback is the check that tells a wrong model from a right one (the demo's canaries)."""
    hold_inconclusive_until: int = 50
    """A check that passed although its estimate is beyond its bound (feedback lower by more than the margin, an
    error rate above the tolerated delta, a p95 above the threshold: not significant yet) is inconclusive: while the
    challenger has fewer than this many samples in that check, the step is extended instead of handing it more
    traffic or promoting it. Past it the test alone decides (a drop that is still not significant on this many
    samples is close to the margin). 0: off (the test alone decides at once)."""
    hold_inconclusive_steps: int = 3
    """At most this many extensions of one step for inconclusive estimates (the traffic at a small share can take
    long to reach hold_inconclusive_until); then the test alone decides. A step held for missing samples
    (min_samples, require_feedback) is not bounded by this."""

    def __post_init__(self):
        self.steps = tuple(float(s) for s in self.steps)
        if not self.steps:
            raise ValueError("a rollout needs at least one step")
        if any(not 0.0 < s <= 1.0 for s in self.steps) or any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"steps must be strictly increasing shares in (0, 1], got {self.steps}")
        if self.requests_per_step < 1 or self.min_samples < 1:
            raise ValueError("requests_per_step and min_samples must be >= 1")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_seconds_per_step is not None and self.max_seconds_per_step <= 0:
            raise ValueError("max_seconds_per_step must be > 0 or None")
        if self.latency_p95_ratio < 1.0 or self.latency_slack_ms < 0 or self.max_error_rate_delta < 0:
            raise ValueError("latency_p95_ratio must be >= 1, latency_slack_ms and max_error_rate_delta >= 0")
        if self.max_error_rate is not None and not 0.0 < self.max_error_rate < 1.0:
            raise ValueError(f"max_error_rate must be in (0, 1) or None, got {self.max_error_rate}")
        if isinstance(self.hold_inconclusive_until, bool) or not isinstance(self.hold_inconclusive_until, int) \
                or self.hold_inconclusive_until < 0:
            raise ValueError(f"hold_inconclusive_until must be an integer >= 0, got {self.hold_inconclusive_until!r}")
        if isinstance(self.hold_inconclusive_steps, bool) or not isinstance(self.hold_inconclusive_steps, int) \
                or self.hold_inconclusive_steps < 0:
            raise ValueError(f"hold_inconclusive_steps must be an integer >= 0, got {self.hold_inconclusive_steps!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


# ---------------------------------------------------------------------------------------------------- analysis


def check_error_rate(champion_errors: list[bool], challenger_errors: list[bool], cfg: RolloutConfig,
                     alpha: float) -> dict:
    """Two one-sided tests of the challenger's errors; either failing fails the check.

    Relative: is the challenger's error rate above the champion's by more than `max_error_rate_delta`? A z-test of
    the risk difference against that margin (the non-inferiority test of clinical trials), with each arm's
    variance floored so that a small arm without errors still counts as uncertain; a small arm needs many errors to
    fail, e.g. 5 of 10 at the first look when the champion has 1 error in 200. (Bench/canary_eval.py: it catches a challenger failing
    20% of requests against a champion's 2% before 100% of traffic; testing against the champion's upper
    confidence bound instead, as before, let 8% of those through.)
    Absolute: an exact binomial test of the challenger's errors against `max_error_rate`. It needs only
    `min_samples` challenger requests, so a champion arm starved of samples cannot hide a challenger that fails most
    requests.
    """
    n_a, n_b = len(champion_errors), len(challenger_errors)
    out = {"champion_n": n_a, "challenger_n": n_b, "threshold": cfg.max_error_rate_delta,
           "max_error_rate": cfg.max_error_rate, "alpha": alpha}
    k_b = int(sum(challenger_errors))
    abs_p = 1.0
    if cfg.max_error_rate is not None and n_b >= cfg.min_samples:
        abs_p = float(stats.binom.sf(k_b - 1, n_b, cfg.max_error_rate))
        out.update(challenger_rate=k_b / n_b, abs_p_value=abs_p)
    abs_fail = k_b / max(n_b, 1) > (cfg.max_error_rate or 1.0) and abs_p < alpha
    if min(n_a, n_b) < cfg.min_samples:
        if abs_fail:
            return {**out, "p_value": abs_p, "failed_bound": "absolute", "verdict": FAIL}
        return {**out, "verdict": INSUFFICIENT}
    k_a = int(sum(champion_errors))
    p_a, p_b = k_a / n_a, k_b / n_b
    # One-sided z-test of H0: p_b - p_a <= delta (risk-difference non-inferiority), each arm's variance floored at
    # that of half an error so that an arm without errors still counts as uncertain.
    var = (max(p_a * (1 - p_a), 0.5 / n_a) / n_a) + (max(p_b * (1 - p_b), 0.5 / n_b) / n_b)
    z = (p_b - p_a - cfg.max_error_rate_delta) / math.sqrt(var)
    p_value = float(stats.norm.sf(z))
    rel_fail = p_b - p_a > cfg.max_error_rate_delta and p_value < alpha
    out.update(champion_rate=p_a, challenger_rate=p_b, delta=p_b - p_a, z=z, relative_p_value=p_value)
    if rel_fail or abs_fail:
        bound = "relative" if rel_fail else "absolute"
        return {**out, "p_value": p_value if rel_fail else abs_p, "failed_bound": bound, "verdict": FAIL}
    return {**out, "p_value": min(p_value, abs_p), "verdict": PASS}


def check_latency(champion_ms: list[float], challenger_ms: list[float], cfg: RolloutConfig, alpha: float) -> dict:
    n_a, n_b = len(champion_ms), len(challenger_ms)
    out = {"champion_n": n_a, "challenger_n": n_b, "alpha": alpha}
    if min(n_a, n_b) < cfg.min_samples:
        return {**out, "verdict": INSUFFICIENT}
    p95_a, p95_b = float(np.percentile(champion_ms, 95)), float(np.percentile(challenger_ms, 95))
    threshold = max(cfg.latency_p95_ratio * p95_a, p95_a + cfg.latency_slack_ms)
    above = int(np.sum(np.asarray(challenger_ms) > threshold))
    # p95 > threshold  <=>  more than 5% of requests above it: test that share, not the noisy p95 of a small arm.
    p_value = float(stats.binomtest(above, n_b, 0.05, alternative="greater").pvalue)
    verdict = FAIL if (p95_b > threshold and p_value < alpha) else PASS
    return {**out, "champion_p95_ms": p95_a, "challenger_p95_ms": p95_b, "threshold": threshold,
            "challenger_share_above": above / n_b, "p_value": p_value, "verdict": verdict}


def check_feedback(champion_scores: list[float], challenger_scores: list[float], cfg: RolloutConfig,
                   alpha: float) -> dict:
    n_a, n_b = len(champion_scores), len(challenger_scores)
    out = {"champion_n": n_a, "challenger_n": n_b, "threshold": cfg.feedback_margin, "alpha": alpha}
    if min(n_a, n_b) < cfg.min_samples:
        return {**out, "verdict": INSUFFICIENT}
    a, b = np.asarray(champion_scores, float), np.asarray(challenger_scores, float)
    drop = float(a.mean() - b.mean())
    # Non-inferiority: is the challenger worse than the champion by more than the margin?
    p_value = float(stats.mannwhitneyu(b + cfg.feedback_margin, a, alternative="less").pvalue)
    if not math.isfinite(p_value):
        p_value = 1.0
    verdict = FAIL if (drop > cfg.feedback_margin and p_value < alpha) else PASS
    return {**out, "champion_mean": float(a.mean()), "challenger_mean": float(b.mean()), "drop": drop,
            "p_value": p_value, "verdict": verdict}


def check_nll(challenger_nll: list[float], offline_nll: float | None, cfg: RolloutConfig, alpha: float) -> dict:
    out = {"challenger_n": len(challenger_nll), "offline_nll": offline_nll, "threshold": cfg.nll_ratio_max,
           "alpha": alpha}
    if offline_nll is None or not offline_nll > 0:
        return {**out, "verdict": SKIPPED}
    if len(challenger_nll) < cfg.min_samples:
        return {**out, "verdict": INSUFFICIENT}
    x = np.asarray(challenger_nll, float)
    bound = cfg.nll_ratio_max * offline_nll
    ratio = float(x.mean() / offline_nll)
    if float(x.std()) <= 1e-9 * max(1.0, abs(float(x.mean()))):  # greedy outputs can repeat exactly: no t-test
        p_value = 0.0 if x.mean() > bound else 1.0
    else:
        p_value = float(stats.ttest_1samp(x, bound, alternative="greater").pvalue)
    verdict = FAIL if (ratio > cfg.nll_ratio_max and p_value < alpha) else PASS
    return {**out, "online_nll": float(x.mean()), "ratio": ratio, "p_value": p_value, "verdict": verdict}


def _error_reason(c: dict) -> str:
    if c.get("failed_bound") == "absolute":
        return (f"error rate {c['challenger_rate']:.3f} of {c['challenger_n']} requests above the absolute bound "
                f"{c['max_error_rate']} (p={c['p_value']:.2g})")
    return (f"error rate {c['challenger_rate']:.3f} vs champion {c['champion_rate']:.3f} (delta > {c['threshold']}, "
            f"p={c['p_value']:.2g})")


def _error_beyond(c: dict) -> str | None:
    if c.get("delta") is not None and c["delta"] > c["threshold"]:
        return (f"error rate {c['challenger_rate']:.3f} vs champion {c['champion_rate']:.3f} is above the tolerated "
                f"delta {c['threshold']} but not significantly (p={c['relative_p_value']:.2g})")
    rate = c.get("challenger_rate")
    if rate is not None and c.get("max_error_rate") is not None and rate > c["max_error_rate"]:
        return f"error rate {rate:.3f} is above the absolute bound {c['max_error_rate']} but not significantly"
    return None


def _latency_beyond(c: dict) -> str | None:
    if c.get("challenger_p95_ms") is not None and c["challenger_p95_ms"] > c["threshold"]:
        return (f"p95 latency {c['challenger_p95_ms']:.1f} ms is above the threshold {c['threshold']:.1f} ms but not "
                f"significantly (p={c['p_value']:.2g})")
    return None


def _feedback_beyond(c: dict) -> str | None:
    if c.get("drop") is not None and c["drop"] > c["threshold"]:
        return (f"feedback {c['challenger_mean']:.3f} vs champion {c['champion_mean']:.3f} is lower by more than the "
                f"margin {c['threshold']} but not significantly (p={c['p_value']:.2g})")
    return None


def _nll_beyond(c: dict) -> str | None:
    if c.get("ratio") is not None and c["ratio"] > c["threshold"]:
        return (f"response NLL is {c['ratio']:.2f}x the offline {c['offline_nll']:.3f} (> {c['threshold']}) but not "
                f"significantly (p={c['p_value']:.2g})")
    return None


@dataclass(frozen=True)
class Check:
    """One rollout check: how it is computed, how many tests it spends alpha on, and how its verdicts read.

    run(champion, challenger, feedback, rollout, cfg, alpha) -> a dict with "verdict" (pass/fail/insufficient/
    skipped) and the figures; reason(result): why it failed; beyond(result): why, when it passed, its point estimate
    is still outside the tolerated bound (inconclusive: the rollout collects more before handing the challenger
    more traffic or promoting it), else None. Adding a check is one entry in CHECK_REGISTRY.
    """

    run: Callable[..., dict]
    reason: Callable[[dict], str]
    beyond: Callable[[dict], str | None]
    tests: int = 1


CHECK_REGISTRY: dict[str, Check] = {
    "error_rate": Check(lambda ch, cl, fb, ro, cfg, a: check_error_rate(ch["error"], cl["error"], cfg, a),
                        _error_reason, _error_beyond, tests=2),  # relative and absolute bound
    "latency_p95": Check(lambda ch, cl, fb, ro, cfg, a: check_latency(ch["latency_ms"], cl["latency_ms"], cfg, a),
                         lambda c: f"p95 latency {c['challenger_p95_ms']:.1f} ms > threshold {c['threshold']:.1f} ms",
                         _latency_beyond),
    "feedback": Check(lambda ch, cl, fb, ro, cfg, a: check_feedback(fb[CHAMPION], fb[CHALLENGER], cfg, a),
                      lambda c: (f"feedback {c['challenger_mean']:.3f} vs champion {c['champion_mean']:.3f} "
                                 f"(drop {c['drop']:.3f} > {c['threshold']}, p={c['p_value']:.2g})"),
                      _feedback_beyond),
    "response_nll": Check(lambda ch, cl, fb, ro, cfg, a: check_nll([x for x in cl["nll"] if x is not None
                                                                     and math.isfinite(x)],
                                                                    ro.get("offline_nll"), cfg, a),
                          lambda c: (f"response NLL {c['online_nll']:.3f} is {c['ratio']:.2f}x the offline "
                                     f"{c['offline_nll']:.3f} (> {c['threshold']})"),
                          _nll_beyond),
}
CHECKS = tuple(CHECK_REGISTRY)
_N_TESTS = sum(c.tests for c in CHECK_REGISTRY.values())


def look_alpha(alpha: float, look: int, n_tests: int = _N_TESTS) -> float:
    """The level of a test at its `look`-th analysis (1, 2, ...): alpha / n_tests * 6 / (pi^2 look^2). Summed over
    every test and every look this is alpha, so any number of looks keeps the chance of a false failure <= alpha."""
    if isinstance(look, bool) or not isinstance(look, int) or look < 1:
        raise ValueError(f"look must be an integer >= 1, got {look!r}")
    return alpha / n_tests * 6.0 / (math.pi ** 2 * look * look)


def analyze(rollout: dict, cfg: RolloutConfig, since: int = 0) -> dict:
    """All checks over a rollout state dict: the champion's cumulative samples against the challenger's samples from
    index `since` on (0: cumulative).

    Each check is tested at `look_alpha(cfg.alpha, k)`, k = 1 + the times it was tested before in this rollout
    (rollout["looks"]; the caller counts a look for every check whose verdict is not insufficient or skipped).
    """
    looks = rollout.get("looks") or {}
    s, f = rollout["samples"], rollout["feedback"]
    champ, chall = s[CHAMPION], {k: v[since:] for k, v in s[CHALLENGER].items()}
    feedback = {CHAMPION: [score for _, score in f[CHAMPION].values()],
                CHALLENGER: [score for seq, score in f[CHALLENGER].values() if seq >= since]}
    checks = {name: check.run(champ, chall, feedback, rollout, cfg,
                              look_alpha(cfg.alpha, int(looks.get(name, 0)) + 1))
              for name, check in CHECK_REGISTRY.items()}
    for name, c in checks.items():
        c["look"] = int(looks.get(name, 0)) + 1
        c["tested"] = c["verdict"] in (PASS, FAIL) or "abs_p_value" in c  # a look that spent alpha
    failed = [name for name, c in checks.items() if c["verdict"] == FAIL]
    inconclusive = {name: why for name, c in checks.items() if c["verdict"] == PASS
                    and (why := CHECK_REGISTRY[name].beyond(c)) is not None}
    return {"verdict": FAIL if failed else PASS, "failed": failed, "inconclusive": inconclusive, "since": since,
            "checks": checks}


def _short_of_samples(analysis: dict, cfg: RolloutConfig, holds: int = 0) -> list[str]:
    """Why the rollout may not promote (or advance) yet: the arms short of min_samples, missing feedback when it is
    required, and inconclusive estimates (while the step was held for them fewer than hold_inconclusive_steps
    times: `holds`)."""
    short = []
    er = analysis["checks"]["error_rate"]
    for arm in (CHAMPION, CHALLENGER):
        if er[f"{arm}_n"] < cfg.min_samples:
            short.append(f"{arm} arm has {er[f'{arm}_n']} requests < min_samples={cfg.min_samples}")
    fb = analysis["checks"]["feedback"]
    if cfg.require_feedback and fb["verdict"] == INSUFFICIENT:
        short.append(f"feedback {fb['champion_n']} champion / {fb['challenger_n']} challenger scores < "
                     f"min_samples={cfg.min_samples} (require_feedback)")
    for name, why in (analysis.get("inconclusive") or {}).items():
        n = analysis["checks"][name]["challenger_n"]
        if n < cfg.hold_inconclusive_until and holds < cfg.hold_inconclusive_steps:
            short.append(f"inconclusive: {why}; holding until the challenger has {cfg.hold_inconclusive_until} "
                         f"samples ({n} now; hold {holds + 1} of at most {cfg.hold_inconclusive_steps})")
    return short


def _promote_reason(analysis: dict) -> str:
    """'all steps passed', naming the checks that could not be tested (no feedback, no offline NLL baseline): an
    operator reading the status must see that a promotion rested on error rate and latency alone."""
    unchecked = [f"{name} ({c['verdict']}: {c.get('challenger_n', 0)} challenger samples)"
                 for name, c in analysis["checks"].items() if c["verdict"] == INSUFFICIENT]
    if not unchecked:
        return "all steps passed"
    return "all steps passed; NOT checked: " + ", ".join(unchecked)


def _fail_reason(analysis: dict, names: list[str]) -> str:
    return "; ".join(CHECK_REGISTRY[name].reason(analysis["checks"][name]) for name in names)


# ---------------------------------------------------------------------------------------------------- controller


def _empty_arms() -> dict:
    return {arm: {"latency_ms": [], "error": [], "nll": []} for arm in (CHAMPION, CHALLENGER)}


class RolloutController:
    """Runs at most one rollout per family; state persisted to `state_path` on every change."""

    def __init__(self, state_path: Path, config: RolloutConfig, on_promote: Callable[[str, str], None],
                 on_rollback: Callable[[str, str, str], None], persist_interval_s: float = 0.5):
        self.persist_interval_s = persist_interval_s
        self._last_save = float("-inf")
        self._dirty = False
        self.state_path = Path(state_path)
        self.config = config
        self.on_promote = on_promote
        self.on_rollback = on_rollback
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.RLock()
        self._state = self._load()

    # ------------------------------------------------------------------ public API

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call listener(family) after every change of a family's weights (start, step, promote, rollback, abort)."""
        self._listeners.append(listener)

    def start(self, family: str, champion: str, challenger: str, offline_nll: float | None = None,
              config: RolloutConfig | None = None, baseline: str | None = None) -> dict:
        """Start a rollout at the first step. `config` overrides the controller's for this rollout only (it is
        stored with the rollout, so a restart keeps it). `baseline`: the version that serves the champion's share
        instead of the champion (the family's fallback, "base" or a version); its requests form the champion arm."""
        if champion == challenger or (baseline is not None and baseline == challenger):
            raise RolloutError(f"challenger {challenger} is the champion (or the fallback serving in its place) "
                               f"already; nothing to roll out")
        with self._lock:
            old = self._state["rollouts"].get(family)
            if old is not None and old["status"] in ACTIVE:
                raise RolloutError(f"family {family} has a rollout of version {old['challenger']} in progress; "
                                   f"abort it first")
            if old is not None:
                self._archive(old)
            now = time.time()
            cfg = config or self.config
            ro = {
                "id": uuid.uuid4().hex, "family": family, "champion": champion, "challenger": challenger,
                "baseline": baseline, "offline_nll": offline_nll, "status": RUNNING, "step": 0, "weight": cfg.steps[0],
                "step_started_at": now, "step_requests": 0, "started_at": now, "ended_at": None, "reason": None,
                "config": cfg.as_dict(), "samples": _empty_arms(), "looks": {},
                "client_errors": {CHAMPION: 0, CHALLENGER: 0},
                "feedback": {CHAMPION: {}, CHALLENGER: {}}, "history": [], "callback_errors": [],
            }
            self._state["rollouts"][family] = ro
            self._save(durable=True)
            snapshot = self._public(ro)
        self._notify(family)
        return snapshot

    def abort(self, family: str, reason: str) -> dict:
        with self._lock:
            ro = self._active(family)
            self._end(ro, ABORTED, reason)
            self._save(durable=True)
            snapshot = self._public(ro)
        self._notify(family)
        return snapshot

    def status(self, family: str | None = None) -> dict:
        self.tick()
        with self._lock:
            if family is not None:
                ro = self._state["rollouts"].get(family)
                if ro is None:
                    raise KeyError(f"no rollout for family {family}")
                return self._public(ro)
            return {"rollouts": {f: self._public(ro) for f, ro in self._state["rollouts"].items()},
                    "finished": list(self._state["finished"])}

    def weight(self, family: str) -> tuple[str | None, str | None, float]:
        """(champion, challenger, challenger weight) now; after the end: the winner alone with weight 0."""
        with self._lock:
            ro = self._state["rollouts"].get(family)
            if ro is None:
                return None, None, 0.0
            if ro["status"] in ACTIVE:
                return ro["champion"], ro["challenger"], ro["weight"]
            if ro["status"] == PROMOTED:
                return ro["challenger"], None, 0.0
            return ro["champion"], None, 0.0

    def is_active(self, family: str) -> bool:
        with self._lock:
            ro = self._state["rollouts"].get(family)
            return ro is not None and ro["status"] in ACTIVE

    def record(self, family: str, version: str, request_id: str, latency_ms: float, error: bool,
               response_nll: float | None, client_error: bool = False) -> None:
        """One served request of a family; ignored unless a rollout of that family is active and version is an arm
        (the challenger, or the champion or the baseline serving in its place).

        client_error=True: the request failed through the client's fault (a 4xx: a prompt over the context length,
        a bad parameter). It says nothing about the arm, so it is counted apart (status "client_errors") and is
        neither a sample nor a request of the step.
        """
        events: list[tuple] = []
        with self._lock:
            ro = self._state["rollouts"].get(family)
            if ro is None or ro["status"] not in ACTIVE:
                return
            if version == ro["challenger"]:
                arm = CHALLENGER
            elif version in (ro["champion"], ro.get("baseline")):
                arm = CHAMPION
            else:
                return
            if client_error:
                ce = ro.setdefault("client_errors", {CHAMPION: 0, CHALLENGER: 0})
                ce[arm] = int(ce.get(arm, 0)) + 1
                self._save(durable=False)
                return
            s = ro["samples"][arm]
            s["latency_ms"].append(float(latency_ms))
            s["error"].append(bool(error))
            nll = None if response_nll is None or not math.isfinite(response_nll) else float(response_nll)
            s["nll"].append(nll)
            ro["step_requests"] += 1
            arms = self._state["request_arms"]
            arms[request_id] = [ro["id"], arm, len(s["error"]) - 1]
            if len(arms) > _MAX_REQUEST_IDS:
                for rid in list(arms)[: len(arms) - _MAX_REQUEST_IDS]:
                    del arms[rid]
            durable = self._maybe_end_step(ro, time.time(), events)
            self._save(durable=durable)
        self._fire(events)

    def record_feedback(self, request_id: str, score: float) -> bool:
        """Feedback in [0, 1] for a request recorded in an active rollout; False if the id is not known here."""
        with self._lock:
            hit = self._state["request_arms"].get(request_id)
            if hit is None:
                return False
            rid, arm, seq = hit
            for ro in self._state["rollouts"].values():
                if ro["id"] == rid and ro["status"] in ACTIVE:
                    ro["feedback"][arm][request_id] = [seq, float(score)]
                    self._save(durable=False)
                    return True
            return False

    def tick(self) -> None:
        """End steps whose time ran out (max_seconds_per_step); cheap, call it as often as you like."""
        events: list[tuple] = []
        with self._lock:
            now = time.time()
            changed = False
            for ro in self._state["rollouts"].values():
                if ro["status"] in ACTIVE:
                    changed |= self._maybe_end_step(ro, now, events)
            if changed:
                self._save(durable=True)
        self._fire(events)

    # ------------------------------------------------------------------ steps

    def _cfg(self, ro: dict) -> RolloutConfig:
        return RolloutConfig(**ro["config"])

    def _maybe_end_step(self, ro: dict, now: float, events: list) -> bool:
        cfg = self._cfg(ro)
        by_requests = ro["step_requests"] >= cfg.requests_per_step
        by_time = cfg.max_seconds_per_step is not None and now - ro["step_started_at"] >= cfg.max_seconds_per_step
        if not (by_requests or by_time):
            return False
        family = ro["family"]
        entry = {"step": ro["step"], "weight": ro["weight"], "requests": ro["step_requests"],
                 "seconds": round(now - ro["step_started_at"], 3), "ended_at": now,
                 "ended_by": "requests" if by_requests else "time"}
        if ro["status"] == ROLLING_BACK:
            entry["decision"] = "step_down"
            ro["history"].append(entry)
            self._step_down(ro, now, events)
            events.append(("weights", family))
            return True
        analysis = analyze(ro, cfg)
        entry["analysis"] = analysis
        looks = ro.setdefault("looks", {})
        for name, c in analysis["checks"].items():
            if c["tested"]:
                looks[name] = int(looks.get(name, 0)) + 1
        last = ro["step"] == len(cfg.steps) - 1
        holds = int(ro.get("inconclusive_holds", 0))
        short = _short_of_samples(analysis, cfg, holds)
        if analysis["failed"]:
            reason = _fail_reason(analysis, analysis["failed"])
            entry["decision"] = "rollback"
            ro["history"].append(entry)
            ro["reason"] = reason
            if cfg.gradual_rollback and ro["step"] > 0:
                ro["status"] = ROLLING_BACK
                self._step_down(ro, now, events)
            else:
                self._end(ro, ROLLED_BACK, reason)
                events.append(("rollback", family, ro["challenger"], reason))
        elif short and (last or cfg.extend_until_min_samples):
            # Never promote (nor, by default, raise the share) on too little evidence: extend the step instead.
            entry["decision"] = "extend"
            entry["short"] = short
            if ro["weight"] >= 1.0 and any(x.startswith(CHAMPION) for x in short):
                entry["short"].append("the champion gets no traffic at a 100% step: abort and restart the rollout "
                                      "with a step below 1.0")
            ro["history"].append(entry)
            ro["step_requests"] = 0
            ro["step_started_at"] = now
            if any(x.startswith("inconclusive:") for x in short):
                ro["inconclusive_holds"] = holds + 1
        elif last:
            entry["decision"] = "promote"
            ro["history"].append(entry)
            self._end(ro, PROMOTED, _promote_reason(analysis))
            events.append(("promote", family, ro["challenger"]))
        else:
            entry["decision"] = "advance"
            ro["history"].append(entry)
            ro["inconclusive_holds"] = 0
            ro["step"] += 1
            ro["weight"] = cfg.steps[ro["step"]]
            ro["step_requests"] = 0
            ro["step_started_at"] = now
        events.append(("weights", family))
        return True

    def _step_down(self, ro: dict, now: float, events: list) -> None:
        cfg = self._cfg(ro)
        ro["step"] -= 1
        ro["step_requests"] = 0
        ro["step_started_at"] = now
        if ro["step"] < 0:
            ro["step"] = 0
            self._end(ro, ROLLED_BACK, ro["reason"])
            events.append(("rollback", ro["family"], ro["challenger"], ro["reason"]))
        else:
            ro["weight"] = cfg.steps[ro["step"]]

    def _end(self, ro: dict, status: str, reason: str) -> None:
        ro["status"] = status
        ro["reason"] = reason
        ro["weight"] = 1.0 if status == PROMOTED else 0.0
        ro["ended_at"] = time.time()

    def _active(self, family: str) -> dict:
        ro = self._state["rollouts"].get(family)
        if ro is None or ro["status"] not in ACTIVE:
            raise RolloutError(f"family {family} has no rollout in progress")
        return ro

    def _archive(self, ro: dict) -> None:
        summary = {k: ro[k] for k in ("id", "family", "champion", "challenger", "status", "reason", "started_at",
                                      "ended_at")}
        self._state["finished"] = (self._state["finished"] + [summary])[-_MAX_FINISHED:]

    # ------------------------------------------------------------------ callbacks

    def _notify(self, family: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(family)
            except Exception:
                log.exception("rollout listener failed for family %s", family)

    def _fire(self, events: list[tuple]) -> None:
        """Run callbacks outside the lock: they may call back into the controller (weight(), status())."""
        for ev in events:
            kind, family = ev[0], ev[1]
            try:
                if kind == "promote":
                    self.on_promote(family, ev[2])
                elif kind == "rollback":
                    self.on_rollback(family, ev[2], ev[3])
            except Exception as exc:
                log.exception("rollout %s callback failed for family %s", kind, family)
                with self._lock:
                    ro = self._state["rollouts"].get(family)
                    if ro is not None:
                        ro["callback_errors"].append(f"{kind}: {type(exc).__name__}: {exc}")
                        self._save(durable=True)
            if kind == "weights":
                self._notify(family)

    # ------------------------------------------------------------------ persistence

    def _public(self, ro: dict) -> dict:
        out = {k: v for k, v in ro.items() if k not in ("samples", "feedback")}
        out["history"] = json.loads(json.dumps(ro["history"]))
        out["counts"] = {arm: {"requests": len(ro["samples"][arm]["error"]),
                               "errors": int(sum(ro["samples"][arm]["error"])),
                               "feedback": len(ro["feedback"][arm])} for arm in (CHAMPION, CHALLENGER)}
        return out

    def _load(self) -> dict:
        if not self.state_path.exists():
            return {"format": 1, "rollouts": {}, "finished": [], "request_arms": {}}
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"rollout state {self.state_path} is not valid JSON ({exc}); restore it from backup "
                               f"or move it away to start with no rollouts") from exc
        state.setdefault("finished", [])
        state.setdefault("request_arms", {})
        return state

    def flush(self) -> None:
        """Write samples recorded since the last save (call on shutdown)."""
        with self._lock:
            if self._dirty:
                self._save(durable=True)

    def _save(self, durable: bool) -> None:
        """Write-to-temp then os.replace: a crash leaves the old or the new file, never half of one.

        Step transitions, starts and ends are written (and fsynced) at once; plain samples at most every
        `persist_interval_s`, so a crash loses at most that much of the current step's samples.
        """
        now = time.monotonic()
        if not durable and now - self._last_save < self.persist_interval_s:
            self._dirty = True
            return
        self._last_save = now
        self._dirty = False
        write_json_atomic(self.state_path, self._state, durable)


def write_json_atomic(path: Path, obj: dict, durable: bool = True) -> None:
    """common.atomic.write_json, compact: a crash leaves the old or the new file, never half (fsynced if durable)."""
    write_json(path, obj, indent=None, durable=durable, separators=(",", ":"))


__all__ = ["CHECK_REGISTRY", "Check", "RolloutConfig", "RolloutController", "RolloutError", "RolloutStateUnavailable",
           "analyze", "check_error_rate", "check_latency",
           "check_feedback", "check_nll", "look_alpha", "write_json_atomic"]
