"""infra/ and configs/profiles/: every file parses, and the compose file, the Kubernetes manifests and the
production profile agree on service names, ports and URLs. Docker and kubectl do not run here: structure only."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PROFILES = REPO / "configs" / "profiles"
if str(REPO) not in sys.path:  # infra/ is run from the repo root, not installed
    sys.path.insert(0, str(REPO))

from pipelines.config import ConfigError  # noqa: E402
from pipelines.profile import expand_env as expand  # noqa: E402
from pipelines.profile import load_profile  # noqa: E402

FIELDS = {"tracking_uri", "init_store_uri", "s3_endpoint_url", "prefect_api_url", "serving_host", "serving_port",
          "artifact_root", "state_db_url"}
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker", "serving"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def production():
    # every placeholder at its default: the compose service names
    return dataclasses.asdict(load_profile("production", {}))


@pytest.fixture(scope="module")
def k8s():
    docs = [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _port(url: str) -> int:
    return urlparse(url).port


def _flag(command: str, flag: str) -> str:
    m = re.search(rf"{flag}[ =]([^\s\"]+)", command)
    assert m, f"{flag} missing from {command!r}"
    return m.group(1)


# -- profiles ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["local", "production"])
def test_profiles_have_exactly_the_profile_fields_and_document_them(name):
    text = (PROFILES / f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    assert set(data) == FIELDS
    assert isinstance(data["serving_port"], int) and 0 < data["serving_port"] < 65536
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    missing = [f for f in FIELDS if f not in header]
    assert not missing, f"{name}.yaml's header comment does not describe {missing}"


def test_local_profile_needs_nothing_running():
    data = dataclasses.asdict(load_profile("local", {}))
    assert data["serving_host"] == "127.0.0.1"
    assert all(data[f] == "" for f in ("tracking_uri", "init_store_uri", "s3_endpoint_url", "prefect_api_url"))
    assert "$" not in (PROFILES / "local.yaml").read_text().split("\n# Values")[0].split("tracking_uri:")[-1]


def test_production_profile_defaults_and_overrides(production):
    assert production["tracking_uri"] == "http://mlflow:5000"
    assert production["init_store_uri"] == "s3://adapterops/init-cache"
    assert production["prefect_api_url"].endswith("/api") and production["serving_host"] == "0.0.0.0"
    assert production["artifact_root"].startswith("s3://adapterops/")
    env = {"MLFLOW_TRACKING_URI": "postgresql://u:p@db:5432/mlflow"}
    assert load_profile("production", env).tracking_uri == env["MLFLOW_TRACKING_URI"]


def test_placeholders_expand_and_an_unset_one_without_default_names_the_variable():
    assert expand("${A:-x}/${B}", {"B": "b"}) == "x/b"
    assert expand("${A:-x}", {"A": "a"}) == "a" and expand(8000, {}) == 8000
    with pytest.raises(ConfigError, match="export B"):
        expand("${B}", {})
    with pytest.raises(ConfigError, match="known profiles: local, production"):
        load_profile("staging", {})


def test_profiles_load_into_the_profile_dataclass_when_it_exists():
    for name in ("local", "production"):
        p = load_profile(name, env={})
        assert {f for f in FIELDS if hasattr(p, f)} == FIELDS


# -- docker compose ----------------------------------------------------------------------------------------------

def test_compose_has_the_production_services_with_healthchecks(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        if name != "minio-init":  # a one-shot job: done when it exits 0
            assert "healthcheck" in svc, f"service {name} has no healthcheck"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_builds_from_the_infra_dockerfile(compose):
    for name in ("mlflow", "prefect-server", "prefect-worker", "serving"):
        build = compose["services"][name]["build"]
        assert (INFRA / build["context"] / build["dockerfile"]).resolve() == (INFRA / "Dockerfile").resolve()


def test_compose_ports_and_urls_match_the_production_profile(compose, production):
    s = compose["services"]
    assert _flag(s["mlflow"]["command"], "--port") == str(_port(production["tracking_uri"]))
    assert _flag(s["mlflow"]["command"], "--artifacts-destination") == production["artifact_root"]
    assert _flag(s["prefect-server"]["command"], "--port") == str(_port(production["prefect_api_url"]))
    serve = s["serving"]["command"]
    assert _flag(serve, "--port") == str(production["serving_port"])
    assert _flag(serve, "--host") == production["serving_host"]
    assert f"{production['serving_port']}:{production['serving_port']}" in s["serving"]["ports"]
    assert str(production["serving_port"]) in str(s["serving"]["healthcheck"]["test"])
    for client in ("prefect-worker", "serving"):
        env = s[client]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == production["tracking_uri"]
        assert env["PREFECT_API_URL"] == production["prefect_api_url"]
        assert env["AWS_ENDPOINT_URL"] == production["s3_endpoint_url"]
        assert env["ADAPTEROPS_INIT_STORE_URI"] == production["init_store_uri"]
    # the profile's default hostnames are compose service names
    for url in (production["tracking_uri"], production["prefect_api_url"], production["s3_endpoint_url"]):
        assert urlparse(url).hostname in s


def test_compose_buckets_and_databases_exist_for_what_the_profile_names(compose, production):
    bucket = urlparse(production["init_store_uri"]).netloc
    assert urlparse(production["artifact_root"]).netloc == bucket
    assert f"local/{bucket}" in " ".join(compose["services"]["minio-init"]["entrypoint"])
    assert "/mlflow" in _flag(compose["services"]["mlflow"]["command"], "--backend-store-uri")
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"
    assert "CREATE DATABASE prefect" in (INFRA / "postgres" / "init.sql").read_text()
    url = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")


def test_compose_holds_no_literal_secrets(compose):
    text = (INFRA / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${MINIO_ROOT_PASSWORD:?" in text and "${ADAPTEROPS_API_KEY:?" in text
    assert not re.search(r"(PASSWORD|SECRET_ACCESS_KEY|API_KEY): [^$\s]", text)


# -- kubernetes --------------------------------------------------------------------------------------------------

def test_k8s_serving_deployment_and_service_are_consistent(k8s, production):
    dep = k8s[("Deployment", "adapterops-serving")]
    svc = k8s[("Service", "adapterops-serving")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": production["serving_port"]}
    (sp,) = svc["spec"]["ports"]
    assert sp["targetPort"] in ports and sp["port"] == production["serving_port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    args = " ".join(c["args"])
    assert _flag(args, "--port") == str(production["serving_port"])
    assert _flag(args, "--host") == production["serving_host"]
    claims = {v["name"] for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= claims
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} <= {name for kind, name in k8s if kind == "ConfigMap"}


def test_k8s_configmap_matches_the_production_profile(k8s, production):
    data = k8s[("ConfigMap", "adapterops-env")]["data"]
    assert data["MLFLOW_TRACKING_URI"] == production["tracking_uri"]
    assert data["PREFECT_API_URL"] == production["prefect_api_url"]
    assert data["AWS_ENDPOINT_URL"] == production["s3_endpoint_url"]
    assert data["ADAPTEROPS_INIT_STORE_URI"] == production["init_store_uri"]


def test_probe_paths_exist_in_the_serving_app():
    app = (REPO / "serving" / "app.py").read_text()
    assert '@app.get("/readyz")' in app and '@app.get("/healthz")' in app


# -- prefect deployments -----------------------------------------------------------------------------------------

def test_importing_prefect_deployments_imports_no_prefect():
    code = "import sys, infra.prefect_deployments; print('prefect' in sys.modules, 'pipelines.flows' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_deployment_parameters_are_per_family_and_come_from_the_config(tmp_path):
    import infra.prefect_deployments as pd

    config = tmp_path / "c.yaml"
    config.write_text("family: fam-x\ndrift: {min_window: 30, consecutive: 2}\nreference_prompts: 40\n"
                      "traffic: {max_tokens: 8}\n")
    env = {"ADAPTEROPS_RETRAIN_CONFIG": str(config), "ADAPTEROPS_WORKDIR": "/w", "ADAPTEROPS_PROFILE": "local",
           "ADAPTEROPS_DATA_DIR": "/d"}
    assert pd.families(env, "fam-x") == ["fam-x"]  # no ADAPTEROPS_FAMILY: the config's family
    assert pd.families({"ADAPTEROPS_FAMILY": " a, b ,a"}, "x") == ["a", "b"]
    p = pd.retrain_parameters(env, "b")
    assert p["family"] == "b" and p["new_train"] == "/d/b/new/train.jsonl"
    assert p["old_train"] == "/d/b/champion/train.jsonl"
    assert (p["reference_prompts"], p["max_tokens"]) == (40, 8)
    assert p["ws"]["root"] == "/w" and p["ws"]["tracking_uri"] == ""  # local profile: SQLite under the work dir
    assert pd.retrain_parameters(env)["family"] == "fam-x"
    m = pd.monitor_parameters(env, "b")
    assert m["family"] == "b" and m["drift"]["min_window"] == 30 and m["drift"]["consecutive"] == 2
    assert m["webhook_url"] == ""


@pytest.mark.parametrize("value, message", [("0", "at least 1 second"), ("15m", "not a whole number of seconds")])
def test_schedule_intervals_must_be_whole_positive_seconds(value, message):
    import infra.prefect_deployments as pd

    assert pd._seconds({}, "ADAPTEROPS_MONITOR_INTERVAL", 900) == 900
    with pytest.raises(ValueError, match=f"ADAPTEROPS_MONITOR_INTERVAL.*{message}"):
        pd._seconds({"ADAPTEROPS_MONITOR_INTERVAL": value}, "ADAPTEROPS_MONITOR_INTERVAL", 900)


def test_serve_without_a_prefect_server_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "infra.prefect_deployments", "serve"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "PREFECT_API_URL" in out.stderr and "adapterops schedules serve" in out.stderr
