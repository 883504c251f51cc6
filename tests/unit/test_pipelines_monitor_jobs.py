"""The rules the scheduled flows only order: the drift monitor's state, window and streak (pipelines.monitor_jobs)
and the retrain's skip while a challenger awaits its canary (pipelines.register.pending_challenger)."""

from __future__ import annotations

from types import SimpleNamespace

from pipelines.monitor_jobs import advance_streak, read_monitor_state, read_window, write_monitor_state
from pipelines.register import pending_challenger


def _result(status: str) -> dict:
    return {"drift": status == "drift", "status": status, "reason": status}


def test_monitor_state_round_trip_and_a_new_champion_starts_fresh(tmp_path):
    ws = SimpleNamespace(root=tmp_path)
    assert read_monitor_state(ws, "fam", "3") == {"version": "3", "last_id": 0, "streak": 0}
    write_monitor_state(ws, "fam", {"version": "3", "last_id": 41, "streak": 1})
    assert (tmp_path / "monitoring" / "fam" / "drift_state.json").is_file()
    assert not list((tmp_path / "monitoring" / "fam").glob("*.tmp"))
    assert read_monitor_state(ws, "fam", "3") == {"version": "3", "last_id": 41, "streak": 1}
    assert read_monitor_state(ws, "fam", "4") == {"version": "4", "last_id": 0, "streak": 0}


def test_no_prediction_log_is_an_empty_window(tmp_path):
    assert read_window(tmp_path / "predictions.db", "fam", "3", 0) == []


def test_an_alert_needs_consecutive_drifted_windows():
    fire, streak = advance_streak(0, 2, _result("drift"))
    assert (fire, streak) == (False, 1)
    fire, streak = advance_streak(streak, 2, _result("drift"))
    assert fire and streak == 2
    assert advance_streak(1, 2, _result("ok")) == (False, 0)
    assert advance_streak(0, 1, _result("drift"))[0]


class _Registry:
    def __init__(self, challenger: str | None, parent: str):
        self.challenger, self.parent = challenger, parent

    def alias(self, family, name):
        return self.challenger if name == "challenger" else None

    def get(self, family, version):
        return SimpleNamespace(tags={"parent_version": self.parent})


def test_a_challenger_retrained_from_the_champion_is_pending():
    assert pending_challenger(_Registry("5", parent="4"), "fam", "4") == "5"
    assert pending_challenger(_Registry("5", parent="3"), "fam", "4") is None  # made from an older champion
    assert pending_challenger(_Registry(None, parent="4"), "fam", "4") is None
