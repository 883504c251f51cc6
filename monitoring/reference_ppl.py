"""Reference-perplexity monitor: has the champion's perplexity on a fixed reference text risen since it was promoted?

A scheduled job measures the served champion's perplexity on a fixed text (one no adapter trains on) and appends it
to a history file; `decide` compares the rolling median of the latest results of that version with the value
recorded for it at promotion, and alerts on a rise above the configured fraction (default 5%). For a given model the
number is deterministic, so a rise means the weights being served are not the ones that were promoted (a corrupted
or swapped adapter or base, a changed quantization) or the measurement changed. numpy-free and torch-free: the
measurement itself is pipelines.monitor_jobs.

    verdict = decide(baseline, load_history(path, family), PplCheckConfig(max_rise=0.05, window=3))

Run:  adapterops schedules serve (the periodic job is pipelines.monitor_jobs.reference_ppl_check)
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.atomic import write_text
from common.jsonl import JsonlError, read_jsonl

STATUSES = ("ok", "alert", "insufficient_data")


@dataclass
class PplCheckConfig:
    """When a rise of the reference perplexity is an alert."""

    max_rise: float = 0.05
    """Alert when the rolling perplexity exceeds the promotion-time value by more than this fraction."""
    window: int = 3
    """Latest results of the champion version in the rolling window; their median is compared, so one odd
    measurement neither fires nor hides an alert (the first results use what there is)."""

    def __post_init__(self):
        if isinstance(self.max_rise, bool) or not isinstance(self.max_rise, (int, float)) or not (
                0.0 < self.max_rise < 10.0):
            raise ValueError(f"PplCheckConfig.max_rise must be a fraction in (0, 10), got {self.max_rise!r}; "
                             "0.05 alerts on a 5% rise")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"PplCheckConfig.window must be an integer >= 1, got {self.window!r}")


@dataclass
class PplMeasurement:
    """One perplexity measurement of one adapter version on the reference text."""

    family: str
    version: str
    perplexity: float
    text_sha256: str
    """Hash of the reference text and of how it was cut into windows: only equal settings are comparable."""
    ts: float = field(default_factory=time.time)

    def __post_init__(self):
        self.version = str(self.version)
        self.perplexity = float(self.perplexity)
        if not self.family or not self.version:
            raise ValueError(f"a perplexity measurement needs a family and a version, got {self.family!r}, "
                             f"{self.version!r}")
        if not self.text_sha256:
            raise ValueError("a perplexity measurement needs the text_sha256 of what it measured")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["perplexity"] = self.perplexity if math.isfinite(self.perplexity) else None  # strict JSON
        return d


@dataclass
class PplVerdict:
    status: str
    """"ok" | "alert" | "insufficient_data"."""
    alert: bool
    reason: str
    family: str
    version: str
    baseline: float
    """Perplexity recorded for this version at promotion."""
    rolling: float | None
    """Median of the latest `window` results (None when there are none)."""
    rise: float | None
    """rolling / baseline - 1."""
    threshold: float
    """The configured max_rise."""
    results: list[float]
    """The perplexities in the rolling window, oldest first (None for a non-finite one)."""

    def as_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def decide(baseline: PplMeasurement, history: list[PplMeasurement], cfg: PplCheckConfig) -> PplVerdict:
    """The verdict for `baseline`'s version from its latest results in `history` (oldest first).

    Results of other versions are left out (a promotion starts a new window). A result measured on another text
    or windowing than the baseline is an error, as is a baseline that is not a positive finite number. A non-finite
    perplexity in the window is an alert: the model produced NaN or inf logits.
    """
    if not isinstance(cfg, PplCheckConfig):
        raise TypeError(f"cfg must be a PplCheckConfig, got {type(cfg).__name__}")
    if not (math.isfinite(baseline.perplexity) and baseline.perplexity > 0):
        raise ValueError(f"the promotion-time perplexity of {baseline.family} v{baseline.version} is "
                         f"{baseline.perplexity}, not a positive finite number; record it again (re-run the gates "
                         "of that version) before checking against it")
    mine = [m for m in history if m.family == baseline.family and m.version == baseline.version]
    other_text = [m for m in mine if m.text_sha256 != baseline.text_sha256]
    if other_text:
        raise ValueError(f"{len(other_text)} result(s) of {baseline.family} v{baseline.version} were measured on "
                         f"reference text/windows {other_text[-1].text_sha256[:12]}, the baseline on "
                         f"{baseline.text_sha256[:12]}; perplexities of different texts are not comparable: measure "
                         "with the baseline's settings or record a new baseline")
    window = mine[-cfg.window:]
    common = dict(family=baseline.family, version=baseline.version, baseline=baseline.perplexity,
                  threshold=cfg.max_rise, results=[_finite_or_none(m.perplexity) for m in window])
    if not window:
        return PplVerdict("insufficient_data", False, f"no reference-perplexity result for {baseline.family} "
                          f"v{baseline.version} yet; no alert", rolling=None, rise=None, **common)
    bad = [m for m in window if not math.isfinite(m.perplexity)]
    if bad:
        return PplVerdict("alert", True, f"{baseline.family} v{baseline.version}: reference perplexity was "
                          f"{bad[-1].perplexity} (not finite) in {len(bad)} of the last {len(window)} checks: the "
                          "served model produces NaN/inf logits", rolling=None, rise=None, **common)
    rolling = statistics.median(m.perplexity for m in window)
    rise = rolling / baseline.perplexity - 1
    what = (f"{baseline.family} v{baseline.version}: reference perplexity {rolling:.4g} (median of the last "
            f"{len(window)}) vs {baseline.perplexity:.4g} at promotion: {rise:+.2%}")
    if rise > cfg.max_rise:
        return PplVerdict("alert", True, f"{what}, above the allowed +{cfg.max_rise:.0%}", rolling=rolling, rise=rise,
                          **common)
    return PplVerdict("ok", False, f"{what}, within +{cfg.max_rise:.0%}", rolling=rolling, rise=rise, **common)


def load_history(path: Path, family: str | None = None) -> list[PplMeasurement]:
    """Measurements in a JSONL history file, oldest first (a missing file is an empty history)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = read_jsonl(path, _measurement)
    except JsonlError as e:
        raise ValueError(f"{path}:{e.lineno}: not a reference-perplexity record ({e.json_error or e.detail}); fix "
                         "or remove that line") from None
    return [m for m in rows if family is None or m.family == family]


def _measurement(d: dict) -> PplMeasurement:
    return PplMeasurement(d["family"], d["version"], math.nan if d["perplexity"] is None else d["perplexity"],
                          d["text_sha256"], d["ts"])


def append_history(path: Path, m: PplMeasurement, keep: int = 1000) -> None:
    """Append `m` to the history file, keeping its last `keep` records (rewritten atomically)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    lines = [ln for ln in lines if ln.strip()][-(keep - 1):] if keep > 1 else []
    lines.append(json.dumps(m.as_dict(), sort_keys=True, allow_nan=False))
    write_text(path, "\n".join(lines) + "\n")
