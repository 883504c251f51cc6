"""Two serving replicas sharing one PostgreSQL database (issue 15 item 1): one prediction log, one canary.

Each replica is a real server (uvicorn on 127.0.0.1) over its own built-in engine on the tiny base, with a
SharedRolloutController and a SQLPredictionLog on the same fresh database (dropped afterwards). Traffic on both is one
log for the monitor; a canary started on one is the canary of both and routes both by the same weights; feedback
sent to one replica for a request the other served counts; an abort on one ends it on the other; when the replica
that drives the steps dies, the other takes the lease over and finishes the canary. Skips when PostgreSQL does not
answer on 127.0.0.1:5432.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import httpx
import psycopg2
import pytest

from monitoring.sql_log import SQLPredictionLog, open_prediction_log
from registry_fixtures import PG_ADMIN, fresh_postgres_db
from serving.app import ServerState, create_app
from serving.builtin import BuiltinEngine
from serving.rollout import ABORTED, PROMOTED, RolloutConfig
from serving.rollout_shared import RolloutStateUnavailable, SharedRolloutController
from serving.router import Router, sticky_position

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

KEY = "shared-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAM = "support"
CFG = RolloutConfig(steps=(0.5, 1.0), requests_per_step=40, min_samples=4, max_error_rate=None)
# 40: the first canary (25 requests) must not leave its first step while both replicas check its routing
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def db_url():
    with fresh_postgres_db("adapterops_shared") as url:
        yield url


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-adapters")
    return {"1": make_adapter(root / "v1", seed=71), "2": make_adapter(root / "v2", seed=72, std=0.05)}


@dataclass
class Replica:
    name: str
    ctl: SharedRolloutController
    state: ServerState
    stack: contextlib.ExitStack
    url: str = ""
    promoted: list = field(default_factory=list)
    client: httpx.Client | None = None

    def complete(self, user: str) -> dict:
        r = self.client.post("/v1/completions", json={"model": FAM, "prompt": PROMPTS[0], "max_tokens": 2,
                                                      "user": user})
        assert r.status_code == 200, r.text
        return r.json()

    def rollout(self) -> dict:
        r = self.client.get("/admin/rollout/status", params={"family": FAM}, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()

    def kill(self, release_lease: bool = False) -> None:
        """Stop the server and the controller; without release the lease is left to expire, as on a crash."""
        self.ctl.close(release_lease=release_lease)  # first: the server's shutdown would hand the lease over
        self.stack.close()
        self.state.log.close()
        self.state.engine.close()


def start_replica(name: str, db_url: str, adapters: dict) -> Replica:
    promoted: list = []
    ctl = SharedRolloutController(db_url, CFG, lambda f, v: promoted.append((f, v)), lambda f, v, r: None,
                                  replica_id=name, lease_ttl_s=2.0, poll_interval_s=0.2)
    state = ServerState(engine=BuiltinEngine(BASE, max_loras=2), router=Router(seed=0), rollout=ctl,
                        log=open_prediction_log(db_url), api_key=KEY, registry_poll_s=None)
    stack = contextlib.ExitStack()
    rep = Replica(name, ctl, state, stack, promoted=promoted)
    rep.url = stack.enter_context(running(create_app(state)))
    rep.client = stack.enter_context(httpx.Client(base_url=rep.url, timeout=TIMEOUT))
    for version, path in adapters.items():  # every replica loads what the canary may route to
        r = rep.client.post("/admin/adapters/load", json={"family": FAM, "version": version, "path": str(path)},
                            headers=AUTH)
        assert r.status_code == 200, r.text
    return rep


def wait_for(what: str, pred, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def expected_version(user: str, weight: float, champion: str = "1", challenger: str = "2") -> str:
    return challenger if sticky_position(FAM, user) < weight else champion


def test_two_replicas_one_log_one_canary(db_url, adapters):
    a = start_replica("replica-a", db_url, adapters)
    b = start_replica("replica-b", db_url, adapters)
    monitor = SQLPredictionLog(db_url)
    try:
        # -- traffic on both is one log
        ids = {a.complete(f"log-{i}")["id"] for i in range(4)} | {b.complete(f"log-{i}")["id"] for i in range(4)}
        a.state.log.flush()
        b.state.log.flush()
        rows = monitor.query(family=FAM, version="1")
        assert {r["request_id"] for r in rows} == ids and monitor.count(family=FAM) == 8

        # -- a canary started on A is B's canary; a start on B for the same challenger joins it
        r = a.client.post("/admin/rollout/start", json={"family": FAM, "challenger": "2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        first = r.json()["rollout"]["id"]
        r = b.client.post("/admin/rollout/start", json={"family": FAM, "challenger": "2"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["rollout"]["id"] == first, r.text
        assert b.ctl.weight(FAM) == ("1", "2", 0.5)
        users = [f"user-{i}" for i in range(12)]
        for rep in (a, b):  # both route every user by the shared weight (sticky: the same version either side)
            served = {u: rep.complete(u)["adapterops"]["version"] for u in users}
            assert served == {u: expected_version(u, 0.5) for u in users}, rep.name

        # -- feedback sent to B for a request A served counts in the one canary (and in the one log)
        on_a = next(u for u in users if expected_version(u, 0.5) == "2")
        rid = a.complete(on_a)["id"]
        r = b.client.post("/v1/feedback", json={"id": rid, "score": 0.9})
        assert r.status_code == 200 and r.json()["recorded"] == {"log": True, "rollout": True}, r.text
        wait_for("the feedback in A's view", lambda: a.rollout()["counts"]["challenger"]["feedback"] == 1)
        assert [row["feedback"] for row in monitor.query(family=FAM) if row["request_id"] == rid] == [0.9]

        # -- an abort on B ends it on A: A's router sends everyone to the champion
        r = b.client.post("/admin/rollout/abort", json={"family": FAM, "reason": "operator test"}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_for("A to see the abort", lambda: a.rollout()["status"] == ABORTED)
        wait_for("A's router to drop the challenger", lambda: a.state.router.get(FAM).challenger is None)
        assert {a.complete(u)["adapterops"]["version"] for u in users} == {"1"}

        # -- a second canary, started on B; the driver dies mid-step; the other takes over and finishes it
        r = b.client.post("/admin/rollout/start", json={"family": FAM, "challenger": "2"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["rollout"]["id"] != first, r.text
        wait_for("A to follow the new canary", lambda: a.state.router.get(FAM).weight == 0.5)
        driver, other = wait_for("a driver", lambda: (a, b) if a.ctl.is_driver else (b, a) if b.ctl.is_driver
                                 else None)
        for i in range(6):
            driver.complete(f"pre-{i}")
            other.complete(f"pre-{i}")
        driver.kill(release_lease=False)
        t_kill = time.monotonic()
        wait_for("the survivor to take the lease", lambda: other.ctl.is_driver, timeout=10.0)
        took_over_s = time.monotonic() - t_kill
        assert took_over_s >= 1.0  # not before the dead holder's lease expired (ttl 2 s, polled every 0.2 s)
        i = 0

        def finished():
            nonlocal i
            for _ in range(4):
                other.complete(f"post-{i}")
                i += 1
            return other.rollout()["status"] == PROMOTED

        wait_for("the survivor to finish the canary", finished, timeout=60.0)
        ro = other.rollout()
        assert [h["decision"] for h in ro["history"]][-1] == "promote" and ro["counts"]["champion"]["requests"] >= 4
        assert other.promoted == [(FAM, "2")] and driver.promoted == []
        assert other.state.router.get(FAM).champion == "2"
        monitor.flush()
        assert monitor.count(family=FAM) >= 8 + 24 + 1 + 12 + 12
    finally:
        monitor.close()
        for rep in (a, b):
            if not rep.ctl._closed:
                rep.kill(release_lease=True)


def test_a_database_that_goes_away_is_counted_not_fatal(db_url):
    """The log's writer and the canary's sample writer count what they lose while PostgreSQL refuses connections,
    and carry on when it is back; nothing waits longer than the bounded connect timeout."""
    dbname = db_url.rsplit("/", 1)[1]
    log = SQLPredictionLog(db_url, connect_timeout_s=2)
    ctl = SharedRolloutController(db_url, CFG, lambda f, v: None, lambda f, v, r: None, replica_id="blip",
                                  poll_interval_s=None)
    admin = psycopg2.connect(**PG_ADMIN)
    admin.autocommit = True
    try:
        ctl.start("blip", "1", "2")
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                        "pg_backend_pid()", (dbname,))
        t0 = time.monotonic()
        for i in range(5):
            log.log({"request_id": f"x{i}", "family": "blip", "version": "1", "prompt": "p"})
            ctl.record("blip", "2", f"x{i}", 10.0, False, None)
        log.flush(timeout=30)
        ctl.flush(timeout=30)
        assert log.failures == 5 and log.writer_alive and ctl.failures == 5
        assert time.monotonic() - t0 < 25
        with pytest.raises(Exception, match=dbname):
            log.count()
        with pytest.raises(RolloutStateUnavailable, match=f"abort failed: the rollout state database .*{dbname}"):
            ctl.abort("blip", "while the database is away")
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        log.log({"request_id": "back", "family": "blip", "version": "1", "prompt": "p"})
        ctl.record("blip", "2", "back", 10.0, False, None)
        log.flush()
        ctl.flush()
        ctl.poll()
        assert log.count(family="blip") == 1 and ctl.status("blip")["counts"]["challenger"]["requests"] == 1
        # over HTTP an abort while the database is away is a 503 naming it (retry later), not a 500
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                        "pg_backend_pid()", (dbname,))
        state = ServerState(engine=BuiltinEngine(BASE, max_loras=1), router=Router(seed=0), rollout=ctl,
                            api_key=KEY, registry_poll_s=None)
        with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/admin/rollout/abort", json={"family": "blip", "reason": "db away"}, headers=AUTH)
            assert r.status_code == 503 and r.json()["error"]["code"] == "rollout_state_unavailable", r.text
            assert dbname in r.json()["error"]["message"]
            metrics = c.get("/metrics").text
            assert f"adapterops_rollout_state_failures_total {float(ctl.failures)}" in metrics and ctl.failures >= 5
            with admin.cursor() as cur:  # back before the server's stop closes the controller: it gives its lease up
                cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        state.engine.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        admin.close()
        log.close()
        ctl.close()


def test_build_state_opens_the_shared_state_the_workspace_names(db_url, tmp_path):
    from monitoring.store import PredictionLog
    from pipelines.serve import build_state
    from pipelines.workspace import Workspace
    from serving.rollout import RolloutController

    for url, log_type in ((db_url, SQLPredictionLog), ("", PredictionLog)):
        ws = Workspace.create(tmp_path / f"ws{bool(url)}", BASE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                              state_db_url=url)
        state = build_state(ws, CFG, KEY, engine=object())  # no model needed to check the wiring
        try:
            assert type(state.log) is log_type
            assert isinstance(state.rollout, SharedRolloutController) == bool(url)
            assert isinstance(state.rollout, RolloutController)
        finally:
            state.log.close()
            getattr(state.rollout, "close", lambda: None)()


def test_replicas_racing_to_start_get_one_canary(db_url):
    """Four replicas start the same challenger at once: one rollout, the others join it; another challenger is
    refused while it runs."""
    import threading

    from serving.rollout import RolloutError

    ctls = [SharedRolloutController(db_url, CFG, lambda f, v: None, lambda f, v, r: None, replica_id=f"race-{i}",
                                    poll_interval_s=None) for i in range(4)]
    got, barrier = [], threading.Barrier(len(ctls))

    def go(ctl):
        barrier.wait()
        got.append(ctl.start("race", "1", "2")["id"])

    try:
        threads = [threading.Thread(target=go, args=(c,)) for c in ctls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 4 and len(set(got)) == 1
        with pytest.raises(RolloutError, match="in progress"):
            ctls[3].start("race", "1", "3")
        for c in ctls:
            c.poll()
        assert sum(c.is_driver for c in ctls) == 1
    finally:
        for c in ctls:
            c.close()


def test_a_replica_that_cannot_load_the_canarys_challenger_keeps_its_users_on_the_champion(db_url, adapters):
    """A canary started on A names a version B has never loaded and cannot fetch (no registry here): B routes
    none of its traffic to it (no 503s) while A runs the canary; with a registry B would load it, verified."""
    a = start_replica("replica-a2", db_url, adapters)
    b = start_replica("replica-b2", db_url, {"1": adapters["1"]})
    try:
        r = a.client.post("/admin/rollout/start", json={"family": FAM, "challenger": "2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_for("B to see the canary", lambda: b.ctl.weight(FAM) == ("1", "2", 0.5))
        assert b.state.router.get(FAM).challenger is None and b.state.router.get(FAM).champion == "1"
        assert {b.complete(f"user-{i}")["adapterops"]["version"] for i in range(12)} == {"1"}
        assert "2" in {a.complete(f"user-{i}")["adapterops"]["version"] for i in range(12)}
        r = a.client.post("/admin/rollout/abort", json={"family": FAM, "reason": "test over"}, headers=AUTH)
        assert r.status_code == 200, r.text
    finally:
        a.kill(release_lease=True)
        b.kill(release_lease=True)


def test_replicas_starting_together_on_a_fresh_database_all_come_up():
    """Two replicas (and a monitor worker) creating the shared tables at the same moment: one used to get
    PostgreSQL's DuplicateTable between create_all's check and its CREATE and `adapterops serve` exited (seen in
    make prod-test, ~1 in 10 double starts). monitoring.sql_log.create_tables re-checks instead."""
    import threading

    from pipelines.monitor_jobs import _StateDB

    makers = {
        "log": lambda url: SQLPredictionLog(url),
        "rollout": lambda url: SharedRolloutController(url, CFG, lambda f, v: None, lambda f, v, r: None,
                                                       poll_interval_s=None),
        "monitor": lambda url: _StateDB(url),  # the monitor's table (a worker; not the per-process cache)
    }
    for kind, make in makers.items():
        for _ in range(6):
            with fresh_postgres_db("adapterops_race") as url:
                barrier, made, errors = threading.Barrier(3), [], []

                def start():
                    barrier.wait()
                    try:
                        made.append(make(url))
                    except Exception as e:  # noqa: BLE001  (what the test looks at)
                        errors.append(f"{type(e).__name__}: {e}")

                threads = [threading.Thread(target=start) for _ in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                for obj in made:
                    obj.close() if hasattr(obj, "close") else obj._engine.dispose()
                assert errors == [] and len(made) == 3, (kind, errors)
