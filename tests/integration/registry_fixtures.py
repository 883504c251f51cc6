"""Fixtures for the registry integration tests: a moto S3 server on loopback, tiny fake adapters, Postgres databases,
an MLflow tracking server on PostgreSQL + moto S3 (the production profile), and the worker of the multi-process tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
SERVER_START_TIMEOUT_S = 180  # a cold `mlflow server` imports for ~10 s on a quiet 2-core machine; much more when busy


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_adapter(root: Path, seed: int = 0) -> Path:
    """A tiny stand-in for a PEFT adapter dir: adapter_config.json + a small weights file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "seed": seed}))
    (root / "adapter_model.safetensors").write_bytes(bytes([seed % 256]) * 512)
    return root


@contextlib.contextmanager
def fresh_postgres_db(prefix: str):
    """Create a uniquely named database on 127.0.0.1:5432 and drop it afterwards; skip when PostgreSQL is down."""
    try:
        import psycopg2

        admin = psycopg2.connect(**PG_ADMIN)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is unreachable: {e}")
    admin.autocommit = True
    db = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    finally:
        with admin.cursor() as cur:  # FORCE closes the connections MLflow's engines left open
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh PostgreSQL database for MLflow, dropped afterwards; skips when no server answers on 127.0.0.1:5432."""
    with fresh_postgres_db("adapterops_registry") as uri:
        yield uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(moto_endpoint, tmp_path_factory):  # noqa: F811
    """`mlflow server` on 127.0.0.1 with a fresh PostgreSQL database and artifacts proxied to a moto S3 bucket, as
    infra/docker-compose.yml runs it. Yields (tracking URI, bucket); the server's process group is ended afterwards."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    with fresh_postgres_db("adapterops_server") as db_uri:
        port = _free_port()
        workdir = tmp_path_factory.mktemp("mlflow-server")
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint, "OMP_NUM_THREADS": "1",
               # no huey job runner (7 extra processes) : the registry needs none of the server's async jobs
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", db_uri,
               "--serve-artifacts", "--artifacts-destination", f"s3://{bucket}/mlflow",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        log_path = workdir / "server.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: uvicorn is a grandchild
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                                           f"{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield uri, bucket
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):  # uvicorn outliving the CLI process
                os.killpg(proc.pid, signal.SIGKILL)


# -- worker of the multi-process tests (importable by a spawned child) -----------------------------------------------

def alias_worker(uri: str, family: str, name: str, plan: list, wait_s: float, barrier, results) -> None:
    """Run `plan` ([("promote", "2"), ("rollback", None), ...]) as actor `name`; put (name, outcomes) on `results`.

    Each outcome is ("ok", op, version, audit record dict) or (error class name, op, version, message).
    """
    from dataclasses import asdict

    from registry.versions import AdapterRegistry, RegistryError

    reg = AdapterRegistry(uri, lease_wait_seconds=wait_s)
    outcomes = []
    barrier.wait(timeout=300)
    for op, version in plan:
        try:
            if op == "promote":
                rec = reg.promote(family, version, actor=name, reason=f"{name} wants v{version}")
            else:
                rec = reg.rollback(family, actor=name, reason=f"{name} rolls back")
            outcomes.append(("ok", op, version, asdict(rec)))
        except RegistryError as e:
            outcomes.append((type(e).__name__, op, version, str(e)))
    results.put((name, outcomes))


def crashing_promote(uri: str, family: str, version: str, step: int) -> None:
    """Promote, stop after `step` and exit at once: a killed process, which releases neither lease nor intent."""
    from registry.versions import AdapterRegistry, SimulatedCrash

    reg = AdapterRegistry(uri, lease_seconds=600)
    try:
        reg.promote(family, version, actor="killed", reason="dies half way", _fail_after_step=step)
    except SimulatedCrash:
        os._exit(3)
    os._exit(0)
