"""registry.hashing: content hashes that ignore location and mtime but see every byte and every name."""

import hashlib
import os

import pytest

from registry.hashing import model_weights_hash, sha256_file, tree_hash, tree_manifest


def _tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_manifest_is_sorted_relative_posix_and_skips_nothing(tmp_path):
    _tree(tmp_path, {"b.txt": b"b", "a/z.bin": b"z", ".hidden": b"h", "a/.git/x": b"x"})
    m = tree_manifest(tmp_path)
    assert list(m) == [".hidden", "a/.git/x", "a/z.bin", "b.txt"]
    assert m["a/z.bin"] == hashlib.sha256(b"z").hexdigest()


def test_tree_hash_depends_on_content_and_names_not_location_or_mtime(tmp_path):
    a = _tree(tmp_path / "one", {"x": b"1", "d/y": b"2"})
    b = _tree(tmp_path / "two", {"d/y": b"2", "x": b"1"})
    os.utime(b / "x", (0, 0))
    assert tree_hash(a) == tree_hash(b)
    (b / "x").write_bytes(b"changed")
    assert tree_hash(a) != tree_hash(b)
    c = _tree(tmp_path / "three", {"x2": b"1", "d/y": b"2"})  # same bytes, renamed file
    assert tree_hash(a) != tree_hash(c)


def test_tree_hash_refuses_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        tree_hash(tmp_path / "f")


def test_model_weights_hash_uses_only_safetensors_in_name_order(tmp_path):
    _tree(tmp_path, {"model-00002.safetensors": b"BB", "model-00001.safetensors": b"AA", "config.json": b"{}"})
    assert model_weights_hash(tmp_path) == hashlib.sha256(b"AABB").hexdigest()
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert model_weights_hash(tmp_path) == hashlib.sha256(b"AABB").hexdigest()


def test_model_weights_hash_single_file_equals_file_hash(tmp_path):
    _tree(tmp_path, {"model.safetensors": b"weights"})
    assert model_weights_hash(tmp_path) == sha256_file(tmp_path / "model.safetensors")


def test_model_weights_hash_without_safetensors_says_so(tmp_path):
    _tree(tmp_path, {"pytorch_model.bin": b"x"})
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        model_weights_hash(tmp_path)
