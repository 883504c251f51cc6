"""Load: 50 concurrent clients on loopback across 10 hot swaps and one automatic rollback, with 0 failed requests.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/integration/test_serving_load.py -p no:cacheprovider

The real server (uvicorn in a thread, the tiny base, real LoRA adapters, the prediction log, the rollout controller)
serves 50 client threads that send small completions (max_tokens=4) to a routed family, a second family and the base,
and post user feedback for every routed answer. Meanwhile an operator thread does 10 hot swaps, each through the
admin API: load a new version, start its rollout, let the controller promote it, then unload the old champion while
requests routed to it are still queued in the server. Between swap 5 and 6 it loads a bad version whose answers the
users score low; the controller must roll it back by itself (the operator only watches). Bounded: at most
`PER_CLIENT` completions per client, a deadline per rollout, and a pytest-timeout for the whole test.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from monitoring.store import PredictionLog
from serving.app import ServerState, create_app
from serving.rollout import RolloutConfig, RolloutController
from serving.router import Router

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running, scaled_copy

pytestmark = pytest.mark.integration

KEY = "load-test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(120.0)
CLIENTS = 50
PER_CLIENT = 80
"""Completions per client at most: bounds the test at 4000 completions (the scenario needs about half)."""
MAX_TOKENS = 4
ROLLOUT_DEADLINE_S = 60.0
MODELS = ("fam", "fam", "other", "fam", "base", "fam")
"""What each client cycles through: 2/3 routed family traffic (what the rollouts see), plus a second family and the
base, so the engine serves mixed adapters in most batches."""
SWAPS_BEFORE_BAD, SWAPS_AFTER_BAD = 5, 5
CHALLENGERS = [str(n) for n in range(2, 2 + SWAPS_BEFORE_BAD + 1 + SWAPS_AFTER_BAD)]
"""Versions rolled out after the first champion "1", in order: 10 good ones and the bad one."""
BAD = CHALLENGERS[SWAPS_BEFORE_BAD]
"""The version the users dislike: rolled out after the first 5 swaps."""
FINAL = CHALLENGERS[-1]

# Short steps so that 11 rollouts fit in the test. The final step is 0.5, not 1.0: at promotion the old champion
# still has half of the family's traffic queued in the server, so its unload races requests routed to it.
# Latency is dominated by queueing on a shared 2-core box, the same for both arms but noisy; its
# bounds are wide so that CPU contention from other processes cannot roll back a good version. The bad version is
# caught by user feedback.
CONFIG = RolloutConfig(steps=(0.2, 0.5), requests_per_step=12, min_samples=4, latency_p95_ratio=4.0,
                       latency_slack_ms=2000.0)


def user_score(version: str, j: int) -> float:
    """The simulated users' feedback: they dislike the bad version's answers; small spread, no ties."""
    spread = 0.02 * (j % 5)
    return 0.1 + spread if version == BAD else 0.8 + spread


@dataclass
class Outcome:
    client: int
    model: str
    sent: float
    received: float
    ok: bool
    detail: str
    version: str | None = None
    route: str | None = None


def check_completion(r: httpx.Response, model: str) -> tuple[bool, str]:
    """A 200 with a valid OpenAI-style text completion for `model`."""
    if r.status_code != 200:
        return False, f"HTTP {r.status_code}: {r.text[:300]}"
    try:
        body = r.json()
        choice = body["choices"][0]
        meta = body["adapterops"]
        valid = (body["object"] == "text_completion" and body["id"].startswith("cmpl-")
                 and isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
                 and 1 <= body["usage"]["completion_tokens"] <= MAX_TOKENS
                 and meta["family"] == model
                 and body["model"] == ("base" if model == "base" else f"{model}@{meta['version']}"))
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return False, f"malformed body ({type(e).__name__}: {e}): {r.text[:300]}"
    return valid, "" if valid else f"invalid body: {r.text[:300]}"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("load-adapters")
    dirs = {f"src{i}": make_adapter(root / f"src{i}", seed=20 + i) for i in range(3)}
    dirs["other"] = make_adapter(root / "other", seed=30)
    dirs["bad"] = scaled_copy(dirs["src0"], root / "bad", 25.0)  # lora_B x25: garbled answers
    return dirs


@pytest.fixture(params=["builtin", "vllm"])
def engine(request):
    """The same scenario in front of each engine: in process, and a real vLLM server over HTTP."""
    if request.param == "builtin":
        from serving.builtin import BuiltinEngine

        eng = BuiltinEngine(BASE, max_loras=8)
    else:
        from serving.vllm_engine import VLLMEngine

        server = request.getfixturevalue("vllm_server")
        eng = VLLMEngine([server.url], BASE, max_lora_rank=server.max_lora_rank)
    try:
        yield eng
    finally:
        for key in eng.loaded():  # the vLLM server is shared by the session: leave its LoRA slots free
            eng.unload(key)
        eng.close()


@pytest.mark.timeout(420)
def test_50_clients_10_hot_swaps_and_an_automatic_rollback(adapter_dirs, engine, tmp_path):
    events: list[tuple] = []
    rollout = RolloutController(tmp_path / "rollout.json", CONFIG,
                                on_promote=lambda f, v: events.append(("promote", f, v)),
                                on_rollback=lambda f, v, reason: events.append(("rollback", f, v, reason)))
    state = ServerState(engine=engine, router=Router(seed=0), rollout=rollout,
                        log=PredictionLog(tmp_path / "pred.db"), api_key=KEY, max_tokens_limit=16)

    def version_dir(version: str) -> Path:
        """Every version gets its own directory (a real load of new files), copied from one of the sources."""
        src = adapter_dirs["bad"] if version == BAD else adapter_dirs[f"src{int(version) % 3}"]
        return Path(shutil.copytree(src, tmp_path / "versions" / version))

    outcomes: list[Outcome] = []
    feedback_failures: list[str] = []
    stop = threading.Event()

    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as admin:

        def admin_post(path: str, body: dict) -> dict:
            r = admin.post(path, json=body, headers=AUTH)
            assert r.status_code == 200, f"{path} {body}: HTTP {r.status_code}: {r.text}"
            return r.json()

        def fam_route() -> dict:
            return next(m for m in admin.get("/v1/models").json()["data"] if m["id"] == "fam")["adapterops"]

        rollout_ended = threading.Event()

        def on_weights(family: str) -> None:
            """Subscribed after create_app's own listener, so the router has followed the controller already."""
            if family == "fam" and not rollout.is_active(family):
                rollout_ended.set()

        rollout.subscribe(on_weights)

        def wait_for_end() -> dict:
            """Wait for (never drive) the end of the rollout; the operator reacts at once, as an automation
            subscribed to rollout events would, so the unload that follows races requests still routed to the
            retired version."""
            deadline = time.monotonic() + ROLLOUT_DEADLINE_S
            while not rollout_ended.wait(0.2):
                assert any(t.is_alive() for t in threads), f"the clients ran out of requests: {rollout.status('fam')}"
                assert time.monotonic() < deadline, f"rollout still running after {ROLLOUT_DEADLINE_S}s: " \
                                                    f"{rollout.status('fam')}"
            return rollout.status("fam")

        admin_post("/admin/adapters/load", {"family": "fam", "version": "1", "path": str(version_dir("1"))})
        admin_post("/admin/adapters/load", {"family": "other", "version": "1", "path": str(adapter_dirs["other"])})

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
                for j in range(PER_CLIENT):
                    if stop.is_set():
                        return
                    model = MODELS[(i + j) % len(MODELS)]
                    sent = time.monotonic()
                    try:
                        r = c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[(i + j) % len(PROMPTS)],
                                                            "max_tokens": MAX_TOKENS})
                    except httpx.HTTPError as e:
                        outcomes.append(Outcome(i, model, sent, time.monotonic(), False, f"{type(e).__name__}: {e}"))
                        continue
                    ok, detail = check_completion(r, model)
                    out = Outcome(i, model, sent, time.monotonic(), ok, detail)
                    if ok:
                        body = r.json()
                        out.version, out.route = body["adapterops"]["version"], body["adapterops"]["route"]
                        if model == "fam":
                            fb = c.post("/v1/feedback", json={"id": body["id"], "score": user_score(out.version, j)})
                            if fb.status_code != 200:
                                feedback_failures.append(f"HTTP {fb.status_code}: {fb.text[:300]}")
                    outcomes.append(out)

        threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(CLIENTS)]
        for t in threads:
            t.start()

        unloads: list[tuple[str, float]] = []  # (version, when its unload was sent)
        ended: list[dict] = []
        t_start = time.monotonic()
        champion = "1"
        try:
            for version in CHALLENGERS:
                admin_post("/admin/adapters/load", {"family": "fam", "version": version,
                                                    "path": str(version_dir(version))})
                rollout_ended.clear()
                started = admin_post("/admin/rollout/start", {"family": "fam", "challenger": version})
                assert started["rollout"]["champion"] == champion and started["rollout"]["weight"] == CONFIG.steps[0]
                st = wait_for_end()
                ended.append(st)
                print(f"rollout of {version}: {st['status']} after {time.monotonic() - t_start:.1f}s, "
                      f"{len(outcomes)} completions so far", flush=True)
                if version == BAD:
                    assert st["status"] == "rolled_back", st["history"]
                    assert state.router.get("fam").champion == champion  # unchanged
                    retired = version
                else:
                    assert st["status"] == "promoted", st["history"]
                    assert state.router.get("fam").champion == version
                    retired, champion = champion, version
                # unload while requests routed to the retired version are still queued in the server
                unloads.append((retired, time.monotonic()))
                admin_post("/admin/adapters/unload", {"family": "fam", "version": retired})
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not any(t.is_alive() for t in threads)

        # 0 failed requests, and the scenario really raced unloads with requests routed to the unloaded versions
        failures = [o for o in outcomes if not o.ok]
        assert failures == [] and feedback_failures == [], (
            f"{len(failures)} of {len(outcomes)} completions failed, e.g. {failures[:3]}; "
            f"{len(feedback_failures)} feedback posts failed, e.g. {feedback_failures[:3]}")
        in_flight = sum(1 for v, t in unloads for o in outcomes if o.model == "fam" and o.version == v
                        and o.received > t)
        assert in_flight > 0, "no request routed to a version was still in flight when that version was unloaded"
        print(f"{len(outcomes)} completions in {time.monotonic() - t_start:.1f}s, 0 failed; {in_flight} of them "
              f"were in flight when the version they were routed to was unloaded", flush=True)
        assert len(outcomes) < CLIENTS * PER_CLIENT, "the clients ran out of requests: the bound, not the scenario"

        # the rollback happened by itself, the champion was kept; every good swap was promoted
        bad = ended[SWAPS_BEFORE_BAD]
        assert bad["challenger"] == BAD and bad["champion"] == CHALLENGERS[SWAPS_BEFORE_BAD - 1]
        assert bad["history"][-1]["decision"] == "rollback" and "feedback" in bad["reason"], bad["history"]
        assert [e for e in events if e[0] == "rollback"] == [("rollback", "fam", BAD, bad["reason"])]
        promoted = [e[2] for e in events if e[0] == "promote"]
        assert promoted == [v for v in CHALLENGERS if v != BAD]
        assert sum(1 for o in outcomes if o.version == BAD and o.route == "canary") >= CONFIG.min_samples
        status = admin.get("/admin/rollout/status", headers=AUTH).json()
        current = status["rollouts"]["fam"]
        history = [(f["challenger"], f["status"]) for f in status["finished"]] + [(current["challenger"],
                                                                                  current["status"])]
        assert history == [(v, "rolled_back" if v == BAD else "promoted") for v in CHALLENGERS]

        # final routing: the last good version serves the family alone, everything retired is unloaded
        assert champion == FINAL
        route = fam_route()
        assert (route["champion"], route["challenger"], route["weight"], route["fallback"]) == (FINAL, None, 0.0, None)
        assert route["versions"] == [FINAL] and route["loaded"] == [FINAL]
        assert sorted(engine.loaded()) == sorted([f"fam@{FINAL}", "other@1"])
        assert admin.get("/readyz").status_code == 200
        for prompt in PROMPTS:
            r = admin.post("/v1/completions", json={"model": "fam", "prompt": prompt, "max_tokens": MAX_TOKENS})
            assert r.json()["adapterops"] == {"family": "fam", "version": FINAL, "route": "champion"}
        metrics = admin.get("/metrics").text
        assert 'status="500"' not in metrics and "adapterops_request_errors_total{" not in metrics

    state.log.flush()
    assert state.log.dropped == 0 and state.log.count() == len(outcomes) + len(PROMPTS)
    state.log.close()
