"""Replay buffer: a sample of past training data mixed into incremental retraining, against forgetting.

`ratio` is the share of the final mix that comes from old data (default 0.2: 1 old example per 4 new).
category_balanced draws round-robin over the old categories (small categories are not crowded out);
reservoir draws uniformly (Algorithm R), which is what a stream of past traffic without labels allows.
"""

from __future__ import annotations

import random
from collections import defaultdict

from pipelines.data import Example

STRATEGIES = ("category_balanced", "reservoir")


def n_old_for(n_new: int, ratio: float) -> int:
    if not 0 <= ratio < 1:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    return round(n_new * ratio / (1 - ratio))


def reservoir(stream, k: int, rng: random.Random) -> list:
    out = []
    for i, item in enumerate(stream):
        if i < k:
            out.append(item)
        else:
            j = rng.randint(0, i)
            if j < k:
                out[j] = item
    return out


def category_balanced(old: list[Example], k: int, rng: random.Random) -> list[Example]:
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for e in old:
        by_cat[e.category].append(e)
    for items in by_cat.values():
        rng.shuffle(items)
    cats = sorted(by_cat)
    out, i = [], 0
    while len(out) < min(k, len(old)):
        items = by_cat[cats[i % len(cats)]]
        if items:
            out.append(items.pop())
        i += 1
    return out


def mix(new: list[Example], old: list[Example], ratio: float = 0.2, strategy: str = "category_balanced",
        seed: int = 0) -> list[Example]:
    """New data plus a replay sample of `old`, shuffled deterministically."""
    if strategy not in STRATEGIES:
        raise ValueError(f"replay strategy {strategy!r} is not one of {STRATEGIES}")
    if not new:
        raise ValueError("no new examples to retrain on")
    rng = random.Random(seed)
    k = n_old_for(len(new), ratio)
    replay = category_balanced(old, k, rng) if strategy == "category_balanced" else reservoir(old, k, rng)
    out = list(new) + replay
    rng.shuffle(out)
    return out
