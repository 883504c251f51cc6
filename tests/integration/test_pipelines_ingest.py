"""Ingestion (pipelines.ingest) from a real prediction log written through the store's writer API (log, then
add_feedback by request id, as the serving control plane does), on both backends: the local SQLite file and the
shared PostgreSQL database (127.0.0.1:5432; skipped when it does not answer). Both must give byte-identical retrain
data; the rules (family, window, threshold, dedup, extra data, split, minimum) are checked on the files written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from registry_fixtures import fresh_postgres_db

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
FAM = "support"
NOW = 1_800_000_000.0
DAY = 86400.0


def _prompt(i: int) -> str:
    return f"### Customer: question number {i}\n### Agent:"


def traffic() -> list[tuple[dict, float | None]]:
    """(record, feedback) pairs: what the log holds and which feedback each request got."""
    out = []
    for i in range(40):  # 40 distinct prompts, each with a good answer; prompts 0..9 also got a worse one later
        out.append(({"request_id": f"good-{i}", "family": FAM, "version": "1", "prompt": _prompt(i),
                     "response": f" answer {i}", "ts": NOW - 3600 + i}, 0.9 if i % 2 else 1.0))
    for i in range(10):
        out.append(({"request_id": f"worse-{i}", "family": FAM, "version": "2", "prompt": _prompt(i),
                     "response": f" worse {i}", "ts": NOW - 60 + i}, 0.75))
    out.append(({"request_id": "best-3", "family": FAM, "version": "2", "prompt": _prompt(3),
                 "response": " the best answer 3", "ts": NOW - 30}, 1.0))  # ties prompt 3's 0.9 -> beats it
    for i in range(5):  # rated bad only: never targets, listed in rejected.jsonl
        out.append(({"request_id": f"bad-{i}", "family": FAM, "version": "1", "prompt": _prompt(100 + i),
                     "response": f" wrong {i}", "ts": NOW - 100}, 0.2))
    out.append(({"request_id": "bad-of-good", "family": FAM, "version": "1", "prompt": _prompt(5),
                 "response": " bad for 5", "ts": NOW - 10}, 0.0))  # prompt 5 has a good answer: not rejected
    for i in range(6):  # no feedback / errors / empty answers / other family / too old: all skipped
        out.append(({"request_id": f"silent-{i}", "family": FAM, "version": "1", "prompt": _prompt(200 + i),
                     "response": " no one rated this", "ts": NOW - 50}, None))
        out.append(({"request_id": f"err-{i}", "family": FAM, "version": "1", "prompt": _prompt(300 + i),
                     "response": None, "error": "engine timeout", "ts": NOW - 50}, 1.0))
        out.append(({"request_id": f"empty-{i}", "family": FAM, "version": "1", "prompt": _prompt(350 + i),
                     "response": "  ", "ts": NOW - 50}, 1.0))
        out.append(({"request_id": f"other-{i}", "family": "other-family", "version": "1",
                     "prompt": _prompt(400 + i), "response": " other", "ts": NOW - 50}, 1.0))
        out.append(({"request_id": f"old-{i}", "family": FAM, "version": "1", "prompt": _prompt(500 + i),
                     "response": " old", "ts": NOW - 9 * DAY}, 1.0))
    return out


def write_log(log) -> None:
    pairs = traffic()
    for record, _ in pairs:
        log.log(record)
    log.flush()
    for record, score in pairs:
        if score is not None:
            assert log.add_feedback(record["request_id"], score)


@pytest.fixture(scope="module")
def pg_url():
    with fresh_postgres_db("adapterops_ingest") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def logged(request, tmp_path_factory):
    """(workspace, data dir) with the traffic above in its prediction log."""
    from monitoring.sql_log import open_prediction_log
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp(f"ingest-{request.param}")
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""
    ws = Workspace.create(root, BASE, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", state_db_url=url)
    log = open_prediction_log(ws.prediction_log_target)
    try:
        write_log(log)
    finally:
        log.close()
    return ws, request.param


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ingest_keeps_good_feedback_of_the_family_deduped_and_split(logged, tmp_path):
    from pipelines.ingest import IngestConfig, run

    ws, backend = logged
    extra = tmp_path / "labelled.jsonl"
    extra.write_text(json.dumps({"prompt": _prompt(7), "response": " a human's answer 7", "category": "REFUND"})
                     + "\n" + json.dumps({"prompt": _prompt(101), "response": " fixed 1", "category": "REFUND"})
                     + "\n" + json.dumps({"prompt": "### Customer: new one\n### Agent:", "response": " new"}) + "\n")
    out = run(IngestConfig(family=FAM, since="7d", min_feedback=0.7, extra=extra, min_examples=30), ws, now=NOW,
              log=lambda *a: None)
    assert out == ws.root / "data" / FAM / "new"
    train, val = _lines(out / "train.jsonl"), _lines(out / "val.jsonl")
    rows = {r["prompt"]: r for r in train + val}
    assert len(rows) == len(train) + len(val)  # deduped by prompt
    expected = {_prompt(i) for i in range(40)} | {_prompt(101), "### Customer: new one\n### Agent:"}
    assert set(rows) == expected
    assert rows[_prompt(3)]["response"] == " the best answer 3"  # 1.0 beats 0.9 and 0.75
    assert rows[_prompt(4)]["response"] == " answer 4"  # 1.0 beats the later 0.75
    assert rows[_prompt(5)]["response"] == " answer 5"  # 0.9 beats 0.75 and the 0.0
    assert rows[_prompt(7)] == {"prompt": _prompt(7), "response": " a human's answer 7", "category": "REFUND",
                                "intent": ""}
    assert rows[_prompt(11)]["category"] == "traffic"
    assert 1 <= len(val) < len(train)
    rejected = _lines(out / "rejected.jsonl")
    assert {r["prompt"] for r in rejected} == {_prompt(100 + i) for i in (0, 2, 3, 4)}  # 101 got a human label
    assert all(r["feedback"] == 0.2 for r in rejected)

    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["read"] == 40 + 10 + 1 + 5 + 1 + 6 * 3  # the family's rows in the window (not other-family, not old)
    assert (c["no_feedback"], c["errors"], c["bad"], c["good"]) == (6, 12, 6, 51)
    assert (c["logged_prompts"], c["extra"], c["extra_overrides_log"], c["examples"]) == (40, 3, 1, 42)
    assert (c["train"], c["val"]) == (len(train), len(val))
    assert manifest["window"]["since_ts"] == NOW - 7 * DAY and manifest["window"]["until_ts"] == NOW
    assert manifest["versions"] == {"1": 39, "2": 1}
    assert manifest["source"]["extra"] == str(extra)
    log_source = manifest["source"]["prediction_log"]
    assert log_source.startswith("postgresql://") if backend == "postgres" else log_source.endswith("predictions.db")
    from registry.hashing import sha256_file

    for name in ("train", "val", "rejected"):
        entry = manifest["files"][name]
        assert entry["sha256"] == sha256_file(out / entry["path"]).removeprefix("sha256:")
    assert not list(out.glob(".*.tmp"))

    again = run(IngestConfig(family=FAM, since="7d", min_feedback=0.7, extra=extra, min_examples=30), ws, now=NOW,
                log=lambda *a: None)
    assert _lines(again / "train.jsonl") == train and _lines(again / "val.jsonl") == val  # deterministic


def test_both_backends_give_the_same_files(logged, tmp_path_factory):
    """Each backend's run leaves its files where the other backend's run of this test compares them (the module's
    fixture runs sqlite first, then postgres)."""
    from pipelines.ingest import IngestConfig, run

    ws, backend = logged
    out = run(IngestConfig(family=FAM, since="7d", min_examples=30), ws, now=NOW, log=lambda *a: None)
    shared = tmp_path_factory.getbasetemp() / "ingest-compare"
    shared.mkdir(exist_ok=True)
    for name in ("train.jsonl", "val.jsonl", "rejected.jsonl"):
        (shared / f"{backend}-{name}").write_bytes((out / name).read_bytes())
    if backend == "postgres":
        for name in ("train.jsonl", "val.jsonl", "rejected.jsonl"):
            assert (shared / f"postgres-{name}").read_bytes() == (shared / f"sqlite-{name}").read_bytes(), name


def test_too_few_examples_is_refused_and_the_previous_window_stays(logged):
    from pipelines.ingest import IngestConfig, NotEnoughData, run

    ws, _ = logged
    out = run(IngestConfig(family=FAM, since="all", min_examples=30), ws, now=NOW, log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a one-hour window holds the 40 good prompts; only 0.95+ feedback (the 1.0s): 20 + best-3 -> 21 prompts
    with pytest.raises(NotEnoughData, match=r"ingest support: 21 examples, min_examples=30; .* 6 without feedback, "
                                            r"12 errors/empty, .* Nothing was written"):
        run(IngestConfig(family=FAM, since="1h", min_feedback=0.95, min_examples=30), ws, now=NOW,
            log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(NotEnoughData, match="0 examples"):
        run(IngestConfig(family="nobody-here", min_examples=2), ws, now=NOW, log=lambda *a: None)


def test_bad_options_and_inputs_are_named(tmp_path):
    from pipelines.data import DataError
    from pipelines.ingest import IngestConfig, parse_since, run
    from pipelines.workspace import Workspace

    assert parse_since("36h", NOW) == NOW - 36 * 3600 and parse_since("all", NOW) == 0.0
    assert parse_since("2027-01-15T08:00:00Z", NOW) == parse_since("2027-01-15T08:00:00", NOW)
    with pytest.raises(ValueError, match="since 'yesterday' is neither a duration"):
        IngestConfig(family=FAM, since="yesterday")
    with pytest.raises(ValueError, match=r"min_feedback must be in \[0, 1\]"):
        IngestConfig(family=FAM, min_feedback=5)
    ws = Workspace.create(tmp_path / "ws", BASE, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(FileNotFoundError, match=f"no prediction log at {ws.root / 'predictions.db'}"):
        run(IngestConfig(family=FAM), ws)
    bad = tmp_path / "extra.jsonl"
    bad.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=f"{bad}:2 needs string fields 'prompt' and 'response'"):
        run(IngestConfig(family=FAM, extra=bad), ws)


def test_the_shared_log_down_is_one_error_naming_it(tmp_path):
    from monitoring.sql_log import PredictionLogUnavailable
    from pipelines.ingest import IngestConfig, run
    from pipelines.workspace import Workspace

    ws = Workspace.create(tmp_path, BASE, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          state_db_url="postgresql://postgres@127.0.0.1:9/adapterops")
    t0 = time.monotonic()
    with pytest.raises(PredictionLogUnavailable, match="prediction log database postgresql://postgres@127.0.0.1:9/"):
        run(IngestConfig(family=FAM), ws)
    assert time.monotonic() - t0 < 15
