"""The production profile on one machine, without Docker: every service of infra/docker-compose.yml as a local process
on 127.0.0.1, for `make prod-test` (tests/prod/) and for trying the production shape by hand.

    python -m infra.prodtest up --workdir work/prod     start everything, print the URLs, stop it all on Ctrl+C

What runs (each started with a bounded wait for its health check, each log under <root>/logs/):
  PostgreSQL     the one already running on 127.0.0.1:5432 (user postgres, trust auth): three fresh databases per
                 run (MLflow, Prefect, the shared state), dropped on exit
  S3             `moto_server` on a free loopback port, bucket `adapterops` (MLflow artifacts, the init cache)
  MLflow         `mlflow server` on the MLflow database, artifacts proxied to s3://adapterops/mlflow
  Prefect        `prefect server start` on the Prefect database, a process work pool, the deployments of
                 infra/prefect_deployments.py applied to it, and N `prefect worker start` processes polling it
  serving        N `adapterops serve --profile production` replicas sharing ADAPTEROPS_STATE_DB_URL

Nothing here is imported by pipelines/, serving/, registry/ or monitoring/. Stopping is always bounded: SIGTERM to
each process group, SIGKILL after a grace period; the databases are dropped WITH (FORCE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = REPO / "models" / "tiny-llama"
PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
BUCKET = "adapterops"
API_KEY = "prodtest-admin-key"
POOL = "adapterops-prodtest"
START_TIMEOUT_S = 240.0  # a cold server import takes ~10 s on a quiet 2-core box, several times that when it is busy
STOP_GRACE_S = 10.0


class ServiceDown(RuntimeError):
    """A service did not come up (or died): the message names it and quotes its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
        """End the service's whole process group (servers fork workers), bounded: SIGKILL after `grace` s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)

    def kill(self) -> None:
        """SIGKILL, no grace: an outage, not a shutdown."""
        self.stop(signal.SIGKILL, grace=5.0)


def wait_http(service: Service, url: str, timeout: float = START_TIMEOUT_S, ok=(200,)) -> float:
    """Poll `url` until it answers one of `ok`; ServiceDown naming the service (and quoting its log) if it exits or
    does not answer within `timeout` s. Returns the seconds waited."""
    import httpx

    t0 = time.monotonic()
    while True:
        if not service.alive():
            raise ServiceDown(f"{service.name} exited with status {service.proc.returncode} before {url} answered; "
                              f"its log ({service.log}):\n{_tail(service.log)}")
        try:
            if httpx.get(url, timeout=3.0).status_code in ok:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise ServiceDown(f"{service.name} did not answer {url} within {timeout:.0f} s; its log ({service.log}):\n"
                              f"{_tail(service.log)}")
        time.sleep(0.5)


@dataclass
class Stack:
    """Every production service as a local process. Use as a context manager: leaving it stops everything (also
    on an error half way through starting) and drops the databases."""

    root: Path
    family: str = "prod-support"
    config: Path | None = None
    """LifecycleConfig YAML the deployments read (ADAPTEROPS_RETRAIN_CONFIG); default configs/demo.yaml."""
    monitor_interval_s: int = 900
    pool_concurrency: int = 4
    """The work pool's limit on flow runs at once (`apply --pool-concurrency`), as in the compose file."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    services: dict[str, Service] = field(default_factory=dict)
    databases: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.workdir = self.root / "work"  # the workers' shared work dir (the RWX volume in k8s)
        self.data_dir = self.root / "data"
        self._stack = contextlib.ExitStack()

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - t0, 2)

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> Service:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, cwd=str(cwd or self.root), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: stop() ends its children
        svc = Service(name, proc, log)
        self.services[name] = svc
        self._stack.callback(svc.stop)
        return svc

    # -- PostgreSQL ----------------------------------------------------------------------------------------------------

    def _admin(self):
        import psycopg2

        try:
            conn = psycopg2.connect(**PG_ADMIN)
        except Exception as e:  # noqa: BLE001 - psycopg2.OperationalError and friends
            raise ServiceDown(f"PostgreSQL on {PG_ADMIN['host']}:{PG_ADMIN['port']} (user {PG_ADMIN['user']}) is "
                              f"unreachable: {str(e).strip()}; start it (the production profile needs it)") from None
        conn.autocommit = True
        return conn

    def create_databases(self, names=("mlflow", "prefect", "state")) -> dict[str, str]:
        """Fresh databases named prodtest_<name>_<run id>, dropped (WITH FORCE) when the stack closes."""
        admin = self._admin()
        self._stack.callback(admin.close)
        for name in names:
            db = f"prodtest_{name}_{self.run_id}"
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
            self.databases[name] = db
            self._stack.callback(self._drop, admin, db)
        return {k: self.db_url(k) for k in names}

    @staticmethod
    def _drop(admin, db: str) -> None:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def db_url(self, name: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:5432/{self.databases[name]}"

    def databases_down(self, names=("mlflow", "state")) -> None:
        """An outage of these databases (the server stays up for the others): new connections are refused and the
        open ones are ended."""
        admin = self._admin()
        try:
            with admin.cursor() as cur:
                for name in names:
                    db = self.databases[name]
                    cur.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
                    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
        finally:
            admin.close()

    def databases_up(self, names=("mlflow", "state")) -> None:
        admin = self._admin()
        try:
            with admin.cursor() as cur:
                for name in names:
                    cur.execute(f'ALTER DATABASE "{self.databases[name]}" ALLOW_CONNECTIONS true')
        finally:
            admin.close()

    # -- services ----------------------------------------------------------------------------------------------------

    def base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ADAPTEROPS_"))}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
                   AWS_ACCESS_KEY_ID="prodtest", AWS_SECRET_ACCESS_KEY="prodtest", AWS_DEFAULT_REGION="us-east-1")
        return env

    def client_env(self) -> dict:
        """What every adapterops client (worker, serving, the CLI) gets: infra/docker-compose.yml's x-client-env."""
        env = {**self.base_env(), "MLFLOW_TRACKING_URI": self.urls["mlflow"], "AWS_ENDPOINT_URL": self.urls["s3"],
               "ADAPTEROPS_INIT_STORE_URI": f"s3://{BUCKET}/init-cache", "ADAPTEROPS_STATE_DB_URL": self.db_url("state"),
               "ADAPTEROPS_PROFILE": "production", "ADAPTEROPS_API_KEY": API_KEY,
               "PREFECT_HOME": str(self.root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if "prefect" in self.urls:
            env["PREFECT_API_URL"] = self.urls["prefect"]
        return env

    def start_s3(self) -> str:
        port = free_port()
        svc = self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], self.base_env())
        svc.url = self.urls["s3"] = f"http://127.0.0.1:{port}"
        wait_http(svc, f"{svc.url}/", ok=(200, 403, 404))
        import boto3
        from botocore.config import Config

        boto3.client("s3", endpoint_url=svc.url, region_name="us-east-1", aws_access_key_id="prodtest",
                     aws_secret_access_key="prodtest",
                     config=Config(connect_timeout=5, read_timeout=10)).create_bucket(Bucket=BUCKET)
        return svc.url

    def start_mlflow(self) -> str:
        port = free_port()
        env = {**self.base_env(), "MLFLOW_S3_ENDPOINT_URL": self.urls["s3"],
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job runner: the registry needs none
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.db_url("mlflow"), "--serve-artifacts",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
        svc = self._spawn("mlflow", cmd, env)
        svc.url = self.urls["mlflow"] = f"http://127.0.0.1:{port}"
        wait_http(svc, f"{svc.url}/health")
        return svc.url

    def start_prefect(self) -> str:
        port = free_port()
        env = {**self.base_env(), "PREFECT_HOME": str(self.root / "prefect-server"),
               "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url("prefect", "postgresql+asyncpg"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
        svc = self._spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                             "--port", str(port)], env)
        svc.url = self.urls["prefect"] = f"http://127.0.0.1:{port}/api"
        wait_http(svc, f"{svc.url}/health")
        return svc.url

    def worker_env(self) -> dict:
        env = {**self.client_env(), "ADAPTEROPS_WORKDIR": str(self.workdir), "ADAPTEROPS_BASE_DIR": str(BASE),
               "ADAPTEROPS_DATA_DIR": str(self.data_dir), "ADAPTEROPS_FAMILY": self.family,
               "ADAPTEROPS_MONITOR_INTERVAL": str(self.monitor_interval_s), "PREFECT_WORKER_QUERY_SECONDS": "2",
               "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
        if self.config is not None:
            env["ADAPTEROPS_RETRAIN_CONFIG"] = str(self.config)
        return env

    def run(self, name: str, cmd: list[str], env: dict, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """A one-shot command, bounded; its output goes to <logs>/<name>.log. CalledProcessError-like ServiceDown on
        failure."""
        log = self.logs / f"{name}.log"
        try:
            out = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServiceDown(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
        log.write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise ServiceDown(f"`{' '.join(cmd)}` exited with {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
        return out

    def start_workers(self, n: int = 2) -> list[Service]:
        """The compose worker's command, in three steps: create the process pool, apply the deployments, poll."""
        env = self.worker_env()
        self.run("work-pool", [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process",
                               "--overwrite"], env)
        self.run("deployments", [sys.executable, "-m", "infra.prefect_deployments", "apply", "--pool", POOL,
                                 "--pool-concurrency", str(self.pool_concurrency)], env)
        out = []
        for i in range(n):
            svc = self._spawn(f"worker-{i + 1}", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type",
                                                  "process", "--name", f"prodtest-worker-{i + 1}"], env, cwd=REPO)
            out.append(svc)
        return out

    def start_serving(self, n: int = 2, extra: list[str] | None = None) -> list[Service]:
        """N `adapterops serve --profile production` replicas, each with its own work dir (a pod's emptyDir), all on
        the one state database. Returns once each answers /healthz (readiness is the caller's: /readyz).

        One after the other: two replicas starting at the same moment on a fresh state database can both try to
        create the prediction-log table, and the loser exits 2 ("DuplicateTable: relation "predictions" already
        exists": monitoring/sql_log.py SQLPredictionLog.__init__ catches only IntegrityError). In Kubernetes the
        pod restarts once; here it would fail the run."""
        out = []
        for i in range(n):
            port = free_port()
            name = f"serving-{i + 1}"
            cmd = [str(BIN / "adapterops"), "serve", "--profile", "production", "--workdir",
                   str(self.root / name), "--base", str(BASE), "--host", "127.0.0.1", "--port", str(port),
                   *(extra or [])]
            svc = self._spawn(name, cmd, self.client_env())
            svc.url = self.urls[name] = f"http://127.0.0.1:{port}"
            out.append(svc)
            wait_http(svc, f"{svc.url}/healthz")
        return out

    def start_all(self, workers: int = 2) -> "Stack":
        """Databases, S3, MLflow, Prefect, the pool + deployments and the workers (not serving: start_serving)."""
        with self.phase("start_services"):
            try:
                self.create_databases()
                self.start_s3()
                self.start_mlflow()
                self.start_prefect()
                self.start_workers(workers)
            except BaseException:
                self.close()
                raise
        return self

    def cli(self, *args: str, timeout: float = 120.0, env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
        """`adapterops ARGS` as an operator runs it against the stack; (result, seconds). Not checked."""
        t0 = time.monotonic()
        out = subprocess.run([str(BIN / "adapterops"), *args], env=env or self.client_env(), cwd=str(REPO),
                             capture_output=True, text=True, timeout=timeout)
        return out, time.monotonic() - t0


class Fleet:
    """One client in front of every serving replica: round-robin, as a load balancer would."""

    def __init__(self, urls: list[str], family: str, max_tokens: int = 8, timeout_s: float = 60.0):
        import httpx

        self.family, self.max_tokens = family, max_tokens
        self.clients = [httpx.Client(base_url=u, timeout=httpx.Timeout(timeout_s)) for u in urls]
        self._next = 0

    def complete(self, prompt: str, user: str, replica: int | None = None):
        """(replica index, httpx.Response) of one completion, on the next replica (or the one named)."""
        i = self._next % len(self.clients) if replica is None else replica
        self._next += replica is None
        r = self.clients[i].post("/v1/completions", json={"model": self.family, "prompt": prompt,
                                                          "max_tokens": self.max_tokens, "user": user})
        return i, r

    def versions(self) -> list[str | None]:
        """The version each replica serves the family's champion route now (a fixed user, one token)."""
        out = []
        for c in self.clients:
            try:
                r = c.post("/v1/completions", json={"model": self.family, "prompt": "hello", "max_tokens": 1,
                                                    "user": "probe"})
            except Exception:  # noqa: BLE001 - a replica that does not answer serves nothing
                out.append(None)
                continue
            out.append(r.json()["adapterops"]["version"] if r.status_code == 200 else None)
        return out

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.prodtest", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up"])
    p.add_argument("--workdir", default="work/prod", help="root of every log, work dir and data dir")
    p.add_argument("--family", default="prod-support")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    with Stack(Path(args.workdir), family=args.family) as stack:
        stack.start_all(args.workers)
        stack.start_serving(args.replicas)
        print(json.dumps({"urls": stack.urls, "databases": stack.databases, "logs": str(stack.logs),
                          "admin_key": API_KEY, "client_env": {k: v for k, v in stack.client_env().items()
                                                               if k.startswith(("MLFLOW", "ADAPTEROPS", "AWS_END",
                                                                                "PREFECT_API"))}}, indent=2),
              flush=True)
        print("up; Ctrl+C stops everything and drops the databases", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
