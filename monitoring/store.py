"""Prediction log: one SQLite row per served request, written by a background thread.

Serving calls `log(record)` on the request path; it only enqueues (never touches the disk), and when the queue is
full the record is dropped and counted rather than slowing the request. Text that UTF-8 cannot hold (a lone surrogate
such as "\ud800" from a JSON request body) is stored with U+FFFD in its place, and the writer thread survives any
row it cannot write: it logs the error, counts it in `failures` and goes on with the next rows. The monitors read the rows back with
`query`. SQLite runs in WAL mode so that readers never block the writer.

    log = PredictionLog("work/predictions.sqlite")
    log.log({"request_id": rid, "family": "support", "version": "3", "prompt": p, "prompt_nll": 2.1, ...})
    log.flush(); rows = log.query(family="support", version="3")
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ROUTES = ("canary", "pinned", "base", "fallback")

# Column -> SQLite type. `embedding` is a float32 blob; `feedback` is set later by add_feedback.
_COLUMNS = {
    "request_id": "TEXT",
    "ts": "REAL NOT NULL",
    "family": "TEXT NOT NULL",
    "version": "TEXT NOT NULL",
    "prompt": "TEXT NOT NULL",
    "response": "TEXT",
    "prompt_nll": "REAL",
    "gen_entropy": "REAL",
    "gen_max_prob": "REAL",
    "latency_ms": "REAL",
    "error": "TEXT",
    "route": "TEXT",
    "embedding": "BLOB",
}
RECORD_KEYS = tuple(_COLUMNS)
_FLOAT_KEYS = ("ts", "prompt_nll", "gen_entropy", "gen_max_prob", "latency_ms")
_INSERT = f"INSERT INTO predictions ({', '.join(RECORD_KEYS)}) VALUES ({', '.join('?' * len(RECORD_KEYS))})"
_STOP = object()
_BATCH = 512


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class PredictionLog:
    """SQLite prediction log with a non-blocking `log` and a single background writer thread."""

    def __init__(self, path: str | Path, max_queue: int = 10_000):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._dropped = 0
        self._write_errors = 0
        self._writer_errors = 0
        self._count_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False

        self._read = _connect(self.path)
        cols = ", ".join(f"{k} {t}" for k, t in _COLUMNS.items())
        self._read.execute(f"CREATE TABLE IF NOT EXISTS predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols}, "
                           "feedback REAL, feedback_ts REAL)")
        self._read.execute("CREATE INDEX IF NOT EXISTS predictions_family_version ON predictions (family, version)")
        self._read.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")

        self._writer = threading.Thread(target=self._write_loop, name=f"PredictionLog({self.path.name})", daemon=True)
        self._writer.start()

    # ---- hot path -------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        """Enqueue one record; never blocks. A full queue drops the record and counts it in `dropped`.

        Raises ValueError for a malformed record (missing family/prompt, unknown key, bad route): that is a bug in
        the caller, not load, so it is not silently dropped.
        """
        if self._closed:
            raise RuntimeError(f"PredictionLog({self.path}) is closed; create a new one to keep logging")
        row = _to_row(record)
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._count_lock:
                self._dropped += 1

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full."""
        return self._dropped

    @property
    def write_errors(self) -> int:
        """Records that reached the writer but could not be inserted (logged with the SQLite error)."""
        return self._write_errors

    @property
    def failures(self) -> int:
        """Every record that was lost: dropped on a full queue, refused by SQLite, or lost to an unexpected writer
        error. What serving's `prediction_log_failures_total` metric reports; it only ever grows."""
        return self._dropped + self._write_errors + self._writer_errors

    @property
    def writer_alive(self) -> bool:
        """False only after close(): the writer thread does not die on a bad row."""
        return self._writer.is_alive()

    # ---- writer thread --------------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                batch = [self._queue.get()]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is _STOP for item in batch)
                rows = [item for item in batch if item is not _STOP]
                try:
                    if rows:
                        self._insert(conn, rows)
                except Exception:  # noqa: BLE001 - the writer must outlive any row; the rows are counted as lost
                    with self._count_lock:
                        self._writer_errors += len(rows)
                    logger.exception("prediction log writer lost %d records to %s; it keeps running", len(rows),
                                     self.path)
                finally:
                    for _ in batch:
                        self._queue.task_done()
                if stop:
                    return
        finally:
            conn.close()

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(_INSERT, rows)
            return
        except Exception:  # noqa: BLE001 - any bad row: retry one by one so the good rows of the batch are kept
            logger.exception("prediction log batch insert into %s failed; retrying row by row", self.path)
        for row in rows:
            try:
                with conn:
                    conn.execute(_INSERT, row)
            except Exception as e:  # noqa: BLE001
                with self._count_lock:
                    self._write_errors += 1
                logger.error("prediction log dropped a record (request_id=%r) that %s rejected: %s: %s",
                             row[0], self.path, type(e).__name__, e)

    # ---- readers --------------------------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every record queued so far is written; TimeoutError if that takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    raise TimeoutError(
                        f"PredictionLog({self.path}) still has {self._queue.unfinished_tasks} records unwritten after "
                        f"{timeout}s (writer alive: {self._writer.is_alive()}); the disk may be slow or locked")
                self._queue.all_tasks_done.wait(min(left, 0.1))

    def add_feedback(self, request_id: str, score: float) -> bool:
        """Attach a user feedback score in [0, 1] to a logged request. False if no request has that id."""
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"feedback score must be a number in [0, 1], got {score!r}") from None
        if not (0.0 <= score <= 1.0):
            raise ValueError(f"feedback score must be in [0, 1], got {score}; rescale it (e.g. thumbs up = 1.0)")
        if not self._closed:
            self.flush()
        with self._read_lock, self._read:
            cur = self._read.execute("UPDATE predictions SET feedback = ?, feedback_ts = ? WHERE request_id = ?",
                                     (score, time.time(), safe_text(str(request_id))))
            return cur.rowcount > 0

    def set_embeddings(self, ids, embeddings: np.ndarray) -> int:
        """Store prompt embeddings [N, D] for logged rows (by row "id"); returns how many rows were updated.

        For rows logged without one: the monitor that embeds them writes them back, so a prompt is embedded once,
        however many (overlapping) windows later read it.
        """
        ids = [int(i) for i in ids]
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"set_embeddings needs one embedding row per id: {len(ids)} ids, embeddings of shape "
                             f"{emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("set_embeddings got NaN or inf embeddings; re-embed those prompts")
        if not ids:
            return 0
        if not self._closed:
            self.flush()
        with self._read_lock, self._read:
            self._read.execute("BEGIN")  # one transaction: a window of 10k rows is one commit, not 10k
            cur = self._read.executemany("UPDATE predictions SET embedding = ? WHERE id = ?",
                                         [(row.tobytes(), i) for i, row in zip(ids, emb)])
            return cur.rowcount

    def query(self, family: str | None = None, version: str | None = None, after_id: int = 0,
              limit: int | None = None) -> list[dict]:
        """Rows ordered by id (ascending), each a dict with the record keys plus "id" and "feedback".

        `after_id` pages through the log: pass the last id seen to get only newer rows. `embedding` comes back as a
        float32 np.ndarray (or None).
        """
        where, params = self._where(family, version)
        where.append("id > ?")
        params.append(int(after_id))
        sql = (f"SELECT id, {', '.join(RECORD_KEYS)}, feedback FROM predictions WHERE {' AND '.join(where)} "
               "ORDER BY id")
        if limit is not None:
            if int(limit) < 0:
                raise ValueError(f"limit must be >= 0 or None, got {limit}")
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read_lock:
            cur = self._read.execute(sql, params)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for values in rows:
            row = dict(zip(names, values))
            blob = row["embedding"]
            row["embedding"] = None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()
            out.append(row)
        return out

    def count(self, family: str | None = None, version: str | None = None) -> int:
        where, params = self._where(family, version)
        sql = "SELECT COUNT(*) FROM predictions" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._read_lock:
            return int(self._read.execute(sql, params).fetchone()[0])

    @staticmethod
    def _where(family, version) -> tuple[list[str], list]:
        where, params = [], []
        if family is not None:
            where.append("family = ?")
            params.append(safe_text(str(family)))
        if version is not None:
            where.append("version = ?")
            params.append(safe_text(str(version)))
        return where, params

    def close(self) -> None:
        """Write what is queued, stop the writer, close the database. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            try:
                self._queue.put(_STOP, timeout=10.0)
            except queue.Full:
                logger.error("PredictionLog(%s): queue still full at close; %d records not written",
                             self.path, self._queue.qsize())
            self._writer.join(timeout=10.0)
            with self._read_lock:
                self._read.close()

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safe_text(text: str) -> str:
    """`text` with every lone surrogate (which UTF-8, hence SQLite, cannot store) replaced by U+FFFD; any other
    string comes back unchanged. Valid surrogate pairs cannot occur in a Python str built by json.loads: they are
    joined into one code point."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _to_row(record: dict) -> tuple:
    if not isinstance(record, dict):
        raise ValueError(f"a prediction record must be a dict, got {type(record).__name__}")
    unknown = set(record) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"prediction record has unknown keys {sorted(unknown)}; allowed keys are {list(RECORD_KEYS)}")
    for key in ("family", "prompt"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"prediction record needs a string {key!r}, got {record.get(key)!r}")
    route = record.get("route")
    if route is not None and route not in ROUTES:
        raise ValueError(f"prediction record route {route!r} is not one of {ROUTES}")
    values = dict(record)
    values.setdefault("ts", time.time())
    version = values.get("version")
    values["version"] = "" if version is None else str(version)
    for key in _FLOAT_KEYS:
        if values.get(key) is not None:
            values[key] = float(values[key])
    if values.get("request_id") is not None:
        values["request_id"] = str(values["request_id"])
    for key in ("request_id", "family", "version", "prompt", "response", "error"):
        if values.get(key) is not None:
            values[key] = safe_text(str(values[key]))
    emb = values.get("embedding")
    if emb is not None:
        # Copy to bytes now: the caller may reuse its buffer after log() returns.
        values["embedding"] = np.ascontiguousarray(emb, dtype=np.float32).reshape(-1).tobytes()
    return tuple(values.get(k) for k in RECORD_KEYS)
