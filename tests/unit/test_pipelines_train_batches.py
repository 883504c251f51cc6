"""The trainer's data order and settings, without a model: packed rows respect max_len and cover every example once
per epoch, the order is reproducible from its JSON state (what a checkpoint stores), and bad settings fail clearly."""

from __future__ import annotations

import json
import random

import pytest

from pipelines.train import TrainConfig, length_grouped_batches, packed_batches


def _lengths(n: int = 500, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(8, 120) for _ in range(n)]


def test_packed_rows_fit_and_cover_every_example_once():
    lengths = _lengths()
    batches = packed_batches(lengths, batch_size=4, max_len=128, rng=random.Random(1))
    rows = [row for batch in batches for row in batch]
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(len(b) <= 4 for b in batches) and sum(len(b) == 4 for b in batches) >= len(batches) - 1
    fill = sum(lengths) / (len(rows) * 128)
    assert fill > 0.9, f"first-fit decreasing should fill rows well, got {fill:.2f}"


def test_an_example_longer_than_a_row_gets_a_row_of_its_own():
    batches = packed_batches([200, 10, 10], batch_size=8, max_len=128, rng=random.Random(0))
    rows = sorted((sorted(r) for b in batches for r in b), key=len)
    assert rows == [[0], [1, 2]]


def test_the_order_is_reproducible_from_json_state():
    lengths = _lengths(200)
    rng = random.Random(3)
    first = length_grouped_batches(lengths, 8, rng)
    state = json.loads(json.dumps([list(x) if isinstance(x, tuple) else x for x in rng.getstate()]))
    version, internal, gauss = state
    clone = random.Random()
    clone.setstate((version, tuple(internal), gauss))
    assert length_grouped_batches(lengths, 8, rng) == length_grouped_batches(lengths, 8, clone)
    assert sorted(i for b in first for i in b) == list(range(200))


@pytest.mark.parametrize("field, value, match", [
    ("precision", "fp16", "precision must be one of"),
    ("device", "tpu", "device must be auto, cpu, cuda"),
    ("checkpoint_every", -1, "checkpoint_every must be >= 0"),
    ("steps", 0, "steps must be >= 1"),
])
def test_bad_settings_fail_clearly(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})
