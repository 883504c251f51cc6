"""Automatic fallback on severe drift, end to end: real drift verdicts (monitoring.drift.detect) sent to a running
server (pipelines/serve.py state, MLflow on SQLite, the tiny base with real LoRA adapters). A single mild alert does
nothing; a streak engages the registry's `previous` version; requests go there and the prediction log says
"fallback"; a canary run against the fallback and promoted releases it; a promotion made in the registry by someone
else releases it too; a restarted server puts an engaged fallback back."""

import re
import time
import uuid

import httpx
import numpy as np
import pytest

from monitoring.drift import DriftConfig, detect
from pipelines.serve import build_state, load_champions
from pipelines.workspace import Workspace
from serving.app import create_app
from serving.client import AdminClient
from serving.fallback import FallbackConfig
from serving.rollout import RolloutConfig

from test_serving_fixtures import BASE, PROMPTS, make_adapter, register_version, running

pytestmark = pytest.mark.integration

KEY = "fallback-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(60.0)
DRIFT = DriftConfig(alpha=0.01, min_window=50, stats=("prompt_nll", "gen_entropy"))
FALLBACK = FallbackConfig(enabled=True, target="previous", severe_windows=3, severe_alpha=1e-6, registry_poll_s=0.3)
ROLLOUT = RolloutConfig(steps=(0.5, 1.0), requests_per_step=12, min_samples=4)


def window(shift: float, seed: int) -> dict:
    """A monitoring verdict: 200 reference requests against 200 current ones whose stats moved by `shift` sd."""
    rng = np.random.default_rng(seed)
    ref = {s: rng.normal(0.0, 1.0, 200) for s in DRIFT.stats}
    cur = {s: rng.normal(shift if s == "prompt_nll" else 0.0, 1.0, 200) for s in DRIFT.stats}
    return detect(ref, cur, DRIFT).as_dict()


@pytest.fixture(scope="module")
def verdicts():
    """Real windows: a mild alert (fired, but nowhere near severe_alpha), a quiet one, and a severe one."""
    mild = next(r for r in (window(0.3, s) for s in range(200)) if r["drift"]
                and min(t["p_value"] for t in r["tests"]) * 2 > 1e-4)
    quiet = next(r for r in (window(0.0, s) for s in range(50)) if r["status"] == "ok")
    severe = window(1.5, 0)
    assert min(t["p_value"] for t in severe["tests"]) * 2 < FALLBACK.severe_alpha
    return {"mild": mild, "ok": quiet, "severe": severe}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"a{seed}", seed=seed) for seed in (1, 2, 3)]


@pytest.fixture
def ws(tmp_path_factory):
    return Workspace.create(tmp_path_factory.mktemp("ws"), BASE)


def family_route(c, family):
    return next(m for m in c.get("/v1/models").json()["data"] if m["id"] == family)["adapterops"]


def complete(c, family):
    r = c.post("/v1/completions", json={"model": family, "prompt": PROMPTS[1], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def gauge(c, family) -> dict[str, float]:
    """{fallback label: value} of the family's adapterops_fallback_active samples on /metrics."""
    out = {}
    for line in c.get("/metrics").text.splitlines():
        m = re.fullmatch(r'adapterops_fallback_active\{fallback="([^"]*)",family="([^"]*)"\} (\S+)', line)
        if m and m.group(2) == family:
            out[m.group(1)] = float(m.group(3))
    return out


def test_severe_drift_routes_to_previous_until_a_promotion(ws, adapters, verdicts):
    fam = f"fam-{uuid.uuid4().hex[:8]}"
    reg = ws.registry()
    v1, v2, v3 = (register_version(reg, fam, a) for a in adapters)
    reg.promote(fam, v1, actor="test")
    reg.promote(fam, v2, actor="test")  # champion 2, previous 1
    state = build_state(ws, ROLLOUT, KEY, FALLBACK)
    load_champions(state, ws)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c, \
            AdminClient(url, KEY) as admin:
        # one mild alert, a quiet window, two mild alerts: never 3 in a row, never severe -> no fallback
        for name in ("mild", "ok", "mild", "mild"):
            out = admin.report_drift(fam, verdicts[name], version="2")
            assert out["decision"]["engage"] is False and out["route"]["fallback"] is None, out
        assert out["drift"]["streak"] == 2 and family_route(c, fam)["fallback"] is None
        assert complete(c, fam)["adapterops"] == {"family": fam, "version": "2", "route": "champion"}
        assert gauge(c, fam) == {"": 0.0}

        # the third drifted window in a row is severe: the champion's traffic goes to `previous` (v1)
        out = admin.report_drift(fam, verdicts["mild"], version="2")
        assert out["decision"]["engage"] and out["error"] is None and out["route"]["fallback"] == "1"
        assert "3 windows in a row" in out["drift"]["reason"]
        info = family_route(c, fam)
        assert info["fallback"] == "1" and info["champion"] == "2" and info["drift"]["engaged"]["version"] == "1"
        assert c.get("/v1/models").json()["fallbacks"] == {fam: "1"}
        assert gauge(c, fam) == {"1": 1.0}
        ids = []
        for _ in range(3):
            body = complete(c, fam)
            assert body["adapterops"] == {"family": fam, "version": "1", "route": "fallback"}
            ids.append(body["id"])
        # a verdict about the old champion is ignored; quiet windows do not release it (they measure v1 now)
        assert "ignored" in admin.report_drift(fam, verdicts["severe"], version="1")["decision"]
        assert admin.report_drift(fam, verdicts["ok"], version="2")["route"]["fallback"] == "1"

        # a retrained v3 runs its canary against the fallback (the baseline arm) and is promoted: fallback released
        reg.set_challenger(fam, v3, actor="test")
        r = c.post("/admin/rollout/start", json={"family": fam}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["rollout"]["baseline"] == "1" and r.json()["rollout"]["champion"] == "2"
        routes = set()
        for i in range(150):
            body = complete(c, fam)
            routes.add(body["adapterops"]["route"])
            c.post("/v1/feedback", json={"id": body["id"], "score": 0.8 + 0.01 * (i % 5)})
            st = c.get("/admin/rollout/status", params={"family": fam}, headers=AUTH).json()
            if st["status"] != "running":
                break
        assert st["status"] == "promoted", st["history"]
        assert routes == {"fallback", "canary"} and st["counts"]["champion"]["requests"] > 0  # v1 was the baseline
        info = family_route(c, fam)
        assert (info["champion"], info["fallback"], info["drift"]["engaged"]) == ("3", None, None)
        assert gauge(c, fam) == {"": 0.0} and c.get("/v1/models").json()["fallbacks"] == {}
        assert complete(c, fam)["adapterops"] == {"family": fam, "version": "3", "route": "champion"}
        assert reg.alias(fam, "champion") == "3" and reg.alias(fam, "previous") == "2"

        # one window far beyond alpha is severe at once: fallback to the new `previous` (v2)
        out = admin.report_drift(fam, verdicts["severe"], version="3")
        assert out["route"]["fallback"] == "2" and "combined p-value" in out["drift"]["reason"]
        # someone promotes v1 in the registry: the server follows the champion alias and releases the fallback
        reg.promote(fam, v1, actor="operator", reason="known good")
        wait_for(lambda: family_route(c, fam)["champion"] == "1")
        info = family_route(c, fam)
        assert info["fallback"] is None and info["drift"]["streak"] == 0
        assert complete(c, fam)["adapterops"] == {"family": fam, "version": "1", "route": "champion"}

    state.log.flush()
    rows = {row["request_id"]: row for row in state.log.query(family=fam)}
    assert [(rows[i]["route"], rows[i]["version"]) for i in ids] == [("fallback", "1")] * 3
    state.log.close()


def test_engaged_fallback_survives_a_restart_and_base_target(ws, adapters, verdicts):
    fam = f"fam-{uuid.uuid4().hex[:8]}"
    reg = ws.registry()
    reg.promote(fam, register_version(reg, fam, adapters[0]), actor="test")
    cfg = FallbackConfig(enabled=True, target="base", severe_windows=2, severe_alpha=None, registry_poll_s=None)
    state = build_state(ws, ROLLOUT, KEY, cfg)
    load_champions(state, ws)
    with running(create_app(state)) as url, AdminClient(url, KEY) as admin:
        assert not admin.report_drift(fam, verdicts["severe"])["decision"]["engage"]  # severe_alpha off: streak 1
        assert admin.report_drift(fam, verdicts["mild"])["route"]["fallback"] == "base"
    state.log.close()

    state = build_state(ws, ROLLOUT, KEY, cfg)  # same work dir: the fallback state file
    load_champions(state, ws)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert family_route(c, fam)["fallback"] == "base"
        body = complete(c, fam)
        assert body["adapterops"] == {"family": fam, "version": "base", "route": "fallback"}
        assert body["choices"][0]["text"] == c.post("/v1/completions", json={
            "model": "base", "prompt": PROMPTS[1], "max_tokens": 2}).json()["choices"][0]["text"]
        # the operator clears it: the policy forgets the drift too
        r = c.post("/admin/router/fallback", json={"family": fam, "fallback": None}, headers=AUTH)
        assert r.status_code == 200 and r.json()["fallback"] is None
        status = c.get("/admin/fallback", headers=AUTH).json()
        assert status["families"][fam]["engaged"] is None and status["families"][fam]["streak"] == 0
        assert complete(c, fam)["adapterops"]["route"] == "champion"

        # severe drift while a canary runs waits for it: an abort (no new champion) then engages the fallback
        reg.set_challenger(fam, register_version(reg, fam, adapters[1]), actor="test")
        assert c.post("/admin/rollout/start", json={"family": fam}, headers=AUTH).status_code == 200
        r = c.post("/admin/drift", json={"family": fam, "drift": True, "severe": True,
                                         "details": verdicts["severe"]}, headers=AUTH).json()
        assert r["decision"]["deferred"] and r["route"]["fallback"] is None and r["drift"]["pending"]
        assert c.post("/admin/rollout/abort", json={"family": fam}, headers=AUTH).status_code == 200
        assert family_route(c, fam)["fallback"] == "base" and family_route(c, fam)["drift"]["pending"] is False
    state.log.close()
