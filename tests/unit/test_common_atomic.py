"""common.atomic and common.jsonl: the one atomic writer and the one JSONL reader every package uses."""

from __future__ import annotations

import json
import threading

import pytest

from common import atomic, jsonl


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and target.read_text().endswith("}\n")
    assert _siblings(target) == ["state.json"]


def test_an_exception_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.atomic_open(target) as f:
            f.write("half of the new cont")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert _siblings(target) == ["data.txt"]


def test_an_exception_before_any_file_existed_leaves_nothing(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_open(target, "wb") as f:
            f.write(b"\x00" * 10)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_unserializable_object_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "x.json"
    target.write_text('{"ok": true}\n')
    with pytest.raises(ValueError):
        atomic.write_json(target, {"nan": float("nan")}, allow_nan=False)
    assert target.read_text() == '{"ok": true}\n' and _siblings(target) == ["x.json"]


def test_two_threads_get_unique_temp_names_and_one_complete_file(tmp_path):
    target = tmp_path / "shared.json"
    barrier = threading.Barrier(2)
    seen: list[list[str]] = []

    def writer(n: int) -> None:
        with atomic.atomic_open(target) as f:
            barrier.wait(timeout=10)  # both temp files exist now
            seen.append(_siblings(target))
            f.write(json.dumps({"writer": n, "pad": "x" * 10000}))
            barrier.wait(timeout=10)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    temps = seen[0]
    assert len(temps) == 2 and all(t.startswith(".shared.json.") and t.endswith(".tmp") for t in temps), temps
    assert json.loads(target.read_text())["writer"] in (1, 2)
    assert _siblings(target) == ["shared.json"]


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic.atomic_open(tmp_path / "x", "a"):
            pass


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    path = jsonl.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, [2], "three"])
    path.write_text(path.read_text() + "\n\n")
    assert jsonl.read_jsonl(path) == [{"a": 1}, [2], "three"]
    jsonl.append_jsonl(path, {"b": 4})
    assert jsonl.read_jsonl(path)[-1] == {"b": 4}


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(jsonl.JsonlError, match=r"bad\.jsonl:3: malformed JSON") as e:
        jsonl.read_jsonl(path)
    assert e.value.lineno == 3 and e.value.json_error
    path.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(jsonl.JsonlError, match=r"bad\.jsonl:2: missing field 'a'") as e:
        jsonl.read_jsonl(path, lambda r: r["a"])
    assert e.value.json_error is None
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        jsonl.read_jsonl(tmp_path / "nope.jsonl")
