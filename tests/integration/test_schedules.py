"""`adapterops schedules serve` against a real Prefect server (the local one the command starts: Prefect's temporary
test server runs no scheduler, so its interval schedules would never fire).

A champion v1 is built on the tiny base and "after"-category requests (a shifted window) are logged the way serving
logs them. The monitor-check deployment, on a 4-second interval, finds the window, alerts (alerts.jsonl) and emits
the `adapterops.drift.alert` event; the event starts the family's retrain deployment. A second alert while that
retrain runs is coalesced (its run is cancelled by the deployment's concurrency limit, nothing queued), another
family's retrain is not blocked, and the retrain runs to the end on a tiny config (v2 registered as challenger).
Without the server: a window below the minimum gives "insufficient_data" and no alert; the reference-perplexity flow
finds the unchanged champion unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models" / "tiny-llama"
ADAPTEROPS = Path(sys.executable).parent / "adapterops"
FAMILY, OTHER = "sched-support", "sched-other"
INIT = {"method": "pissa", "rank": 4}
TRAIN = {"steps": 8, "batch_size": 4, "max_len": 64, "eval_every": 8}
MERGE = {
    "quantize": "nf4", "eval_examples": 16, "golden_prompts": 4, "max_len": 64, "reference_windows": 4,
    # the tiny base's clean nf4 top-1 agreement measures ~0.8 at this eval size (shipped bound 0.85)
    "gates": {"quant": {"nf4": {"kl_mean": 0.06, "kl_p99": 0.6, "top1": 0.7}}},
}
DRIFT = {"alpha": 0.01, "min_window": 20, "consecutive": 1}  # one shifted window must alert here
REFERENCE_PROMPTS, MAX_TOKENS = 40, 8
FIRST_ROWS, SHIFTED_ROWS = 5, 40  # below min_window first (test 1), then the window the schedule must catch
EMIT = ("import sys; from pipelines.flows import emit_drift_event; "
        "emit_drift_event(sys.argv[1], {'status': 'drift', 'reason': 'second alert (test)'}, '1')")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Work dir, the data v1 trains on, the retraining data windows and the tiny config `schedules serve` reads."""
    import yaml

    from pipelines import data
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("sched")
    examples = data.load_bitext()
    before = data.splits(examples, data.CATEGORIES_BEFORE)
    after = data.splits(examples, data.CATEGORIES_AFTER)
    d = root / "retrain-data" / FAMILY
    files = {
        "train": data.write_jsonl(data.sample(before["train"], 64, 0), d / "champion" / "train.jsonl"),
        "val": data.write_jsonl(data.sample(before["val"], REFERENCE_PROMPTS, 0), d / "champion" / "val.jsonl"),
        "new_train": data.write_jsonl(data.sample(after["train"], 48, 0), d / "new" / "train.jsonl"),
        "new_val": data.write_jsonl(data.sample(after["val"], 16, 0), d / "new" / "val.jsonl"),
    }
    shifted = [e.prompt for e in data.sample(after["test"], FIRST_ROWS + SHIFTED_ROWS, 1)]
    config = root / "schedules.yaml"
    config.write_text(yaml.safe_dump({
        "family": FAMILY, "init": INIT, "retrain": TRAIN, "merge": MERGE, "drift": DRIFT,
        "reference_prompts": REFERENCE_PROMPTS, "traffic": {"max_tokens": MAX_TOKENS},
    }))
    ws = Workspace.create(root / "work", BASE, tracking_uri=f"sqlite:///{root / 'work' / 'mlflow.db'}")
    return {"root": root, "ws": ws, "files": files, "shifted": shifted, "config": config}


@pytest.fixture(scope="module")
def champion(prefect_harness, setup):
    from pipelines.flows import build_version

    ws, f = setup["ws"], setup["files"]
    v1 = build_version(ws, FAMILY, "v1", INIT, TRAIN, MERGE, f["train"], f["val"],
                       reference_prompts=REFERENCE_PROMPTS, max_tokens=MAX_TOKENS)
    ws.registry().promote(FAMILY, v1["version"], actor="test", reason="first version")
    return v1


def log_requests(ws, v1: dict, prompts: list[str]) -> None:
    """Run prompts through the serving pool with v1 and log them as serving does (pipelines.serve / serving.app)."""
    from monitoring.store import PredictionLog
    from pipelines.flows import PREDICTION_LOG

    pool = ws.reference_pool()
    key = f"{FAMILY}@{v1['version']}"
    pool.load(key, Path(v1["adapter_path"]))
    with PredictionLog(ws.root / PREDICTION_LOG) as log:
        for i, prompt in enumerate(prompts):
            c = pool.complete(prompt, key, max_tokens=MAX_TOKENS)
            log.log({"request_id": f"r{i}-{time.time_ns()}", "family": FAMILY, "version": v1["version"],
                     "prompt": prompt, "response": c.text, "latency_ms": 1.0, **c.stats})


def test_a_window_below_the_minimum_is_insufficient_data_and_no_alert(champion, setup):
    from pipelines.flows import monitor_check

    ws = setup["ws"]
    log_requests(ws, champion, setup["shifted"][:FIRST_ROWS])
    out = monitor_check(ws, FAMILY, DRIFT)
    assert out["status"] == "insufficient_data" and out["drift"] is False and out["alert"] is False
    assert f"{FIRST_ROWS} requests" in out["reason"] and "min_window=20" in out["reason"]
    assert not (ws.root / "alerts.jsonl").exists()
    assert not (ws.root / "monitoring" / FAMILY / "drift_state.json").exists()  # the window stays open
    # a scheduled family that has no version yet is nothing to monitor (it raised RegistryError every interval)
    out = monitor_check(ws, "not-built-yet", DRIFT)
    assert out["status"] == "insufficient_data" and "no champion" in out["reason"] and out["alert"] is False


def test_the_reference_perplexity_flow_checks_the_champion(champion, setup):
    """pipelines.flows.reference_ppl wraps pipelines.monitor_jobs.reference_ppl_check: the unchanged champion
    measured against its own promotion-time value is no alert."""
    from pipelines.flows import reference_ppl

    ws = setup["ws"]
    out = reference_ppl(ws, FAMILY, reference_windows=MERGE["reference_windows"])
    assert out["version"] == "1" and out["status"] == "ok" and out["alert"] is False, out
    assert out["perplexity"] > 1 and Path(out["history"]).is_file()
    assert not (ws.root / "alerts.jsonl").exists()


# -- the served deployments ----------------------------------------------------------------------------------------

def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def served(champion, setup):
    """`adapterops schedules serve` for FAMILY and OTHER (monitor every 4 s) in a subprocess; yields its API URL."""
    ws = setup["ws"]
    log_requests(ws, champion, setup["shifted"][FIRST_ROWS:])
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PREFECT_HOME=str(setup["root"] / "prefect"), PREFECT_RUNNER_POLL_FREQUENCY="2",
               PREFECT_SERVER_UI_ENABLED="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = setup["root"] / "serve.log"
    cmd = [str(ADAPTEROPS), "schedules", "serve", "--workdir", str(ws.root), "--family", FAMILY, "--family", OTHER,
           "--monitor-interval", "4", "--config", str(setup["config"]),
           "--data-dir", str(setup["root"] / "retrain-data")]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"Prefect API: (\S+)", out.read_text())):
            assert proc.poll() is None, f"schedules serve exited ({proc.returncode}):\n{out.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no Prefect API after 120 s:\n{out.read_text()[-3000:]}"
            time.sleep(1)
        yield {"url": m.group(1), "env": env, "log": out}
    finally:
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:  # flow runs still going when the runner stopped, and the local server
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass


def _client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


def _runs(client, deployment: str) -> list:
    """The deployment's flow runs; for retrain deployments only those a drift event started (a cron tick could add
    one if the test ran across 02:00 UTC)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    try:
        dep = client.read_deployment_by_name(deployment)
    except ObjectNotFound:  # not registered yet: the command prints the API URL first
        return []
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    drift = [r for r in runs if (r.parameters.get("name") or "").startswith("drift-")]
    return drift if deployment.startswith("retrain") else runs


def _wait(what: str, check, served: dict, timeout: float):
    """Poll check() until it returns something truthy; fail with the serve log's tail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s; serve log:\n{served['log'].read_text()[-4000:]}")
        time.sleep(2)


def test_the_monitor_schedule_fires_alerts_and_starts_the_retrain(served, setup):
    from prefect.events.filters import EventFilter, EventNameFilter

    ws = setup["ws"]
    # the UI link Prefect prints points at the server this command started, not at Prefect's default port 4200
    ui = served["url"].removesuffix("/api")
    _wait("Prefect's UI link", lambda: f"{ui}/deployments" in served["log"].read_text(), served, 60)
    with _client(served["url"]) as client:
        def alerted():
            path = ws.root / "alerts.jsonl"
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            return [a for a in lines if a["family"] == FAMILY and a["monitor"] == "drift"]

        def completed_with_alert():
            done = [r for r in _runs(client, f"monitor-check/{FAMILY}") if r.state and r.state.is_completed()]
            return (alerted(), done) if done and alerted() else None

        # the alert is sent inside the run; its window's state is saved after it, before the run completes
        (alert,), completed = _wait("a scheduled monitor run completed with a drift alert", completed_with_alert,
                                    served, 120)
        assert all(r.parameters["family"] == FAMILY for r in completed)
        assert alert["details"]["version"] == "1"
        window = alert["details"]["window"]
        assert window["n"] == FIRST_ROWS + SHIFTED_ROWS  # the open window of test 1 plus the newer requests
        assert any(t["fired"] for t in alert["details"]["tests"])
        assert Path(alert["details"]["report"]).is_file()  # the Evidently report of that window
        state = json.loads((ws.root / "monitoring" / FAMILY / "drift_state.json").read_text())
        assert state == {"version": "1", "last_id": window["last_id"], "streak": 1}

        def drift_events():
            page = client.read_events(EventFilter(event=EventNameFilter(name=["adapterops.drift.alert"])), limit=50)
            return [e for e in page.events if e.resource.id == f"adapterops.family.{FAMILY}"]

        (event,) = _wait("the drift event stored by the server", drift_events, served, 20)
        assert event.payload == {"family": FAMILY, "version": "1", "status": "drift", "reason": alert["message"]}

        def retrain_started():
            runs = [r for r in _runs(client, f"retrain-on-drift/{FAMILY}")
                    if r.state and (r.state.is_running() or r.state.is_final()) and not r.state.is_cancelled()]
            return runs

        (run,) = _wait("the retrain run started by the drift event", retrain_started, served, 40)
        assert run.parameters["family"] == FAMILY and run.parameters["name"].startswith(f"drift-{FAMILY}-")
        assert run.parameters["new_train"] == str(setup["files"]["new_train"])
        assert run.parameters["train_cfg"]["steps"] == TRAIN["steps"]
        assert run.parameters["data_dir"] == str(setup["root"] / "retrain-data")  # --data-dir, the <data> root


def test_alerts_during_a_retrain_are_coalesced_and_other_families_are_not_blocked(served, setup):
    with _client(served["url"]) as client:
        def first_running():
            runs = _runs(client, f"retrain-on-drift/{FAMILY}")
            return [r for r in runs if r.state and r.state.is_running()]

        (first,) = _wait("the drift-triggered retrain running", first_running, served, 30)
        env = {**served["env"], "PREFECT_API_URL": served["url"]}
        for family in (FAMILY, OTHER):  # the monitor's own event code, from a separate process
            sent = subprocess.run([sys.executable, "-c", EMIT, family], env=env, cwd=REPO, timeout=120,
                                  capture_output=True, text=True)
            assert sent.returncode == 0, sent.stderr[-3000:]

        def settled():
            runs = {r.id: r for r in _runs(client, f"retrain-on-drift/{FAMILY}")}
            other = [r for r in _runs(client, f"retrain-on-drift/{OTHER}")
                     if r.state and (r.state.is_running() or r.state.is_final())]
            later = [r for r in runs.values() if r.id != first.id and r.state and r.state.is_final()]
            return (runs, later, other) if later and other else None

        runs, later, other = _wait("the second alert's retrain run settled, and the other family's started", settled,
                                   served, 60)
        # the alert during the retrain did not start (or queue) a second one: its run was cancelled at once
        assert len(runs) == 2, [(r.name, r.state.name) for r in runs.values()]
        (second,) = later
        assert second.state.is_cancelled() and "concurrency limit" in (second.state.message or ""), second.state
        assert second.parameters["name"].startswith(f"drift-{FAMILY}-")
        assert not any(s.is_running() for s in client.read_flow_run_states(second.id))
        # the first retrain was still running when the second was refused
        first_states = client.read_flow_run_states(first.id)
        assert not any(s.is_final() and s.timestamp < second.state.timestamp for s in first_states)
        # the other family has its own deployment and limit: its retrain started while FAMILY's was running
        (o,) = other
        o_running = [s for s in client.read_flow_run_states(o.id) if s.is_running()]
        assert o_running and o.parameters["family"] == OTHER
        assert not any(s.is_final() and s.timestamp < o_running[0].timestamp for s in first_states)


def test_the_drift_triggered_retrain_registers_a_challenger(served, setup):
    """The retrain the alert started runs to the end on the tiny config: replay mix, warm start from v1, gates,
    registration as challenger (the champion stays v1 until a canary promotes v2)."""
    with _client(served["url"]) as client:
        def finished():
            runs = [r for r in _runs(client, f"retrain-on-drift/{FAMILY}") if r.state and r.state.is_final()
                    and not r.state.is_cancelled()]
            return runs

        (run,) = _wait("the drift-triggered retrain finished", finished, served, 300)
        assert run.state.is_completed(), run.state
    reg = setup["ws"].registry()
    assert reg.alias(FAMILY, "challenger") == "2" and reg.alias(FAMILY, "champion") == "1"
    tags = reg.get(FAMILY, "2").tags
    assert tags["parent_version"] == "1" and tags["gates_passed"] == "true"
    # what v2 was trained on is recorded under the deployment's data root, for the retrain after its promotion
    from pipelines.data import version_data_dir

    recorded = version_data_dir(setup["root"] / "retrain-data" / FAMILY, "2")
    assert (recorded / "train.jsonl").is_file() and (recorded / "val.jsonl").is_file()
