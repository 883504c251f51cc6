"""The reduced `make prod-test` that CI runs (integration tier): the production wiring without Prefect and training.

infra/prodtest.py's Stack with two fresh PostgreSQL databases (MLflow's, the shared state), moto S3, `mlflow server`
on PostgreSQL with S3 artifacts, and two `adapterops serve --profile production` replicas on one
ADAPTEROPS_STATE_DB_URL behind one round-robin client; two real LoRA adapters on the tiny base registered in MLflow.
A family registered after the replicas started is picked up by both; `adapterops registry promote` / `rollback`
reach both within seconds; with the MLflow and state databases gone the registry commands fail fast naming the MLflow
backend while serving keeps answering, and both recover; with S3 killed `registry verify` fails fast naming the
artifact store and serving keeps answering. The full story (Prefect workers, scheduled monitor, retrain, canary) is
tests/prod (`make prod-test`). Skips when PostgreSQL does not answer on 127.0.0.1:5432.
"""

from __future__ import annotations

import time

import httpx
import pytest

from infra.prodtest import BASE, Fleet, Stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

FAMILY = "smoke-support"
BOUND_S = 60.0
FOLLOW_S = 30.0
PROMPTS = ["my order never arrived", "how do I reset my password", "cancel my subscription please",
           "the invoice amount is wrong"]


def _wait(what, check, timeout, stack, every=0.5):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                             for p in sorted(stack.logs.glob("*.log")))
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{logs}")
        time.sleep(every)
    return got


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is unreachable: {e}")
    with Stack(tmp_path_factory.mktemp("prod-smoke"), family=FAMILY) as s:
        s.create_databases(("mlflow", "state"))
        s.start_s3()
        s.start_mlflow()
        yield s


@pytest.fixture(scope="module")
def fleet(stack, tmp_path_factory):
    from registry.binding import write_binding
    from registry.hashing import model_weights_hash
    from registry.versions import AdapterRegistry
    from test_serving_fixtures import make_adapter

    reps = stack.start_serving(2)  # before the family exists: they must pick it up from the registry
    root = tmp_path_factory.mktemp("smoke-adapters")
    base_sha = model_weights_hash(BASE)
    reg = AdapterRegistry(stack.urls["mlflow"])
    for seed in (1, 2):
        adapter = make_adapter(root / f"v{seed}", seed=70 + seed)
        write_binding(adapter, base_sha256=base_sha, base="plain", method="lora")
        reg.register(FAMILY, reg.create_run(f"adapterops-{FAMILY}", run_name=f"v{seed}"), {"adapter": adapter},
                     {"base_sha256": base_sha}, True)
    reg.promote(FAMILY, "1", actor="smoke", reason="first version")
    f = Fleet([svc.url for svc in reps], FAMILY, 4, BOUND_S)
    yield f
    f.close()


def test_both_replicas_pick_up_a_family_registered_after_they_started(stack, fleet):
    _wait("both replicas serving v1", lambda: fleet.versions() == ["1", "1"], FOLLOW_S * 2, stack)
    for svc in (stack.services["serving-1"], stack.services["serving-2"]):
        assert httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200


def test_promote_and_rollback_through_the_registry_reach_both_replicas(stack, fleet):
    out, _ = stack.cli("registry", "promote", FAMILY, "2", "--reason", "smoke")
    assert out.returncode == 0, out.stderr
    _wait("both replicas on v2", lambda: fleet.versions() == ["2", "2"], FOLLOW_S, stack)
    out, _ = stack.cli("registry", "rollback", FAMILY, "--reason", "smoke rollback")
    assert out.returncode == 0, out.stderr
    _wait("both replicas back on v1", lambda: fleet.versions() == ["1", "1"], FOLLOW_S, stack)


def test_traffic_on_both_replicas_is_one_prediction_log(stack, fleet):
    from monitoring.sql_log import SQLPredictionLog

    served = [fleet.complete(p, f"u{i}") for i, p in enumerate(PROMPTS * 2)]
    assert all(r.status_code == 200 for _, r in served) and {i for i, _ in served} == {0, 1}
    ids = {r.json()["id"] for _, r in served}
    with SQLPredictionLog(stack.db_url("state")) as log:
        _wait("both replicas' requests in the one log",
              lambda: ids <= {row["request_id"] for row in log.query(family=FAMILY)}, 30, stack)


def test_databases_down_fail_fast_naming_the_backend_serving_goes_on_and_recovers(stack, fleet):
    stack.databases_down(("mlflow", "state"))
    try:
        out, took = stack.cli("registry", "ping", timeout=BOUND_S * 2)
        assert out.returncode == 2 and took < BOUND_S, (took, out.stderr)
        assert f"MLflow backend {stack.urls['mlflow']}" in out.stderr, out.stderr
        for i, p in enumerate(PROMPTS):
            t0 = time.monotonic()
            _, r = fleet.complete(p, f"down-{i}")
            assert r.status_code == 200 and time.monotonic() - t0 < BOUND_S, r.text
    finally:
        stack.databases_up(("mlflow", "state"))
    _wait("registry ping answering again", lambda: stack.cli("registry", "ping")[0].returncode == 0, BOUND_S, stack, 2)
    assert fleet.versions() == ["1", "1"]


def test_s3_killed_verify_names_the_artifact_store_and_serving_goes_on(stack, fleet):
    stack.services["s3"].kill()
    out, took = stack.cli("registry", "verify", FAMILY, "1", timeout=BOUND_S * 3)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and took < BOUND_S, (took, text)
    assert ("does not answer" in text or "unreachable" in text) and "stored copy is gone" not in text, text
    for i, p in enumerate(PROMPTS):
        assert fleet.complete(p, f"s3-{i}")[1].status_code == 200
