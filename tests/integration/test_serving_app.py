"""The HTTP server end to end: uvicorn on 127.0.0.1 in a thread, the tiny base, real LoRA adapters, the real
prediction log and rollout controller."""

import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from monitoring.store import PredictionLog
from serving.app import ServerState, create_app
from serving.parity import GOLDEN_FILE, save_golden
from serving.pool import AdapterPool
from serving.rollout import RolloutConfig, RolloutController
from serving.router import Router

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running, scaled_copy, training_side_logits

pytestmark = pytest.mark.integration

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"1": make_adapter(root / "a1", seed=1), "2": make_adapter(root / "a2", seed=2)}


@pytest.fixture(scope="module")
def pool():
    return AdapterPool(BASE, max_adapters=4)


def make_state(pool, tmp_path, rollout_cfg=None, events=None):
    rollout = None
    if rollout_cfg is not None:
        rollout = RolloutController(tmp_path / "rollout.json", rollout_cfg,
                                    on_promote=lambda f, v: events.append(("promote", f, v)),
                                    on_rollback=lambda f, v, r: events.append(("rollback", f, v, r)))
    return ServerState(pool=pool, router=Router(seed=0), rollout=rollout, log=PredictionLog(tmp_path / "pred.db"),
                       api_key=KEY, max_prompt_chars=500, max_tokens_limit=16)


def load(client, family, version, path):
    r = client.post("/admin/adapters/load", json={"family": family, "version": version, "path": str(path)},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def complete(client, model, prompt=PROMPTS[0], max_tokens=3, **kw):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, **kw})


def test_completions_route_pin_base_chat_models_log(pool, adapters, tmp_path):
    state = make_state(pool, tmp_path)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        load(c, "fam", "1", adapters["1"])  # first version of a family becomes its champion
        load(c, "fam", "2", adapters["2"])
        assert c.get("/readyz").status_code == 200

        out = {}
        for model in ("base", "fam", "fam@1", "fam@2"):
            r = complete(c, model, max_tokens=6)
            assert r.status_code == 200, r.text
            out[model] = r.json()
        assert out["fam"]["adapterops"] == {"family": "fam", "version": "1", "route": "champion"}
        assert out["fam@2"]["adapterops"] == {"family": "fam", "version": "2", "route": "pinned"}
        assert out["base"]["adapterops"]["route"] == "base" and out["base"]["model"] == "base"
        text = {m: o["choices"][0]["text"] for m, o in out.items()}
        assert text["fam"] == text["fam@1"]
        assert len({text["base"], text["fam@1"], text["fam@2"]}) == 3, text
        assert out["fam@1"]["usage"]["completion_tokens"] <= 6 and out["fam@1"]["id"].startswith("cmpl-")

        lp = complete(c, "fam@2", logprobs=1).json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) >= 1

        chat = c.post("/v1/chat/completions", json={"model": "fam@2", "max_tokens": 4, "messages": [
            {"role": "system", "content": "be nice"}, {"role": "user", "content": "where is my order?"}]})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["adapterops"]["version"] == "2"

        models = c.get("/v1/models").json()
        fam = next(m for m in models["data"] if m["id"] == "fam")["adapterops"]
        assert fam["champion"] == "1" and fam["versions"] == ["1", "2"] and fam["loaded"] == ["1", "2"]
        assert models["base"]["sha256"] == pool.base_sha256 and models["fallbacks"] == {}

        # fallback to base overrides routing while set
        r = c.post("/admin/router/fallback", json={"family": "fam", "fallback": "base"}, headers=AUTH)
        assert r.status_code == 200
        fb = complete(c, "fam").json()
        assert fb["adapterops"] == {"family": "fam", "version": "base", "route": "fallback"}
        assert fb["choices"][0]["text"] == complete(c, "base").json()["choices"][0]["text"]
        assert c.get("/v1/models").json()["fallbacks"] == {"fam": "base"}
        c.post("/admin/router/fallback", json={"family": "fam", "fallback": None}, headers=AUTH)

        # feedback reaches the prediction log
        rid = out["fam@2"]["id"]
        r = c.post("/v1/feedback", json={"id": rid, "score": 0.75})
        assert r.status_code == 200 and r.json()["recorded"]["log"] is True

    state.log.flush()
    rows = {row["request_id"]: row for row in state.log.query(family="fam")}
    row = rows[rid]
    assert row["version"] == "2" and row["route"] == "pinned" and row["feedback"] == 0.75
    assert row["prompt"] == PROMPTS[0] and row["response"] == text["fam@2"]
    assert row["prompt_nll"] > 0 and 0 < row["gen_max_prob"] <= 1 and row["latency_ms"] > 0 and row["error"] is None
    assert rows[out["fam"]["id"]]["route"] is None  # champion traffic: the log's default route
    state.log.close()


def test_error_statuses_and_admin_auth(pool, adapters, tmp_path):
    state = make_state(pool, tmp_path)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters["1"])

        def err(r, status):
            assert r.status_code == status, r.text
            e = r.json()["error"]
            assert set(e) >= {"message", "type", "param", "code"} and e["message"]
            return e

        assert err(complete(c, "nope"), 404)["code"] == "model_not_found"
        assert err(complete(c, "fam@7"), 404)["param"] == "model"
        err(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        assert err(c.post("/v1/completions", json={"prompt": "hi"}), 400)["param"] == "model"
        assert err(c.post("/v1/completions", json={"model": "fam", "prompt": ["a", "b"]}), 400)["param"] == "prompt"
        assert err(complete(c, "fam", prompt="x" * 501), 413)["code"] == "prompt_too_large"
        assert err(complete(c, "fam", max_tokens=0), 400)["param"] == "max_tokens"
        assert err(complete(c, "fam", max_tokens=17), 400)["param"] == "max_tokens"
        assert err(complete(c, "fam", n=2), 400)["param"] == "n"
        # a lone surrogate (valid JSON, not valid Unicode): one clear 400, and the prediction log keeps working
        lone = json.dumps({"model": "fam", "prompt": "\ud800 x", "max_tokens": 2})
        r = c.post("/v1/completions", content=lone, headers={"content-type": "application/json"})
        assert "not valid Unicode" in err(r, 400)["message"]
        chat = json.dumps({"model": "fam", "messages": [{"role": "user", "content": "hi \udfff"}], "max_tokens": 2})
        err(c.post("/v1/chat/completions", content=chat, headers={"content-type": "application/json"}), 400)
        assert err(complete(c, "fam", echo=True), 400)["param"] == "echo"
        assert err(complete(c, "fam", temperature=3.0), 400)["param"] == "temperature"
        err(c.post("/v1/chat/completions", json={"model": "fam", "messages": [{"role": "system", "content": "x"}]}),
            400)
        err(c.post("/v1/feedback", json={"id": "cmpl-unknown", "score": 0.5}), 404)
        err(c.post("/v1/feedback", json={"id": "cmpl-unknown", "score": 2.0}), 400)
        err(c.get("/no/such/path"), 404)

        body = {"family": "fam", "version": "2", "path": str(adapters["2"])}
        assert err(c.post("/admin/adapters/load", json=body), 401)["type"] == "authentication_error"
        err(c.post("/admin/adapters/load", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        err(c.get("/admin/rollout/status", headers={"Authorization": "Basic abc"}), 401)
        err(c.post("/admin/adapters/load", json={**body, "path": str(tmp_path)}, headers=AUTH), 400)
        err(c.post("/admin/adapters/unload", json={"family": "fam", "version": "1"}, headers=AUTH), 409)  # champion
        err(c.post("/admin/adapters/unload", json={"family": "fam", "version": "9"}, headers=AUTH), 404)
        err(c.post("/admin/rollout/start", json={"family": "fam", "challenger": "2"}, headers=AUTH), 409)  # none

        # after all of that the server still serves, and logs
        after = complete(c, "fam")
        assert after.status_code == 200
        state.log.flush()
        assert [row["request_id"] for row in state.log.query(family="fam")][-1:] == [after.json()["id"]]
        metrics = c.get("/metrics").text
        assert 'adapterops_request_errors_total{family="unknown",type="model_not_found",version="unknown"}' in metrics
        assert 'adapterops_requests_rejected_total{reason="prompt_too_large"} 1.0' in metrics
        assert "adapterops_prediction_log_failures_total 0.0" in metrics
    state.log.close()


def test_hot_load_unload_and_20_concurrent_clients(pool, adapters, tmp_path):
    state = make_state(pool, tmp_path)
    spare = Path(shutil.copytree(adapters["2"], tmp_path / "a3"))
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as admin:
        load(admin, "fam", "1", adapters["1"])
        load(admin, "fam", "2", adapters["2"])
        before = complete(admin, "fam@2").json()["choices"][0]["text"]

        failures, done = [], []

        def client(i):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
                for j in range(3):
                    model = ("fam", "fam@1", "fam@2", "base")[(i + j) % 4]
                    r = complete(c, model, max_tokens=2, user=f"user-{i}")
                    (done if r.status_code == 200 else failures).append((model, r.status_code, r.text[:200]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        swaps = 0
        while any(t.is_alive() for t in threads) and swaps < 6:  # hot swaps while the clients run
            load(admin, "fam", "3", spare)
            assert complete(admin, "fam@3", max_tokens=1).status_code == 200
            r = admin.post("/admin/adapters/unload", json={"family": "fam", "version": "3"}, headers=AUTH)
            assert r.status_code == 200, r.text
            swaps += 1
        for t in threads:
            t.join(120)
        assert failures == [] and len(done) == 60 and swaps >= 2
        assert complete(admin, "fam@3").status_code == 404  # unloaded, without any restart
        assert complete(admin, "fam@2").json()["choices"][0]["text"] == before
        metrics = admin.get("/metrics").text
        assert 'adapterops_requests_total{family="fam",route="pinned",status="200",version="2"}' in metrics
        assert "adapterops_request_latency_seconds_bucket" in metrics and "adapterops_adapters_loaded 2.0" in metrics
    state.log.close()


def run_rollout(c, score_for, max_requests=160):
    """Send routed requests with feedback until the rollout ends; returns the routes seen."""
    routes = []
    for i in range(max_requests):
        r = complete(c, "fam", max_tokens=2)
        assert r.status_code == 200, r.text
        body = r.json()
        routes.append(body["adapterops"]["route"])
        fb = c.post("/v1/feedback", json={"id": body["id"], "score": score_for(body["adapterops"]["route"], i)})
        assert fb.status_code == 200 and fb.json()["recorded"]["rollout"] in (True, False)
        if i % 4 == 3 and c.get("/admin/rollout/status", params={"family": "fam"},
                                headers=AUTH).json()["status"] != "running":
            break
    return routes


CFG = RolloutConfig(steps=(0.5, 1.0), requests_per_step=12, min_samples=4)


def test_rollout_over_http_promotes(pool, adapters, tmp_path):
    events = []
    state = make_state(pool, tmp_path, CFG, events)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters["1"])
        load(c, "fam", "2", adapters["2"])
        r = c.post("/admin/rollout/start", json={"family": "fam", "challenger": "2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["rollout"]["weight"] == 0.5 and r.json()["parity"]["passed"] is None
        fam = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "fam")["adapterops"]
        assert (fam["champion"], fam["challenger"], fam["weight"]) == ("1", "2", 0.5)  # the router follows

        routes = run_rollout(c, lambda route, i: 0.8 + 0.01 * (i % 5))
        st = c.get("/admin/rollout/status", params={"family": "fam"}, headers=AUTH).json()
        assert st["status"] == "promoted", st["history"]
        assert "canary" in routes and "champion" in routes
        assert events == [("promote", "fam", "2")]
        assert [h["decision"] for h in st["history"]][-1] == "promote"
        assert st["history"][0]["analysis"]["checks"]["feedback"]["verdict"] in ("pass", "insufficient")
        # after promotion all family traffic goes to 2
        assert {complete(c, "fam").json()["adapterops"]["version"] for _ in range(4)} == {"2"}
        assert 'adapterops_rollout_challenger_weight{family="fam"} 0.0' in c.get("/metrics").text
    state.log.close()


def test_rollout_with_bad_feedback_is_rolled_back(pool, adapters, tmp_path):
    events = []
    state = make_state(pool, tmp_path, CFG, events)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters["1"])
        load(c, "fam", "2", adapters["2"])
        assert c.post("/admin/rollout/start", json={"family": "fam", "challenger": "2"},
                      headers=AUTH).status_code == 200
        run_rollout(c, lambda route, i: (0.05 + 0.01 * (i % 3)) if route == "canary" else 0.9 - 0.01 * (i % 3))
        st = c.get("/admin/rollout/status", params={"family": "fam"}, headers=AUTH).json()
        assert st["status"] == "rolled_back", st["history"]
        assert len(events) == 1 and events[0][:3] == ("rollback", "fam", "2") and "feedback" in events[0][3]
        assert {complete(c, "fam").json()["adapterops"]["route"] for _ in range(4)} == {"champion"}
        fam = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "fam")["adapterops"]
        assert (fam["champion"], fam["challenger"], fam["weight"]) == ("1", None, 0.0)
    state.log.close()


def test_parity_mismatch_blocks_rollout(pool, adapters, tmp_path):
    events = []
    state = make_state(pool, tmp_path, CFG, events)
    good = Path(shutil.copytree(adapters["2"], tmp_path / "good"))
    bad = Path(shutil.copytree(adapters["2"], tmp_path / "bad"))
    logits, mask = training_side_logits(good, PROMPTS)
    save_golden(good / GOLDEN_FILE, PROMPTS, logits, mask)
    planted = scaled_copy(adapters["2"], tmp_path / "scaled", 1.5)  # golden from a different adapter weight
    save_golden(bad / GOLDEN_FILE, PROMPTS, *training_side_logits(planted, PROMPTS))
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters["1"])
        load(c, "fam", "5", bad)
        r = c.post("/admin/rollout/start", json={"family": "fam", "challenger": "5"}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "parity_failed"
        assert r.json()["error"]["parity"]["passed"] is False
        assert complete(c, "fam").json()["adapterops"]["version"] == "1"  # no traffic went to 5
        load(c, "fam", "6", good)
        r = c.post("/admin/rollout/start", json={"family": "fam", "challenger": "6"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["parity"]["passed"] is True and r.json()["parity"]["max_logprob_abs"] <= 1e-3
        assert c.post("/admin/rollout/abort", json={"family": "fam", "reason": "test"},
                      headers=AUTH).json()["rollout"]["status"] == "aborted"
    state.log.close()
