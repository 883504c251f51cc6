"""Operating a running server: `adapterops rollout status|start|abort` over HTTP, and a gradual rollback that steps
traffic down, survives two server restarts and clears the registry's challenger. Real parts throughout: uvicorn on
127.0.0.1, the tiny base with real LoRA adapters, MLflow on SQLite, the server state of pipelines/serve.py."""

import json
import uuid

import httpx
import pytest

from pipelines import cli
from pipelines.serve import build_state, load_champions
from pipelines.workspace import Workspace
from serving.app import create_app
from serving.rollout import RolloutConfig
from serving.router import sticky_position

from test_serving_fixtures import BASE, PROMPTS, make_adapter, register_version, running

pytestmark = pytest.mark.integration

KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"a{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture
def ws(tmp_path, tracking_uri):
    """A work dir of its own (rollout state, prediction log, serving cache) on the module's MLflow database."""
    return Workspace.create(tmp_path / "ws", BASE, tracking_uri=tracking_uri)


@pytest.fixture
def family(ws, adapters):
    """A family with v1 champion and v2 challenger in the registry."""
    fam = f"fam-{uuid.uuid4().hex[:8]}"
    reg = ws.registry()
    v1, v2 = (register_version(reg, fam, a) for a in adapters)
    reg.promote(fam, v1, actor="test")
    reg.set_challenger(fam, v2, actor="test")
    return fam


def cli_run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def sides(family, weight):
    """(a user the sticky router sends to the canary at `weight`, one it keeps on the champion)."""
    users = [f"user-{i}" for i in range(200)]
    return (next(u for u in users if sticky_position(family, u) < weight),
            next(u for u in users if sticky_position(family, u) >= weight))


def complete(c, model, user=None):
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 2, "user": user})
    assert r.status_code == 200, r.text
    return r.json()


def test_rollout_cli_start_status_abort(ws, family, capsys, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_API_KEY", raising=False)
    state = build_state(ws, RolloutConfig(steps=(0.5, 1.0), requests_per_step=50, min_samples=4), KEY)
    assert load_champions(state, ws) == [f"{family}@1"]
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        opts = ["--url", url, "--api-key", KEY]
        code, out, _ = cli_run(capsys, "rollout", "status", *opts)
        assert code == 0 and out.strip() == "no rollouts on this server"

        # the challenger comes from the registry's alias; the server loads it (verified) and checks its parity
        code, out, err = cli_run(capsys, "rollout", "start", family, "--steps", "0.25,1", "--requests-per-step", "30",
                                 "--gradual", *opts)
        assert code == 0, err
        assert out.startswith(f"started: {family}@2 against champion 1, steps [0.25, 1.0], 30 requests per step, "
                              f"gradual rollback on; parity: passed")
        assert "2" in state.families[family]  # loaded on demand from the registry

        canary_user, champion_user = sides(family, 0.25)
        assert complete(c, family, user=canary_user)["adapterops"] == {"family": family, "version": "2",
                                                                       "route": "canary"}
        assert complete(c, family, user=champion_user)["adapterops"]["route"] == "champion"
        code, out, _ = cli_run(capsys, "rollout", "status", family, *opts)
        head, row = out.strip().splitlines()
        assert head.split()[:6] == ["family", "champion", "challenger", "status", "step", "weight"]
        assert row.split() == [family, "1", "2", "running", "1/2", "0.25", "-", "-", "-", "-"]

        code, out, _ = cli_run(capsys, "rollout", "status", family, "--json", *opts)
        st = json.loads(out)
        assert st["config"]["steps"] == [0.25, 1.0] and st["config"]["gradual_rollback"] is True
        assert st["step_requests"] == 2 and st["counts"]["challenger"]["requests"] == 1

        code, _, err = cli_run(capsys, "rollout", "status", "--url", url, "--api-key", "wrong")
        assert code == 2 and err.startswith(f"error: the server at {url} refused the API key (401)")
        monkeypatch.setenv("ADAPTEROPS_API_KEY", KEY)  # the key from the environment
        code, _, err = cli_run(capsys, "rollout", "start", family, "--challenger", "2", "--url", url)
        assert code == 2 and "rollout of version 2 in progress" in err

        code, out, _ = cli_run(capsys, "rollout", "abort", family, "--reason", "cli test", *opts)
        assert code == 0 and "aborted" in out and out.strip().endswith(f"{family}: cli test")
        assert {complete(c, family, user=f"u{i}")["adapterops"]["route"] for i in range(6)} == {"champion"}

        ws.registry().clear_challenger(family, actor="test")
        code, _, err = cli_run(capsys, "rollout", "start", family, *opts)
        assert code == 2 and f"the registry has no challenger for {family}" in err
        code, _, err = cli_run(capsys, "rollout", "start", family, "--challenger", "7", *opts)
        assert code == 2 and f"challenger {family}@7 is not loaded" in err
        code, _, err = cli_run(capsys, "rollout", "start", family, "--challenger", "2", "--steps", "0.5,0.2", *opts)
        assert code == 2 and "invalid rollout settings" in err and "strictly increasing" in err
    state.log.close()
    code, _, err = cli_run(capsys, "rollout", "status", "--url", url, "--api-key", KEY)
    assert code == 2 and err.startswith(f"error: cannot reach the adapterops server at {url}")


def drive(c, family, score, until, max_requests=150):
    """Routed requests, each with feedback score(route), until until(status); returns (requests, statuses seen)."""
    seen = []
    for i in range(max_requests):
        body = complete(c, family)
        route = body["adapterops"]["route"]
        assert c.post("/v1/feedback", json={"id": body["id"], "score": score(route, i)}).status_code == 200
        st = c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()
        seen.append((st["status"], st["weight"]))
        if until(st):
            return i + 1, seen
    raise AssertionError(f"rollout did not reach the expected state in {max_requests} requests: {seen[-5:]}")


def good(route, i):
    return 0.8 + 0.01 * (i % 5)


def bad_canary(route, i):
    return 0.05 + 0.01 * (i % 3) if route == "canary" else 0.9 - 0.01 * (i % 3)


def test_gradual_rollback_steps_down_across_restarts_and_clears_the_challenger(ws, family):
    cfg = RolloutConfig(steps=(0.25, 0.5, 1.0), requests_per_step=24, min_samples=4)
    reg = ws.registry()

    def server():
        state = build_state(ws, cfg, KEY)
        load_champions(state, ws)
        return state

    # 1st server: start with gradual rollback on; the challenger is good at 25% and advances to 50%
    state = server()
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/admin/rollout/start", json={"family": family, "gradual_rollback": True}, headers=AUTH)
        assert r.status_code == 200, r.text
        drive(c, family, good, until=lambda st: st["step"] == 1)
    state.log.close()

    # 2nd server on the same work dir: resumes at 50% (the challenger is loaded again from the registry); the
    # challenger now gets bad feedback and fails (at 50%, or at 100% when its good feedback from the first step kept
    # the cumulative analysis from concluding at 50%); traffic steps DOWN one step instead of being cut to 0
    state = server()
    assert set(state.families[family]) == {"1", "2"}
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        st = c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()
        assert (st["status"], st["step"], st["weight"]) == ("running", 1, 0.5)
        fam = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == family)["adapterops"]
        assert (fam["champion"], fam["challenger"], fam["weight"]) == ("1", "2", 0.5)
        drive(c, family, bad_canary, until=lambda st: st["status"] == "rolling_back")
        st = c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()
        failed_step = next(h for h in reversed(st["history"]) if h["decision"] == "rollback")["step"]
        assert failed_step >= 1 and st["weight"] == cfg.steps[failed_step - 1] > 0.0
        assert reg.alias(family, "challenger") == "2"  # not reported before the rollback ends
        weight = st["weight"]
        canary_user, champion_user = sides(family, weight)  # the canary keeps the lower share for now
        assert complete(c, family, user=canary_user)["adapterops"]["route"] == "canary"
        assert complete(c, family, user=champion_user)["adapterops"]["route"] == "champion"
    state.log.close()

    # 3rd server: resumes the step-down at 25% and ends it: rolled back, the registry's challenger cleared
    state = server()
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        st = c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()
        assert (st["status"], st["weight"]) == ("rolling_back", weight)
        n, seen = drive(c, family, bad_canary, until=lambda st: st["status"] != "rolling_back")
        st = c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()
        assert st["status"] == "rolled_back" and st["weight"] == 0.0 and "feedback" in st["reason"]
        weights = [weight] + [w for _, w in seen]
        steps_down = [w for i, w in enumerate(weights) if i == 0 or w != weights[i - 1]]
        assert steps_down == [*reversed(cfg.steps[:failed_step]), 0.0]  # through every lower step, then 0
        assert n <= cfg.requests_per_step * failed_step
        decisions = [h["decision"] for h in st["history"]]
        assert decisions[-1] == "step_down" and "rollback" in decisions and decisions[0] in ("advance", "extend")
        assert {complete(c, family)["adapterops"]["route"] for _ in range(8)} == {"champion"}
    state.log.close()
    assert reg.alias(family, "challenger") is None and reg.alias(family, "champion") == "1"
    last = reg.history(family)[-1]
    assert last.op == "clear_challenger" and last.actor == "canary" and "rolled back" in last.reason


def test_the_server_starts_the_canary_of_a_new_registry_challenger_once(ws, family):
    """--auto-canary: a challenger registered elsewhere (a scheduled retrain) gets its canary without an operator;
    a challenger whose canary ended is not started again."""
    import time

    state = build_state(ws, RolloutConfig(steps=(0.5, 1.0), requests_per_step=50, min_samples=4), KEY,
                        auto_canary_poll_s=0.2)
    assert f"{family}@1" in load_champions(state, ws)  # the module's registry holds the other tests' families too
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        deadline = time.time() + 90
        while (r := c.get("/admin/rollout/status", params={"family": family}, headers=AUTH)).status_code == 404:
            assert time.time() < deadline, "no canary was started for the registry's challenger"
            time.sleep(0.2)
        st = r.json()
        assert (st["champion"], st["challenger"], st["status"]) == ("1", "2", "running")
        assert st["config"]["require_feedback"] is True  # an automatic canary never promotes on errors alone
        assert state.rollout.config.require_feedback is False  # ... whatever the server's own setting
        assert "2" in state.families[family]  # loaded (verified) from the registry, parity checked
        r = c.post("/admin/rollout/abort", json={"family": family, "reason": "test"}, headers=AUTH)
        assert r.status_code == 200, r.text
        time.sleep(1.5)  # several polls
        assert c.get("/admin/rollout/status", params={"family": family}, headers=AUTH).json()["status"] == "aborted"
    state.log.close()


def test_registry_alias_moves_reach_traffic_without_any_fallback_config(ws, family, adapters):
    """A promote or rollback made elsewhere (the CLI, another replica) reaches this server's traffic within a few
    polls, and a family first registered elsewhere starts being served; no --fallback-config needed."""
    import time

    state = build_state(ws, RolloutConfig(steps=(0.5, 1.0), requests_per_step=50, min_samples=4), KEY)
    state.registry_poll_s = 0.2
    load_champions(state, ws)
    reg = ws.registry()

    def served_version(c, model) -> str | None:
        r = c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 2})
        return r.json()["adapterops"]["version"] if r.status_code == 200 else None

    def wait_for(c, model, version):
        deadline = time.time() + 30
        while (got := served_version(c, model)) != version:
            assert time.time() < deadline, f"{model} still serves v{got}, the registry says v{version}"
            time.sleep(0.2)

    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert served_version(c, family) == "1"
        reg.promote(family, "2", actor="test", reason="promoted from the CLI")
        wait_for(c, family, "2")
        reg.rollback(family, actor="test", reason="rolled back from the CLI")
        wait_for(c, family, "1")
        newcomer = f"new-{uuid.uuid4().hex[:6]}"
        reg.promote(newcomer, register_version(reg, newcomer, adapters[1]), actor="test")
        wait_for(c, newcomer, "1")
    state.engine.close()
    state.log.close()
