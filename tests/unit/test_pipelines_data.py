"""Customer-support data: the real Bitext CSV, deterministic leak-free splits, the before/after shift, JSONL I/O."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipelines.data import (
    BITEXT_CSV,
    CATEGORIES_AFTER,
    CATEGORIES_BEFORE,
    PROMPT_TEMPLATE,
    SPLITS,
    DataError,
    Example,
    category_counts,
    format_prompt,
    load_bitext,
    read_jsonl,
    sample,
    load_dialogue,
    split_of,
    splits,
    write_jsonl,
)

ALL_CATEGORIES = {"ACCOUNT", "CANCELLATION_FEE", "CONTACT", "DELIVERY", "FEEDBACK", "INVOICE", "NEWSLETTER", "ORDER",
                  "PAYMENT", "REFUND", "SHIPPING_ADDRESS"}


@pytest.fixture(scope="module")
def bitext() -> list[Example]:
    return load_bitext()


def _examples(n: int, category: str = "C") -> list[Example]:
    return [Example(format_prompt(f"question {i}"), f" answer {i}", category, f"intent_{i % 3}") for i in range(n)]


# -- the real CSV -------------------------------------------------------------------------------------------------

def test_load_bitext_real_csv(bitext):
    assert BITEXT_CSV.is_file()
    assert len(bitext) == 4514
    assert set(category_counts(bitext)) == ALL_CATEGORIES
    assert all(isinstance(e, Example) for e in bitext)


def test_bitext_rows_are_formatted(bitext):
    for e in bitext:
        assert e.prompt.startswith("### Customer: ") and e.prompt.endswith("\n### Agent:")
        assert e.response.startswith(" ") and e.response.strip()
        assert e.category in ALL_CATEGORIES and e.intent


def test_category_counts_of_bitext(bitext):
    counts = category_counts(bitext)
    assert list(counts) == sorted(counts)
    assert sum(counts.values()) == 4514
    assert counts["ACCOUNT"] == 1041 and counts["NEWSLETTER"] == 142


def test_category_counts_small():
    ex = _examples(3, "B") + _examples(2, "A")
    assert category_counts(ex) == {"A": 2, "B": 3}
    assert list(category_counts(ex)) == ["A", "B"]
    assert category_counts([]) == {}


def test_before_after_categories_disjoint_and_cover_the_data(bitext):
    before, after = set(CATEGORIES_BEFORE), set(CATEGORIES_AFTER)
    assert not before & after
    assert before | after == ALL_CATEGORIES == set(category_counts(bitext))
    assert len(CATEGORIES_BEFORE) == len(before) and len(CATEGORIES_AFTER) == len(after)


# -- splits -------------------------------------------------------------------------------------------------------

def test_splits_deterministic(bitext):
    first, second = splits(bitext), splits(load_bitext())
    assert set(first) == set(SPLITS)
    for name in SPLITS:
        assert first[name] == second[name]


def test_split_sizes_are_pinned(bitext):
    """sha256-based, so they never change between runs, machines or Python versions (PYTHONHASHSEED-free);
    a change here means every stored dataset hash and every comparison with earlier versions moves."""
    assert {k: len(v) for k, v in splits(bitext).items()} == {"train": 3638, "val": 415, "test": 461}


def test_splits_disjoint_no_prompt_in_two_splits(bitext):
    s = splits(bitext)
    prompts = {name: {e.prompt for e in rows} for name, rows in s.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert sum(len(v) for v in s.values()) == len(bitext)


def test_duplicate_prompts_land_in_the_same_split():
    a = Example(format_prompt("where is my order"), " one", "ORDER")
    b = Example(format_prompt("where is my order"), " two", "DELIVERY")
    assert split_of(a) == split_of(b)
    assert all(split_of(e) == split_of(Example(e.prompt, "x", "y")) for e in _examples(200))


def test_split_fractions_roughly_match(bitext):
    s = splits(bitext)
    assert 0.08 < len(s["val"]) / len(bitext) < 0.12
    assert 0.08 < len(s["test"]) / len(bitext) < 0.12


def test_split_of_honours_fractions():
    ex = _examples(500)
    assert {split_of(e, val=0.0, test=0.0) for e in ex} == {"train"}
    assert {split_of(e, val=1.0, test=0.0) for e in ex} == {"val"}


def test_splits_by_category(bitext):
    before = splits(bitext, CATEGORIES_BEFORE)
    after = splits(bitext, CATEGORIES_AFTER)
    cats_before = {e.category for rows in before.values() for e in rows}
    cats_after = {e.category for rows in after.values() for e in rows}
    assert cats_before == set(CATEGORIES_BEFORE) and cats_after == set(CATEGORIES_AFTER)
    n_before = sum(category_counts(bitext)[c] for c in CATEGORIES_BEFORE)
    assert sum(len(v) for v in before.values()) == n_before
    for name in SPLITS:  # filtering does not move an example to another split
        assert {e.prompt for e in before[name]} <= {e.prompt for e in splits(bitext)[name]}


def test_splits_unknown_category_is_an_error(bitext):
    with pytest.raises(DataError, match="no examples in categories"):
        splits(bitext, ("NOT_A_CATEGORY",))


# -- format_prompt ------------------------------------------------------------------------------------------------

def test_format_prompt():
    assert format_prompt("  where is my parcel?\n") == "### Customer: where is my parcel?\n### Agent:"
    assert format_prompt("x") == PROMPT_TEMPLATE.format(instruction="x")


# -- load_bitext on bad files -------------------------------------------------------------------------------------

def test_load_bitext_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_bitext(tmp_path / "none.csv")


def test_load_bitext_missing_columns(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("instruction,category\nhi,ORDER\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['response'\]"):
        load_bitext(f)


def test_load_bitext_skips_empty_rows_and_rejects_all_empty(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("instruction,response,category,intent\nhi, hello ,ORDER,greet\n ,x,ORDER,\ny,  ,ORDER,\n")
    rows = load_bitext(f)
    assert rows == [Example(format_prompt("hi"), " hello", "ORDER", "greet")]
    f.write_text("instruction,response,category\n ,x,ORDER\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_bitext(f)


# -- JSONL --------------------------------------------------------------------------------------------------------

def test_write_read_jsonl_round_trip(tmp_path):
    ex = _examples(5) + [Example("p \u00e9\u4e2d\n", "r\t\"q\"", "", "")]
    out = write_jsonl(ex, tmp_path / "deep" / "dir" / "d.jsonl")
    assert out == tmp_path / "deep" / "dir" / "d.jsonl"
    assert read_jsonl(out) == ex
    assert [p.name for p in out.parent.iterdir()] == ["d.jsonl"]  # no .tmp left behind
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(ex)


def test_write_jsonl_dicts_and_overwrite(tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(_examples(10), f)
    write_jsonl([{"prompt": "p", "response": "r"}], f)
    assert read_jsonl(f) == [Example("p", "r", "", "")]


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"dataset .*nope\.jsonl does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_jsonl_malformed_json_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n{not json\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert f"{f}:3 is not valid JSON" in str(e.value)


@pytest.mark.parametrize(
    "row",
    [{"prompt": "a"}, {"response": "b"}, {"prompt": "a", "response": 3}, {"prompt": None, "response": "b"},
     ["a", "b"], "just a string"],
)
def test_read_jsonl_missing_fields_names_file_and_line(tmp_path, row):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{f.name}:2 needs string fields 'prompt' and 'response'"):
        read_jsonl(f)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_read_jsonl_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match="is empty"):
        read_jsonl(f)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# -- sample / dialogue data ------------------------------------------------------------------------------------------

def test_sample_deterministic_and_capped():
    ex = _examples(50)
    assert sample(ex, 10, seed=1) == sample(ex, 10, seed=1)
    assert sample(ex, 10, seed=1) != sample(ex, 10, seed=2)
    assert len(set(sample(ex, 10, seed=1))) == 10
    assert sorted(sample(ex, 500, seed=0), key=ex.index) == ex


def test_load_dialogue_formats_sgd_turns_as_support_prompts():
    rows = load_dialogue()
    assert len(rows) == 13646
    assert all(r.prompt.startswith("### Customer: ") and r.prompt.endswith("### Agent:") for r in rows[:50])
    assert all(r.response.startswith(" ") and r.response.strip() for r in rows[:50])
    assert load_dialogue(n=100, seed=1) == load_dialogue(n=100, seed=1) != load_dialogue(n=100, seed=2)


def test_load_dialogue_names_file_and_line_of_a_bad_row(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"user": "hi", "system": "hello"}\n{"user": "no system"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        load_dialogue(bad)
