"""Prediction log on a database URL (PostgreSQL in production), shared by every serving replica and monitor.

The same interface and writer semantics as monitoring.store.PredictionLog (the local SQLite file, which stays the
default): `log` only enqueues and never blocks a request, one background thread writes in batches, every lost record
is counted in `failures`, and `query` sees the rows every process wrote. Built on SQLAlchemy Core.

    log = open_prediction_log("postgresql://adapterops@db:5432/adapterops")   # or a path / sqlite:///path
    log.log({"request_id": rid, "family": "support", "version": "3", "prompt": p, ...})
    log.flush(); rows = log.query(family="support", version="3")

A database that is down at construction is one error naming it; one that goes away later costs the records written
meanwhile (counted, logged at most every 10 s) and the writer carries on when it is back. Connections time out after
`connect_timeout_s`, statements after `statement_timeout_s`, so nothing waits unbounded on a dead server.

Known limit: ids come from a sequence, so with several writers a row can commit after a row with a higher id; a
monitor paging with `after_id` right at the edge of the log can miss such a row (query a little behind the newest id).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from monitoring.store import RECORD_KEYS, PredictionLog, _to_row, safe_text

logger = logging.getLogger(__name__)

_STOP = object()
_BATCH = 512
_ERROR_LOG_EVERY_S = 10.0


class PredictionLogUnavailable(RuntimeError):
    """The prediction log's database cannot be reached (or refused the operation)."""


def open_prediction_log(url_or_path: str | Path, max_queue: int = 10_000, **kw):
    """A prediction log on `url_or_path`: a plain path or sqlite:///path -> the local SQLite PredictionLog (the
    default, unchanged); any other SQLAlchemy URL (postgresql://...) -> SQLPredictionLog."""
    text = str(url_or_path)
    if "://" not in text:
        return PredictionLog(text, max_queue=max_queue)
    url = make_url(text)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return PredictionLog(url.database, max_queue=max_queue)
    return SQLPredictionLog(text, max_queue=max_queue, **kw)


def create_tables(engine, md, attempts: int = 3) -> None:
    """CREATE the tables of `md` that do not exist yet, safe when replicas start together on a fresh database:
    between create_all's existence check and its CREATE another process may create a table (PostgreSQL answers
    DuplicateTable, a ProgrammingError, or a unique violation in pg_type, an IntegrityError); the check is then run
    again, which finds it. Other errors (the server down) propagate."""
    for attempt in range(attempts):
        try:
            md.create_all(engine, checkfirst=True)
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def make_db_engine(url: str, connect_timeout_s: float = 5.0, statement_timeout_s: float = 30.0) -> sa.Engine:
    """A SQLAlchemy engine with bounded waits: connect, pool checkout and (PostgreSQL) statements and locks."""
    u = make_url(url)
    args: dict = {}
    kw: dict = {"pool_pre_ping": True}
    if u.get_backend_name() == "postgresql":
        args["connect_timeout"] = max(1, int(connect_timeout_s))
        args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
        kw.update(pool_timeout=connect_timeout_s + 5, pool_size=4, max_overflow=4)
    elif u.get_backend_name() == "sqlite":
        args["timeout"] = statement_timeout_s
        args["check_same_thread"] = False
    return sa.create_engine(u, connect_args=args, **kw)


def describe(url: str) -> str:
    """The URL with its password hidden: what an error names."""
    return make_url(url).render_as_string(hide_password=True)


def _metadata() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    table = sa.Table(
        "predictions", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text),
        sa.Column("ts", sa.Float(53), nullable=False),
        sa.Column("family", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text),
        sa.Column("prompt_nll", sa.Float(53)),
        sa.Column("gen_entropy", sa.Float(53)),
        sa.Column("gen_max_prob", sa.Float(53)),
        sa.Column("latency_ms", sa.Float(53)),
        sa.Column("error", sa.Text),
        sa.Column("route", sa.Text),
        sa.Column("embedding", sa.LargeBinary),
        sa.Column("feedback", sa.Float(53)),
        sa.Column("feedback_ts", sa.Float(53)),
        sa.Index("predictions_family_version", "family", "version"),
        sa.Index("predictions_request_id", "request_id"),
    )
    return md, table


_TEXT_KEYS = ("request_id", "family", "version", "prompt", "response", "error", "route")


def _db_text(value):
    """PostgreSQL text cannot hold NUL; SQLite can. Replace it like a lone surrogate, with U+FFFD."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class SQLPredictionLog:
    """Prediction log in a database table, with a non-blocking `log` and a single background writer thread."""

    def __init__(self, url: str, max_queue: int = 10_000, connect_timeout_s: float = 5.0,
                 statement_timeout_s: float = 30.0, feedback_wait_s: float = 2.0):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.url = str(url)
        self.feedback_wait_s = feedback_wait_s
        """How long add_feedback waits for a request id that no replica has written yet, before it says False."""
        self.path = describe(self.url)  # what errors and thread names show (PredictionLog has a file path here)
        self._engine = make_db_engine(self.url, connect_timeout_s, statement_timeout_s)
        self._md, self._table = _metadata()
        try:
            create_tables(self._engine, self._md)  # replicas starting together on a fresh database race here
        except sa.exc.SQLAlchemyError as e:
            self._engine.dispose()
            raise PredictionLogUnavailable(
                f"prediction log database {self.path} is unreachable: {type(e.orig or e).__name__}: "
                f"{str(e.orig or e).strip()}; check that the server is up and the URL is right") from None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._dropped = 0
        self._write_errors = 0
        self._writer_errors = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self._last_error_log = float("-inf")
        self._writer = threading.Thread(target=self._write_loop, name="PredictionLog(sql)", daemon=True)
        self._writer.start()

    # ---- hot path -------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        """Enqueue one record; never blocks. A full queue drops the record and counts it in `dropped`."""
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
        return self._dropped

    @property
    def write_errors(self) -> int:
        return self._write_errors

    @property
    def failures(self) -> int:
        """Every record lost: dropped on a full queue, refused by the database, or lost while it was down."""
        return self._dropped + self._write_errors + self._writer_errors

    @property
    def writer_alive(self) -> bool:
        return self._writer.is_alive()

    # ---- writer thread --------------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
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
                    self._insert(rows)
            except Exception as e:  # noqa: BLE001 - the writer outlives the database going away
                with self._count_lock:
                    self._writer_errors += len(rows)
                now = time.monotonic()
                if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
                    self._last_error_log = now
                    logger.error("prediction log lost %d records: database %s: %s: %s (the writer keeps running; "
                                 "%d lost so far)", len(rows), self.path, type(e).__name__, str(e).strip()[:300],
                                 self.failures)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                self._engine.dispose()
                return

    def _insert(self, rows: list[tuple]) -> None:
        dicts = [{k: _db_text(v) if k in _TEXT_KEYS else v for k, v in zip(RECORD_KEYS, row)} for row in rows]
        try:
            with self._engine.begin() as conn:
                conn.execute(self._table.insert(), dicts)
            return
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError):
            raise  # the database is away: the whole batch is lost (counted by the caller), no row-by-row retry
        except Exception:  # noqa: BLE001 - a bad row: retry one by one so the good rows of the batch are kept
            logger.exception("prediction log batch insert into %s failed; retrying row by row", self.path)
        for d in dicts:
            try:
                with self._engine.begin() as conn:
                    conn.execute(self._table.insert(), [d])
            except Exception as e:  # noqa: BLE001
                with self._count_lock:
                    self._write_errors += 1
                logger.error("prediction log dropped a record (request_id=%r) that %s rejected: %s: %s",
                             d["request_id"], self.path, type(e).__name__, e)

    # ---- readers --------------------------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every record queued so far is written (or counted lost); TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    raise TimeoutError(
                        f"PredictionLog({self.path}) still has {self._queue.unfinished_tasks} records unwritten after "
                        f"{timeout}s (writer alive: {self._writer.is_alive()}); the database may be slow or down")
                self._queue.all_tasks_done.wait(min(left, 0.1))

    def _run(self, what: str, fn):
        try:
            with self._engine.begin() as conn:
                return fn(conn)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as e:
            raise PredictionLogUnavailable(
                f"prediction log database {self.path} is unreachable ({what}): {type(e.orig or e).__name__}: "
                f"{str(e.orig or e).strip()[:300]}") from None

    def add_feedback(self, request_id: str, score: float) -> bool:
        """Attach a feedback score in [0, 1] to a logged request (logged by any replica). False if no row has that id
        within `feedback_wait_s` (a bogus id costs that long)."""
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"feedback score must be a number in [0, 1], got {score!r}") from None
        if not (0.0 <= score <= 1.0):
            raise ValueError(f"feedback score must be in [0, 1], got {score}; rescale it (e.g. thumbs up = 1.0)")
        if not self._closed:
            self.flush()
        t = self._table
        stmt = (t.update().where(t.c.request_id == _db_text(safe_text(str(request_id))))
                .values(feedback=score, feedback_ts=time.time()))
        deadline = time.monotonic() + self.feedback_wait_s
        while True:  # another replica may have served it and not written it yet: its writer commits within ms
            if self._run("add_feedback", lambda conn: conn.execute(stmt).rowcount > 0):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def set_embeddings(self, ids, embeddings: np.ndarray) -> int:
        """Store prompt embeddings [N, D] for logged rows (by row "id"); returns how many rows were updated."""
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
        t = self._table
        stmt = t.update().where(t.c.id == sa.bindparam("row_id")).values(embedding=sa.bindparam("emb"))
        params = [{"row_id": i, "emb": row.tobytes()} for i, row in zip(ids, emb)]
        return self._run("set_embeddings", lambda conn: conn.execute(stmt, params).rowcount)

    def query(self, family: str | None = None, version: str | None = None, after_id: int = 0,
              limit: int | None = None) -> list[dict]:
        """Rows ordered by id (ascending), each a dict with the record keys plus "id" and "feedback"."""
        t = self._table
        cols = [t.c.id, *(t.c[k] for k in RECORD_KEYS), t.c.feedback]
        stmt = sa.select(*cols).where(*self._where(family, version), t.c.id > int(after_id)).order_by(t.c.id)
        if limit is not None:
            if int(limit) < 0:
                raise ValueError(f"limit must be >= 0 or None, got {limit}")
            stmt = stmt.limit(int(limit))
        rows = self._run("query", lambda conn: [dict(r._mapping) for r in conn.execute(stmt)])
        for row in rows:
            blob = row["embedding"]
            row["embedding"] = None if blob is None else np.frombuffer(bytes(blob), dtype=np.float32).copy()
        return rows

    def count(self, family: str | None = None, version: str | None = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(self._table).where(*self._where(family, version))
        return int(self._run("count", lambda conn: conn.execute(stmt).scalar_one()))

    def _where(self, family, version) -> list:
        t, out = self._table, []
        if family is not None:
            out.append(t.c.family == _db_text(safe_text(str(family))))
        if version is not None:
            out.append(t.c.version == _db_text(safe_text(str(version))))
        return out

    def close(self) -> None:
        """Write what is queued, stop the writer, close the connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout=30.0)
        finally:
            try:
                self._queue.put(_STOP, timeout=10.0)
            except queue.Full:
                logger.error("PredictionLog(%s): queue still full at close; %d records not written",
                             self.path, self._queue.qsize())
            self._writer.join(timeout=30.0)
            self._engine.dispose()

    def __enter__(self) -> "SQLPredictionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["PredictionLogUnavailable", "SQLPredictionLog", "describe", "make_db_engine", "open_prediction_log"]
