"""The drift fallback's state in a database (PostgreSQL in production), shared by every serving replica.

    policy = open_fallback_policy(FallbackConfig(enabled=True), "postgresql://adapterops@db/adapterops")
    policy.subscribe(lambda family, before, after: ...)   # another replica engaged / released (versions or None)
    policy.close()

The same decisions as serving.fallback.FallbackPolicy (it is one: every change is the same function over the
families dict); what differs is where the state lives:
- table `fallback_families`: one row per family (its drift state as JSON, a revision number); every change reads the
  row and writes it back as a compare-and-set on the revision, retried when another replica wrote in between, so
  verdicts posted to two replicas at once are all counted in one streak and the family ends engaged once;
- a poller re-reads the table every `poll_interval_s` and calls the subscribers for each family whose engaged
  fallback changed (another replica engaged or released it): the control plane routes by it within that time;
- reads (engaged, status, should_engage) use the last state read and never wait on the database; a change while it
  is unreachable raises FallbackStateUnavailable naming it (nothing changed: the replica keeps its last state), a poll
  that fails is counted in `failures` and logged at most every 10 s, and polling resumes when it is back.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from monitoring.sql_log import create_tables, describe, make_db_engine
from serving.fallback import FallbackConfig, FallbackPolicy, FallbackStateUnavailable

log = logging.getLogger(__name__)

_DB_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
_ERROR_LOG_EVERY_S = 10.0
_CAS_ATTEMPTS = 50


class _Stale(Exception):
    pass


def open_fallback_policy(config: FallbackConfig, state: str | Path, **kw) -> FallbackPolicy:
    """A FallbackPolicy on `state`: a path -> the JSON file (the local default); a database URL (postgresql://...,
    sqlite:///...) -> SharedFallbackPolicy (kw: replica_id, poll_interval_s, connect_timeout_s)."""
    if "://" in str(state):
        return SharedFallbackPolicy(config, str(state), **kw)
    return FallbackPolicy(config, Path(state))


def _table() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    t = sa.Table("fallback_families", md,
                 sa.Column("family", sa.Text, primary_key=True),
                 sa.Column("rev", sa.Integer, nullable=False),
                 sa.Column("doc", sa.Text, nullable=False),
                 sa.Column("updated_at", sa.Float(53), nullable=False),
                 sa.Column("updated_by", sa.Text))
    return md, t


class SharedFallbackPolicy(FallbackPolicy):
    """FallbackPolicy whose state is a database table shared by every replica (see the module docstring)."""

    def __init__(self, config: FallbackConfig, url: str, replica_id: str | None = None,
                 poll_interval_s: float | None = 1.0, connect_timeout_s: float = 5.0,
                 statement_timeout_s: float = 10.0):
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0 or None, got {poll_interval_s!r}")
        self.url = str(url)
        self.replica_id = replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.poll_interval_s = poll_interval_s
        self._db = make_db_engine(self.url, connect_timeout_s, statement_timeout_s)
        self._md, self._t = _table()
        self._revs: dict[str, int] = {}
        self._write_lock = threading.Lock()  # database I/O happens under it; self._lock only guards the view
        self._subscribers: list[Callable[[str, str | None, str | None], None]] = []
        self._failures = 0
        self._last_error: str | None = None
        self._last_error_log = float("-inf")
        self._last_read = None
        try:
            create_tables(self._db, self._md)  # replicas starting together on a fresh database race here
            super().__init__(config, None)  # _load() reads the table
        except sa.exc.SQLAlchemyError as e:
            self._db.dispose()
            raise FallbackStateUnavailable(f"fallback state database {describe(self.url)} is unreachable: "
                                           f"{self._why(e)}; check that the server is up and the URL is right") \
                from None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if poll_interval_s is not None:
            self._poller = threading.Thread(target=self._poll_loop, name="fallback-poll", daemon=True)
            self._poller.start()

    # ------------------------------------------------------------------ what the control plane calls

    def subscribe(self, fn: Callable[[str, str | None, str | None], None]) -> None:
        """fn(family, engaged version before, after): called from the poller when another replica changed it."""
        self._subscribers.append(fn)

    @property
    def failures(self) -> int:
        """Polls and changes that failed because the database could not be reached; it only grows."""
        return self._failures

    def poll(self) -> list[str]:
        """Re-read every family's state; call the subscribers of those whose engaged fallback changed. Returns those
        families. Raises on a database error (the poller counts and logs it, and keeps the last state)."""
        with self._write_lock:
            rows = self._read_all()
            with self._lock:
                before = {f: (fam["engaged"] or {}).get("version") for f, fam in self._families.items()}
                for family, (rev, doc) in rows.items():
                    self._families[family], self._revs[family] = doc, rev
                after = {f: (fam["engaged"] or {}).get("version") for f, fam in self._families.items()}
        changed = [f for f in after if after[f] != before.get(f)]
        for family in changed:
            for fn in self._subscribers:
                try:
                    fn(family, before.get(family), after[family])
                except Exception:  # noqa: BLE001 - one subscriber's failure must not stop the others or the poll
                    log.exception("fallback subscriber failed for family %s", family)
        return changed

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10.0)
            self._poller = None
        self._db.dispose()

    # ------------------------------------------------------------------ state <-> table

    def _state_info(self) -> dict:
        return {"kind": "database", "url": describe(self.url), "replica": self.replica_id,
                "failures": self._failures, "last_error": self._last_error,
                "last_read_s_ago": None if self._last_read is None else round(time.monotonic() - self._last_read, 1)}

    def _load(self) -> dict:
        rows = self._read_all()
        self._revs = {f: rev for f, (rev, _) in rows.items()}
        return {f: doc for f, (_, doc) in rows.items()}

    def _read_all(self) -> dict[str, tuple[int, dict]]:
        t = self._t
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(t.c.family, t.c.rev, t.c.doc)).all()
        self._last_read = time.monotonic()
        return {family: (rev, json.loads(doc)) for family, rev, doc in rows}

    def _change(self, family: str, fn):
        """fn over the family's row as read now, written back as a compare-and-set on its revision (retried when
        another replica wrote first); FallbackStateUnavailable when the database cannot be reached."""
        t = self._t
        with self._write_lock:
            for _ in range(_CAS_ATTEMPTS):
                try:
                    with self._db.begin() as conn:
                        row = conn.execute(sa.select(t.c.rev, t.c.doc).where(t.c.family == family)).first()
                        fams = {family: json.loads(row.doc)} if row is not None else {}
                        before = row.doc if row is not None else None
                        out = fn(fams)
                        doc = fams.get(family)
                        text = json.dumps(doc, sort_keys=True) if doc is not None else None
                        rev = row.rev if row is not None else None
                        if text is not None and text != (json.dumps(json.loads(before), sort_keys=True)
                                                         if before is not None else None):
                            values = dict(doc=text, updated_at=time.time(), updated_by=self.replica_id)
                            if row is None:
                                try:
                                    with conn.begin_nested():
                                        conn.execute(t.insert().values(family=family, rev=1, **values))
                                except sa.exc.IntegrityError:
                                    raise _Stale() from None
                                rev = 1
                            else:
                                r = conn.execute(t.update().where(t.c.family == family, t.c.rev == row.rev)
                                                 .values(rev=row.rev + 1, **values))
                                if r.rowcount != 1:
                                    raise _Stale()
                                rev = row.rev + 1
                except _Stale:
                    continue  # another replica wrote this family since it was read: read it again
                except _DB_DOWN as e:
                    self._failures += 1
                    self._last_error = self._why(e)
                    raise FallbackStateUnavailable(
                        f"fallback state database {describe(self.url)} is unreachable ({self._why(e)}); nothing was "
                        f"changed and this replica keeps its last state: send the verdict again when it is back") \
                        from None
                with self._lock:
                    if doc is not None:
                        self._families[family], self._revs[family] = doc, rev
                return out
        raise FallbackStateUnavailable(f"fallback state of {family} in {describe(self.url)}: {_CAS_ATTEMPTS} writes "
                                       f"in a row lost to other replicas' writes; try again")

    @staticmethod
    def _why(e: Exception) -> str:
        orig = getattr(e, "orig", None) or e
        return f"{type(orig).__name__}: {str(orig).strip()[:300]}"

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
                self._last_error = None
            except Exception as e:  # noqa: BLE001 - keep polling: the database may come back
                self._failures += 1
                self._last_error = self._why(e)
                now = time.monotonic()
                if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
                    self._last_error_log = now
                    log.error("fallback state database %s: poll failed: %s (replica %s keeps the last state it "
                              "read)", describe(self.url), self._last_error, self.replica_id)


__all__ = ["FallbackStateUnavailable", "SharedFallbackPolicy", "open_fallback_policy"]
