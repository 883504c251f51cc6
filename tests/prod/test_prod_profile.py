"""The production profile end to end on this machine, without Docker (issue 15 item 6; `make prod-test`).

infra/prodtest.py starts what infra/docker-compose.yml runs, as local processes on 127.0.0.1: fresh PostgreSQL
databases (MLflow, Prefect, the shared state), a moto S3 server, `mlflow server` on PostgreSQL with artifacts proxied
to S3, a Prefect server on PostgreSQL with a process work pool, the deployments of infra/prefect_deployments.py and
two workers, and two `adapterops serve --profile production` replicas sharing ADAPTEROPS_STATE_DB_URL behind one
client (round-robin). The story, one test per step, in order:

  both replicas up -> first version (`adapterops build`) -> both pick it up -> shifted traffic on both -> the scheduled monitor (a worker) fires ->
  the drift event starts the retrain (a worker) -> challenger v2 -> one canary, driven by one replica, routed by
  both -> promote / rollback through the registry reaches both replicas within seconds -> the state and MLflow
  databases go away: errors name the service, waits are bounded, serving keeps answering, everything recovers ->
  S3 is killed: errors name the artifact store, a registration leaves a FAILED run, serving keeps answering ->
  nothing half-done (no RUNNING MLflow run, no active rollout).

Phase timings go to <tmp>/timings.json and work/prod-test/last-run.json; with ADAPTEROPS_RECORD_BENCH=1 also to
bench/results/prod_profile.json and BENCHMARKS.md. Skips when PostgreSQL does not answer on 127.0.0.1:5432.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from infra.prodtest import API_KEY, BASE, POOL, REPO, Fleet, Stack

pytestmark = [pytest.mark.prod, pytest.mark.postgres]

FAMILY = "prod-support"
BOUND_S = 60.0  # every outage error within this (the clients' own bounds are 30 s and less)
FOLLOW_S = 30.0  # a registry alias move reaches every replica within this (ServerState.registry_poll_s = 5 s)
INIT = {"method": "pissa", "rank": 4}
TRAIN = {"steps": 8, "batch_size": 4, "max_len": 64, "eval_every": 8}
MERGE = {"quantize": "nf4", "eval_examples": 16, "golden_prompts": 4, "max_len": 64, "reference_windows": 4,
         "gates": {"quant": {"nf4": {"kl_mean": 0.06, "kl_p99": 0.6, "top1": 0.7}}}}  # as tests/integration
DRIFT = {"alpha": 0.01, "min_window": 20, "consecutive": 1}
REFERENCE_PROMPTS, MAX_TOKENS = 40, 8
SHIFTED = 40
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STATE: dict = {}


def _wait(what: str, check, timeout: float, stack: Stack | None = None, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            logs = ""
            if stack is not None:
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                                 for p in sorted(stack.logs.glob("*.log")))
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{logs}")
        time.sleep(every)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import yaml

    from pipelines import data

    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is unreachable: {e}")
    root = tmp_path_factory.mktemp("prod")
    examples = data.load_bitext()
    before = data.splits(examples, data.CATEGORIES_BEFORE)
    after = data.splits(examples, data.CATEGORIES_AFTER)
    d = root / "data" / FAMILY
    files = {
        "train": data.write_jsonl(data.sample(before["train"], 64, 0), d / "champion" / "train.jsonl"),
        "val": data.write_jsonl(data.sample(before["val"], REFERENCE_PROMPTS, 0), d / "champion" / "val.jsonl"),
        "new_train": data.write_jsonl(data.sample(after["train"], 48, 0), d / "new" / "train.jsonl"),
        "new_val": data.write_jsonl(data.sample(after["val"], 16, 0), d / "new" / "val.jsonl"),
    }
    STATE["shifted"] = [e.prompt for e in data.sample(after["test"], SHIFTED, 1)]
    STATE["before"] = [e.prompt for e in data.sample(before["test"], 60, 2)]
    config = root / "lifecycle.yaml"
    config.write_text(yaml.safe_dump({"family": FAMILY, "init": INIT, "retrain": TRAIN, "merge": MERGE,
                                      "drift": DRIFT, "reference_prompts": REFERENCE_PROMPTS,
                                      "traffic": {"max_tokens": MAX_TOKENS}}))
    STATE["files"], STATE["config"] = files, config
    t0 = time.monotonic()
    with Stack(root, family=FAMILY, config=config, monitor_interval_s=10) as s:
        s.start_all(workers=2)
        yield s
        s.timings["total"] = round(time.monotonic() - t0, 1)
        _record(s)


def _record(s: Stack) -> None:
    doc = json.dumps({"timings": s.timings, "notes": STATE.get("notes", {})}, indent=2)
    (s.root / "timings.json").write_text(doc)
    last = REPO / "work" / "prod-test" / "last-run.json"  # outlives pytest's temporary directories
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(doc)
    if os.environ.get("ADAPTEROPS_RECORD_BENCH") != "1":
        return
    from bench.common import write_benchmarks_md, write_result

    rows = [{"phase": k, "seconds": v} for k, v in s.timings.items()]
    write_result("prod_profile", {
        "title": "Production profile end to end on one host (make prod-test)",
        "description": "tests/prod/test_prod_profile.py over infra/prodtest.py: PostgreSQL (3 fresh databases), moto "
                       "S3, mlflow server (PostgreSQL + S3 artifacts), Prefect server (PostgreSQL) with 2 process "
                       "workers, 2 `adapterops serve --profile production` replicas on one state database; tiny "
                       "base, 8-step trainings. Wall seconds per phase, all services on the same (shared) machine.",
        "command": "ADAPTEROPS_RECORD_BENCH=1 make prod-test",
        "rows": rows,
        "notes": [f"{k}: {v}" for k, v in STATE.get("notes", {}).items()],
    })
    write_benchmarks_md()


@pytest.fixture(scope="module")
def fleet(stack):
    import yaml

    root = stack.root
    configs = {}
    for name, cfg in (("init", INIT), ("train", TRAIN), ("merge", MERGE)):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    args = ["--family", FAMILY, "--train", str(STATE["files"]["train"]), "--val", str(STATE["files"]["val"]),
            "--init-config", str(configs["init"]), "--train-config", str(configs["train"]),
            "--merge-config", str(configs["merge"]), "--reference-prompts", str(REFERENCE_PROMPTS),
            "--max-tokens", str(MAX_TOKENS)]
    env = {**stack.client_env(), "ADAPTEROPS_WORKDIR": str(stack.workdir), "ADAPTEROPS_DATA_DIR": str(stack.data_dir)}
    with stack.phase("serving_start"):  # before the family exists: the replicas must pick it up from the registry
        reps = stack.start_serving(2)
    with stack.phase("first_version"):  # `adapterops build` as an operator runs it against the stack
        stack.run("first-version", [str(Path(sys.executable).parent / "adapterops"), "build", *args, "--profile",
                                    "production", "--workdir", str(stack.workdir), "--base", str(BASE)], env,
                  timeout=900)
    f = Fleet([svc.url for svc in reps], FAMILY, MAX_TOKENS, BOUND_S)
    yield f
    f.close()


def _registry(stack):
    from registry.versions import AdapterRegistry

    return AdapterRegistry(stack.urls["mlflow"])


def test_both_replicas_pick_up_the_first_version_from_the_registry(stack, fleet):
    assert _registry(stack).alias(FAMILY, "champion") == "1"
    with stack.phase("replicas_serve_v1"):
        _wait("both replicas serving the new family's champion v1", lambda: fleet.versions() == ["1", "1"],
              FOLLOW_S * 2, stack, every=0.5)
    for svc in (stack.services["serving-1"], stack.services["serving-2"]):
        assert httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200


def test_traffic_on_both_replicas_is_one_log_and_the_scheduled_monitor_fires(stack, fleet):
    from monitoring.sql_log import SQLPredictionLog

    with stack.phase("shifted_traffic"):
        served = [fleet.complete(p, f"user-{i}") for i, p in enumerate(STATE["shifted"])]
        assert all(r.status_code == 200 for _, r in served), [r.text for _, r in served if r.status_code != 200]
        assert {i for i, _ in served} == {0, 1}
    log = SQLPredictionLog(stack.db_url("state"))
    try:
        _wait("both replicas' requests in the one log",
              lambda: log.count(family=FAMILY, version="1") >= SHIFTED + 2, 30, stack)
    finally:
        log.close()
    alerts = stack.workdir / "alerts.jsonl"

    def alerted():
        lines = [json.loads(x) for x in alerts.read_text().splitlines()] if alerts.exists() else []
        return [a for a in lines if a["family"] == FAMILY and a["monitor"] == "drift"]

    with stack.phase("monitor_fires"):
        (alert,) = _wait("a scheduled monitor run (on a worker) alerting on the shifted window", alerted, 300, stack,
                         every=2)
    assert alert["details"]["version"] == "1" and alert["details"]["window"]["n"] >= SHIFTED


def test_the_drift_event_retrains_on_a_worker_into_a_challenger(stack, fleet):
    reg = _registry(stack)
    with stack.phase("retrain"):
        _wait("the drift-triggered retrain registered challenger v2",
              lambda: reg.alias(FAMILY, "challenger") == "2", 900, stack, every=3)
    assert reg.alias(FAMILY, "champion") == "1"
    assert reg.get(FAMILY, "2").tags["parent_version"] == "1"
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(stack.urls["prefect"]) as client:
        dep = client.read_deployment_by_name(f"retrain-on-drift/{FAMILY}")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        done = [r for r in runs if r.state and r.state.is_completed()]
        assert done and all(r.work_pool_name == POOL for r in done)
        monitors = client.read_deployment_by_name(f"monitor-check/{FAMILY}")
        mruns = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[monitors.id])))
    worker_logs = {p.name: p.read_text(errors="replace") for p in stack.logs.glob("worker-*.log")}
    ran = {name: sum(str(r.id) in text for r in [*runs, *mruns]) for name, text in worker_logs.items()}
    STATE.setdefault("notes", {})["flow runs per worker"] = json.dumps(ran)
    assert sum(ran.values()) >= len(done) + 1, ran  # the runs went through the pool's workers


def test_one_canary_driven_by_one_replica_routes_both(stack, fleet):
    import sqlalchemy as sa

    a = stack.services["serving-1"].url
    with stack.phase("canary"):
        out, _ = stack.cli("rollout", "start", FAMILY, "--challenger", "2", "--steps", "0.5,1",
                           "--requests-per-step", "12", "--url", a, "--api-key", API_KEY, "--json")
        assert out.returncode == 0, out.stderr
        seen = {0: set(), 1: set()}
        users = (f"canary-{i}" for i in itertools.count())

        def finished():
            for p in STATE["shifted"][:8]:
                i, r = fleet.complete(p, next(users))
                assert r.status_code == 200, r.text
                seen[i].add(r.json()["adapterops"]["version"])
            st = fleet.clients[1].get("/admin/rollout/status", params={"family": FAMILY}, headers=AUTH).json()
            return st if st.get("status") in ("promoted", "rolled_back", "aborted") else None

        status = _wait("the canary's outcome, seen by the replica that did not start it", finished, 300, stack, 0)
    STATE.setdefault("notes", {})["canary outcome"] = status["status"]
    assert seen[0] >= {"1", "2"} and seen[1] >= {"1", "2"}, seen  # both replicas routed by the canary's weights
    engine = sa.create_engine(stack.db_url("state"))
    with engine.connect() as c:
        ids = c.execute(sa.text("SELECT DISTINCT rollout_id FROM rollout_samples")).scalars().all()
        replicas = c.execute(sa.text("SELECT DISTINCT replica FROM rollout_samples")).scalars().all()
        (row,) = c.execute(sa.text("SELECT rollout_id, status, updated_by FROM rollout_rollouts WHERE family = :f"),
                           {"f": FAMILY}).all()
    engine.dispose()
    assert len(ids) == 1 and row.rollout_id == ids[0], (ids, row)  # one canary, not one per replica
    assert row.status == status["status"]
    assert len(replicas) == 2, replicas  # samples from both replicas counted in it
    STATE["notes"]["canary's last state write by"] = row.updated_by
    history = _registry(stack).history(FAMILY)
    canary_moves = [h for h in history if h.actor == "canary"]
    assert len(canary_moves) <= 1, canary_moves  # one outcome applied once


def _move(stack, fleet, phase: str, argv: list[str], want: str) -> None:
    """An alias move through `adapterops registry ...`; the phase is the command plus the time until both replicas
    serve `want` (ServerState.registry_poll_s: 5 s)."""
    t0 = time.monotonic()
    out, took = stack.cli("registry", *argv)
    assert out.returncode == 0, out.stderr
    _wait(f"both replicas on v{want} after `adapterops registry {' '.join(argv)}`",
          lambda: fleet.versions() == [want, want], FOLLOW_S, stack, every=0.25)
    stack.timings[phase] = round(time.monotonic() - t0, 2)
    stack.timings[f"{phase}_cli"] = round(took, 2)


def test_rollback_and_promote_through_the_registry_reach_both_replicas(stack, fleet):
    reg = _registry(stack)
    if reg.alias(FAMILY, "champion") == "2":  # the canary promoted v2: roll it back, then promote it again
        _move(stack, fleet, "rollback_reaches_both", ["rollback", FAMILY, "--reason", "prodtest"], "1")
        _move(stack, fleet, "promote_reaches_both", ["promote", FAMILY, "2", "--reason", "prodtest"], "2")
    else:  # the canary rolled v2 back: promote it by hand, then roll back
        _move(stack, fleet, "promote_reaches_both", ["promote", FAMILY, "2", "--reason", "prodtest"], "2")
        _move(stack, fleet, "rollback_reaches_both", ["rollback", FAMILY, "--reason", "prodtest"], "1")
    history = [(h.op, h.to_version) for h in reg.history(FAMILY)]
    assert ("rollback", "1") in history and ("promote", "2") in history, history


def test_databases_down_fail_fast_naming_the_service_and_recover(stack, fleet):
    from monitoring.sql_log import SQLPredictionLog

    mlflow = stack.urls["mlflow"]
    stack.databases_down(("mlflow", "state"))
    try:
        with stack.phase("db_down_registry_error"):
            out, took = stack.cli("registry", "ping", timeout=BOUND_S * 2)
        assert out.returncode == 2 and took < BOUND_S, (out.returncode, took, out.stderr)
        assert f"MLflow backend {mlflow}" in out.stderr and out.stderr.count("\n") == 1, out.stderr
        out, took = stack.cli("registry", "list", timeout=BOUND_S * 2)
        assert out.returncode == 2 and took < BOUND_S and mlflow in out.stderr, (took, out.stderr)
        with stack.phase("db_down_serving"):
            codes = []
            for i, p in enumerate(STATE["before"][:6]):
                t0 = time.monotonic()
                _, r = fleet.complete(p, f"outage-{i}")
                codes.append((r.status_code, round(time.monotonic() - t0, 2)))
        STATE.setdefault("notes", {})["requests while the databases were down (status, s)"] = str(codes)
        assert all(c == 200 and s < BOUND_S for c, s in codes), codes  # routes are in memory: traffic goes on
    finally:
        stack.databases_up(("mlflow", "state"))
    with stack.phase("db_recovery"):
        _wait("registry ping answering again", lambda: stack.cli("registry", "ping")[0].returncode == 0, BOUND_S,
              stack)
        log = SQLPredictionLog(stack.db_url("state"))
        try:
            n = log.count(family=FAMILY)
            for i, p in enumerate(STATE["before"][6:12]):
                assert fleet.complete(p, f"after-{i}")[1].status_code == 200
            _wait("the replicas' prediction logs writing again", lambda: log.count(family=FAMILY) >= n + 6, BOUND_S,
                  stack)
        finally:
            log.close()
    metrics = [c.get("/metrics").text for c in fleet.clients]
    lost = [sum(float(line.split()[-1]) for line in m.splitlines()
                if line.startswith("adapterops_prediction_log_failures_total")) for m in metrics]
    STATE["notes"]["prediction-log records lost during the outage (per replica)"] = str(lost)
    assert sum(lost) <= 6, lost  # at most the requests served during the outage, and counted


def test_s3_killed_errors_name_the_artifact_store_and_leave_nothing_half_done(stack, fleet):
    from pipelines import register
    from registry.versions import RegistryError

    reg = _registry(stack)
    stack.services["s3"].kill()
    with stack.phase("s3_down_verify_error"):
        out, took = stack.cli("registry", "verify", FAMILY, "1", timeout=BOUND_S * 3)
    assert out.returncode != 0 and took < BOUND_S, (took, out.stdout, out.stderr)
    text = out.stdout + out.stderr
    assert "does not answer" in text or "unreachable" in text, text
    assert "stored copy is gone" not in text, text
    # a registration while S3 is down: v2's own stage outputs, registered again (in-process, as the flows do)
    run = stack.workdir / "runs"
    (v2,) = [p for p in run.iterdir() if p.name.startswith("drift-") or p.name.startswith("retrain-")]
    t0 = time.monotonic()
    with stack.phase("s3_down_register_error"), pytest.raises(RegistryError) as e:
        register.run(reg, FAMILY, v2 / "train", v2 / "merged", v2 / "monitoring", "1", log=lambda *a: None)
    assert time.monotonic() - t0 < BOUND_S
    assert "artifact" in str(e.value) and ("down" in str(e.value) or "does not answer" in str(e.value)), e.value
    assert sorted(v.version for v in reg.list_versions(FAMILY)) == ["1", "2"], "no version from the failed registration"
    for i, p in enumerate(STATE["before"][12:16]):  # the adapters are loaded: serving does not need S3
        assert fleet.complete(p, f"s3-{i}")[1].status_code == 200


def test_nothing_is_left_running_or_half_done(stack, fleet):
    from mlflow.entities import ViewType

    reg = _registry(stack)
    exps = reg.client.search_experiments(view_type=ViewType.ALL)
    runs = reg.client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL, max_results=1000)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"], \
        [(r.info.run_name, r.info.status) for r in runs]
    assert "FAILED" in {r.info.status for r in runs}  # the registration S3 refused, marked failed
    for c in fleet.clients:
        st = c.get("/admin/rollout/status", headers=AUTH).json()
        assert not [f for f, ro in st.get("rollouts", {}).items() if ro.get("status") in ("running", "paused")], st
    assert REPO.joinpath("models", "tiny-llama").resolve() == BASE.resolve()
    for name in ("serving-1", "serving-2", "worker-1", "worker-2", "mlflow", "prefect-server"):
        assert stack.services[name].alive(), f"{name} died: {stack.services[name].log}"
