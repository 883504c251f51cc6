"""infra/prefect_deployments.py (over pipelines/schedules.py) builds the deployments offline: importing Prefect and
our flows and calling to_deployment() must open no network connection (the worker applies them later against the
real server). Per family: the monitor check on an interval (its verdicts to the configured model server), the
reference-perplexity check, and the retrain on its jittered cron and on the family's drift events, each limited to
one run at a time with CANCEL_NEW (the coalescing rule)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.schedules import jitter_minutes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, socket, sys
def deny(*args, **kwargs):
    raise AssertionError(f"network connection attempted: {args}")
socket.socket.connect = deny
socket.create_connection = deny
import infra.prefect_deployments as pd
assert "prefect" not in sys.modules, "importing infra.prefect_deployments pulled in prefect"
env = {"ADAPTEROPS_WORKDIR": "/data/work", "ADAPTEROPS_BASE_DIR": "/models/base", "ADAPTEROPS_FAMILY": "fam-a,fam-b",
       "ADAPTEROPS_MONITOR_INTERVAL": "600", "ADAPTEROPS_RETRAIN_CRON": "0 3 * * 0",
       "ADAPTEROPS_ALERT_WEBHOOK": "http://alerts.example/hook", "ADAPTEROPS_SERVER_URL": "http://serving:8000"}
deployments = pd.build_deployments(env)
from prefect.utilities.schema_tools import validate
out = []
for d in deployments:
    validate(d.parameters, d._parameter_openapi_schema.model_dump(), raise_on_error=True, ignore_required=False)
    out.append({
        "flow": d.flow_name, "name": d.name, "entrypoint": d.entrypoint, "parameters": d.parameters,
        "schedules": [[s.schedule.cron, s.schedule.timezone] if hasattr(s.schedule, "cron")
                      else s.schedule.interval.total_seconds() for s in d.schedules],
        "triggers": [{"expect": sorted(t.expect), "match": t.match.model_dump(), "parameters": t.parameters}
                     for t in d.triggers],
        "concurrency": [d.concurrency_limit, d.concurrency_options.collision_strategy.value],
    })
errors = {}
for var, value in (("ADAPTEROPS_RETRAIN_CRON", "every night"), ("ADAPTEROPS_MONITOR_INTERVAL", "0"),
                   ("ADAPTEROPS_FAMILY", "bad/family"), ("ADAPTEROPS_RETRAIN_JITTER", "soon")):
    try:
        pd.build_deployments({**env, var: value})
    except ValueError as e:
        errors[var] = str(e)
show = pd.describe(deployments, pd.ScheduleConfig.from_env(env))
import contextlib, io
flags = io.StringIO()
with contextlib.redirect_stdout(flags):  # the entry point: flags win over the environment's settings
    rc = pd.main(["show", "--family", "fam-z", "--retrain-jitter", "0", "--monitor-interval", "120"])
print(json.dumps({"deployments": out, "errors": errors, "show": show, "show_flags": [rc, flags.getvalue()]}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect")),
           "PREFECT_API_URL": "http://127.0.0.1:9/api", "MLFLOW_TRACKING_URI": "", "AWS_ENDPOINT_URL": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_family_gets_a_monitor_a_perplexity_check_and_a_retrain_deployment(probe):
    got = {(d["flow"], d["name"]): d for d in probe["deployments"]}
    assert set(got) == {(flow, fam) for fam in ("fam-a", "fam-b")
                        for flow in ("monitor-check", "reference-ppl-check", "retrain-on-drift")}
    ws = {"root": "/data/work", "base_path": "/models/base", "tracking_uri": "http://mlflow:5000",
          "init_store_uri": "s3://adapterops/init-cache", "s3_endpoint_url": "http://minio:9000"}
    for fam in ("fam-a", "fam-b"):
        monitor = got["monitor-check", fam]
        assert monitor["entrypoint"] == "pipelines.flows.monitor_check" and monitor["schedules"] == [600.0]
        assert monitor["parameters"]["ws"] == ws and monitor["parameters"]["family"] == fam
        assert monitor["parameters"]["drift"]["min_window"] == 50  # configs/demo.yaml's drift section
        assert monitor["parameters"]["webhook_url"] == "http://alerts.example/hook" and not monitor["triggers"]
        assert monitor["parameters"]["server_url"] == "http://serving:8000"  # a drift verdict reaches /admin/drift
        ppl = got["reference-ppl-check", fam]
        assert ppl["entrypoint"] == "pipelines.flows.reference_ppl" and ppl["schedules"] == [3600.0]
        assert ppl["parameters"]["reference_windows"] == 24  # configs/demo.yaml's merge (MergeConfig default)

        retrain = got["retrain-on-drift", fam]
        assert retrain["entrypoint"] == "pipelines.flows.retrain"
        # 03:00 Sunday shifted by the family's fixed offset within the default 60-minute window
        offset = jitter_minutes(fam, 60)
        assert retrain["schedules"] == [[f"{offset} 3 * * 0", "UTC"]]
        assert f"retrain-on-drift/{fam}" in probe["show"] and f"jitter +{offset} min of '0 3 * * 0'" in probe["show"]
        p = retrain["parameters"]
        assert p["ws"] == ws and p["family"] == fam and p["name"] is None
        assert p["new_train"] == f"/data/work/data/{fam}/new/train.jsonl"
        assert p["old_val"] == f"/data/work/data/{fam}/champion/val.jsonl"
        assert p["data_dir"] == "/data/work/data"  # the champion's own recorded data is replayed when there is one
        assert p["reference_prompts"] == 200 and p["max_tokens"] == 16  # from configs/demo.yaml, not flow defaults
        (trigger,) = retrain["triggers"]
        assert trigger["expect"] == ["adapterops.drift.alert"]
        assert trigger["match"] == {"prefect.resource.id": f"adapterops.family.{fam}"}  # this family's alerts only
        assert trigger["parameters"]["name"].startswith(f"drift-{fam}-{{{{")
    assert all(d["concurrency"] == [1, "CANCEL_NEW"] for d in probe["deployments"])
    assert "retrain-on-drift/fam-a" in probe["show"] and "concurrency: 1 (CANCEL_NEW)" in probe["show"]


def test_bad_schedule_settings_are_refused_with_the_variable_named(probe):
    errors = probe["errors"]
    assert "'every night' (ADAPTEROPS_RETRAIN_CRON, --retrain-cron) is not a cron" in errors["ADAPTEROPS_RETRAIN_CRON"]
    assert "ADAPTEROPS_MONITOR_INTERVAL=0" in errors["ADAPTEROPS_MONITOR_INTERVAL"]
    assert "invalid family name 'bad/family'" in errors["ADAPTEROPS_FAMILY"]
    assert "ADAPTEROPS_RETRAIN_JITTER='soon' is not a whole number" in errors["ADAPTEROPS_RETRAIN_JITTER"]


def test_the_entry_points_flags_are_the_schedule_configs_fields(probe):
    rc, text = probe["show_flags"]
    assert rc == 0, text
    assert "retrain-on-drift/fam-z: pipelines.flows.retrain; schedules: cron 0 2 * * * UTC (jitter +0 min" in text
    assert "monitor-check/fam-z: pipelines.flows.monitor_check; schedules: every 120s" in text
    assert "fam-a" not in text
