"""The drift decision: power, false-alarm rate, Holm step-down, small windows, NaN, the consecutive rule."""

import json

import numpy as np
import pytest

from monitoring.drift import (
    EMBEDDING_STAT,
    NOVELTY_STAT,
    ConsecutiveRule,
    DriftConfig,
    DriftResult,
    detect,
    holm_thresholds,
    novelty_tail_test,
)
from monitoring.embeddings import EmbeddingIndex
from monitoring.logit_stats import REQUEST_STATS

ALL_STATS = REQUEST_STATS + (EMBEDDING_STAT, NOVELTY_STAT)


def _cols(rng, n, shift=None):
    shift = shift or {}
    return {s: rng.normal(shift.get(s, 0.0), 1.0, n) for s in ALL_STATS}


def test_default_config_tests_logit_stats_and_embedding():
    assert DriftConfig().stats == ("prompt_nll", "gen_entropy", "gen_max_prob", "embedding_max_cos",
                                   "embedding_novelty")


def test_detects_half_sd_shift_and_names_the_stat():
    rng = np.random.default_rng(0)
    res = detect(_cols(rng, 200), _cols(rng, 200, {"prompt_nll": 0.5}), DriftConfig())
    assert res.drift and res.status == "drift"
    fired = {t.name for t in res.tests if t.fired}
    assert fired == {"prompt_nll"}
    assert "prompt_nll" in res.reason


def test_power_for_half_sd_shift_on_one_stat():
    cfg = DriftConfig(stats=("prompt_nll",))
    hits = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        hits += detect({"prompt_nll": rng.normal(0, 1, 200)}, {"prompt_nll": rng.normal(0.5, 1, 200)}, cfg).drift
    assert hits >= 85, hits


def test_quiet_on_same_distribution():
    rng = np.random.default_rng(1)
    res = detect(_cols(rng, 200), _cols(rng, 200), DriftConfig())
    assert not res.drift and res.status == "ok"
    assert len(res.tests) == 5 and all(0.0 <= t.p_value <= 1.0 for t in res.tests)


def test_false_alarm_rate_is_bounded_by_alpha():
    cfg = DriftConfig(alpha=0.01)
    alarms = 0
    n_windows = 300
    for seed in range(n_windows):
        rng = np.random.default_rng(1000 + seed)
        alarms += detect(_cols(rng, 200), _cols(rng, 150), cfg).drift
    # Expected <= 1% (3 windows); 3% leaves room for sampling noise while catching a missing correction
    # (four uncorrected tests at 1% would alarm ~4% of the time).
    assert alarms / n_windows <= 0.03, alarms


def test_uncorrected_tests_would_alarm_more_often():
    # The same null windows tested one stat at a time without correction alarm more often than detect does:
    # shows the correction is doing something, not that the data happen to be tame.
    raw = corrected = 0
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        ref, cur = _cols(rng, 200), _cols(rng, 150)
        corrected += detect(ref, cur, DriftConfig(alpha=0.05)).drift
        raw += any(detect({s: ref[s]}, {s: cur[s]}, DriftConfig(alpha=0.05, stats=(s,))).drift for s in ALL_STATS)
    assert corrected < raw


def test_holm_thresholds_step_down():
    thr, fired = holm_thresholds([0.5, 0.001, 0.02, 0.004], alpha=0.01)
    assert thr == pytest.approx([0.01, 0.0025, 0.005, 0.01 / 3])
    assert fired == [False, True, False, False]
    # 0.009 <= its own threshold 0.01, but Holm stops at the first non-rejection (0.006 > 0.005).
    thr, fired = holm_thresholds([0.006, 0.009], alpha=0.01)
    assert thr == pytest.approx([0.005, 0.01]) and fired == [False, False]
    thr, fired = holm_thresholds([0.004, 0.009], alpha=0.01)
    assert fired == [True, True]


def test_detect_reports_holm_thresholds():
    rng = np.random.default_rng(2)
    cur = _cols(rng, 200, {"prompt_nll": 2.0, "gen_entropy": 1.0})
    res = detect(_cols(rng, 200), cur, DriftConfig(alpha=0.02))
    by_p = sorted(res.tests, key=lambda t: t.p_value)
    assert [t.threshold for t in by_p] == pytest.approx([0.02 / 5, 0.02 / 4, 0.02 / 3, 0.02 / 2, 0.02])
    assert by_p[0].name == "prompt_nll" and by_p[0].fired and by_p[1].name == "gen_entropy" and by_p[1].fired


def test_small_window_is_insufficient_never_drift():
    rng = np.random.default_rng(3)
    cfg = DriftConfig(min_window=50)
    res = detect(_cols(rng, 500), _cols(rng, 49, {s: 10.0 for s in ALL_STATS}), cfg)
    assert res.status == "insufficient_data" and not res.drift
    assert all(not t.fired and "49 finite values" in t.note for t in res.tests)
    assert detect(_cols(rng, 500), _cols(rng, 50, {s: 10.0 for s in ALL_STATS}), cfg).drift


def test_empty_current_is_insufficient_data():
    rng = np.random.default_rng(4)
    assert detect(_cols(rng, 100), {}, DriftConfig()).status == "insufficient_data"
    assert detect(_cols(rng, 100), {s: np.array([]) for s in ALL_STATS}, DriftConfig()).status == "insufficient_data"


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="reference is missing"):
        detect({}, {"prompt_nll": np.zeros(100)}, DriftConfig())
    with pytest.raises(ValueError, match="none of the configured stats"):
        detect({"other": np.zeros(100)}, {"prompt_nll": np.zeros(100)}, DriftConfig())


def test_nan_values_are_dropped_and_sparse_stats_not_tested():
    rng = np.random.default_rng(5)
    ref = _cols(rng, 300)
    cur = _cols(rng, 120, {"prompt_nll": 3.0, "gen_entropy": 3.0})
    cur["prompt_nll"][:30] = np.nan  # 90 finite values left: still tested
    cur["gen_entropy"][:80] = np.nan  # 40 left: below min_window, not tested
    ref["gen_max_prob"][:10] = np.inf
    res = detect(ref, cur, DriftConfig())
    t = {x.name: x for x in res.tests}
    assert t["prompt_nll"].n_current == 90 and t["prompt_nll"].fired
    assert not t["gen_entropy"].fired and np.isnan(t["gen_entropy"].p_value) and "40 finite" in t["gen_entropy"].note
    assert t["gen_max_prob"].n_reference == 290
    assert res.status == "drift" and "not tested: gen_entropy" in res.reason
    # Only four tests were run, so Holm divides alpha by 4, not 5.
    assert min(x.threshold for x in res.tests if not np.isnan(x.threshold)) == pytest.approx(0.01 / 4)


def test_stat_missing_from_reference_is_reported_not_tested():
    rng = np.random.default_rng(6)
    ref = _cols(rng, 200)
    del ref[EMBEDDING_STAT]
    res = detect(ref, _cols(rng, 200), DriftConfig())
    emb = next(t for t in res.tests if t.name == EMBEDDING_STAT)
    assert not emb.fired and "missing from the reference" in emb.note
    assert res.status == "ok"


def test_as_dict_is_strict_json():
    rng = np.random.default_rng(7)
    cur = _cols(rng, 100)
    cur["gen_entropy"][:] = np.nan
    d = detect(_cols(rng, 100), cur, DriftConfig()).as_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["status"] == "ok" and len(back["tests"]) == 5
    assert next(t for t in back["tests"] if t["name"] == "gen_entropy")["p_value"] is None


def _result(status):
    return DriftResult(drift=status == "drift", status=status, reason="", tests=[])


def test_consecutive_rule():
    rule = ConsecutiveRule(3)
    seq = ["drift", "drift", "ok", "drift", "drift", "insufficient_data", "drift", "drift", "ok"]
    assert [rule.update(_result(s)) for s in seq] == [False, False, False, False, False, False, True, True, False]
    assert ConsecutiveRule(1).update(_result("drift"))
    with pytest.raises(ValueError, match="n >= 1"):
        ConsecutiveRule(0)
    with pytest.raises(ValueError, match="unknown DriftResult.status"):
        rule.update(_result("maybe"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"min_window": 1}, "min_window must be an integer >= 2"),
        ({"min_window": 10.5}, "min_window must be an integer >= 2"),
        ({"stats": ()}, "stats is empty"),
        ({"stats": "prompt_nll"}, "got the string"),
        ({"stats": ("prompt_nll", "prompt_nll")}, "more than once"),
        ({"stats": ("prompt_nll", "")}, "non-empty strings"),
        ({"consecutive": 0}, "consecutive must be an integer >= 1"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DriftConfig(**kwargs)


def test_config_accepts_list_of_stats():
    cfg = DriftConfig(stats=["prompt_nll", "gen_entropy"])
    assert cfg.stats == ("prompt_nll", "gen_entropy")
    assert cfg.as_dict()["stats"] == ["prompt_nll", "gen_entropy"]


def test_reference_too_small_for_every_stat_is_an_error_not_silence():
    rng = np.random.default_rng(8)
    ref = _cols(rng, 49)
    with pytest.raises(ValueError, match="fewer than min_window=50 finite values for every configured stat"):
        detect(ref, _cols(rng, 200), DriftConfig())
    ref = _cols(rng, 200)
    ref["prompt_nll"][:] = np.nan
    ref["gen_entropy"][:] = np.nan
    ref["gen_max_prob"][:] = np.nan
    ref[NOVELTY_STAT][:] = np.nan
    ref[EMBEDDING_STAT][:170] = np.nan  # 30 finite values left
    with pytest.raises(ValueError, match="recapture the reference"):
        detect(ref, _cols(rng, 200), DriftConfig())
    # one testable stat is enough: the others are reported as not tested
    ref[EMBEDDING_STAT] = rng.normal(0, 1, 200)
    res = detect(ref, _cols(rng, 200), DriftConfig())
    assert res.status == "ok" and sum(np.isnan(t.p_value) for t in res.tests) == 4


def test_dropped_non_finite_values_are_counted_in_the_note():
    rng = np.random.default_rng(9)
    cur = _cols(rng, 200)
    cur["gen_entropy"][:25] = np.nan
    cur["gen_max_prob"][:5] = -np.inf
    t = {x.name: x for x in detect(_cols(rng, 200), cur, DriftConfig()).tests}
    assert t["gen_entropy"].note.startswith("25 non-finite current values left out")
    assert t["gen_max_prob"].note.startswith("5 non-finite") and t["prompt_nll"].note == ""


# ---------------------------------------------------------------------------------------------- novelty tail count


def _topics(rng, n_topics, dim=32, spread=0.35):
    centres = rng.normal(size=(n_topics, dim))
    return centres / np.linalg.norm(centres, axis=1, keepdims=True), spread


def _prompts_of(rng, topics, n, which=None):
    centres, spread = topics
    idx = rng.integers(len(centres), size=n) if which is None else np.full(n, which)
    x = centres[idx] + rng.normal(scale=spread / np.sqrt(centres.shape[1]), size=(n, centres.shape[1])) * 3
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _novelty_window(rng, known, n_index, n, novel_share=0.0, new=None, index=None):
    """(reference, current) novelty columns as monitoring.check builds them: window prompts scored against an
    index of known prompts, the null being the index's own leave-one-out novelty."""
    index = index or EmbeddingIndex(_prompts_of(rng, known, n_index))
    k_new = int(round(novel_share * n))
    cur = _prompts_of(rng, known, n - k_new)
    if k_new:
        cur = np.concatenate([cur, _prompts_of(rng, new, k_new)])
    _, cur_nov = index.neighbour_stats(cur, k=5)
    return {NOVELTY_STAT: index.self_novelty(k=5)}, {NOVELTY_STAT: cur_nov}


def test_novelty_count_false_alarms_are_nominal_on_reference_like_data():
    """Window and index from the same mixture of topics: the calibrated count alarms about alpha of the time."""
    rng = np.random.default_rng(20)
    known = _topics(rng, 12)
    cfg = DriftConfig(stats=(NOVELTY_STAT,), alpha=0.05)
    trials = 400
    alarms = sum(detect(*_novelty_window(rng, known, 200, 200), cfg).drift for _ in range(trials))
    # nominal 5% (20 of 400), averaged over indexes; a plain binomial at 5% that ignores the index's sampling
    # would alarm more often than that
    assert alarms / trials <= 0.085, alarms
    assert alarms > 0  # not degenerate: the test can fire


def test_novelty_count_detects_a_planted_ten_percent_shift():
    """10% of a 200-request window from topics the index never had: the KS of max-cos misses most of these,
    the tail count catches them."""
    rng = np.random.default_rng(21)
    known, new = _topics(rng, 12), _topics(rng, 3)
    cfg = DriftConfig(stats=(NOVELTY_STAT, EMBEDDING_STAT), alpha=0.01)
    hits = ks_hits = 0
    index = EmbeddingIndex(_prompts_of(rng, known, 1000))
    for _ in range(100):
        ref, cur = _novelty_window(rng, known, 1000, 200, novel_share=0.1, new=new, index=index)
        ref[EMBEDDING_STAT] = 1.0 - ref[NOVELTY_STAT]  # a stand-in KS column that sees the same shift
        cur[EMBEDDING_STAT] = 1.0 - cur[NOVELTY_STAT]
        res = detect(ref, cur, cfg)
        hits += res.drift
        ks_hits += next(t for t in res.tests if t.name == EMBEDDING_STAT).p_value <= 0.01 / 2
    assert hits >= 90, hits
    assert ks_hits < hits
    tail = next(t for t in res.tests if t.name == NOVELTY_STAT)
    assert "expected under no drift" in tail.note and tail.statistic > 0.1


def test_self_novelty_merges_duplicates_and_leaves_each_prompt_out():
    rng = np.random.default_rng(22)
    rows = _prompts_of(rng, _topics(rng, 4), 50)
    with_dupes = EmbeddingIndex(np.concatenate([rows, rows[:10]]))
    nov = with_dupes.self_novelty(k=3)
    assert nov.shape == (50,) and (nov > 1e-4).all()  # no prompt found its own twin
    np.testing.assert_allclose(np.sort(nov), np.sort(EmbeddingIndex(rows).self_novelty(k=3)), atol=1e-6)
    assert with_dupes.self_novelty(k=3) is nov  # cached
    assert EmbeddingIndex(rows).self_novelty(k=3, max_rows=20).shape == (20,)


def test_novelty_tail_test_is_exact_and_one_sided():
    ref = np.arange(1, 100, dtype=float)  # 99 values: j = ceil(0.9 * 100) = 90, threshold 90
    share, p, note = novelty_tail_test(ref, np.full(50, 50.0), 0.9)
    assert share == 0.0 and p == 1.0 and "0 of 50" in note  # fewer novel prompts than chance: never drift
    share, p, _ = novelty_tail_test(ref, np.full(50, 95.0), 0.9)
    assert share == 1.0 and p < 1e-20
    # the p-value is the beta-binomial tail: P(count >= 5) of 10 draws with exceedance ~ Beta(10, 90)
    from scipy.stats import betabinom

    cur = np.array([91.0] * 5 + [1.0] * 5)
    _, p, _ = novelty_tail_test(ref, cur, 0.9)
    assert p == pytest.approx(betabinom.sf(4, 10, 10, 90))
    with pytest.raises(ValueError, match="both sides"):
        novelty_tail_test(ref, np.array([]), 0.9)


def test_novelty_config_validation():
    with pytest.raises(ValueError, match="novelty_quantile"):
        DriftConfig(novelty_quantile=1.0)
    with pytest.raises(ValueError, match="novelty_k"):
        DriftConfig(novelty_k=0)
