"""infra/prefect_deployments.py builds the retrain deployment offline: importing Prefect and our flows and calling
to_deployment() must open no network connection (the worker applies it later against the real server)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
(d,) = pd.build_deployments({"ADAPTEROPS_WORKDIR": "/data/work", "ADAPTEROPS_BASE_DIR": "/models/base"})
from prefect.utilities.schema_tools import validate
validate(d.parameters, d._parameter_openapi_schema.model_dump(), raise_on_error=True, ignore_required=False)
print(json.dumps({
    "flow": d.flow_name, "name": d.name, "entrypoint": d.entrypoint, "parameters": d.parameters,
    "schedules": [[s.schedule.cron, s.schedule.timezone] for s in d.schedules],
    "triggers": [sorted(t.expect) for t in d.triggers],
    "trigger_params": d.triggers[0].parameters, "concurrency_limit": d.concurrency_limit,
    "show": pd.describe([d]),
}))
"""


def test_retrain_deployment_is_built_without_a_server(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "MLFLOW_TRACKING_URI": "", "AWS_ENDPOINT_URL": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert (d["flow"], d["name"], d["entrypoint"]) == ("retrain-on-drift", "retrain-nightly", "pipelines.flows.retrain")
    assert d["schedules"] == [["0 2 * * *", "UTC"]]
    assert d["triggers"] == [["adapterops.drift.alert"]] and d["concurrency_limit"] == 1
    ws = d["parameters"]["ws"]
    assert ws == {"root": "/data/work", "base_path": "/models/base", "tracking_uri": "http://mlflow:5000",
                  "init_store_uri": "s3://adapterops/init-cache", "s3_endpoint_url": "http://minio:9000"}
    assert d["trigger_params"]["family"] == "{{ event.payload.family }}"
    assert d["trigger_params"]["name"].startswith("drift-{{")
    assert "retrain-on-drift/retrain-nightly" in d["show"]
