"""Router: champion/challenger weights, sticky users, fallback override, thread safety. No model, no torch."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serving.router import Router, UnknownFamily, sticky_position

ROOT = Path(__file__).resolve().parents[2]


def test_router_and_rollout_do_not_import_torch():
    code = ("import sys, serving.router, serving.rollout; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'pipelines') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_champion_only_always_champion():
    r = Router(seed=0)
    r.set("fam", "1")
    assert {r.choose("fam") for _ in range(100)} == {("1", "champion")}
    assert {r.choose("fam", f"u{i}") for i in range(100)} == {("1", "champion")}


def test_weight_splits_traffic():
    r = Router(seed=1)
    r.set("fam", "1", challenger="2", weight=0.3)
    picks = [r.choose("fam") for _ in range(4000)]
    share = sum(route == "canary" for _, route in picks) / len(picks)
    assert 0.27 < share < 0.33
    assert {v for v, route in picks if route == "canary"} == {"2"}
    assert {v for v, route in picks if route == "champion"} == {"1"}


def test_weight_bounds():
    r = Router()
    r.set("fam", "1", "2", weight=1.0)
    assert {r.choose("fam", f"u{i}")[1] for i in range(200)} == {"canary"}
    r.set("fam", "1", "2", weight=0.0)
    assert {r.choose("fam", f"u{i}")[1] for i in range(200)} == {"champion"}
    with pytest.raises(ValueError):
        r.set("fam", "1", "2", weight=1.5)
    with pytest.raises(ValueError):
        r.set("fam", "1", "2", weight=-0.1)


def test_sticky_users_keep_their_arm_and_only_move_to_canary_as_weight_grows():
    r = Router()
    users = [f"user-{i}" for i in range(2000)]
    r.set("fam", "1", "2", weight=0.2)
    first = {u: r.choose("fam", u) for u in users}
    assert all(r.choose("fam", u) == first[u] for u in users[:300])  # same answer every time
    share = sum(route == "canary" for _, route in first.values()) / len(users)
    assert 0.17 < share < 0.23
    r.set("fam", "1", "2", weight=0.5)
    second = {u: r.choose("fam", u) for u in users}
    assert all(second[u][1] == "canary" for u in users if first[u][1] == "canary")
    assert 0.46 < sum(route == "canary" for _, route in second.values()) / len(users) < 0.54


def test_sticky_position_depends_on_family():
    assert sticky_position("a", "u1") == sticky_position("a", "u1")
    assert sticky_position("a", "u1") != sticky_position("b", "u1")
    assert all(0.0 <= sticky_position("f", f"u{i}") < 1.0 for i in range(100))


def test_fallback_takes_the_champion_share_and_clears():
    r = Router()
    r.set("fam", "1")
    r.set_fallback("fam", "base")
    assert {r.choose("fam", f"u{i}") for i in range(50)} == {("base", "fallback")}
    r.set("fam", "1", "2", weight=0.5)  # a canary keeps its share; the rest stays on the fallback
    picks = {u: r.choose("fam", u) for u in (f"u{i}" for i in range(400))}
    assert set(picks.values()) == {("base", "fallback"), ("2", "canary")}
    assert all((route == "canary") == (sticky_position("fam", u) < 0.5) for u, (_, route) in picks.items())
    r.set("fam", "1", "2", weight=1.0)  # a weight change keeps the fallback
    assert r.get("fam").fallback == "base" and r.choose("fam") == ("2", "canary")
    r.set("fam", "1")
    r.set_fallback("fam", "0")
    assert r.choose("fam") == ("0", "fallback")
    r.set_fallback("fam", None)
    assert r.choose("fam") == ("1", "champion")


def test_unknown_family():
    r = Router()
    with pytest.raises(UnknownFamily):
        r.choose("nope")
    with pytest.raises(UnknownFamily):
        r.set_fallback("nope", "base")


def test_challenger_without_weight_is_ignored_and_weight_needs_challenger():
    r = Router()
    assert r.set("fam", "1", "2", 0.0).weight == 0.0
    assert r.set("fam", "1", None, 0.7).weight == 0.0  # no challenger: weight dropped


def test_concurrent_set_and_choose():
    r = Router(seed=3)
    r.set("fam", "1", "2", 0.5)
    errors = []

    def chooser():
        try:
            for i in range(2000):
                v, route = r.choose("fam", f"u{i}" if i % 2 else None)
                assert (v, route) in {("1", "champion"), ("2", "canary"), ("3", "canary")}
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def setter():
        for i in range(500):
            r.set("fam", "1", "2" if i % 2 else "3", (i % 10) / 10)

    threads = [threading.Thread(target=chooser) for _ in range(4)] + [threading.Thread(target=setter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
