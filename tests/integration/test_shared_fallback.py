"""Two serving replicas sharing the drift fallback's state in one PostgreSQL database (serving/fallback_shared.py).

Each replica is a real server (uvicorn on 127.0.0.1) over its own built-in engine on the tiny base, with a
SharedFallbackPolicy on the same fresh database (dropped afterwards). A severe verdict posted to one replica routes
both to the fallback; the operator's release on the other clears it on both; verdicts posted to both at once all
count in one streak; with the database away the replicas keep serving, a verdict is a 503 naming the database, the
failed polls are counted, and the shared state resumes when it is back. Skips when PostgreSQL does not answer on
127.0.0.1:5432.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psycopg2
import pytest

from registry_fixtures import PG_ADMIN, fresh_postgres_db
from serving.app import ServerState, create_app
from serving.builtin import BuiltinEngine
from serving.fallback import FallbackConfig
from serving.fallback_shared import SharedFallbackPolicy, open_fallback_policy
from serving.router import Router

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

KEY = "fallback-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAM = "support"
CFG = FallbackConfig(enabled=True, target="base", severe_windows=10, severe_alpha=None, registry_poll_s=None)


@dataclass
class Replica:
    policy: SharedFallbackPolicy
    state: ServerState
    client: httpx.Client

    def route(self) -> str:
        r = self.client.post("/v1/completions", json={"model": FAM, "prompt": PROMPTS[0], "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["adapterops"]["route"]

    def verdict(self, drift: bool, severe: bool = False) -> httpx.Response:
        return self.client.post("/admin/drift", json={"family": FAM, "drift": drift, "severe": severe},
                                headers=AUTH)


@contextlib.contextmanager
def replica(name: str, db_url: str, adapter):
    policy = open_fallback_policy(CFG, db_url, replica_id=name, poll_interval_s=0.2, connect_timeout_s=2)
    assert isinstance(policy, SharedFallbackPolicy)
    state = ServerState(engine=BuiltinEngine(BASE, max_loras=1), router=Router(seed=0), api_key=KEY,
                        fallback=policy, registry_poll_s=None)
    try:
        with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/admin/adapters/load", json={"family": FAM, "version": "1", "path": str(adapter)},
                            headers=AUTH)
            assert r.status_code == 200, r.text
            yield Replica(policy, state, client)
    finally:
        policy.close()
        state.engine.close()


def wait_for(what: str, pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_replicas_share_one_fallback(tmp_path):
    adapter = make_adapter(tmp_path / "v1", seed=81)
    with fresh_postgres_db("adapterops_fallback") as db_url, replica("a", db_url, adapter) as a, \
            replica("b", db_url, adapter) as b:
        assert a.route() == b.route() == "champion"

        # -- a severe verdict posted to A engages the fallback on A at once and on B within its poll
        r = a.verdict(True, severe=True)
        assert r.status_code == 200 and r.json()["decision"]["engage"] and r.json()["error"] is None, r.text
        assert a.route() == "fallback"
        t0 = time.monotonic()
        wait_for("B to route to the fallback", lambda: b.state.router.get(FAM).fallback == "base")
        assert time.monotonic() - t0 < 5 and b.route() == "fallback"
        assert b.policy.status(FAM)["engaged"]["champion"] == "1"

        # -- the operator's release on B clears it on A
        r = b.client.post("/admin/router/fallback", json={"family": FAM, "fallback": None}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_for("A to drop the fallback", lambda: a.state.router.get(FAM).fallback is None)
        assert a.route() == "champion" and a.policy.status(FAM)["streak"] == 0

        # -- verdicts posted to both at once all count in one streak (compare-and-set; a lost update would leave
        #    it short of severe_windows=10 and nothing engaged)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda rep: rep.verdict(True), [a, b] * 5))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert sorted(r.json()["decision"]["streak"] for r in answers) == list(range(1, 11))
        wait_for("both to agree", lambda: a.policy.status(FAM) == b.policy.status(FAM)
                 and a.state.router.get(FAM).fallback == b.state.router.get(FAM).fallback == "base")
        assert a.policy.status(FAM)["streak"] == 10 and a.policy.status(FAM)["severe"]

        # -- the database goes away: both keep serving their last state; a verdict is a 503 naming the database
        r = a.client.post("/admin/router/fallback", json={"family": FAM, "fallback": None}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_for("B to drop the fallback", lambda: b.state.router.get(FAM).fallback is None)
        dbname = db_url.rsplit("/", 1)[1]
        admin = psycopg2.connect(**PG_ADMIN)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                            "pg_backend_pid()", (dbname,))
            failures = b.policy.failures
            t0 = time.monotonic()
            r = a.verdict(True, severe=True)
            assert r.status_code == 503 and r.json()["error"]["code"] == "fallback_state_unavailable", r.text
            assert dbname in r.json()["error"]["message"] and time.monotonic() - t0 < 15
            assert a.route() == b.route() == "champion"
            wait_for("B's poll to fail", lambda: b.policy.failures > failures)
            r = b.client.get("/admin/fallback", headers=AUTH)
            assert r.status_code == 200 and dbname in r.json()["state"]["last_error"] + r.json()["state"]["url"]
            metric = next(line for line in b.client.get("/metrics").text.splitlines()
                          if line.startswith("adapterops_fallback_state_failures_total "))
            assert float(metric.split()[1]) >= failures + 1  # what an alert on the replica's metrics would see
        finally:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
            admin.close()

        # -- back: the next verdict engages on both again
        r = a.verdict(True, severe=True)
        assert r.status_code == 200 and r.json()["decision"]["engage"], r.text
        wait_for("B to follow after the outage", lambda: b.state.router.get(FAM).fallback == "base")
        wait_for("B's poll to succeed", lambda: b.policy.status()["state"]["last_error"] is None)


def test_build_state_opens_the_shared_fallback_the_workspace_names(tmp_path):
    from pipelines.serve import build_state
    from pipelines.workspace import Workspace
    from serving.fallback import FallbackPolicy
    from serving.rollout import RolloutConfig

    with fresh_postgres_db("adapterops_fallback_ws") as db_url:
        for url in (db_url, ""):
            ws = Workspace.create(tmp_path / f"ws{bool(url)}", BASE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                  state_db_url=url)
            state = build_state(ws, RolloutConfig(), KEY, fallback_cfg=CFG, engine=object())
            try:
                if url:
                    assert isinstance(state.fallback, SharedFallbackPolicy) and state.fallback.url == db_url
                else:
                    assert type(state.fallback) is FallbackPolicy
                    assert state.fallback.state_path == ws.root / "fallback-state.json"
            finally:
                for part in (state.fallback, state.rollout, state.log):
                    close = getattr(part, "close", None)
                    if close is not None:
                        close()
