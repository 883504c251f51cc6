"""Prediction log over SQLAlchemy (monitoring/sql_log.py) on a SQLite URL: the interface of the SQLite file log, two
logs on one database see each other's rows, failures are counted and the writer survives. PostgreSQL itself:
tests/integration/test_shared_state.py."""

import sqlite3

import numpy as np
import pytest

from monitoring.sql_log import PredictionLogUnavailable, SQLPredictionLog, open_prediction_log
from monitoring.store import PredictionLog


def _rec(i, family="support", version="3", **kw):
    return {"request_id": f"r{i}", "family": family, "version": version, "prompt": f"prompt {i}",
            "response": f"answer {i}", "prompt_nll": 1.0 + i, "gen_entropy": 0.5, "gen_max_prob": 0.9,
            "latency_ms": 12.5, "route": "canary", **kw}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'shared.db'}"


def test_factory_keeps_the_sqlite_file_log_for_paths(tmp_path):
    for target in (tmp_path / "a.db", str(tmp_path / "b.db"), f"sqlite:///{tmp_path / 'c.db'}"):
        log = open_prediction_log(target)
        assert type(log) is PredictionLog
        log.close()
    log = open_prediction_log("sqlite://")  # in memory: only the SQLAlchemy log can serve that URL
    assert isinstance(log, SQLPredictionLog)
    log.close()


def test_round_trip_feedback_embeddings_across_two_logs(url):
    a, b = SQLPredictionLog(url), SQLPredictionLog(url)
    try:
        a.log(_rec(0, embedding=np.arange(4, dtype=np.float32)))
        a.flush()  # two writer threads: without this, b's rows may land first (ids follow the write order)
        b.log(_rec(1, version="4"))
        b.log(_rec(2, family="other", route=None, error="timeout", prompt="nul \x00 and \ud800"))
        b.flush()
        rows = a.query()
        assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]
        assert rows[0]["embedding"].tolist() == [0, 1, 2, 3] and rows[1]["embedding"] is None
        assert rows[2]["prompt"] == "nul \ufffd and \ufffd" and rows[2]["error"] == "timeout"
        assert a.count() == 3 and a.count(family="support") == 2 and b.count(version="4") == 1
        assert [r["id"] for r in a.query(after_id=rows[0]["id"], limit=1)] == [rows[1]["id"]]
        assert b.add_feedback("r0", 0.25) and not b.add_feedback("nope", 0.5)  # r0 was written by the other log
        assert a.query(family="support", version="3")[0]["feedback"] == 0.25
        assert a.set_embeddings([rows[1]["id"]], np.ones((1, 3))) == 1
        assert b.query(version="4")[0]["embedding"].tolist() == [1.0, 1.0, 1.0]
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            a.add_feedback("r0", 2.0)
        with pytest.raises(ValueError, match="unknown keys"):
            a.log({"family": "f", "prompt": "p", "colour": "red"})
        assert a.failures == 0 and b.failures == 0
    finally:
        a.close()
        b.close()
        a.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        a.log(_rec(9))


def test_writer_counts_lost_rows_and_keeps_running(url, tmp_path):
    log = SQLPredictionLog(url)
    try:
        con = sqlite3.connect(tmp_path / "shared.db")
        con.execute("ALTER TABLE predictions RENAME TO gone")
        con.commit()
        for i in range(3):
            log.log(_rec(i))
        log.flush()
        assert log.failures == 3 and log.writer_alive
        con.execute("ALTER TABLE gone RENAME TO predictions")
        con.commit()
        con.close()
        log.log(_rec(7))
        log.flush()
        assert log.count() == 1 and log.failures == 3
    finally:
        log.close()


def test_a_full_queue_drops_and_counts(url):
    log = SQLPredictionLog(url, max_queue=1)
    try:
        for i in range(200):
            log.log(_rec(i))  # never blocks
        log.flush()
        assert log.dropped > 0 and log.failures == log.dropped and log.count() == 200 - log.dropped
    finally:
        log.close()


def test_an_unreachable_database_is_one_error_naming_it():
    with pytest.raises(PredictionLogUnavailable, match=r"postgresql://adapterops:\*\*\*@127.0.0.1:1/x"):
        SQLPredictionLog("postgresql://adapterops:secret@127.0.0.1:1/x", connect_timeout_s=1)
