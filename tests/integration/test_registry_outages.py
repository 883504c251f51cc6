"""Outages fail fast and clean (issue 15 item 3): a real moto S3 server on loopback stopped mid-way, a socket that
accepts and never answers, and MLflow tracking URIs pointing at a closed port or at a server that went away.

Each case asserts a bounded wait (BOUND_S), an error that names the service (its URL) and what to do, and that nothing
is left half-done: no model version, no RUNNING run.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipelines import cli
from registry.store import S3Store, StoreUnreachable
from registry.versions import AdapterRegistry, RegistryError

from registry_fixtures import make_adapter

pytestmark = pytest.mark.integration

BOUND_S = 30.0
BASE = "ab12" * 16


@contextlib.contextmanager
def moto_server():
    """A moto S3 server of its own (the test stops it), with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    url = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      MLFLOW_S3_ENDPOINT_URL=url)
    state = {"running": True}

    def stop():
        if state["running"]:
            server.stop()
            state["running"] = False

    try:
        yield url, stop
    finally:
        stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def silent_socket():
    """A TCP port that accepts connections (kernel backlog) and never answers: a hung service."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bucket(endpoint: str) -> str:
    import boto3

    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# -- the content-addressed store on S3 (init cache) -------------------------------------------------------------------

def test_s3_store_stopped_mid_way_fails_fast_naming_the_endpoint(tmp_path):
    src = make_adapter(tmp_path / "entry", 1)
    with moto_server() as (endpoint, stop):
        store = S3Store(_bucket(endpoint), "cache", endpoint_url=endpoint)
        store.put_dir("init-cache/one", src)
        stop()
        for what, call in [("exists", lambda: store.exists("init-cache/one")),
                           ("get_dir", lambda: store.get_dir("init-cache/one", tmp_path / "got")),
                           ("put_dir", lambda: store.put_dir("init-cache/two", src)),
                           ("list", lambda: store.list())]:
            t0 = time.monotonic()
            with pytest.raises(StoreUnreachable) as e:
                call()
            took = time.monotonic() - t0
            assert took < BOUND_S, (what, took)
            assert f"S3 endpoint {endpoint} is unreachable" in str(e.value), what
            assert "start it or fix AWS_ENDPOINT_URL" in str(e.value)
        assert not (tmp_path / "got").exists(), "nothing half-written at the destination"
        assert not list(tmp_path.glob(".got.*.partial"))


def test_s3_store_that_hangs_times_out(tmp_path):
    with silent_socket() as endpoint:
        store = S3Store("bucket", "cache", endpoint_url=endpoint, read_timeout=2.0, max_attempts=2)
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable, match=f"S3 endpoint {endpoint} is unreachable"):
            store.exists("init-cache/one")
        assert time.monotonic() - t0 < 12


def test_cli_init_cache_with_s3_down_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_DEBUG", raising=False)
    with moto_server() as (endpoint, stop):
        bucket = _bucket(endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        stop()
        t0 = time.monotonic()
        code = cli.main(["init-cache", "ls", "--store", f"s3://{bucket}/cache"])
        err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < BOUND_S
    assert err.startswith(f"error: S3 endpoint {endpoint} is unreachable") and err.count("\n") == 1


# -- MLflow with S3 artifacts: registering and downloading while S3 is down -----------------------------------------

def _manifests(root: Path) -> tuple[Path, Path]:
    train, merge = root / "train", root / "merge"
    make_adapter(train / "adapter", 1)
    make_adapter(train / "adapter_native", 1)
    (train / "manifest.json").write_text(json.dumps({
        "kind": "adapter", "fingerprint": "f" * 16, "method": "lora", "rank": 4, "code_version": "c",
        "inputs": {"base_sha256": BASE, "train_sha256": "1" * 64, "val_sha256": "2" * 64, "init_key": "k"},
        "config": {"steps": 1}, "data": {"train_categories": {"A": 1}}, "curve": [], "evals": [], "metrics": {},
        "health": {"checks": []}}))
    (merge / "golden").mkdir(parents=True)
    (merge / "golden" / "parity_golden.safetensors").write_bytes(b"x")
    (merge / "gates.json").write_text("{}")
    (merge / "gates.md").write_text("# gates\n")
    (merge / "manifest.json").write_text(json.dumps({"kind": "merged", "gates": [], "config": {"quantize": "none"},
                                                      "gates_passed": True}))
    return train, merge


def test_registration_with_s3_down_fails_fast_and_marks_the_run_failed(tmp_path):
    import serving.parity  # noqa: F401 - imports torch: seconds that are not the outage's
    from pipelines import register

    train, merge = _manifests(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    family = f"outage-{uuid.uuid4().hex[:6]}"
    with moto_server() as (endpoint, stop):
        bucket = _bucket(endpoint)
        reg = AdapterRegistry(uri)
        reg.client.create_experiment(f"adapterops-{family}", artifact_location=f"s3://{bucket}/mlflow")
        stop()
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as e:
            register.run(reg, family, train, merge, log=lambda *a: None)
        took = time.monotonic() - t0
    assert took < BOUND_S, took
    msg = str(e.value)
    assert f"cannot register {family}: uploading artifact" in msg and f"s3://{bucket}/mlflow" in msg
    assert "the artifact store (S3 / the tracking server's artifact proxy) looks down: start it" in msg
    exp = reg.client.get_experiment_by_name(f"adapterops-{family}")
    runs = reg.client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], "no RUNNING run is left behind"
    assert family not in reg.families(), "no version (and no family) was created"


def test_download_with_s3_down_names_the_store_not_a_lost_copy(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    family = f"outage-{uuid.uuid4().hex[:6]}"
    with moto_server() as (endpoint, stop):
        reg = AdapterRegistry(uri)
        run_id = reg.create_run("outage", artifact_location=f"s3://{_bucket(endpoint)}/mlflow")
        v = reg.register(family, run_id, {"adapter": make_adapter(tmp_path / "a", 1)}, {"base_sha256": BASE}, True)
        stop()
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as e:
            reg.download(family, v.version, "adapter", tmp_path / "dl")
        took = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(RegistryError, match="does not answer"):
            reg.verify(family)
        took_verify = time.monotonic() - t1
    assert took < BOUND_S and took_verify < BOUND_S, (took, took_verify)
    assert "the artifact store behind" in str(e.value) and "does not answer" in str(e.value)
    assert "stored copy is gone" not in str(e.value)
    assert not (tmp_path / "dl" / family / v.version / "adapter").exists()


# -- the tracking server: closed port, gone after start-up, hung ----------------------------------------------------

class _FakeRegistryServer(http.server.ThreadingHTTPServer):
    """Answers the start-up probe like an MLflow server with an empty registry; then the test shuts it down."""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"registered_models": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_closed_tracking_port_fails_fast_on_every_registry_command(capsys, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_DEBUG", raising=False)
    port = _closed_port()
    for argv in (["list"], ["ping"], ["show", "f", "1"], ["promote", "f", "1"], ["verify", "f"]):
        t0 = time.monotonic()
        code = cli.main(["registry", "--tracking-uri", f"http://127.0.0.1:{port}", *argv])
        err = capsys.readouterr().err
        assert code == 2 and time.monotonic() - t0 < 10, argv
        assert err.startswith(f"error: MLflow backend http://127.0.0.1:{port} is unreachable after 3 tries")
        assert err.count("\n") == 1


def test_tracking_server_gone_after_start_up_fails_fast_naming_it():
    server = _FakeRegistryServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    reg = AdapterRegistry(uri)  # the probe's real query is answered
    server.shutdown()
    server.server_close()
    for call in (reg.families, lambda: reg.aliases("fam"), reg.ping):
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as e:
            call()
        assert time.monotonic() - t0 < BOUND_S
        assert uri in str(e.value) and "start it" in str(e.value)


def test_hung_tracking_server_fails_the_probe_in_bounded_time(monkeypatch):
    import registry.versions as versions

    monkeypatch.setattr(versions, "PROBE_TIMEOUT_S", 1.0)
    with silent_socket() as uri:
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match=f"MLflow backend {uri} is unreachable after 3 tries"):
            AdapterRegistry(uri)
        assert time.monotonic() - t0 < 10


def test_mlflow_http_client_is_bounded_unless_the_operator_says_otherwise(monkeypatch):
    from registry.versions import MLFLOW_HTTP_BOUNDS, bound_mlflow_http

    for key in MLFLOW_HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    bound_mlflow_http()
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300, "an operator's own setting is kept"
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1


# -- readiness that really checks the database (MLflow's /health does not) -------------------------------------------

@pytest.mark.postgres
def test_ping_fails_when_the_servers_database_is_down_while_health_says_ok(tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    import psycopg2

    from registry_fixtures import PG_ADMIN, SERVER_START_TIMEOUT_S, _free_port, fresh_postgres_db

    with fresh_postgres_db("adapterops_ping") as db_uri:
        db = db_uri.rsplit("/", 1)[1]
        port = _free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", db_uri,
               "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
        with open(tmp_path / "server.log", "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        admin = psycopg2.connect(**PG_ADMIN)
        admin.autocommit = True
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "mlflow server did not start"
                    time.sleep(0.5)
            reg = AdapterRegistry(uri)
            assert reg.ping()["ok"] is True
            with admin.cursor() as cur:  # the database goes away under the running server
                cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
            urllib.request.urlopen(f"{uri}/health", timeout=5).close()  # MLflow's own health check still says OK
            t0 = time.monotonic()
            with pytest.raises(RegistryError) as e:
                reg.ping()
            assert time.monotonic() - t0 < BOUND_S
            assert f"MLflow backend {uri} does not answer" in str(e.value)
            assert "start it (and its database" in str(e.value) or "its database" in str(e.value)
            t0 = time.monotonic()
            with pytest.raises(RegistryError, match=f"MLflow backend {uri} is unreachable after 3 tries: HTTP 50[03] "
                                                    "from the registry query"):
                AdapterRegistry(uri)
            assert time.monotonic() - t0 < BOUND_S
        finally:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            admin.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.postgres
def test_direct_postgres_gone_after_start_up_is_one_error_naming_it():
    import psycopg2

    from registry_fixtures import PG_ADMIN, fresh_postgres_db

    with fresh_postgres_db("adapterops_gone") as db_uri:
        db = db_uri.rsplit("/", 1)[1]
        reg = AdapterRegistry(db_uri)
        assert reg.families() == []
        assert "connect_timeout=" in reg.client._client._tracking_client.tracking_uri
        admin = psycopg2.connect(**PG_ADMIN)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
            t0 = time.monotonic()
            with pytest.raises(RegistryError) as e:
                reg.ping()
            assert time.monotonic() - t0 < BOUND_S
            assert f"MLflow backend {db_uri} does not answer" in str(e.value)
        finally:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            admin.close()
