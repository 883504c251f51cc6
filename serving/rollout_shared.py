"""Canary rollout state in a database (PostgreSQL in production), shared by every serving replica.

    ctl = open_rollout_controller("postgresql://adapterops@db/adapterops", RolloutConfig(), on_promote, on_rollback)
    ctl.start("support", champion="2", challenger="3")   # on a second replica: joins the same canary
    ctl.poll()      # what the control plane's poller calls (a thread does it every poll_interval_s by default)
    ctl.close()

The same decisions as the file-backed RolloutController (it is one: the step logic and the statistics are inherited
unchanged); what differs is where the state lives and who acts on it:
- tables `rollout_rollouts` (one row per family: the rollout without its samples, a revision number), `rollout_samples`
  and `rollout_feedback` (appended by any replica), `rollout_finished`, `rollout_lease`;
- one canary per family across replicas: a start for the challenger that runs already returns that rollout, one for
  another challenger is refused while it runs; every write of a rollout row is a compare-and-set on its revision, so
  an abort on any replica ends it everywhere and a driver that raced with it loses its write and its callbacks;
- `record` and `record_feedback` on any replica count in the one canary: samples go through a background writer (a
  request never waits on the database; lost ones are counted in `failures`), feedback is matched with the sample of
  its request id, whichever replica served it;
- one replica at a time drives the steps (ends steps, promotes, rolls back, runs on_promote / on_rollback): the
  holder of the lease row, renewed at every poll and taken over by another replica when it has not been renewed for
  `lease_ttl_s` (the holder died);
- every replica re-reads the state at every poll and calls its subscribers for each family whose weights or status
  changed, so every router follows the shared weights within `poll_interval_s`.
Clocks: the lease expiry compares replica clocks, which must agree to well within `lease_ttl_s`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from monitoring.sql_log import create_tables, describe, make_db_engine
from serving.rollout import (ACTIVE, CHALLENGER, CHAMPION, PROMOTED, RolloutConfig, RolloutController, RolloutError,
                             RolloutStateUnavailable, _empty_arms)

log = logging.getLogger(__name__)

_LOCAL = ("samples", "feedback", "step_requests", "client_errors")  # rebuilt from the sample and feedback tables
_STOP = object()
_ERROR_LOG_EVERY_S = 10.0
_MAX_FINISHED = 20
LEASE = "rollout-driver"


class StaleRollout(RuntimeError):
    """Another replica changed the rollout since this one read it (compare-and-set on its revision failed)."""


def open_rollout_controller(state: str | Path, config: RolloutConfig, on_promote: Callable[[str, str], None],
                            on_rollback: Callable[[str, str, str], None], **kw) -> RolloutController:
    """A RolloutController on `state`: a path -> the JSON file (the local default); a database URL
    (postgresql://..., sqlite:///...) -> SharedRolloutController (kw: replica_id, lease_ttl_s, poll_interval_s)."""
    if "://" in str(state):
        return SharedRolloutController(str(state), config, on_promote, on_rollback, **kw)
    return RolloutController(Path(state), config, on_promote, on_rollback)


def _tables() -> tuple[sa.MetaData, dict[str, sa.Table]]:
    md = sa.MetaData()
    bigid = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    t = {
        "rollouts": sa.Table(
            "rollout_rollouts", md,
            sa.Column("family", sa.Text, primary_key=True),
            sa.Column("rollout_id", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("rev", sa.Integer, nullable=False),
            sa.Column("doc", sa.Text, nullable=False),
            sa.Column("updated_at", sa.Float(53), nullable=False),
            sa.Column("updated_by", sa.Text)),
        "samples": sa.Table(
            "rollout_samples", md,
            sa.Column("id", bigid, primary_key=True, autoincrement=True),
            sa.Column("rollout_id", sa.Text, nullable=False),
            sa.Column("arm", sa.Text, nullable=False),
            sa.Column("request_id", sa.Text),
            sa.Column("latency_ms", sa.Float(53), nullable=False),
            sa.Column("error", sa.Boolean, nullable=False),
            sa.Column("nll", sa.Float(53)),
            sa.Column("client_error", sa.Boolean, nullable=False),
            sa.Column("ts", sa.Float(53), nullable=False),
            sa.Column("replica", sa.Text),
            sa.Index("rollout_samples_rollout", "rollout_id", "id"),
            sa.Index("rollout_samples_request", "request_id")),
        "feedback": sa.Table(
            "rollout_feedback", md,
            sa.Column("id", bigid, primary_key=True, autoincrement=True),
            sa.Column("rollout_id", sa.Text, nullable=False),
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("score", sa.Float(53), nullable=False),
            sa.Column("ts", sa.Float(53), nullable=False),
            sa.Index("rollout_feedback_rollout", "rollout_id", "id")),
        "finished": sa.Table(
            "rollout_finished", md,
            sa.Column("id", bigid, primary_key=True, autoincrement=True),
            sa.Column("rollout_id", sa.Text, nullable=False, unique=True),
            sa.Column("doc", sa.Text, nullable=False)),
        "lease": sa.Table(
            "rollout_lease", md,
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("holder", sa.Text, nullable=False),
            sa.Column("expires_at", sa.Float(53), nullable=False)),
    }
    return md, t


_DB_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


class SharedRolloutController(RolloutController):
    """RolloutController whose state is in database tables shared by every replica (see the module docstring)."""

    def __init__(self, url: str, config: RolloutConfig, on_promote: Callable[[str, str], None],
                 on_rollback: Callable[[str, str, str], None], replica_id: str | None = None,
                 lease_ttl_s: float = 15.0, poll_interval_s: float | None = 1.0, connect_timeout_s: float = 5.0,
                 feedback_wait_s: float = 0.5):
        if lease_ttl_s <= 0 or (poll_interval_s is not None and not 0 < poll_interval_s < lease_ttl_s):
            raise ValueError(f"need 0 < poll_interval_s < lease_ttl_s, got poll_interval_s={poll_interval_s}, "
                             f"lease_ttl_s={lease_ttl_s}")
        self.url = str(url)
        self.replica_id = replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = float(lease_ttl_s)
        self.poll_interval_s = poll_interval_s
        self.feedback_wait_s = feedback_wait_s
        """How long record_feedback waits for a request id no replica has written yet (another replica's writer)."""
        self._db = make_db_engine(self.url, connect_timeout_s)
        self._md, self._t = _tables()
        self._revs: dict[str, int] = {}  # family -> revision of the row this replica last read
        self._docs: dict[str, str] = {}  # family -> that row's doc, as read
        self._marks: dict[str, int] = {}  # rollout id -> highest sample id read
        self._ended_cache: dict[str, dict] = {}  # rollout id -> samples/feedback of an ended rollout (they no longer change)
        self._finished_ids: set[str] = set()
        self._is_driver = False
        self._sample_failures = 0
        self._last_error_log = float("-inf")
        self._queue: queue.Queue = queue.Queue(maxsize=100_000)
        self._closed = False
        self._view: dict[str, tuple] = {}
        try:
            create_tables(self._db, self._md)  # replicas starting together on a fresh database race here
        except sa.exc.SQLAlchemyError as e:
            self._db.dispose()
            raise RolloutStateUnavailable(f"rollout state database {describe(self.url)} is unreachable: "
                               f"{type(getattr(e, 'orig', None) or e).__name__}: {str(getattr(e, 'orig', None) or e).strip()}; "
                               f"check that the server is up and the URL is right") from None
        super().__init__(Path("rollout-state"), config, on_promote, on_rollback)  # _load() reads the tables
        self.state_path = describe(self.url)
        self._writer = threading.Thread(target=self._write_loop, name="rollout-samples", daemon=True)
        self._writer.start()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if poll_interval_s is not None:
            self._poller = threading.Thread(target=self._poll_loop, name="rollout-poll", daemon=True)
            self._poller.start()

    # ------------------------------------------------------------------ what the control plane calls

    @property
    def is_driver(self) -> bool:
        """True while this replica holds the lease: it alone ends steps, promotes and rolls back."""
        return self._is_driver

    @property
    def failures(self) -> int:
        """Samples and feedback that could not be written (database down, queue full); it only grows."""
        return self._sample_failures

    def poll(self) -> None:
        """Take or renew the driver lease, re-read the shared state, drive the steps if this replica holds the lease,
        and call the subscribers of every family whose weights or status changed here. Raises on a database error
        (the background poller logs it and tries again)."""
        self._is_driver = self._take_lease()
        events: list[tuple] = []
        with self._lock:
            before = self._view
            self._refresh()
            if self._is_driver:
                now = time.time()
                for ro in self._state["rollouts"].values():
                    if ro["status"] in ACTIVE:
                        self._maybe_end_step(ro, now, events)
                if events:
                    try:
                        self._save(durable=True)
                    except StaleRollout:
                        events = []  # someone else moved it (an abort): act on what the next poll reads
                        self._refresh()
            after = self._view
        changed = [f for f in after if after[f] != before.get(f)]
        fired = {ev[1] for ev in events if ev[0] == "weights"}
        self._fire(events)
        for family in changed:
            if family not in fired:
                self._notify(family)

    refresh = poll

    def tick(self) -> None:
        """poll(), quietly: status() calls it, and a database blip must not fail a status read."""
        try:
            self.poll()
        except _DB_DOWN as e:
            self._log_db_error("poll", e)

    def start(self, family: str, champion: str, challenger: str, offline_nll: float | None = None,
              config: RolloutConfig | None = None, baseline: str | None = None) -> dict:
        """Start the family's canary; if one runs already for this challenger (started by any replica), return it."""
        with self._unavailable_as_error("start"):
            return self._start(family, champion, challenger, offline_nll, config, baseline)

    def _start(self, family, champion, challenger, offline_nll, config, baseline) -> dict:
        for _ in range(5):
            with self._lock:
                self._refresh()
                ro = self._state["rollouts"].get(family)
                if ro is not None and ro["status"] in ACTIVE and ro["challenger"] == challenger:
                    snapshot = self._public(ro)
                    joined = True
                else:
                    joined = False
            if joined:
                self._notify(family)
                return snapshot
            try:
                return super().start(family, champion, challenger, offline_nll=offline_nll, config=config,
                                     baseline=baseline)
            except StaleRollout:
                continue
        raise RolloutError(f"family {family}: the rollout kept changing under this replica; try again")

    def abort(self, family: str, reason: str) -> dict:
        with self._unavailable_as_error("abort"):
            return self._abort(family, reason)

    def _abort(self, family: str, reason: str) -> dict:
        for _ in range(5):
            with self._lock:
                self._refresh()
            try:
                return super().abort(family, reason)
            except StaleRollout:
                continue
        raise RolloutError(f"family {family}: the rollout kept changing under this replica; try again")

    def record(self, family: str, version: str, request_id: str, latency_ms: float, error: bool,
               response_nll: float | None, client_error: bool = False) -> None:
        """Queue one served request's sample for the shared canary; never blocks, never touches the database here."""
        view = self._view.get(family)
        if view is None or view[1] not in ACTIVE:
            return
        rollout_id, _, champion, challenger, _, baseline = view
        if version == challenger:
            arm = CHALLENGER
        elif version in (champion, baseline):
            arm = CHAMPION
        else:
            return
        nll = None if response_nll is None or response_nll != response_nll or abs(response_nll) == float("inf") \
            else float(response_nll)
        row = {"rollout_id": rollout_id, "arm": arm, "request_id": str(request_id), "latency_ms": float(latency_ms),
               "error": bool(error), "nll": nll, "client_error": bool(client_error), "ts": time.time(),
               "replica": self.replica_id}
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._sample_failures += 1

    def record_feedback(self, request_id: str, score: float) -> bool:
        """Feedback for a request any replica recorded in an active rollout; False if no active rollout has it
        within `feedback_wait_s` (no wait while no rollout is active)."""
        if not any(view[1] in ACTIVE for view in self._view.values()):
            return False
        self.flush()
        t = self._t
        request_id = str(request_id)
        find = (sa.select(t["samples"].c.rollout_id)
                .join(t["rollouts"], t["rollouts"].c.rollout_id == t["samples"].c.rollout_id)
                .where(t["samples"].c.request_id == request_id, t["samples"].c.client_error.is_(False),
                       t["rollouts"].c.status.in_(ACTIVE))
                .order_by(t["samples"].c.id.desc()).limit(1))
        deadline = time.monotonic() + self.feedback_wait_s
        try:
            while True:  # the replica that served it may not have written its sample yet: its writer lags by ms
                with self._db.connect() as conn:
                    hit = conn.execute(find).first()
                if hit is not None or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            if hit is None:
                return False
            with self._db.begin() as conn:
                conn.execute(t["feedback"].insert().values(rollout_id=hit[0], request_id=request_id,
                                                           score=float(score), ts=time.time()))
                return True
        except _DB_DOWN as e:
            self._sample_failures += 1
            self._log_db_error("record_feedback", e)
            return False

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the samples queued so far are written (or counted lost)."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    raise TimeoutError(f"rollout samples: {self._queue.unfinished_tasks} not written to "
                                       f"{describe(self.url)} after {timeout}s; the database may be slow or down")
                self._queue.all_tasks_done.wait(min(left, 0.1))

    def close(self, release_lease: bool = True) -> None:
        """Stop polling, write the queued samples, give the lease up (another replica drives at its next poll) and
        close the connections. release_lease=False leaves the lease to expire, as a crashed replica does."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10.0)
        try:
            self.flush()
        except TimeoutError as e:
            log.error("%s", e)
        self._queue.put(_STOP)
        self._writer.join(10.0)
        if release_lease:
            t = self._t["lease"]
            try:
                with self._db.begin() as conn:
                    conn.execute(t.update().where(t.c.name == LEASE, t.c.holder == self.replica_id)
                                 .values(expires_at=0.0))
            except _DB_DOWN as e:
                self._log_db_error("lease release", e)
        self._is_driver = False
        self._db.dispose()

    @contextlib.contextmanager
    def _unavailable_as_error(self, what: str):
        try:
            yield
        except _DB_DOWN as e:
            orig = getattr(e, "orig", None) or e
            raise RolloutStateUnavailable(
                f"rollout {what} failed: the rollout state database {describe(self.url)} is unreachable "
                f"({type(orig).__name__}: {str(orig).strip()[:300]}); nothing was changed, try again when it is "
                f"back") from None

    # ------------------------------------------------------------------ lease

    def _take_lease(self) -> bool:
        t = self._t["lease"]
        now = time.time()
        with self._db.begin() as conn:
            got = conn.execute(t.update().where(t.c.name == LEASE, sa.or_(t.c.holder == self.replica_id,
                                                                           t.c.expires_at < now))
                               .values(holder=self.replica_id, expires_at=now + self.lease_ttl_s)).rowcount
        if got:
            return True
        try:
            with self._db.begin() as conn:
                conn.execute(t.insert().values(name=LEASE, holder=self.replica_id, expires_at=now + self.lease_ttl_s))
            return True
        except sa.exc.IntegrityError:
            return False  # held by a live replica

    # ------------------------------------------------------------------ state <-> tables

    def _views(self) -> dict[str, tuple]:
        return {f: (ro["id"], ro["status"], ro["champion"], ro["challenger"], ro["weight"], ro.get("baseline"))
                for f, ro in self._state["rollouts"].items()}

    # The request path (weight, is_active, record) reads this snapshot, replaced whole after every read or write of
    # the tables, and never takes self._lock: database I/O happens under that lock and must not hold up a request.

    def weight(self, family: str) -> tuple[str | None, str | None, float]:
        view = self._view.get(family)
        if view is None:
            return None, None, 0.0
        _, status, champion, challenger, weight, _ = view
        if status in ACTIVE:
            return champion, challenger, weight
        if status == PROMOTED:
            return challenger, None, 0.0
        return champion, None, 0.0

    def is_active(self, family: str) -> bool:
        view = self._view.get(family)
        return view is not None and view[1] in ACTIVE

    def _load(self) -> dict:
        self._state = {"format": 1, "rollouts": {}, "finished": [], "request_arms": {}}
        self._refresh()
        return self._state

    def _refresh(self) -> None:
        """Replace this replica's view with the tables' (under self._lock)."""
        t = self._t
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(t["rollouts"].c.family, t["rollouts"].c.rev, t["rollouts"].c.doc)).all()
            docs = {family: (rev, json.loads(doc)) for family, rev, doc in rows}
            live = [d["id"] for _, d in docs.values() if d["status"] in ACTIVE or d["id"] not in self._ended_cache]
            samples = conn.execute(
                sa.select(t["samples"]).where(t["samples"].c.rollout_id.in_(live)).order_by(t["samples"].c.id)
            ).mappings().all() if live else []
            feedback = conn.execute(
                sa.select(t["feedback"]).where(t["feedback"].c.rollout_id.in_(live)).order_by(t["feedback"].c.id)
            ).mappings().all() if live else []
            finished = conn.execute(sa.select(t["finished"].c.doc).order_by(t["finished"].c.id.desc())
                                    .limit(_MAX_FINISHED)).scalars().all()
        built = {rid: {"samples": _empty_arms(), "feedback": {CHAMPION: {}, CHALLENGER: {}},
                       "client_errors": {CHAMPION: 0, CHALLENGER: 0}, "arm_of": {}, "after_mark": 0, "max_id": 0}
                 for rid in live}
        marks = {d["id"]: int(d.get("step_mark", 0)) for _, d in docs.values()}
        for s in samples:
            b = built[s["rollout_id"]]
            b["max_id"] = max(b["max_id"], int(s["id"]))
            if s["client_error"]:
                b["client_errors"][s["arm"]] += 1
                continue
            arm = b["samples"][s["arm"]]
            arm["latency_ms"].append(float(s["latency_ms"]))
            arm["error"].append(bool(s["error"]))
            arm["nll"].append(s["nll"])
            if s["request_id"] is not None:
                b["arm_of"][s["request_id"]] = (s["arm"], len(arm["error"]) - 1)
            if int(s["id"]) > marks.get(s["rollout_id"], 0):
                b["after_mark"] += 1
        for fb in feedback:
            b = built[fb["rollout_id"]]
            hit = b["arm_of"].get(fb["request_id"])
            if hit is not None:
                b["feedback"][hit[0]][fb["request_id"]] = [hit[1], float(fb["score"])]
        rollouts = {}
        for family, (rev, doc) in docs.items():
            rid = doc["id"]
            if rid in built:
                b = built.pop(rid)
                b.pop("arm_of")
                self._marks[rid] = b.pop("max_id")
                b["step_requests"] = b.pop("after_mark")
                if doc["status"] not in ACTIVE:
                    self._ended_cache[rid] = json.loads(json.dumps(b))  # kept apart from the copy handed out
            else:
                b = json.loads(json.dumps(self._ended_cache[rid]))
            rollouts[family] = {**doc, **b}
            self._revs[family] = rev
            self._docs[family] = json.dumps(doc, sort_keys=True)
        current = {doc["id"] for _, doc in docs.values()}
        self._ended_cache = {rid: b for rid, b in self._ended_cache.items() if rid in current}
        self._marks = {rid: m for rid, m in self._marks.items() if rid in current}
        finished = [json.loads(d) for d in reversed(finished)]
        self._finished_ids = {d["id"] for d in finished}
        self._state = {"format": 1, "rollouts": rollouts, "finished": finished, "request_arms": {}}
        self._view = self._views()

    def _save(self, durable: bool) -> None:
        """Write every rollout this replica changed, each a compare-and-set on the revision it read; StaleRollout
        (nothing written) when another replica wrote one first. Samples never go through here."""
        t = self._t
        now = time.time()
        with self._db.begin() as conn:
            for ro in self._state["finished"]:
                if ro["id"] not in self._finished_ids:
                    try:
                        with conn.begin_nested():
                            conn.execute(t["finished"].insert().values(rollout_id=ro["id"], doc=json.dumps(ro)))
                    except sa.exc.IntegrityError:
                        pass  # archived by another replica already
                    for name in ("samples", "feedback"):  # an archived rollout keeps its summary, not its samples
                        conn.execute(t[name].delete().where(t[name].c.rollout_id == ro["id"]))
            written = []
            for family, ro in self._state["rollouts"].items():
                doc = {k: v for k, v in ro.items() if k not in _LOCAL}
                old = self._docs.get(family)
                if old is not None:
                    before = json.loads(old)
                    if before["id"] == doc["id"] and before.get("step_started_at") != doc.get("step_started_at"):
                        doc["step_mark"] = self._marks.get(doc["id"], 0)  # a step ended: count from here on
                text = json.dumps(doc, sort_keys=True)
                if text == old:
                    continue
                rev = self._revs.get(family)
                values = dict(rollout_id=doc["id"], status=doc["status"], doc=text, updated_at=now,
                              updated_by=self.replica_id)
                if rev is None:
                    try:
                        with conn.begin_nested():
                            conn.execute(t["rollouts"].insert().values(family=family, rev=1, **values))
                    except sa.exc.IntegrityError:
                        raise StaleRollout(family) from None
                    new_rev = 1
                else:
                    r = conn.execute(t["rollouts"].update().where(t["rollouts"].c.family == family,
                                                                  t["rollouts"].c.rev == rev)
                                     .values(rev=rev + 1, **values))
                    if r.rowcount != 1:
                        raise StaleRollout(family)
                    new_rev = rev + 1
                written.append((family, new_rev, text))
        for family, rev, text in written:
            self._revs[family] = rev
            self._docs[family] = text
            self._state["rollouts"][family]["step_mark"] = json.loads(text).get("step_mark", 0)
        self._finished_ids |= {ro["id"] for ro in self._state["finished"]}
        self._view = self._views()

    def _fire(self, events: list[tuple]) -> None:
        for ev in events:  # one by one: a callback error that loses its write to another replica skips no other
            try:
                super()._fire([ev])
            except (StaleRollout, *_DB_DOWN) as e:
                log.warning("rollout %s of family %s: its callback error could not be stored (%s)", ev[0], ev[1],
                            type(e).__name__)

    # ------------------------------------------------------------------ background threads

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [b for b in batch if b is not _STOP]
            try:
                if rows:
                    with self._db.begin() as conn:
                        conn.execute(self._t["samples"].insert(), rows)
            except Exception as e:  # noqa: BLE001 - the writer outlives the database going away
                self._sample_failures += len(rows)
                self._log_db_error(f"writing {len(rows)} canary samples", e)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if len(rows) < len(batch):
                return

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - keep polling: the database may come back
                self._is_driver = False
                self._log_db_error("poll", e)

    def _log_db_error(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.error("rollout state database %s: %s failed: %s: %s (replica %s keeps the last state it read)",
                      describe(self.url), what, type(e).__name__, str(e).strip()[:300], self.replica_id)


__all__ = ["RolloutStateUnavailable", "SharedRolloutController", "StaleRollout", "open_rollout_controller"]
