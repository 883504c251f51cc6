"""Artifact manifests: atomic staging, fingerprints, and the reuse decision that makes stages idempotent."""

from __future__ import annotations

import json

import pytest

from pipelines import manifest
from pipelines.manifest import MANIFEST, fingerprint, read, reusable, staging, write


@pytest.fixture(autouse=True)
def _no_git(monkeypatch):
    monkeypatch.setattr(manifest, "code_version", lambda: "test-version")


def _fill(d, text="new"):
    (d / "weights.bin").write_text(text)
    (d / "sub").mkdir()
    (d / "sub" / "x.txt").write_text(text)


def _partials(parent):
    return [p for p in parent.iterdir() if p.name.endswith(".partial")]


# -- staging ------------------------------------------------------------------------------------------------------

def test_staging_creates_output_on_success(tmp_path):
    out = tmp_path / "a" / "b" / "artifact"
    with staging(out) as tmp:
        assert tmp != out and tmp.is_dir() and tmp.parent == out.parent
        assert not out.exists()
        _fill(tmp)
    assert (out / "weights.bin").read_text() == "new" and (out / "sub" / "x.txt").is_file()
    assert not _partials(out.parent)


def test_staging_replaces_existing_output_on_success(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with staging(out) as tmp:
        _fill(tmp)
        assert (out / "stale.txt").is_file()  # the old output stays readable until the new one is complete
    assert not (out / "stale.txt").exists()
    assert (out / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_staging_exception_keeps_old_output_and_removes_partial(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "good.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staging(out) as tmp:
            _fill(tmp)
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["good.txt"]
    assert (out / "good.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_staging_exception_without_previous_output_leaves_nothing(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(ValueError):
        with staging(out) as tmp:
            _fill(tmp)
            raise ValueError("bad data")
    assert list(tmp_path.iterdir()) == []


def test_staging_keyboard_interrupt_also_cleans_up(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(KeyboardInterrupt):
        with staging(out) as tmp:
            _fill(tmp)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_staging_removes_a_stale_partial_from_a_crash(tmp_path):
    out = tmp_path / "artifact"
    stale = tmp_path / ".artifact.partial"
    stale.mkdir()
    (stale / "half-written.bin").write_text("x")
    with staging(out) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "ok").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert sorted(p.name for p in out.iterdir()) == ["ok"]


# -- fingerprint --------------------------------------------------------------------------------------------------

CFG = {"steps": 150, "lr": None, "health": {"max_delta_ratio": 0.5}}
INPUTS = {"base_sha256": "ab" * 32, "train_sha256": "cd" * 32, "parent": None}


def test_fingerprint_stable():
    fp = fingerprint("adapter", CFG, INPUTS)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint("adapter", json.loads(json.dumps(CFG)), dict(INPUTS)) == fp
    reordered = {k: INPUTS[k] for k in reversed(list(INPUTS))}
    assert fingerprint("adapter", CFG, reordered) == fp  # key order is irrelevant


@pytest.mark.parametrize(
    ("kind", "config", "inputs"),
    [
        ("merged", CFG, INPUTS),
        ("adapter", {**CFG, "steps": 151}, INPUTS),
        ("adapter", {**CFG, "health": {"max_delta_ratio": 0.6}}, INPUTS),
        ("adapter", {**CFG, "extra": 1}, INPUTS),
        ("adapter", CFG, {**INPUTS, "train_sha256": "ce" * 32}),
        ("adapter", CFG, {**INPUTS, "parent": "f" * 64}),
    ],
)
def test_fingerprint_sensitive_to_kind_config_and_inputs(kind, config, inputs):
    assert fingerprint(kind, config, inputs) != fingerprint("adapter", CFG, INPUTS)


def test_fingerprint_handles_non_json_values(tmp_path):
    fp = fingerprint("adapter", {"target_modules": ("q_proj",)}, {"path": tmp_path})
    assert fp == fingerprint("adapter", {"target_modules": ["q_proj"]}, {"path": str(tmp_path)})


# -- write / read / reusable --------------------------------------------------------------------------------------

def test_write_and_read_round_trip(tmp_path):
    m = write(tmp_path, "adapter", CFG, INPUTS, metrics={"val_loss": 1.5}, method="pissa")
    assert m["fingerprint"] == fingerprint("adapter", CFG, INPUTS)
    assert m["code_version"] == "test-version" and m["metrics"] == {"val_loss": 1.5} and m["method"] == "pissa"
    assert read(tmp_path) == json.loads(json.dumps(m))


def test_read_without_manifest_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no {MANIFEST}"):
        read(tmp_path)


def test_reusable_only_for_matching_kind_and_fingerprint(tmp_path):
    out = tmp_path / "artifact"
    fp = fingerprint("adapter", CFG, INPUTS)
    assert reusable(out, "adapter", fp) is None  # no directory
    out.mkdir()
    assert reusable(out, "adapter", fp) is None  # no manifest
    write(out, "adapter", CFG, INPUTS)
    assert reusable(out, "adapter", fp)["fingerprint"] == fp
    assert reusable(out, "merged", fp) is None
    assert reusable(out, "adapter", fingerprint("adapter", {**CFG, "steps": 1}, INPUTS)) is None
    assert reusable(out, "adapter", "") is None


def test_reusable_ignores_a_corrupt_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{truncated")
    assert reusable(tmp_path, "adapter", fingerprint("adapter", CFG, INPUTS)) is None


def test_staged_write_is_reusable_and_a_failed_rerun_keeps_it(tmp_path):
    out = tmp_path / "run"
    fp = fingerprint("adapter", CFG, INPUTS)
    with staging(out) as tmp:
        write(tmp, "adapter", CFG, INPUTS)
    assert reusable(out, "adapter", fp) is not None
    with pytest.raises(RuntimeError):
        with staging(out) as tmp:
            write(tmp, "adapter", {**CFG, "steps": 3}, INPUTS)
            raise RuntimeError("crash after the manifest, before the weights")
    assert reusable(out, "adapter", fp) is not None


def test_code_version_never_raises(monkeypatch):
    monkeypatch.undo()  # the real one; it must answer even where git is missing or the tree is not a checkout
    monkeypatch.setattr(manifest, "REPO_ROOT", manifest.REPO_ROOT / "does-not-exist")
    assert manifest.code_version() == "unknown"
