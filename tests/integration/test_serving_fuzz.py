"""Fuzz pass on the HTTP API (issue 16): hypothesis throws malformed and hostile bodies at every endpoint of a real
server (uvicorn on 127.0.0.1, the built-in engine on the tiny base, a real prediction log and canary controller);
none may get a 500, and afterwards nothing is dead or leaked: the log's writer is alive and lost nothing, the engine
answers, no request is left in flight, and a canary that ran through the fuzzing still counts.

Bounded: a fixed number of examples per endpoint (no shrinking database written), max_tokens capped at 4.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitoring.store import PredictionLog
from serving.app import ServerState, create_app
from serving.builtin import BuiltinEngine
from serving.rollout import RolloutConfig, RolloutController
from serving.router import Router

from test_serving_fixtures import BASE, make_adapter, running

pytestmark = pytest.mark.integration

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.sampled_from(["fam", "fam@1", "fam@2", "base", "fam@base", "@", "", "\ud800",
                                                    "../../etc/passwd", "fam@../1"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                     max_size=4), max_leaves=12)
COMPLETION_KEYS = ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "logprobs",
                   "echo", "n", "user", "stream_options", "suffix", "presence_penalty"]
CHAT_KEYS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "logprobs", "top_logprobs", "n", "user", "stream_options"]
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | values,
                                           "content": st.text(max_size=60) | values}), max_size=4) | values


def bodies(keys: list[str], plausible: dict) -> st.SearchStrategy:
    """Dicts over the endpoint's own keys (plausible values mixed with anything) plus arbitrary JSON."""
    field = {k: plausible.get(k, values) | values for k in keys}
    return st.fixed_dictionaries({}, optional=field) | values


completion_bodies = bodies(COMPLETION_KEYS, {
    "model": st.sampled_from(["fam", "fam@1", "base"]), "prompt": st.text(max_size=80),
    "max_tokens": st.integers(-2, 6), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-5, 2**64), "stop": st.lists(st.text(max_size=4), max_size=5) | st.text(max_size=4),
    "stream": st.booleans(), "logprobs": st.integers(-2, 30)})
served = st.fixed_dictionaries(  # bodies that mostly are valid: the generation paths get fuzzed too
    {"model": st.sampled_from(["fam", "fam@1", "fam@2", "base"]), "prompt": st.text(min_size=1, max_size=80)},
    optional={"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "seed": st.integers(0, 2**63), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
              "stream": st.booleans(), "logprobs": st.integers(0, 5), "user": st.text(max_size=10)})
completion_bodies = served | served | completion_bodies
chat_bodies = bodies(CHAT_KEYS, {
    "model": st.sampled_from(["fam", "fam@1", "base"]), "messages": messages, "max_tokens": st.integers(-2, 6),
    "max_completion_tokens": st.integers(-2, 6), "logprobs": st.booleans(), "top_logprobs": st.integers(-2, 30),
    "stream": st.booleans()})
admin_bodies = st.fixed_dictionaries({}, optional={
    "family": st.sampled_from(["fam", "nope", "", "a@b"]) | values,
    "version": st.sampled_from(["1", "2", "3", "base", ""]) | values,
    "path": st.text(max_size=30) | values, "ref": st.text(max_size=20) | values,
    "challenger": st.sampled_from(["1", "2", "9"]) | values, "fallback": st.sampled_from(["base", "1", None]) | values,
    "steps": st.lists(st.floats(-1, 2), max_size=4) | values, "requests_per_step": st.integers(-5, 50) | values,
    "drift": values, "severe": values, "score": values, "id": values, "reason": values}) | values


def encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    engine = BuiltinEngine(BASE, max_loras=3)
    rollout = RolloutController(root / "rollout.json", RolloutConfig(steps=(0.5, 1.0), requests_per_step=10_000,
                                                                     min_samples=4), lambda f, v: None,
                                lambda f, v, r: None)
    state = ServerState(engine=engine, router=Router(seed=0), rollout=rollout, log=PredictionLog(root / "pred.db"),
                        api_key=KEY, max_tokens_limit=4, max_prompt_chars=400)
    adapters = [make_adapter(root / f"a{i}", seed=70 + i) for i in (1, 2)]
    app = create_app(state)
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
            for v, d in zip(("1", "2"), adapters):
                r = c.post("/admin/adapters/load", json={"family": "fam", "version": v, "path": str(d)}, headers=AUTH)
                assert r.status_code == 200, r.text
            r = c.post("/admin/rollout/start", json={"family": "fam", "challenger": "2"}, headers=AUTH)
            assert r.status_code == 200, r.text
            yield c, state, app.state.control
    finally:
        engine.close()
        state.log.close()


def post(c, path: str, body, headers=None) -> httpx.Response:
    r = c.post(path, content=encode(body), headers={"content-type": "application/json", **(headers or {})})
    r.read()
    assert r.status_code < 500, f"{path} {body!r}: HTTP {r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and isinstance(err["message"], str), r.text
    return r


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(server, body):
    c, _, _ = server
    post(c, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(server, body):
    c, _, _ = server
    post(c, "/v1/chat/completions", body)


@FUZZ
@given(path=st.sampled_from(["/admin/adapters/load", "/admin/adapters/unload", "/admin/router/fallback",
                             "/admin/drift", "/v1/feedback"]), body=admin_bodies)
def test_fuzz_admin_and_feedback(server, path, body):
    c, _, _ = server
    if path == "/admin/adapters/unload" and isinstance(body, dict) and body.get("version") in ("1", "2"):
        body = {**body, "version": "3"}  # unloading the routed versions is refused anyway; keep the canary's arms
    post(c, path, body, AUTH)


@FUZZ
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/feedback",
                                                          "/admin/rollout/start"]))
def test_fuzz_raw_bytes(server, raw, path):
    c, _, _ = server
    r = c.post(path, content=raw, headers={"content-type": "application/json", **AUTH})
    assert r.status_code < 500, f"{path} {raw!r}: HTTP {r.status_code}: {r.text[:300]}"


def test_zz_nothing_dead_or_leaked_after_the_fuzzing(server):
    c, state, control = server
    r = c.post("/v1/completions", json={"model": "fam", "prompt": "### Customer: hi\n### Agent:", "max_tokens": 2})
    assert r.status_code == 200, r.text
    state.log.flush()
    assert state.log.writer_alive and state.log.failures == 0
    assert state.log.count(family="fam") >= 10  # the fuzzing also sent valid requests, which were served and logged
    assert c.get("/health").status_code == 200 and c.get("/readyz").status_code == 200
    assert not control.inflight, f"requests left counted in flight: {dict(control.inflight)}"
    status = c.get("/admin/rollout/status", params={"family": "fam"}, headers=AUTH).json()
    assert status["status"] == "running" and status["counts"]["champion"]["requests"] >= 1
    assert not math.isnan(float(status["weight"]))
    assert state.engine.health()["running"] == 0
