"""registry.store.LocalStore: atomic, content-verified entries on the local disk."""

import json
import threading

import pytest

from registry.hashing import tree_manifest
from registry.store import ArtifactNotFound, ArtifactStore, CorruptArtifact, LocalStore, open_store


def _src(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def src(tmp_path):
    return _src(tmp_path / "src", {"adapter_config.json": b'{"r": 8}', "w/adapter_model.safetensors": b"\x00" * 1000})


def test_round_trip_and_index(store, src, tmp_path):
    assert isinstance(store, ArtifactStore)
    entry = store.put_dir("init-cache/abc123", src, meta={"base": "sha256:ab"})
    assert set(entry) >= {"key", "files", "meta", "created"}
    assert entry["key"] == "init-cache/abc123" and entry["meta"] == {"base": "sha256:ab"}
    assert entry["files"] == tree_manifest(src)
    assert store.exists("init-cache/abc123") and not store.exists("init-cache/other")
    assert store.index("init-cache/abc123") == entry
    out = store.get_dir("init-cache/abc123", tmp_path / "out")
    assert tree_manifest(out) == tree_manifest(src)
    assert [e["key"] for e in store.list()] == ["init-cache/abc123"]
    assert store.verify("init-cache/abc123") == []
    # getting into a dest that already holds the same content is a no-op; other content is refused
    assert store.get_dir("init-cache/abc123", tmp_path / "out") == out
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="other content"):
        store.get_dir("init-cache/abc123", out)


def test_put_is_idempotent_first_entry_wins(store, src, tmp_path):
    first = store.put_dir("k", src)
    other = _src(tmp_path / "other", {"f": b"different"})
    assert store.put_dir("k", other) == first
    assert store.verify("k") == []


def test_index_is_the_commit_point(store, src, tmp_path):
    store.put_dir("k", src)
    (store.root / "k" / "_index.json").unlink()
    assert not store.exists("k") and store.list() == []
    with pytest.raises(ArtifactNotFound, match="no artifact 'k'"):
        store.get_dir("k", tmp_path / "out")
    # no temp dirs are left behind by writes
    assert list((store.root / ".tmp").iterdir()) == []


def test_concurrent_writers_of_one_key_leave_one_intact_entry(store, tmp_path):
    srcs = [_src(tmp_path / f"s{i}", {"a": bytes([i]) * 200_000, "b/c": b"same"}) for i in range(8)]
    results, errors = [], []
    barrier = threading.Barrier(len(srcs))

    def write(s):
        try:
            barrier.wait()
            results.append(store.put_dir("race/key", s))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.verify("race/key") == []
    winner = store.index("race/key")
    assert all(r == winner for r in results)  # losers return the winner's entry
    assert list((store.root / ".tmp").iterdir()) == []
    assert sorted(p.name for p in (store.root / "race" / "key").iterdir()) == ["_index.json", "a", "b"]


def test_tampered_file_is_refused_and_leaves_no_dest(store, src, tmp_path):
    store.put_dir("k", src)
    (store.root / "k" / "w" / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)
    dest = tmp_path / "dest"
    with pytest.raises(CorruptArtifact, match="adapter_model.safetensors.*delete the entry and rebuild"):
        store.get_dir("k", dest)
    assert not dest.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_verify_lists_every_problem(store, src):
    store.put_dir("k", src)
    d = store.root / "k"
    (d / "adapter_config.json").write_text("tampered")
    (d / "w" / "adapter_model.safetensors").unlink()
    (d / "extra.bin").write_bytes(b"?")
    problems = store.verify("k")
    assert len(problems) == 3
    assert any(p.startswith("adapter_config.json: sha256") for p in problems)
    assert "w/adapter_model.safetensors: missing" in problems
    assert "extra.bin: not in the index" in problems
    assert "no artifact 'nope'" in store.verify("nope")[0]


def test_missing_file_is_corrupt(store, src, tmp_path):
    store.put_dir("k", src)
    (store.root / "k" / "adapter_config.json").unlink()
    with pytest.raises(CorruptArtifact, match="missing"):
        store.get_dir("k", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_delete(store, src):
    store.put_dir("a/b", src)
    store.delete("a/b")
    assert not store.exists("a/b") and store.list() == []
    with pytest.raises(ArtifactNotFound):
        store.delete("a/b")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "A"])
def test_keys_are_validated(store, src, key):
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.put_dir(key, src)


def test_nesting_and_reserved_names_refused(store, src, tmp_path):
    store.put_dir("a", src)
    with pytest.raises(ValueError, match="nest inside entry 'a'"):
        store.put_dir("a/b", src)
    bad = _src(tmp_path / "bad", {"_index.json": b"{}"})
    with pytest.raises(ValueError, match="reserves"):
        store.put_dir("c", bad)


def test_index_json_is_plain_json(store, src):
    store.put_dir("k", src)
    assert json.loads((store.root / "k" / "_index.json").read_text())["key"] == "k"


def test_open_store_local_forms(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a")), LocalStore)
    s = open_store(f"file://{tmp_path}/b")
    assert isinstance(s, LocalStore) and s.root == tmp_path / "b"
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        open_store("s3:///x")
