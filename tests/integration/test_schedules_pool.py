"""The work pool's concurrency limit against a real Prefect server (the session's temporary one, prefect_harness):
`apply` creates the process pool with the limit from --pool-concurrency (or ADAPTEROPS_POOL_CONCURRENCY), changes it
on a later apply, leaves it alone when none is given, and registers the deployments into it. Against a dead server
`apply` fails within its bound, naming the Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def api_url(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _pool(name: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_work_pool(name)


def test_the_pool_is_created_with_its_limit_and_updated(api_url):
    from pipelines.schedules import ensure_work_pool

    assert ensure_work_pool("adapterops-limit", 3) == {"pool": "adapterops-limit", "action": "created",
                                                        "concurrency_limit": 3}
    pool = _pool("adapterops-limit")
    assert (pool.type, pool.concurrency_limit) == ("process", 3)
    assert pool.base_job_template["job_configuration"]["command"]  # a usable process job template, as the CLI makes
    assert ensure_work_pool("adapterops-limit", 5)["action"] == "updated"
    assert _pool("adapterops-limit").concurrency_limit == 5
    assert ensure_work_pool("adapterops-limit", None)["action"] == "unchanged"  # an operator's limit stays
    assert _pool("adapterops-limit").concurrency_limit == 5


def _apply(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.prefect_deployments", "apply", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_apply_sets_the_pool_limit_and_registers_the_deployments(api_url, tmp_path):
    from prefect import get_client

    env = {**os.environ, "PREFECT_API_URL": api_url, "ADAPTEROPS_PROFILE": "local", "ADAPTEROPS_WORKDIR": str(tmp_path),
           "ADAPTEROPS_FAMILY": "pool-fam", "ADAPTEROPS_POOL_CONCURRENCY": "2", "MLFLOW_TRACKING_URI": ""}
    out = _apply(env, "--pool", "adapterops-apply")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "work pool adapterops-apply: created, concurrency limit 2" in out.stdout
    assert _pool("adapterops-apply").concurrency_limit == 2
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain-on-drift/pool-fam")
    assert dep.work_pool_name == "adapterops-apply"
    out = _apply(env, "--pool", "adapterops-apply", "--pool-concurrency", "4")  # the flag wins over the variable
    assert out.returncode == 0 and "updated, concurrency limit 4" in out.stdout, out.stderr[-3000:]
    assert _pool("adapterops-apply").concurrency_limit == 4


def test_apply_against_a_dead_server_names_prefect_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "ADAPTEROPS_PROFILE": "local"}
    start = time.monotonic()
    out = _apply(env, "--pool-concurrency", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"the Prefect server at http://127.0.0.1:{port}/api is not answering" in out.stderr
    assert time.monotonic() - start < 120  # mostly the imports; the health check itself is bounded at 10 s
