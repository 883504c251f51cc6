"""monitoring.drift.DRIFT_TESTS: every stat's test comes from the registry; a new test is one entry."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring import drift
from monitoring.check import EMBEDDING_STATS
from monitoring.logit_stats import REQUEST_STATS


def test_the_registry_holds_every_default_stat_in_order():
    assert drift.DriftConfig().stats == tuple(drift.DRIFT_TESTS)
    assert tuple(drift.DRIFT_TESTS) == REQUEST_STATS + (drift.EMBEDDING_STAT, drift.NOVELTY_STAT)
    assert EMBEDDING_STATS == (drift.EMBEDDING_STAT, drift.NOVELTY_STAT)
    assert drift.test_for(drift.NOVELTY_STAT).run is drift.novelty_test
    assert drift.test_for("a_column_of_my_own") is drift.KS


def test_a_registered_test_is_used_and_holm_corrected(monkeypatch):
    calls = []

    def always_tiny(ref, cur, cfg):
        calls.append((ref.size, cur.size))
        return 42.0, 1e-9, "planted"

    monkeypatch.setitem(drift.DRIFT_TESTS, "planted_stat", drift.DriftTest(always_tiny, statistic="Q"))
    rng = np.random.default_rng(0)
    same = rng.normal(size=200)
    cfg = drift.DriftConfig(stats=("planted_stat", "other"), min_window=50)
    res = drift.detect({"planted_stat": same, "other": same}, {"planted_stat": same, "other": same}, cfg)
    assert calls == [(200, 200)]
    planted = next(t for t in res.tests if t.name == "planted_stat")
    assert planted.fired and planted.statistic == 42.0 and planted.note == "planted"
    assert planted.threshold == pytest.approx(cfg.alpha / 2)  # Holm over the 2 tested stats
    assert res.status == "drift" and "planted_stat (Q=42.000" in res.reason


def test_needs_is_checked():
    with pytest.raises(ValueError, match="needs must be one of"):
        drift.DriftTest(drift.ks_test, needs="gpu")
