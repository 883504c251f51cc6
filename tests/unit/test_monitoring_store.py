"""Prediction log: round trip, feedback, dropping under back-pressure, embeddings, concurrent writers."""

import sqlite3
import threading

import numpy as np
import pytest

from monitoring.store import PredictionLog


def _rec(i, family="support", version="3", **kw):
    return {"request_id": f"r{i}", "family": family, "version": version, "prompt": f"prompt {i}",
            "response": f"answer {i}", "prompt_nll": 1.0 + i, "gen_entropy": 0.5, "gen_max_prob": 0.9,
            "latency_ms": 12.5, "route": "canary", **kw}


@pytest.fixture
def plog(tmp_path):
    log = PredictionLog(tmp_path / "sub" / "pred.sqlite")
    yield log
    log.close()


def test_log_flush_query_count(plog):
    plog.log(_rec(0))
    plog.log(_rec(1, family="other"))
    plog.log(_rec(2, version=None, route="base", error="timeout"))
    plog.flush()
    assert plog.count() == 3
    assert plog.count(family="support") == 2
    assert plog.count(family="support", version="3") == 1
    assert plog.count(family="support", version="") == 1  # None version is the base model: stored as ""
    rows = plog.query(family="support")
    assert [r["request_id"] for r in rows] == ["r0", "r2"]
    assert rows[0]["id"] < rows[1]["id"]
    r0 = rows[0]
    assert r0["prompt"] == "prompt 0" and r0["response"] == "answer 0" and r0["prompt_nll"] == 1.0
    assert r0["route"] == "canary" and r0["error"] is None and r0["feedback"] is None and r0["ts"] > 0
    assert rows[1]["error"] == "timeout" and rows[1]["version"] == ""


def test_query_pages_with_after_id_and_limit(plog):
    for i in range(10):
        plog.log(_rec(i))
    plog.flush()
    first = plog.query(limit=4)
    assert [r["request_id"] for r in first] == ["r0", "r1", "r2", "r3"]
    rest = plog.query(after_id=first[-1]["id"])
    assert [r["request_id"] for r in rest] == [f"r{i}" for i in range(4, 10)]


def test_feedback(plog):
    plog.log(_rec(0))
    plog.log(_rec(1))
    # add_feedback flushes first: the record just logged is found without an explicit flush.
    assert plog.add_feedback("r1", 0.25) is True
    assert plog.add_feedback("nope", 1.0) is False
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plog.add_feedback("r0", 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plog.add_feedback("r0", "good")
    fb = {r["request_id"]: r["feedback"] for r in plog.query()}
    assert fb == {"r0": None, "r1": 0.25}


def test_nan_stat_reads_back_as_none(plog):
    plog.log(_rec(0, gen_entropy=float("nan")))
    plog.flush()
    assert plog.query()[0]["gen_entropy"] is None


def test_embedding_round_trip(plog):
    emb = np.linspace(-1, 1, 384).astype(np.float32)
    plog.log(_rec(0, embedding=emb))
    emb[:] = 0  # the caller reusing its buffer must not change what was logged
    plog.log(_rec(1, embedding=[0.5, 0.25]))
    plog.log(_rec(2))
    plog.flush()
    rows = plog.query()
    assert rows[0]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(rows[0]["embedding"], np.linspace(-1, 1, 384).astype(np.float32))
    np.testing.assert_array_equal(rows[1]["embedding"], np.array([0.5, 0.25], np.float32))
    assert rows[2]["embedding"] is None


def test_full_queue_drops_and_counts(tmp_path):
    path = tmp_path / "pred.sqlite"
    log = PredictionLog(path, max_queue=2)
    # Hold SQLite's write lock so that the writer thread stalls and the queue fills.
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(100):
            log.log(_rec(i))  # must not block although nothing can be written
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    log.flush()
    written = log.count()
    assert log.dropped >= 90
    assert written + log.dropped == 100
    log.close()


def test_concurrent_logging(plog):
    n_threads, per_thread = 8, 250

    def worker(t):
        for i in range(per_thread):
            plog.log({"request_id": f"t{t}-{i}", "family": f"f{t % 2}", "prompt": "p", "prompt_nll": float(i)})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    plog.flush()
    assert plog.dropped == 0
    assert plog.count() == n_threads * per_thread
    assert plog.count(family="f0") == n_threads * per_thread // 2
    rows = plog.query()
    assert {r["request_id"] for r in rows} == {f"t{t}-{i}" for t in range(n_threads) for i in range(per_thread)}
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"family": "f"}, "'prompt'"),
        ({"prompt": "p"}, "'family'"),
        ({"family": "f", "prompt": "p", "promt_nll": 1.0}, "unknown keys"),
        ({"family": "f", "prompt": "p", "route": "shadow"}, "route 'shadow'"),
    ],
)
def test_malformed_records_are_rejected(plog, record, message):
    with pytest.raises(ValueError, match=message):
        plog.log(record)


def test_wal_persistence_and_close(tmp_path):
    path = tmp_path / "pred.sqlite"
    with PredictionLog(path) as log:
        log.log(_rec(0))
    # close() wrote the queue; the data is there for a new instance, in WAL mode.
    log2 = PredictionLog(path)
    assert log2.count() == 1
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    log2.close()
    log2.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log2.log(_rec(1))
    with pytest.raises(ValueError, match="max_queue"):
        PredictionLog(tmp_path / "x.sqlite", max_queue=0)


def test_set_embeddings_fills_rows_by_id(plog):
    for i in range(3):
        plog.log(_rec(i))
    plog.flush()
    ids = [r["id"] for r in plog.query()]
    emb = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert plog.set_embeddings([ids[0], ids[2]], emb) == 2
    rows = plog.query()
    np.testing.assert_array_equal(rows[0]["embedding"], np.array([0, 1, 2], np.float32))
    assert rows[1]["embedding"] is None
    np.testing.assert_array_equal(rows[2]["embedding"], np.array([3, 4, 5], np.float32))
    assert plog.set_embeddings([10_000], np.zeros((1, 3))) == 0  # no such row
    assert plog.set_embeddings([], np.zeros((0, 3))) == 0
    with pytest.raises(ValueError, match="one embedding row per id"):
        plog.set_embeddings(ids, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        plog.set_embeddings(ids[:1], np.full((1, 3), np.nan))


def test_lone_surrogate_is_stored_safely_and_the_writer_survives(plog):
    """Issue 16: a prompt holding a lone surrogate used to kill the writer thread for the life of the server."""
    plog.log(_rec(0, prompt="\ud800 x", response="ok \udfff", error="bad \ud83d"))
    plog.log(_rec(1, prompt="fine \U0001F600"))
    plog.flush()
    rows = plog.query()
    assert [r["prompt"] for r in rows] == ["\ufffd x", "fine \U0001F600"]
    assert rows[0]["response"] == "ok \ufffd" and rows[0]["error"] == "bad \ufffd"
    assert plog.writer_alive and plog.failures == 0
    assert plog.add_feedback("r0", 0.5) is True  # feedback for the same request still works
    plog.log(_rec(2, request_id="\udc80id"))
    assert plog.add_feedback("\udc80id", 1.0) is True
    assert plog.count(family="support\ud800") == 0


def test_writer_survives_any_bad_row_and_counts_it(plog, monkeypatch):
    import monitoring.store as store

    plog.log(_rec(0))
    plog.flush()
    real = store._INSERT
    # a row whose insert raises something other than sqlite3.Error (what the surrogate used to do)
    monkeypatch.setattr(plog, "_insert", lambda conn, rows: (_ for _ in ()).throw(RuntimeError("boom")))
    plog.log(_rec(1))
    plog.log(_rec(2))
    plog.flush()
    assert plog.writer_alive and plog.failures == 2
    monkeypatch.undo()
    assert store._INSERT == real
    plog.log(_rec(3))
    plog.flush()
    assert [r["request_id"] for r in plog.query()] == ["r0", "r3"]
    assert plog.failures == 2


def test_a_row_sqlite_rejects_is_counted_and_the_rest_of_the_batch_is_kept(plog):
    import monitoring.store as store

    good, bad = store._to_row(_rec(0)), list(store._to_row(_rec(1)))
    bad[store.RECORD_KEYS.index("family")] = None  # NOT NULL violated inside the writer
    for row in (good, tuple(bad), store._to_row(_rec(2))):
        plog._queue.put(row)
    plog.flush()
    assert plog.write_errors == 1 and plog.failures == 1 and plog.writer_alive
    assert [r["request_id"] for r in plog.query()] == ["r0", "r2"]
