"""The drift decision: two-sample KS tests on per-request statistics, Holm-Bonferroni across them.

This is the one implementation of "has this window drifted?"; the CLI (`adapterops monitor check`), the
retraining trigger and the tests all call `detect`. Inputs are plain column dicts {stat name: 1-D array}, so the
module needs numpy and scipy only (the stat names come from `logit_stats.REQUEST_STATS`).

    from monitoring.drift import DriftConfig, detect
    result = detect(reference_columns, current_columns, DriftConfig(alpha=0.01, min_window=50))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from monitoring.logit_stats import REQUEST_STATS


def _ks_2samp(*args, **kwargs):
    from scipy.stats import ks_2samp  # imported on use: scipy.stats costs ~1 s, the CLI's --help should not pay it

    return ks_2samp(*args, **kwargs)

# Column name of the per-request max cosine similarity of the prompt's embedding to the reference (or training)
# prompts; a drop in it means prompts unlike anything seen before.
EMBEDDING_STAT = "embedding_max_cos"

STATUSES = ("ok", "drift", "insufficient_data")


@dataclass
class DriftConfig:
    """How a window of requests is compared with the reference."""

    alpha: float = 0.01
    """Family-wise false-alarm rate per window; Holm-Bonferroni spreads it across the tests."""
    min_window: int = 50
    """Fewest finite values a stat needs (in both reference and window) to be tested; a window with no testable
    stat is "insufficient_data", never drift. KS on a handful of values is noise."""
    stats: tuple[str, ...] = REQUEST_STATS + (EMBEDDING_STAT,)
    """Which columns to test."""
    consecutive: int = 2
    """Windows in a row that must drift before an alert fires (see `ConsecutiveRule`); higher trades detection
    delay for fewer alerts. 2 by default: bench/drift_eval.py found that with ONE fixed reference (what a deployed
    version keeps) the per-window false-alarm rate is uneven across references (median 0%, 90th percentile 4%,
    worst 12% over 100 references, 0.71% on average); two windows in a row bring the expected rate to ~0.03%,
    while a real shift (detected in 100% of 200-request windows) costs one window of delay."""

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
    """KS statistic D (NaN when not tested)."""
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


def detect(reference: dict[str, np.ndarray], current: dict[str, np.ndarray], cfg: DriftConfig) -> DriftResult:
    """Test each stat of `cfg.stats` with a two-sample KS test, reference vs current window.

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
        ks = _ks_2samp(ref, cur)
        tested.append(TestResult(name, float(ks.statistic), float(ks.pvalue), math.nan, False,
                                 int(ref.size), int(cur.size),
                                 note=f"{dropped} non-finite current values left out" if dropped else ""))

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
        detail = ", ".join(f"{t.name} (D={t.statistic:.3f}, p={t.p_value:.2g} <= {t.threshold:.2g})"
                           for t in tested if t.fired)
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
