"""The drift decision: two-sample KS tests on per-request statistics and a novelty tail count, Holm across them.

This is the one implementation of "has this window drifted?"; the CLI (`adapterops monitor check`), the
retraining trigger and the tests all call `detect`. Inputs are plain column dicts {stat name: 1-D array}, so the
module needs numpy and scipy only (the stat names come from `logit_stats.REQUEST_STATS`).

Why a tail count beside KS: a real shift starts partial (one new kind of question among many). 10% of novel prompts
move a KS statistic by at most 0.1, which a 200-request window cannot tell from noise; but they are *in the tail*:
`novelty_tail_test` counts the window's prompts above the reference's 95th percentile of kNN novelty, a count whose
null distribution is exact (beta-binomial) whenever reference and window are exchangeable, with no assumption
about the embedding geometry.

    from monitoring.drift import DriftConfig, detect
    result = detect(reference_columns, current_columns, DriftConfig(alpha=0.01, min_window=50))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from monitoring.logit_stats import REQUEST_STATS


def _ks_2samp(*args, **kwargs):
    from scipy.stats import ks_2samp  # imported on use: scipy.stats costs ~1 s, the CLI's --help should not pay it

    return ks_2samp(*args, **kwargs)


def _betabinom_sf(k: int, n: int, a: float, b: float) -> float:
    from scipy.stats import betabinom

    return float(betabinom.sf(k, n, a, b))

# Column name of the per-request max cosine similarity of the prompt's embedding to the reference (or training)
# prompts; a drop in it means prompts unlike anything seen before.
EMBEDDING_STAT = "embedding_max_cos"

# Column name of the per-request kNN novelty: 1 - the mean of the top-k cosine similarities of the prompt's embedding
# to the index (monitoring.embeddings.EmbeddingIndex.neighbour_stats). Tested with `novelty_tail_test`, not KS.
NOVELTY_STAT = "embedding_novelty"

STATUSES = ("ok", "drift", "insufficient_data")


@dataclass(frozen=True)
class DriftTest:
    """How one stat (a column of per-request values) is tested, and what computing the stat needs."""

    __test__ = False  # not a pytest test class

    run: Callable[[np.ndarray, np.ndarray, "DriftConfig"], tuple[float, float, str]]
    """(reference finite values, window finite values, cfg) -> (statistic, p-value, note); `detect` applies Holm
    across the p-values of every tested stat."""
    statistic: str = "D"
    """What the statistic is called in the verdict's reason."""
    needs: str = "logit_stats"
    """What the stat is computed from: "logit_stats" (per request, by the engine: monitoring.logit_stats) or
    "embedding" (the prompt's embedding scored against an index: monitoring.check fills these in)."""

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"DriftTest.needs must be one of {NEEDS}, got {self.needs!r}")


NEEDS = ("logit_stats", "embedding")


def ks_test(reference: np.ndarray, current: np.ndarray, cfg: "DriftConfig") -> tuple[float, float, str]:
    """Two-sample Kolmogorov-Smirnov: statistic D, two-sided p-value."""
    ks = _ks_2samp(reference, current)
    return float(ks.statistic), float(ks.pvalue), ""


def novelty_test(reference: np.ndarray, current: np.ndarray, cfg: "DriftConfig") -> tuple[float, float, str]:
    """`novelty_tail_test` at cfg.novelty_quantile: the share of the window above the tail, exact p-value."""
    return novelty_tail_test(reference, current, cfg.novelty_quantile)


KS = DriftTest(ks_test)
"""The test of a stat that DRIFT_TESTS does not name (a column of the caller's own)."""

DRIFT_TESTS: dict[str, DriftTest] = {
    **{stat: KS for stat in REQUEST_STATS},
    EMBEDDING_STAT: DriftTest(ks_test, needs="embedding"),
    NOVELTY_STAT: DriftTest(novelty_test, statistic="share above the tail", needs="embedding"),
}
"""stat name -> its test; the keys, in order, are DriftConfig.stats' default. Adding a test is one entry here (a
new stat computed from what `needs` names, with its test function)."""


def test_for(stat: str) -> DriftTest:
    return DRIFT_TESTS.get(stat, KS)


test_for.__test__ = False  # not a pytest test function


@dataclass
class DriftConfig:
    """How a window of requests is compared with the reference."""

    alpha: float = 0.01
    """Family-wise false-alarm rate per window; Holm-Bonferroni spreads it across the tests."""
    min_window: int = 50
    """Fewest finite values a stat needs (in both reference and window) to be tested; a window with no testable
    stat is "insufficient_data", never drift. KS on a handful of values is noise."""
    stats: tuple[str, ...] = tuple(DRIFT_TESTS)
    """Which columns to test, each with its DRIFT_TESTS entry (KS for the logit stats and the max-cos, the tail
    count for NOVELTY_STAT; KS for a column DRIFT_TESTS does not name)."""
    novelty_k: int = 5
    """Neighbours averaged in the kNN novelty of a prompt (monitoring.check computes it with this k)."""
    novelty_quantile: float = 0.95
    """The novelty tail starts at this quantile of the reference's novelty: the test counts the window's prompts
    above it (5% of them under no drift). A lower quantile sees milder novelty, a higher one needs fewer novel
    prompts to stand out; on the project's data (bench/drift_eval.py) 0.95 caught a 10% shift at n=200 in 92-100%
    of windows, 0.9 in 76-88%."""
    consecutive: int = 2
    """Windows in a row that must drift before an alert fires (see `ConsecutiveRule`); higher trades detection
    delay for fewer alerts. 2 by default: bench/drift_eval.py found that with ONE fixed reference and index (what a
    deployed version keeps) the per-window false-alarm rate is uneven across versions (mean 0.48%, median 0%, 90th
    percentile 2%, worst 10% over 50 simulated versions, from the KS tests on the logit stats); two windows in a row
    bring the expected rate to ~0.02%, while a real shift (a 10% one caught in 92-100% of 200-request windows)
    costs one window of delay."""

    def __post_init__(self):
        if isinstance(self.stats, str):
            raise ValueError(f"DriftConfig.stats must be a sequence of stat names, got the string {self.stats!r}; "
                             f"write stats=({self.stats!r},)")
        self.stats = tuple(self.stats)
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"DriftConfig.alpha must be in (0, 1), got {self.alpha!r}; 0.01 means at most 1% of "
                             "no-drift windows raise a false alarm")
        if isinstance(self.min_window, bool) or not isinstance(self.min_window, int) or self.min_window < 2:
            raise ValueError(f"DriftConfig.min_window must be an integer >= 2, got {self.min_window!r}; "
                             "KS needs several values per side (50 is a sensible floor)")
        if not self.stats:
            raise ValueError("DriftConfig.stats is empty; name at least one column to test, e.g. "
                             f"{REQUEST_STATS + (EMBEDDING_STAT,)}")
        bad = [s for s in self.stats if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"DriftConfig.stats must hold non-empty strings, got {bad!r}")
        dupes = sorted({s for s in self.stats if self.stats.count(s) > 1})
        if dupes:
            raise ValueError(f"DriftConfig.stats names {dupes} more than once; list each stat once")
        if isinstance(self.consecutive, bool) or not isinstance(self.consecutive, int) or self.consecutive < 1:
            raise ValueError(f"DriftConfig.consecutive must be an integer >= 1, got {self.consecutive!r}")
        if isinstance(self.novelty_k, bool) or not isinstance(self.novelty_k, int) or self.novelty_k < 1:
            raise ValueError(f"DriftConfig.novelty_k must be an integer >= 1, got {self.novelty_k!r} (5 is usual)")
        if not (isinstance(self.novelty_quantile, (int, float)) and 0.5 <= self.novelty_quantile < 1.0):
            raise ValueError(f"DriftConfig.novelty_quantile must be in [0.5, 1), got {self.novelty_quantile!r}; "
                             "0.9 counts the window's prompts above the reference's 90th novelty percentile")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stats"] = list(self.stats)
        return d


@dataclass
class TestResult:
    """One KS test (or a stat that could not be tested, with `note` saying why)."""

    __test__ = False  # not a pytest test class

    name: str
    statistic: float
    """KS statistic D; for the novelty tail count, the share of the window above the tail threshold (NaN when not
    tested)."""
    p_value: float
    threshold: float
    """The Holm-adjusted alpha this p-value was compared against (NaN when not tested)."""
    fired: bool
    n_reference: int
    """Finite values used from the reference."""
    n_current: int
    """Finite values used from the current window."""
    note: str = ""

    def as_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}


@dataclass
class DriftResult:
    drift: bool
    status: str
    """"ok" | "drift" | "insufficient_data"."""
    reason: str
    tests: list[TestResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        return {"drift": self.drift, "status": self.status, "reason": self.reason,
                "tests": [t.as_dict() for t in self.tests]}


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(values, side: str, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{side} column {name!r} is not numeric ({e}); pass 1-D arrays of floats") from None
    return arr[np.isfinite(arr)]


def holm_thresholds(p_values: list[float], alpha: float) -> tuple[list[float], list[bool]]:
    """Holm step-down: the i-th smallest of m p-values is compared with alpha / (m - i).

    Returns (threshold, fired) in the input order. Once one comparison fails, every larger p-value is kept
    (not fired) even if it is below its own threshold: that is what keeps the family-wise error at alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    thresholds = [math.nan] * m
    fired = [False] * m
    rejecting = True
    for rank, i in enumerate(order):
        thresholds[i] = alpha / (m - rank)
        rejecting = rejecting and p_values[i] <= thresholds[i]
        fired[i] = rejecting
    return thresholds, fired


def novelty_tail_test(reference: np.ndarray, current: np.ndarray, quantile: float = 0.9) -> tuple[float, float, str]:
    """One-sided exact count test: does the window hold more values above the reference's `quantile` than chance?

    The threshold is the j-th smallest of the m reference values, j = ceil(quantile * (m + 1)). When reference and
    window values are exchangeable (no drift), the chance that a window value exceeds it is Beta(m - j + 1, j)
    distributed, so the window's count above it is beta-binomial: the p-value P(count >= observed) is exact for any
    distribution of the values, and it accounts for the reference being a sample (a plain binomial at 1 - quantile
    would not, and would raise false alarms with small references). The reference's values must be scored the same
    way as the window's (against the same index; leave-one-out when the index is the reference itself).

    Returns (share of the window above the threshold, p-value, note).
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    cur = np.asarray(current, dtype=np.float64)
    m, n = ref.size, cur.size
    if m < 1 or n < 1:
        raise ValueError(f"novelty_tail_test needs values on both sides, got {m} reference and {n} current values")
    j = min(m, max(1, math.ceil(quantile * (m + 1))))
    threshold = float(ref[j - 1])
    above = int((cur > threshold).sum())
    a, b = m - j + 1, j
    p_value = _betabinom_sf(above - 1, n, a, b) if above > 0 else 1.0
    note = (f"{above} of {n} window prompts above the reference's novelty quantile {quantile:g} ({threshold:.4f}); "
            f"{n * a / (a + b):.1f} expected under no drift")
    return above / n, min(1.0, max(0.0, p_value)), note


def detect(reference: dict[str, np.ndarray], current: dict[str, np.ndarray], cfg: DriftConfig) -> DriftResult:
    """Test each stat of `cfg.stats` with its DRIFT_TESTS entry (a two-sample KS test, reference vs current window;
    NOVELTY_STAT with `novelty_tail_test`).

    NaN/inf values are dropped first (a request without generated tokens has no gen_entropy; the test's note
    counts them). A stat with fewer than `cfg.min_window` finite values on either side is reported with a note and
    not tested; with no testable stat the verdict is "insufficient_data", never drift. A reference in which no stat
    has `cfg.min_window` finite values is an error (no window could ever be tested: monitoring would be off without
    saying so). drift = any test fired after Holm's correction.
    """
    if not isinstance(cfg, DriftConfig):
        raise TypeError(f"cfg must be a DriftConfig, got {type(cfg).__name__}")
    if not reference:
        raise ValueError("reference is missing or empty; pass the reference window's columns "
                         f"(a dict with some of {list(cfg.stats)})")
    if not any(s in reference for s in cfg.stats):
        raise ValueError(f"reference has none of the configured stats {list(cfg.stats)} (it has "
                         f"{sorted(reference)}); log those columns for the reference or change DriftConfig.stats")
    ref_cols = {name: _finite(reference[name], "reference", name) for name in cfg.stats if name in reference}
    if all(col.size < cfg.min_window for col in ref_cols.values()):
        counts = ", ".join(f"{name}: {col.size}" for name, col in ref_cols.items())
        raise ValueError(f"the reference has fewer than min_window={cfg.min_window} finite values for every "
                         f"configured stat ({counts}), so no window could ever be tested; recapture the reference "
                         f"with at least {cfg.min_window} requests that carry these stats")
    current = current or {}

    tested: list[TestResult] = []
    skipped: list[TestResult] = []
    for name in cfg.stats:
        ref = ref_cols.get(name, np.empty(0))
        cur = _finite(current[name], "current", name) if name in current else np.empty(0)
        dropped = (np.size(current[name]) - cur.size) if name in current else 0
        short = []
        if name not in reference:
            short.append("missing from the reference")
        elif ref.size < cfg.min_window:
            short.append(f"reference has {ref.size} finite values")
        if cur.size < cfg.min_window:
            short.append(f"current window has {cur.size} finite values")
        if short:
            skipped.append(TestResult(name, math.nan, math.nan, math.nan, False, int(ref.size), int(cur.size),
                                      note=f"not tested: {'; '.join(short)} (min_window={cfg.min_window})"))
            continue
        note = f"{dropped} non-finite current values left out" if dropped else ""
        statistic, p_value, test_note = test_for(name).run(ref, cur, cfg)
        tested.append(TestResult(name, statistic, p_value, math.nan, False, int(ref.size), int(cur.size),
                                 note="; ".join(n for n in (test_note, note) if n)))

    if not tested:
        most = max(t.n_current for t in skipped)
        return DriftResult(False, "insufficient_data",
                           f"insufficient data, no alert: the current window has at most {most} finite values per "
                           f"stat, fewer than min_window={cfg.min_window}; collect a larger window", skipped)

    thresholds, fired = holm_thresholds([t.p_value for t in tested], cfg.alpha)
    for t, thr, f in zip(tested, thresholds, fired):
        t.threshold, t.fired = thr, f
        if not f and t.p_value <= thr:
            kept = "p-value below its threshold but kept: Holm stops at the first non-rejection"
            t.note = f"{t.note}; {kept}" if t.note else kept
    fired_names = [t.name for t in tested if t.fired]
    if fired_names:
        detail = ", ".join(f"{t.name} ({test_for(t.name).statistic}="
                           f"{t.statistic:.3f}, p={t.p_value:.2g} <= {t.threshold:.2g})" for t in tested if t.fired)
        reason = f"drift in {detail}; family-wise alpha={cfg.alpha}"
    else:
        reason = f"no drift in {len(tested)} tested stats at family-wise alpha={cfg.alpha}"
    if skipped:
        reason += f"; not tested: {', '.join(t.name for t in skipped)}"
    return DriftResult(bool(fired_names), "drift" if fired_names else "ok", reason, tested + skipped)


class ConsecutiveRule:
    """Fires when `n` windows in a row drifted.

    An "insufficient_data" window neither extends nor breaks the streak (a quiet hour should not hide a drift that
    persists around it); an "ok" window resets it. Keeps returning True while the drift persists.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ConsecutiveRule needs n >= 1 windows, got {n!r}")
        self.n = n
        self.streak = 0

    def update(self, result: DriftResult) -> bool:
        if result.status not in STATUSES:
            raise ValueError(f"unknown DriftResult.status {result.status!r}; expected one of {STATUSES}")
        if result.status == "drift":
            self.streak += 1
        elif result.status == "ok":
            self.streak = 0
        return self.streak >= self.n
