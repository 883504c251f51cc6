"""Fallback policy: what counts as severe drift, deferral during a rollout, release on a new champion, persistence.
No model, no torch, no server (the HTTP side is tests/integration/test_serving_fallback.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.fallback import FallbackConfig, FallbackPolicy, combined_p_value

ROOT = Path(__file__).resolve().parents[2]


def result(p_values, drift=True, status=None):
    """A DriftResult.as_dict()-shaped window verdict."""
    return {"drift": drift, "status": status or ("drift" if drift else "ok"), "reason": "test",
            "tests": [{"name": f"s{i}", "p_value": p} for i, p in enumerate(p_values)]}


MILD = result([0.002, 0.3, 0.6, None])  # fired at alpha 0.01 (0.002 * 3 tested = 0.006), far from severe
OK = result([0.4, 0.5, 0.9], drift=False)
EMPTY = result([None, None], drift=False, status="insufficient_data")


def policy(tmp_path=None, **kw):
    cfg = FallbackConfig(enabled=True, **{"severe_windows": 3, "severe_alpha": 1e-6, **kw})
    return FallbackPolicy(cfg, tmp_path / "fb.json" if tmp_path is not None else None)


def test_serving_fallback_does_not_import_torch():
    code = ("import sys, serving.fallback, serving.client; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'pipelines', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_config_validation():
    with pytest.raises(ValueError, match="target"):
        FallbackConfig(target="champion")
    with pytest.raises(ValueError, match="severe_windows"):
        FallbackConfig(severe_windows=0)
    with pytest.raises(ValueError, match="severe_alpha"):
        FallbackConfig(severe_alpha=1.5)
    with pytest.raises(ValueError, match="registry_poll_s"):
        FallbackConfig(registry_poll_s=0)
    assert FallbackConfig().enabled is False  # moving live traffic is opt-in


def test_combined_p_value_is_holm_first_step():
    assert combined_p_value(MILD) == pytest.approx(0.006)
    assert combined_p_value(result([1e-9, 0.5])) == pytest.approx(2e-9)
    assert combined_p_value(EMPTY) is None and combined_p_value(None) is None


def test_a_single_mild_alert_does_not_engage_but_a_streak_does():
    p = policy()
    decisions = [p.observe("fam", "2", True, details=MILD) for _ in range(3)]
    assert [d["engage"] for d in decisions] == [False, False, True]
    assert [d["streak"] for d in decisions] == [1, 2, 3] and not decisions[1]["severe"]
    assert "3 windows in a row" in decisions[2]["reason"]


def test_ok_window_resets_the_streak_and_insufficient_data_keeps_it():
    p = policy()
    p.observe("fam", "2", True, details=MILD)
    p.observe("fam", "2", True, details=MILD)
    d = p.observe("fam", "2", False, details=OK)
    assert d["streak"] == 0 and d["counted"]
    p.observe("fam", "2", True, details=MILD)
    p.observe("fam", "2", True, details=MILD)
    d = p.observe("fam", "2", True, details=EMPTY)  # drift=True but status says insufficient: not counted
    assert not d["counted"] and d["streak"] == 2 and not d["engage"]
    assert p.observe("fam", "2", None)["streak"] == 2
    assert p.observe("fam", "2", True, details=MILD)["engage"]


def test_one_window_far_beyond_alpha_or_marked_severe_engages_at_once():
    p = policy()
    d = p.observe("fam", "2", True, details=result([1e-9, 0.2, 0.4]))
    assert d["engage"] and "combined p-value" in d["reason"] and d["streak"] == 1
    q = policy(severe_alpha=None)
    assert not q.observe("fam", "2", True, details=result([1e-12]))["engage"]  # only the streak counts then
    assert q.observe("other", "1", True, severe=True, details=MILD)["engage"]


def test_engaged_fallback_is_kept_through_quiet_windows_and_released_by_a_new_champion(tmp_path):
    p = policy(tmp_path)
    for _ in range(3):
        d = p.observe("fam", "2", True, details=MILD)
    assert d["engage"]
    p.mark_engaged("fam", "1")
    assert p.engaged() == {"fam": "1"}
    # the monitors now see the fallback's traffic: a quiet window does not release it, nor re-engage
    d = p.observe("fam", "2", False, details=OK)
    assert not d["engage"] and d["engaged"]["version"] == "1" and d["severe"]
    assert p.champion_changed("fam", "2") is None  # same champion: nothing to undo
    undone = p.champion_changed("fam", "3")
    assert undone["version"] == "1" and undone["champion"] == "2" and undone["target"] == "base"
    assert p.engaged() == {} and p.status("fam")["streak"] == 0 and p.status("fam")["champion"] == "3"
    # a mild alert about the new champion starts from zero
    assert p.observe("fam", "3", True, details=MILD)["streak"] == 1


def test_verdict_about_another_version_is_ignored():
    p = policy()
    d = p.observe("fam", "2", True, severe=True, version="1", details=MILD)
    assert not d["counted"] and not d["engage"] and "champion is 2" in d["ignored"]
    assert p.status("fam")["streak"] == 0


def test_observe_refuses_a_silent_champion_change_while_engaged():
    p = policy()
    p.observe("fam", "2", True, severe=True)
    p.mark_engaged("fam", "base")
    with pytest.raises(RuntimeError, match="champion_changed"):
        p.observe("fam", "3", True)


def test_severe_drift_during_a_rollout_is_deferred_until_it_ends():
    p = policy()
    d = p.observe("fam", "2", True, severe=True, defer=True)
    assert d["deferred"] and not d["engage"] and d["pending"]
    assert p.should_engage("fam")  # the rollout ended without a new champion: engage now
    p.mark_engaged("fam", "base")
    assert not p.should_engage("fam")


def test_failed_engagement_is_retried_on_the_next_verdict():
    p = policy()
    assert p.observe("fam", "2", True, severe=True)["engage"]
    p.mark_failed("fam", "no previous version")
    assert p.status("fam")["error"] == "no previous version"
    assert p.observe("fam", "2", True, details=MILD)["engage"]


def test_operator_release_forgets_the_drift():
    p = policy()
    p.observe("fam", "2", True, severe=True)
    p.mark_engaged("fam", "base")
    assert p.release("fam")["version"] == "base"
    assert p.engaged() == {} and not p.status("fam")["severe"] and p.release("nope") is None


def test_state_survives_a_restart_and_a_corrupt_file_names_itself(tmp_path):
    p = policy(tmp_path)
    p.observe("fam", "2", True, details=MILD)
    p.observe("other", "5", True, severe=True)
    p.mark_engaged("other", "4")
    q = policy(tmp_path)
    assert q.engaged() == {"other": "4"} and q.status("fam")["streak"] == 1
    assert q.observe("fam", "2", True, details=MILD)["streak"] == 2
    assert json.loads((tmp_path / "fb.json").read_text())["families"]["fam"]["streak"] == 2
    (tmp_path / "fb.json").write_text("{broken")
    with pytest.raises(RuntimeError, match="fb.json"):
        policy(tmp_path)
