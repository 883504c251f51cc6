"""Replay buffer: how much old data, which old data (balanced or uniform), determinism and errors."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipelines.data import Example
from pipelines.replay import STRATEGIES, category_balanced, mix, n_old_for, reservoir


def _ex(n: int, category: str, tag: str = "old") -> list[Example]:
    return [Example(f"{tag} {category} {i}", f" r{i}", category) for i in range(n)]


NEW = _ex(100, "NEW", "new")
OLD = _ex(60, "A") + _ex(60, "B") + _ex(60, "C") + _ex(60, "D") + _ex(60, "E")


# -- n_old_for ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_new", "ratio", "expected"),
                         [(100, 0.2, 25), (80, 0.2, 20), (4, 0.2, 1), (100, 0.0, 0), (100, 0.5, 100),
                          (30, 0.25, 10), (0, 0.2, 0)])
def test_n_old_for_values(n_new, ratio, expected):
    assert n_old_for(n_new, ratio) == expected


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.5, 0.9])
def test_ratio_is_the_share_of_the_final_mix(ratio):
    for n_new in range(20, 2000, 37):
        n_old = n_old_for(n_new, ratio)
        assert abs(n_old / (n_new + n_old) - ratio) <= 1 / (n_new + n_old)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_n_old_for_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"replay ratio must be in \[0, 1\)"):
        n_old_for(10, ratio)


# -- mix ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mix_sizes_and_membership(strategy):
    out = mix(NEW, OLD, ratio=0.2, strategy=strategy, seed=0)
    assert len(out) == 125
    assert Counter(out) & Counter(NEW) == Counter(NEW)  # every new example exactly once
    replay = [e for e in out if e.category != "NEW"]
    assert len(replay) == 25 and len(set(replay)) == 25 and set(replay) <= set(OLD)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mix_deterministic_by_seed(strategy):
    assert mix(NEW, OLD, 0.2, strategy, seed=7) == mix(NEW, OLD, 0.2, strategy, seed=7)
    assert mix(NEW, OLD, 0.2, strategy, seed=7) != mix(NEW, OLD, 0.2, strategy, seed=8)


def test_mix_is_shuffled():
    out = mix(NEW, OLD, 0.2, seed=0)
    assert [e.category for e in out[:100]] != ["NEW"] * 100


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mix_with_small_old_pool_uses_all_of_it(strategy):
    old = _ex(3, "A") + _ex(2, "B")
    out = mix(NEW, old, ratio=0.2, strategy=strategy)
    assert len(out) == 105 and set(old) <= set(out)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mix_ratio_zero_or_no_old_is_just_the_new_data(strategy):
    assert sorted(mix(NEW, OLD, ratio=0.0, strategy=strategy), key=NEW.index) == NEW
    assert sorted(mix(NEW, [], ratio=0.2, strategy=strategy), key=NEW.index) == NEW


def test_mix_leaves_inputs_untouched():
    new, old = list(NEW), list(OLD)
    mix(new, old, 0.3, seed=1)
    mix(new, old, 0.3, "reservoir", seed=1)
    assert new == NEW and old == OLD


def test_mix_errors():
    with pytest.raises(ValueError, match=r"replay strategy 'fifo' is not one of"):
        mix(NEW, OLD, strategy="fifo")
    with pytest.raises(ValueError, match="no new examples"):
        mix([], OLD)
    with pytest.raises(ValueError, match="replay ratio"):
        mix(NEW, OLD, ratio=1.0)
    with pytest.raises(ValueError, match="replay ratio"):
        mix(NEW, OLD, ratio=-0.5)


# -- category_balanced --------------------------------------------------------------------------------------------

def test_category_balanced_even_when_possible():
    out = category_balanced(OLD, 25, random.Random(0))
    assert Counter(e.category for e in out) == {c: 5 for c in "ABCDE"}
    assert len(set(out)) == 25


def test_category_balanced_small_category_not_crowded_out():
    old = _ex(500, "BIG") + _ex(10, "SMALL") + _ex(100, "MID")
    out = category_balanced(old, 30, random.Random(0))
    assert Counter(e.category for e in out) == {"BIG": 10, "MID": 10, "SMALL": 10}
    uniform = Counter(e.category for e in random.Random(0).sample(old, 30))
    assert uniform["SMALL"] < 10  # what a uniform draw would give instead


def test_category_balanced_exhausted_category_leaves_the_rest_even():
    old = _ex(2, "A") + _ex(50, "B") + _ex(50, "C")
    counts = Counter(e.category for e in category_balanced(old, 21, random.Random(0)))
    assert counts["A"] == 2 and sum(counts.values()) == 21
    assert abs(counts["B"] - counts["C"]) <= 1


def test_category_balanced_uneven_remainder():
    counts = Counter(e.category for e in category_balanced(OLD, 23, random.Random(0)))
    assert sum(counts.values()) == 23 and max(counts.values()) - min(counts.values()) <= 1
    assert set(counts) == set("ABCDE")


def test_category_balanced_k_beyond_pool_and_edge_cases():
    assert sorted(category_balanced(OLD, 10_000, random.Random(0)), key=OLD.index) == OLD
    assert category_balanced(OLD, 0, random.Random(0)) == []
    assert category_balanced([], 5, random.Random(0)) == []


def test_category_balanced_draws_vary_within_a_category():
    picks = {e for seed in range(20) for e in category_balanced(OLD, 5, random.Random(seed))}
    assert len(picks) > 40  # not always the same example per category


# -- reservoir ----------------------------------------------------------------------------------------------------

def test_reservoir_is_uniform():
    """Each of N items is kept with probability k/N; early and late items alike (Algorithm R)."""
    n, k, trials = 100, 10, 4000
    rng = random.Random(1234)
    counts = Counter()
    for _ in range(trials):
        counts.update(reservoir(range(n), k, rng))
    expected = trials * k / n  # 400, sd ~19
    assert all(abs(counts[i] - expected) < 5 * (expected * (1 - k / n)) ** 0.5 for i in range(n))
    first, last = sum(counts[i] for i in range(n // 2)), sum(counts[i] for i in range(n // 2, n))
    assert abs(first - last) < 0.05 * trials * k
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 150  # df 99: p ~ 0.001 above 148


def test_reservoir_sizes():
    rng = random.Random(0)
    assert reservoir(range(5), 10, rng) == [0, 1, 2, 3, 4]
    assert reservoir(range(50), 0, rng) == []
    out = reservoir(iter(range(1000)), 7, rng)  # a one-pass stream is enough
    assert len(out) == 7 and len(set(out)) == 7


def test_reservoir_deterministic():
    assert reservoir(range(500), 20, random.Random(5)) == reservoir(range(500), 20, random.Random(5))
