"""The reference-perplexity decision: rolling median vs the promotion-time value, versions, NaN, history file."""

import json
import math

import pytest

from monitoring.reference_ppl import (
    PplCheckConfig,
    PplMeasurement,
    append_history,
    decide,
    load_history,
)

TEXT = "a" * 64


def _m(ppl, version="3", family="support", text=TEXT, ts=0.0):
    return PplMeasurement(family, version, ppl, text, ts)


BASE = _m(100.0)


def test_within_the_bound_is_ok_and_reports_the_rise():
    v = decide(BASE, [_m(101.0), _m(104.9)], PplCheckConfig())
    assert v.status == "ok" and not v.alert
    assert v.rolling == pytest.approx(102.95) and v.rise == pytest.approx(0.0295)
    assert v.threshold == 0.05 and v.results == [101.0, 104.9] and "+2.95%" in v.reason


def test_a_rise_above_the_bound_alerts():
    v = decide(BASE, [_m(106.0)], PplCheckConfig())
    assert v.status == "alert" and v.alert and v.rise == pytest.approx(0.06)
    assert "above the allowed +5%" in v.reason and "support v3" in v.reason
    assert decide(BASE, [_m(106.0)], PplCheckConfig(max_rise=0.1)).status == "ok"


def test_rolling_median_ignores_one_odd_result_and_uses_only_the_last_window():
    cfg = PplCheckConfig(window=3)
    # one spike among normal results: no alert
    assert decide(BASE, [_m(100.0), _m(150.0), _m(100.5)], cfg).status == "ok"
    # a lasting rise: two of the last three are high
    assert decide(BASE, [_m(100.0), _m(150.0), _m(151.0)], cfg).alert
    # old high results fall out of the window
    v = decide(BASE, [_m(150.0), _m(151.0), _m(100.0), _m(100.2), _m(100.1)], cfg)
    assert v.status == "ok" and v.results == [100.0, 100.2, 100.1]


def test_other_versions_are_left_out_and_no_result_is_insufficient_data():
    history = [_m(300.0, version="2"), _m(300.0, family="other")]
    v = decide(BASE, history, PplCheckConfig())
    assert v.status == "insufficient_data" and not v.alert and v.rolling is None and "no alert" in v.reason
    v = decide(BASE, history + [_m(100.0)], PplCheckConfig())
    assert v.status == "ok" and v.results == [100.0]


def test_a_nan_or_inf_perplexity_is_an_alert_not_a_dropped_value():
    for bad in (math.nan, math.inf):
        v = decide(BASE, [_m(100.0), _m(bad)], PplCheckConfig())
        assert v.status == "alert" and v.alert and "not finite" in v.reason
        assert v.results == [100.0, None]
        json.dumps(v.as_dict(), allow_nan=False)  # strict JSON


@pytest.mark.parametrize("ppl", [math.nan, 0.0, -1.0, math.inf])
def test_a_baseline_that_is_not_a_positive_number_is_an_error(ppl):
    with pytest.raises(ValueError, match="not a positive finite number"):
        decide(_m(ppl), [_m(100.0)], PplCheckConfig())


def test_results_on_another_text_are_an_error():
    with pytest.raises(ValueError, match="not comparable"):
        decide(BASE, [_m(100.0), _m(100.0, text="b" * 64)], PplCheckConfig())


@pytest.mark.parametrize("kwargs, message", [({"max_rise": 0}, "max_rise"), ({"max_rise": -0.1}, "max_rise"),
                                             ({"max_rise": True}, "max_rise"), ({"window": 0}, "window"),
                                             ({"window": 2.5}, "window")])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PplCheckConfig(**kwargs)


def test_measurement_validation():
    with pytest.raises(ValueError, match="family and a version"):
        PplMeasurement("support", "", 1.0, TEXT)
    with pytest.raises(ValueError, match="text_sha256"):
        PplMeasurement("support", "1", 1.0, "")
    assert PplMeasurement("support", 3, "12.5", TEXT).version == "3"


def test_history_round_trip_keep_and_errors(tmp_path):
    path = tmp_path / "sub" / "ppl.jsonl"
    assert load_history(path) == []
    for i in range(5):
        append_history(path, _m(100.0 + i, ts=float(i)), keep=3)
    append_history(path, _m(math.nan, family="other", ts=9.0), keep=3)
    everything = load_history(path)
    assert [m.perplexity for m in everything[:-1]] == [103.0, 104.0]  # only the last 3 lines are kept
    assert everything[-1].family == "other" and math.isnan(everything[-1].perplexity)
    assert [m.ts for m in load_history(path, family="support")] == [3.0, 4.0]
    assert list(path.parent.iterdir()) == [path]  # no temp file left
    path.write_text(path.read_text() + '{"family": "support"}\n')
    with pytest.raises(ValueError, match=r"ppl\.jsonl:4: not a reference-perplexity record"):
        load_history(path)
