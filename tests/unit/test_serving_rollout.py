"""Rollout controller: steps, analysis, hold-and-confirm, persistence, gradual rollback; no model, no torch."""

import json
import math
import time

import numpy as np
import pytest

from serving.rollout import (
    FAIL,
    INSUFFICIENT,
    PASS,
    SKIPPED,
    RolloutConfig,
    RolloutController,
    RolloutError,
    check_error_rate,
    check_feedback,
    check_latency,
    check_nll,
)


class Events:
    def __init__(self):
        self.promoted, self.rolled_back, self.weights = [], [], []

    def controller(self, path, cfg, **kw):
        ctl = RolloutController(path, cfg, on_promote=lambda f, v: self.promoted.append((f, v)),
                                on_rollback=lambda f, v, r: self.rolled_back.append((f, v, r)), **kw)
        ctl.subscribe(lambda f: self.weights.append(ctl.weight(f)))
        return ctl


def drive(ctl, rng, family="fam", champion="1", challenger="2", bad=None, n_max=20_000, feedback=0.6,
          err_p=0.02, start_index=0):
    """Route requests by the controller's weight and record synthetic outcomes until the rollout ends."""
    i = start_index
    while ctl.is_active(family) and i < start_index + n_max:
        _, _, w = ctl.weight(family)
        version = challenger if rng.random() < w else champion
        worse = bad is not None and version == challenger and bad.get("when", lambda c: True)(ctl)
        err = rng.random() < (bad["err"] if worse and "err" in bad else err_p)
        lat = rng.lognormal(3.5, 0.6) * (bad["lat"] if worse and "lat" in bad else 1.0)
        nll = rng.normal(2.0, 0.4) * (bad["nll"] if worse and "nll" in bad else 1.0)
        rid = f"r{i}"
        ctl.record(family, version, rid, lat, err, nll)
        if rng.random() < feedback:
            score = rng.beta(1, 4) if worse and "fb" in bad else rng.beta(2, 2)
            ctl.record_feedback(rid, float(score))
        i += 1
    return i


def test_config_validation():
    with pytest.raises(ValueError):
        RolloutConfig(steps=())
    with pytest.raises(ValueError):
        RolloutConfig(steps=(0.5, 0.25))
    with pytest.raises(ValueError):
        RolloutConfig(steps=(0.0, 1.0))
    with pytest.raises(ValueError):
        RolloutConfig(alpha=0.0)
    assert RolloutConfig(steps=[0.1, 1]).steps == (0.1, 1.0)


def test_good_challenger_steps_through_and_is_promoted(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.1, 0.5, 1.0), requests_per_step=60, min_samples=5)
    ctl = ev.controller(tmp_path / "state.json", cfg)
    snap = ctl.start("fam", "1", "2", offline_nll=2.0)
    assert snap["status"] == "running" and ctl.weight("fam") == ("1", "2", 0.1)
    drive(ctl, np.random.default_rng(0))
    st = ctl.status("fam")
    assert st["status"] == "promoted" and ev.promoted == [("fam", "2")] and ev.rolled_back == []
    assert ctl.weight("fam") == ("2", None, 0.0)
    decisions = [h["decision"] for h in st["history"]]
    assert decisions[-1] == "promote" and decisions.count("advance") == 2
    # weights seen by the router: each step in order, then the winner alone
    seen = [w for _, _, w in ev.weights]
    assert seen[0] == 0.1 and 0.5 in seen and seen[-1] == 0.0 and ev.weights[-1][0] == "2"
    # each step records every check's numbers, threshold and verdict
    checks = st["history"][-1]["analysis"]["checks"]
    assert set(checks) == {"error_rate", "latency_p95", "feedback", "response_nll"}
    assert checks["latency_p95"]["verdict"] == PASS and "threshold" in checks["latency_p95"]
    assert checks["error_rate"]["challenger_n"] + checks["error_rate"]["champion_n"] >= 180
    assert st["counts"]["challenger"]["requests"] > 0


@pytest.mark.parametrize("bad,word", [({"err": 0.6}, "error rate"), ({"lat": 5.0}, "latency"),
                                      ({"fb": True}, "feedback"), ({"nll": 2.0}, "NLL")])
def test_clearly_worse_challenger_is_rolled_back(tmp_path, bad, word):
    ev = Events()
    ctl = ev.controller(tmp_path / "s.json", RolloutConfig())
    ctl.start("fam", "1", "2", offline_nll=2.0)
    drive(ctl, np.random.default_rng(1), bad=bad)
    st = ctl.status("fam")
    assert st["status"] == "rolled_back", st["history"][-1]
    assert ev.promoted == [] and len(ev.rolled_back) == 1
    family, version, reason = ev.rolled_back[0]
    assert (family, version) == ("fam", "2") and word in reason
    assert ctl.weight("fam") == ("1", None, 0.0)
    assert max(h["weight"] for h in st["history"]) <= 0.25  # caught early, at a small share


@pytest.mark.parametrize("scenario", [
    dict(err_p=0.02, feedback=0.6, cfg=RolloutConfig()),
    dict(err_p=0.2, feedback=0.8, cfg=RolloutConfig()),
    dict(err_p=0.05, feedback=0.9, cfg=RolloutConfig(min_samples=5, requests_per_step=40)),
])
def test_identical_arms_are_never_rolled_back(tmp_path, scenario):
    """Champion and challenger draw from the same distributions: no seed may end in a rollback."""
    rollbacks, promotions = [], 0
    for seed in range(150):
        ev = Events()
        ctl = ev.controller(tmp_path / f"s{seed}.json", scenario["cfg"], persist_interval_s=3600)
        ctl.start("fam", "1", "2", offline_nll=2.0)
        drive(ctl, np.random.default_rng(seed), err_p=scenario["err_p"], feedback=scenario["feedback"])
        if ev.rolled_back:
            rollbacks.append((seed, ev.rolled_back[0][2]))
        promotions += len(ev.promoted)
    assert rollbacks == []
    assert promotions == 150


def test_too_few_samples_is_insufficient_never_a_failure_nor_a_promotion(tmp_path):
    """Issue 16: every check "insufficient" must not promote. The rollout extends its last step instead."""
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=10, min_samples=1000, extend_until_min_samples=False)
    ctl = ev.controller(tmp_path / "s.json", cfg, persist_interval_s=3600)
    ctl.start("fam", "1", "2")
    drive(ctl, np.random.default_rng(2), bad={"fb": True, "lat": 10.0}, n_max=2000)
    st = ctl.status("fam")
    assert st["status"] == "running" and ev.promoted == [] and ev.rolled_back == []
    checks = st["history"][0]["analysis"]["checks"]
    assert [checks[n]["verdict"] for n in ("error_rate", "latency_p95", "feedback")] == [INSUFFICIENT] * 3
    assert checks["response_nll"]["verdict"] == SKIPPED  # no offline baseline given
    last = st["history"][-1]
    assert last["decision"] == "extend" and any("min_samples=1000" in x for x in last["short"])
    assert any("no traffic at a 100% step" in x for x in last["short"])  # the champion arm cannot grow at 1.0


def test_issue16_trial_broken_challenger_with_a_starved_champion_arm_is_rolled_back(tmp_path):
    """steps [0.5, 1.0], 24 requests per step, a challenger failing 65% of requests, the champion arm with 2
    samples: the absolute error bound catches it although the relative comparison has too few champion samples."""
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=24, min_samples=10)
    ctl = ev.controller(tmp_path / "s.json", cfg)
    ctl.start("fam", "1", "2")
    rng = np.random.default_rng(7)
    for i in range(2):
        ctl.record("fam", "1", f"c{i}", 30.0, False, None)
    for i in range(22):
        ctl.record("fam", "2", f"r{i}", 30.0, bool(rng.random() < 0.65), None)
    st = ctl.status("fam")
    assert st["status"] == "rolled_back" and ev.promoted == []
    assert "absolute bound" in ev.rolled_back[0][2]
    er = st["history"][-1]["analysis"]["checks"]["error_rate"]
    assert er["failed_bound"] == "absolute" and er["champion_n"] == 2


def test_client_errors_do_not_count_against_an_arm(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=40, min_samples=10)
    ctl = ev.controller(tmp_path / "s.json", cfg)
    ctl.start("fam", "1", "2")
    for i in range(200):  # a client sending prompts over the context length, all routed to the challenger
        ctl.record("fam", "2", f"x{i}", 1.0, True, None, client_error=True)
    st = ctl.status("fam")
    assert st["counts"]["challenger"]["requests"] == 0 and st["step_requests"] == 0
    assert st["client_errors"] == {"champion": 0, "challenger": 200} and st["status"] == "running"
    drive(ctl, np.random.default_rng(8))
    assert ctl.status("fam")["status"] == "promoted" and ev.rolled_back == []
    ctl.record("fam", "2", "late", 1.0, True, None)  # the existing positional call still works


def test_require_feedback_holds_the_promotion_until_feedback_arrives(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=40, min_samples=10, require_feedback=True)
    ctl = ev.controller(tmp_path / "s.json", cfg, persist_interval_s=3600)
    ctl.start("fam", "1", "2")
    rng = np.random.default_rng(9)
    drive(ctl, rng, feedback=0.0, n_max=400)  # /v1/feedback broken: nothing arrives
    st = ctl.status("fam")
    assert st["status"] == "running" and ev.promoted == []
    assert st["history"][-1]["decision"] == "extend" and "require_feedback" in st["history"][-1]["short"][-1]
    assert [h["decision"] for h in st["history"]][0] == "extend"  # not even advanced past the first step
    drive(ctl, rng, feedback=0.6, start_index=400)
    assert ctl.status("fam")["status"] == "promoted"


def test_equal_challenger_under_many_looks_stays_within_alpha(tmp_path):
    """Alpha spending: with no margins (the plain one-sided tests an equal challenger sits on the boundary of) and
    tiny steps that make many looks, the rollback rate of an equal challenger stays at or below alpha; a fixed
    level at every look would exceed it."""
    cfg = RolloutConfig(steps=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), requests_per_step=60, min_samples=10,
                        feedback_margin=0.0, max_error_rate_delta=0.0, alpha=0.2, max_error_rate=None)
    rollbacks, runs = 0, 150
    for seed in range(runs):
        ev = Events()
        ctl = ev.controller(tmp_path / f"s{seed}.json", cfg, persist_interval_s=3600)
        ctl.start("fam", "1", "2")
        drive(ctl, np.random.default_rng(100 + seed), err_p=0.05, feedback=0.9)
        rollbacks += len(ev.rolled_back)
        assert ev.promoted or ev.rolled_back
    assert rollbacks / runs <= 0.2, rollbacks


def test_look_alpha_sums_to_alpha():
    from serving.rollout import look_alpha

    assert look_alpha(0.05, 1) == pytest.approx(0.05 / 5 * 6 / math.pi ** 2)
    assert sum(look_alpha(0.05, k, n_tests=1) for k in range(1, 200_000)) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(ValueError):
        look_alpha(0.05, 0)


def test_step_is_extended_until_challenger_has_min_samples(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.05, 1.0), requests_per_step=20, min_samples=10)
    ctl = ev.controller(tmp_path / "s.json", cfg)
    ctl.start("fam", "1", "2")
    drive(ctl, np.random.default_rng(3))
    decisions = [h["decision"] for h in ctl.status("fam")["history"]]
    assert decisions[0] == "extend" and "advance" in decisions and decisions[-1] == "promote"
    first_advance = next(h for h in ctl.status("fam")["history"] if h["decision"] == "advance")
    assert first_advance["analysis"]["checks"]["error_rate"]["challenger_n"] >= 10


def test_state_survives_restart(tmp_path):
    path = tmp_path / "state.json"
    cfg = RolloutConfig(steps=(0.2, 0.6, 1.0), requests_per_step=50, min_samples=5)
    ev = Events()
    ctl = ev.controller(path, cfg)
    ctl.start("fam", "1", "2")
    rng = np.random.default_rng(4)
    for i in range(70):  # step 0 ends at 50, step 1 has 20 requests
        _, _, w = ctl.weight("fam")
        ctl.record("fam", "2" if rng.random() < w else "1", f"r{i}", 30.0, False, 2.0)
    ctl.record_feedback("r3", 0.9)
    ctl.flush()
    before = ctl.status("fam")
    assert before["step"] == 1 and before["step_requests"] == 20
    assert json.loads(path.read_text())["rollouts"]["fam"]["status"] == "running"

    ev2 = Events()
    ctl2 = ev2.controller(path, RolloutConfig(steps=(0.5, 1.0)))  # a new config applies to new rollouts only
    after = ctl2.status("fam")
    for k in ("status", "step", "weight", "step_requests", "counts", "history", "champion", "challenger"):
        assert after[k] == before[k], k
    assert ctl2.weight("fam") == ("1", "2", 0.6)
    assert ctl2.record_feedback("r3", 0.8)  # request ids of the old process are still known
    drive(ctl2, rng, start_index=70)
    assert ctl2.status("fam")["status"] == "promoted" and ev2.promoted == [("fam", "2")]
    assert len(ctl2.status("fam")["history"]) >= 3  # the steps of both processes


def test_time_based_step_end(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=10_000, max_seconds_per_step=0.05, min_samples=2)
    ctl = ev.controller(tmp_path / "s.json", cfg)
    ctl.start("fam", "1", "2")
    for i in range(6):
        ctl.record("fam", "1" if i % 2 else "2", f"r{i}", 20.0, False, None)
    time.sleep(0.08)
    ctl.tick()
    st = ctl.status("fam")
    assert st["step"] == 1 and st["history"][0]["ended_by"] == "time"


def test_gradual_rollback_steps_down_in_reverse(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.1, 0.3, 0.6, 1.0), requests_per_step=100, min_samples=10, gradual_rollback=True)
    ctl = ev.controller(tmp_path / "s.json", cfg)
    ctl.start("fam", "1", "2")
    # the challenger turns bad once it reaches the 0.6 step
    bad = {"err": 0.9, "when": lambda c: c.weight("fam")[2] >= 0.6 or c.status("fam")["status"] == "rolling_back"}
    drive(ctl, np.random.default_rng(5), bad=bad)
    st = ctl.status("fam")
    assert st["status"] == "rolled_back" and len(ev.rolled_back) == 1 and "error rate" in ev.rolled_back[0][2]
    weights = [w for _, _, w in ev.weights]
    top = weights.index(0.6)
    after = [w for i, w in enumerate(weights) if i > top and (i == 0 or w != weights[i - 1])]
    assert after == [0.3, 0.1, 0.0]  # down through the steps, not a cut to 0
    assert [h["decision"] for h in st["history"]][-2:] == ["step_down", "step_down"]


def test_gradual_rollback_resumes_after_a_restart_and_reports_once(tmp_path):
    """A failing challenger steps down, the process restarts mid-way, the new one finishes the rollback."""
    path = tmp_path / "s.json"
    cfg = RolloutConfig(steps=(0.1, 0.3, 0.6, 1.0), requests_per_step=100, min_samples=10, gradual_rollback=True)
    ev = Events()
    ctl = ev.controller(path, cfg)
    ctl.start("fam", "1", "2")
    bad = {"err": 0.9, "when": lambda c: c.weight("fam")[2] >= 0.3 or c.status("fam")["status"] == "rolling_back"}
    rng = np.random.default_rng(6)
    i = 0
    while ctl.status("fam")["status"] != "rolling_back":
        i = drive(ctl, rng, bad=bad, n_max=1, start_index=i)
    ctl.flush()
    before = ctl.status("fam")
    # failed at the 0.3 step: stepped down to 0.1, not cut to 0, and not reported (no registry change) yet
    assert (before["step"], before["weight"]) == (0, 0.1) and ev.rolled_back == []

    ev2 = Events()
    ctl2 = ev2.controller(path, RolloutConfig())  # the rollout keeps its own config across the restart
    assert ctl2.status("fam")["status"] == "rolling_back" and ctl2.weight("fam") == ("1", "2", before["weight"])
    drive(ctl2, rng, bad=bad, start_index=i)
    st = ctl2.status("fam")
    assert st["status"] == "rolled_back" and ev2.promoted == [] and len(ev2.rolled_back) == 1
    assert ev.rolled_back == [] and ctl2.weight("fam") == ("1", None, 0.0) and ev2.weights[-1] == ("1", None, 0.0)
    decisions = [h["decision"] for h in st["history"]]
    assert decisions[-2:] == ["rollback", "step_down"] and len(st["history"]) > len(before["history"])


def test_per_rollout_config_and_fallback_baseline_arm(tmp_path):
    """start(config=...) applies to that rollout only; with a baseline, the fallback's requests are the champion
    arm (the family was on fallback when the rollout started)."""
    ev = Events()
    ctl = ev.controller(tmp_path / "s.json", RolloutConfig())
    own = RolloutConfig(steps=(0.5, 1.0), requests_per_step=8, min_samples=2, gradual_rollback=True)
    ctl.start("fam", "2", "3", config=own, baseline="base")
    st = ctl.status("fam")
    assert st["config"]["steps"] == [0.5, 1.0] and st["config"]["gradual_rollback"] and st["baseline"] == "base"
    assert ctl.config.steps == RolloutConfig().steps
    for i in range(4):
        ctl.record("fam", "base", f"b{i}", 10.0, False, None)  # the fallback serving the champion's share
        ctl.record("fam", "3", f"c{i}", 10.0, False, None)
    ctl.record("fam", "1", "other", 10.0, False, None)  # neither arm
    st = ctl.status("fam")
    assert st["step"] == 1 and st["counts"]["champion"]["requests"] == 4
    assert st["counts"]["challenger"]["requests"] == 4
    ctl.abort("fam", "test over")
    with pytest.raises(RolloutError, match="fallback"):
        ctl.start("fam", "2", "base", baseline="base")


def test_abort_and_conflicts(tmp_path):
    ev = Events()
    ctl = ev.controller(tmp_path / "s.json", RolloutConfig())
    with pytest.raises(RolloutError):
        ctl.start("fam", "1", "1")
    with pytest.raises(RolloutError):
        ctl.abort("fam", "nothing running")
    ctl.start("fam", "1", "2")
    with pytest.raises(RolloutError):
        ctl.start("fam", "1", "3")
    st = ctl.abort("fam", "operator")
    assert st["status"] == "aborted" and st["reason"] == "operator"
    assert ctl.weight("fam") == ("1", None, 0.0) and ev.rolled_back == [] and ev.promoted == []
    ctl.record("fam", "2", "late", 10.0, True, None)  # ignored after the end
    assert ctl.status("fam")["counts"]["challenger"]["requests"] == 0
    ctl.start("fam", "1", "3")  # a finished rollout can be replaced
    assert ctl.status()["finished"][-1]["status"] == "aborted"


def test_unknown_versions_and_feedback_are_ignored(tmp_path):
    ctl = Events().controller(tmp_path / "s.json", RolloutConfig())
    ctl.record("nofam", "1", "x", 1.0, False, None)
    ctl.start("fam", "1", "2")
    ctl.record("fam", "7", "pinned", 1.0, False, None)
    assert ctl.status("fam")["step_requests"] == 0
    assert ctl.record_feedback("never-seen", 0.5) is False
    with pytest.raises(KeyError):
        ctl.status("nofam")


def test_callback_failure_is_recorded_not_raised(tmp_path):
    def boom(family, version):
        raise ConnectionError("registry down")

    ctl = RolloutController(tmp_path / "s.json", RolloutConfig(steps=(1.0,), requests_per_step=5, min_samples=1),
                            on_promote=boom, on_rollback=lambda *a: None)
    ctl.start("fam", "1", "2")
    ctl.record("fam", "1", "c0", 10.0, False, None)  # a promotion needs min_samples in both arms
    for i in range(4):
        ctl.record("fam", "2", f"r{i}", 10.0, False, None)
    st = ctl.status("fam")
    assert st["status"] == "promoted" and "registry down" in st["callback_errors"][0]


def test_corrupt_state_file_names_the_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match=str(path)):
        RolloutController(path, RolloutConfig(), lambda *a: None, lambda *a: None)


# ---------------------------------------------------------------------------------------------- the checks alone

CFG = RolloutConfig(min_samples=10)


def test_error_check():
    assert check_error_rate([False] * 5, [True] * 5, CFG, 0.01)["verdict"] == INSUFFICIENT
    assert check_error_rate([False] * 200, [True] * 8 + [False] * 12, CFG, 0.01)["verdict"] == FAIL
    equal = check_error_rate([True] * 20 + [False] * 180, [True] * 2 + [False] * 18, CFG, 0.01)
    assert equal["verdict"] == PASS and equal["delta"] == pytest.approx(0.0)


def test_latency_check():
    rng = np.random.default_rng(0)
    base = list(rng.lognormal(3.5, 0.5, 300))
    assert check_latency(base, list(rng.lognormal(3.5, 0.5, 40)), CFG, 0.01)["verdict"] == PASS
    slow = check_latency(base, list(rng.lognormal(3.5, 0.5, 40) * 6), CFG, 0.01)
    assert slow["verdict"] == FAIL and slow["challenger_p95_ms"] > slow["threshold"]
    # within the slack: 20 ms vs 10 ms is twice as slow but only 10 ms more, under the 100 ms slack
    assert check_latency([10.0] * 50, [20.0] * 50, CFG, 0.01)["verdict"] == PASS


def test_feedback_check_needs_margin_and_significance():
    rng = np.random.default_rng(1)
    a = list(rng.beta(8, 2, 200))
    assert check_feedback(a, list(rng.beta(8, 2, 50)), CFG, 0.01)["verdict"] == PASS
    assert check_feedback(a, list(rng.beta(2, 8, 50)), CFG, 0.01)["verdict"] == FAIL
    # lower, significantly, but by less than the margin: not a failure
    small = check_feedback([0.80] * 500, [0.78] * 500, CFG, 0.01)
    assert small["drop"] < CFG.feedback_margin and small["verdict"] == PASS


def test_nll_check():
    assert check_nll([3.0] * 20, None, CFG, 0.01)["verdict"] == SKIPPED
    assert check_nll([3.0] * 5, 2.0, CFG, 0.01)["verdict"] == INSUFFICIENT
    assert check_nll([2.1] * 20, 2.0, CFG, 0.01)["verdict"] == PASS
    assert check_nll([4.0] * 20, 2.0, CFG, 0.01)["verdict"] == FAIL


def test_small_steps_never_promote_a_challenger_users_score_far_lower(tmp_path):
    """The decision gap a fresh-clone CI run found (tests/integration/test_serving_ops.py's gradual rollback): 12
    requests a step; the challenger is scored as well as the champion at its first step, then 0.05 against 0.9. On
    the few cumulative samples the alpha-spent feedback test could not reject it, and "not rejected" advanced and
    promoted it (21 of 200 seeds with hold_inconclusive_until=0). An estimate beyond the margin now holds the step
    until the challenger has hold_inconclusive_until samples, by when the test rejects it."""

    def run(cfg, seed):
        ev = Events()
        ctl = ev.controller(tmp_path / f"s{seed}-{cfg.hold_inconclusive_until}.json", cfg, persist_interval_s=3600)
        ctl.start("fam", "1", "2")
        rng = np.random.default_rng(seed)
        for i in range(5000):
            if not ctl.is_active("fam"):
                break
            version = "2" if rng.random() < ctl.weight("fam")[2] else "1"
            bad_phase = ctl.status("fam")["step"] >= 1
            ctl.record("fam", version, f"r{i}", 30.0, False, None)
            if not bad_phase:
                score = 0.8 + 0.01 * (i % 5)
            else:
                score = 0.05 + 0.01 * (i % 3) if version == "2" else 0.9 - 0.01 * (i % 3)
            ctl.record_feedback(f"r{i}", score)
        return ev

    old_rule = RolloutConfig(steps=(0.25, 0.5, 1.0), requests_per_step=12, min_samples=4, hold_inconclusive_until=0)
    assert sum(bool(run(old_rule, seed).promoted) for seed in range(60)) > 0  # the gap is real
    cfg = RolloutConfig(steps=(0.25, 0.5, 1.0), requests_per_step=12, min_samples=4)
    for seed in range(60):
        ev = run(cfg, seed)
        assert ev.promoted == [] and len(ev.rolled_back) == 1, seed
        assert "feedback" in ev.rolled_back[0][2]


def test_an_inconclusive_estimate_holds_the_step_and_says_why(tmp_path):
    """Feedback 0.2 lower on few samples: passes the (alpha-spent) test but is beyond the margin, so the step is
    extended with the reason, not advanced."""
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=12, min_samples=5)
    ctl = ev.controller(tmp_path / "s.json", cfg, persist_interval_s=3600)
    ctl.start("fam", "1", "2")
    for i in range(12):
        version = "2" if i % 2 else "1"
        ctl.record("fam", version, f"r{i}", 30.0, False, None)
        ctl.record_feedback(f"r{i}", [0.5, 0.9, 0.7][i % 3] - (0.2 if version == "2" else 0.0))
    h = ctl.status("fam")["history"][-1]
    assert h["analysis"]["checks"]["feedback"]["verdict"] == PASS
    assert h["decision"] == "extend" and any(x.startswith("inconclusive: feedback") for x in h["short"]), h
    with pytest.raises(ValueError, match="hold_inconclusive_until"):
        RolloutConfig(hold_inconclusive_until=-1)


def test_a_promotion_without_feedback_says_feedback_was_not_checked(tmp_path):
    ev = Events()
    cfg = RolloutConfig(steps=(0.5, 1.0), requests_per_step=40, min_samples=10)
    ctl = ev.controller(tmp_path / "s.json", cfg, persist_interval_s=3600)
    ctl.start("fam", "1", "2")
    drive(ctl, np.random.default_rng(4), feedback=0.0)
    st = ctl.status("fam")
    assert st["status"] == "promoted" and st["reason"].startswith("all steps passed; NOT checked: feedback")
    ev2 = Events()
    ctl2 = ev2.controller(tmp_path / "s2.json", cfg, persist_interval_s=3600)
    ctl2.start("fam", "1", "2")
    drive(ctl2, np.random.default_rng(4), feedback=1.0)
    assert ctl2.status("fam")["reason"] == "all steps passed"  # response_nll has no baseline: skipped, not unchecked
