"""registry.names: one rule for family/alias names and store keys, and family@selector refs."""

import pytest

from registry.names import parse_ref, validate_key, validate_name


@pytest.mark.parametrize("good", ["support-assistant", "a", "A1.b_c-d", "x" * 128, "9lives"])
def test_valid_names_pass_through(good):
    assert validate_name("family", good) == good


@pytest.mark.parametrize("bad", ["", "-lead", ".hidden", "a..b", "has space", "a/b", "x" * 129, "ü", "a@b", None])
def test_invalid_names_name_the_value_and_the_rule(bad):
    with pytest.raises(ValueError) as e:
        validate_name("alias", bad)
    assert f"invalid alias name {bad!r}" in str(e.value)
    assert "starting with a letter or digit" in str(e.value)


@pytest.mark.parametrize("good", ["init-cache/3f1c0a", "a", "a/b/c.d_e-f"])
def test_valid_keys(good):
    assert validate_key(good) == good


BAD_KEYS = ["", "/abs", "a/", "a//b", "../up", "a/../b", "a/./b", "Upper", "a b", "a\\b", "x" * 513]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_refused(bad):
    with pytest.raises(ValueError, match="invalid artifact key"):
        validate_key(bad)


def test_parse_ref_forms():
    assert parse_ref("support-assistant@champion") == ("support-assistant", "champion")
    assert parse_ref("support-assistant@3") == ("support-assistant", "3")
    assert parse_ref("support-assistant@007") == ("support-assistant", "7")
    assert parse_ref("support-assistant") == ("support-assistant", None)


@pytest.mark.parametrize("bad", ["fam@", "@champion", "fam@a@b", "fam@0", "fam@../x", "bad name@1"])
def test_parse_ref_rejects(bad):
    with pytest.raises(ValueError):
        parse_ref(bad)
