"""The deployments match the code (issue 15 item 5): infra/docker-compose*.yml and every infra/k8s/ manifest parse;
each Kubernetes document has its schema basics; images are pinned with a pull policy; probes point at routes that
exist; every command line runs a command with flags that exist (our CLI through pipelines.cli.build_parser(), the
Prefect CLI through its cyclopts apps, `mlflow server` through its click command, vLLM through the flags
serving.vllm_launch uses); serving replicas and workers get the same shared state and registry; volumes, PVCs,
ConfigMaps and Secret keys referenced exist; compose and Kubernetes agree on ports and settings. Docker and kubectl do
not run here: structure and the real parsers only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILES = [INFRA / "docker-compose.yml", INFRA / "docker-compose.replica.yml"]
SECRET_TEMPLATE = K8S / "secret.yaml.example"
EXTERNAL_HOSTS = {"postgres", "minio"}  # k8s: managed services outside the manifests (configmap.yaml says so)
SHARED = ("MLFLOW_TRACKING_URI", "ADAPTEROPS_STATE_DB_URL", "PREFECT_API_URL", "AWS_ENDPOINT_URL",
          "ADAPTEROPS_INIT_STORE_URI", "ADAPTEROPS_PROFILE")
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


# -- loading -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose files merged as `docker compose -f a -f b` does for what is checked here (services and volumes
    are added; the override file defines only new ones)."""
    merged: dict = {"services": {}, "volumes": {}}
    for path in COMPOSE_FILES:
        doc = yaml.safe_load(path.read_text())
        overlap = set(doc.get("services", {})) & set(merged["services"])
        assert not overlap, f"{path.name} redefines {overlap}: the override only adds replicas"
        merged["services"].update(doc.get("services", {}))
        merged["volumes"].update(doc.get("volumes") or {})
    return merged


def _k8s_paths() -> list[Path]:
    return sorted(K8S.rglob("*.yaml")) + [SECRET_TEMPLATE]


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in _k8s_paths():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def _pods(docs):
    """(path, workload, pod spec) of every Deployment / StatefulSet / DaemonSet / Job."""
    for path, d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield path, d, d["spec"]["template"]["spec"]


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _argv(c: dict) -> list[str]:
    return [str(x) for x in (c.get("command") or [])] + [str(x) for x in (c.get("args") or [])]


def _command_lines(argv: list[str]) -> list[list[str]]:
    """The command lines a container (or compose service) runs: `sh -c "a && b && exec c"` is three."""
    if argv[:2] == ["sh", "-c"]:
        script = " ".join(argv[2:])
        parts = [shlex.split(p) for p in re.split(r"&&|;", script) if p.strip()]
        return [p[1:] if p[0] == "exec" else p for p in parts]
    return [argv]


def _compose_argv(svc: dict) -> list[str]:
    cmd = svc.get("command") or svc.get("entrypoint") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def _serving_routes() -> set[str]:
    return set(re.findall(r'@app\.(?:get|post)\("([^"]+)"\)', (REPO / "serving" / "app.py").read_text()))


def _k8s_env(pod_container: dict, docs) -> dict[str, str]:
    """A container's environment: its ConfigMaps (envFrom) then env (value, or `secret:<name>/<key>`)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in pod_container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    for e in pod_container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env


def _runs(c_or_argv, program: str, sub: str | None = None) -> bool:
    argv = _argv(c_or_argv) if isinstance(c_or_argv, dict) else c_or_argv
    return any(line[:1] == [program] and (sub is None or line[1:2] == [sub]) for line in _command_lines(argv))


# -- Kubernetes schema -------------------------------------------------------------------------------------------

def test_every_k8s_document_has_the_schema_basics(k8s_docs):
    assert len(k8s_docs) >= 10
    names = set()
    for path, d in k8s_docs:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in d, f"{path.name}: a document without {key}"
        assert d["metadata"].get("name"), f"{path.name}: {d['kind']} without metadata.name"
        assert (d["kind"], d["metadata"]["name"]) not in names or path.parent.name == "vllm", \
            f"{d['kind']} {d['metadata']['name']} defined twice"
        names.add((d["kind"], d["metadata"]["name"]))
        if d["kind"] == "Deployment":
            sel = d["spec"]["selector"]["matchLabels"]
            assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items(), path.name
            assert d["spec"]["template"]["spec"]["containers"], path.name


def test_the_fleet_is_there(k8s_docs):
    kinds = {(d["kind"], d["metadata"]["name"]): d for p, d in k8s_docs if p.parent == K8S}
    for name in ("adapterops-serving", "adapterops-worker", "mlflow", "prefect-server"):
        assert ("Deployment", name) in kinds, f"no Deployment {name}"
    assert kinds[("Deployment", "adapterops-serving")]["spec"]["replicas"] == 2
    assert kinds[("Deployment", "adapterops-worker")]["spec"]["replicas"] >= 2
    for svc in ("adapterops-serving", "mlflow", "prefect-server"):
        assert ("Service", svc) in kinds
    vllm = [d for p, d in k8s_docs if p.parent.name == "vllm" and d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in vllm] == ["adapterops-serving"]  # replaces the built-in one
    assert vllm[0]["spec"]["replicas"] == 2


def test_images_are_pinned_with_a_pull_policy(k8s_docs, compose):
    def pinned(image: str) -> bool:
        name, _, tag = image.rpartition(":")
        return bool(name) and "/" not in tag and tag not in ("", "latest")

    for path, _, pod in _pods(k8s_docs):
        for c in _containers(pod):
            assert pinned(c["image"]), f"{path.name} {c['name']}: image {c['image']} has no pinned tag"
            assert c.get("imagePullPolicy") in PULL_POLICIES, f"{path.name} {c['name']}: no imagePullPolicy"
    for name, svc in compose["services"].items():
        assert pinned(svc["image"]), f"compose {name}: image {svc['image']} has no pinned tag"
        assert svc.get("pull_policy") in ("always", "never", "missing", "build", "if_not_present"), name
    text = "\n".join(p.read_text() for p in [*COMPOSE_FILES, *_k8s_paths(), INFRA / "Dockerfile"])
    assert ":latest" not in text


def test_adapterops_image_tag_is_the_package_version(k8s_docs, compose):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    ours = {c["image"] for _, _, pod in _pods(k8s_docs) for c in _containers(pod) if "adapterops" in c["image"]}
    ours |= {s["image"] for s in compose["services"].values() if s["image"].startswith("adapterops")}
    assert ours == {f"adapterops:{version}"}


def test_probes_point_at_routes_that_exist(k8s_docs, compose):
    routes = _serving_routes()
    assert {"/healthz", "/readyz"} <= routes
    for path, _, pod in _pods(k8s_docs):
        for c in _containers(pod):
            probes = {k: c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c}
            if _runs(c, "adapterops", "serve"):
                assert {"readinessProbe", "livenessProbe"} <= set(probes), f"{path.name} {c['name']}"
                assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
                for p in probes.values():
                    assert p["httpGet"]["path"] in routes, (path.name, p)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for p in probes.values():
                if "httpGet" in p and isinstance(p["httpGet"]["port"], str):
                    assert p["httpGet"]["port"] in ports, f"{path.name} {c['name']}: probe on unknown port"
    for name in ("serving", "serving-2"):
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert any(f"localhost:8000{r}'" in test for r in routes), test


# -- commands and flags ------------------------------------------------------------------------------------------

def _all_command_lines(k8s_docs, compose) -> list[tuple[str, list[str]]]:
    out = []
    for path, d, pod in _pods(k8s_docs):
        for c in _containers(pod):
            out += [(f"{path.name}:{c['name']}", line) for line in _command_lines(_argv(c))]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "exec" in c.get(probe, {}):
                    out.append((f"{path.name}:{c['name']}:{probe}", [str(x) for x in c[probe]["exec"]["command"]]))
    for name, svc in compose["services"].items():
        argv = _compose_argv(svc)
        if argv:
            out += [(f"compose:{name}", line) for line in _command_lines(argv)]
    return out


def _check_adapterops(argv: list[str]) -> None:
    from pipelines.cli import build_parser

    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(f"`{' '.join(argv)}` does not parse with pipelines.cli.build_parser()") from e


def _check_prefect(argv: list[str]) -> None:
    import prefect.cli.server
    import prefect.cli.work_pool
    import prefect.cli.worker

    apps = {"server": prefect.cli.server.server_app, "worker": prefect.cli.worker.worker_app,
            "work-pool": prefect.cli.work_pool.work_pool_app}
    assert argv[1] in apps, f"`{' '.join(argv)}`: prefect {argv[1]} is not a command checked here"
    apps[argv[1]].parse_args(argv[2:], exit_on_error=False, print_error=False)


def _check_mlflow(argv: list[str]) -> None:
    from mlflow.cli import server

    assert argv[1] == "server", argv
    server.make_context("server", argv[2:])  # click.UsageError on an unknown option


def _check_prefect_deployments(argv: list[str], capsys) -> None:
    from infra import prefect_deployments

    assert argv[1:3] == ["-m", "infra.prefect_deployments"], argv
    with pytest.raises(SystemExit) as e:
        prefect_deployments.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    action, flags = argv[3], [a for a in argv[4:] if a.startswith("--")]
    assert re.search(rf"\{{[^}}]*\b{action}\b", help_text), f"{action!r} is not an action of {help_text}"
    for flag in flags:
        assert flag in help_text, f"{flag} is not an option of python -m infra.prefect_deployments"


def _check_vllm(argv: list[str]) -> None:
    from serving.vllm_launch import VLLMServer

    ours = VLLMServer(REPO / "models" / "tiny-llama", port=8001).command()
    known = {a for a in ours if a.startswith("--")}
    used = {a for a in argv if a.startswith("--")}
    assert used <= known, f"vLLM flags {used - known} are not the ones serving.vllm_launch runs (and tests)"
    assert {"--enable-lora", "--lora-target-modules", "--served-model-name"} <= used


THIRD_PARTY = {"server": "minio", "/bin/sh": "mc", "pg_isready": "postgres", "CMD-SHELL": "postgres"}


def test_every_command_line_parses_with_the_real_cli(k8s_docs, compose, capsys):
    lines = _all_command_lines(k8s_docs, compose)
    seen = set()
    for where, argv in lines:
        prog = argv[0]
        try:
            if prog == "adapterops":
                _check_adapterops(argv)
            elif prog == "prefect":
                _check_prefect(argv)
            elif prog == "mlflow":
                _check_mlflow(argv)
            elif prog in ("python", "python3") and argv[2:3] == ["infra.prefect_deployments"]:
                _check_prefect_deployments(argv, capsys)
            elif prog in ("python", "python3") and argv[2:3] == ["vllm.entrypoints.openai.api_server"]:
                _check_vllm(argv)
            elif prog in THIRD_PARTY:
                continue  # the minio / mc images' own commands
            else:
                raise AssertionError(f"unknown program {prog!r}")
        except Exception as e:
            raise AssertionError(f"{where}: `{' '.join(argv)}`: {e}") from e
        seen.add(prog if prog not in ("python", "python3") else argv[2])
    assert seen >= {"adapterops", "prefect", "mlflow", "infra.prefect_deployments",
                    "vllm.entrypoints.openai.api_server"}


def test_a_bad_flag_is_caught(capsys):
    """The checks above can fail: an unknown flag of each kind is refused."""
    for bad in (["adapterops", "serve", "--engine", "vllm", "--vllm-urls", "x"], ["prefect", "worker", "start",
                                                                                  "--poll", "x"],
                ["mlflow", "server", "--serve-artifact"],
                ["python3", "-m", "vllm.entrypoints.openai.api_server", "--enable-loras"]):
        with pytest.raises(BaseException):
            {"adapterops": _check_adapterops, "prefect": _check_prefect, "mlflow": _check_mlflow,
             "python3": _check_vllm}[bad[0]](bad)
    capsys.readouterr()


def test_serving_runs_the_production_profile_without_the_mlflow_db_workaround(k8s_docs, compose):
    serve_lines = [line for where, line in _all_command_lines(k8s_docs, compose) if line[:2] == ["adapterops", "serve"]]
    assert len(serve_lines) == 4  # compose serving + serving-2, k8s built-in + vLLM
    for line in serve_lines:
        assert line[line.index("--profile") + 1] == "production", line
    text = "\n".join(p.read_text() for p in [*COMPOSE_FILES, *K8S.rglob("*.yaml")])
    assert "touch" not in text  # cmd_serve needs <workdir>/mlflow.db only without MLFLOW_TRACKING_URI
    cli = (REPO / "pipelines" / "cli.py").read_text()
    assert 'os.environ.get("MLFLOW_TRACKING_URI") and not (Path(args.workdir) / "mlflow.db")' in cli
    vllm = [line for line in serve_lines if "--engine" in line]
    assert len(vllm) == 1 and vllm[0][vllm[0].index("--engine") + 1] == "vllm" and "--vllm-url" in vllm[0]


# -- environment -------------------------------------------------------------------------------------------------

def _k8s_clients(k8s_docs):
    """(label, env) of every container running our serving or worker processes."""
    out = []
    for path, d, pod in _pods(k8s_docs):
        for c in pod["containers"]:
            if _runs(c, "adapterops", "serve") or _runs(c, "prefect", "worker"):
                out.append((f"{path.relative_to(K8S)}:{c['name']}", _k8s_env(c, k8s_docs)))
    return out


def _compose_clients(compose):
    return [(name, {k: str(v) for k, v in svc["environment"].items()}) for name, svc in compose["services"].items()
            if _runs(_compose_argv(svc), "adapterops", "serve") or _runs(_compose_argv(svc), "prefect", "worker")]


def test_serving_replicas_and_workers_share_one_state_and_registry(k8s_docs, compose):
    for label, clients in (("k8s", _k8s_clients(k8s_docs)), ("compose", _compose_clients(compose))):
        assert len(clients) >= 2 + (label == "k8s"), clients  # serving (+ vLLM variant) and the worker
        for var in SHARED:
            values = {name: env.get(var) for name, env in clients}
            assert len(set(values.values())) == 1 and None not in values.values(), f"{label} {var}: {values}"
        state = clients[0][1]["ADAPTEROPS_STATE_DB_URL"]
        assert state.startswith("postgresql://") and ":" not in urlparse(state).netloc.split("@")[0], \
            "no password in the state URL"
        pw = {name: env.get("PGPASSWORD") for name, env in clients}
        assert len(set(pw.values())) == 1 and None not in pw.values(), f"{label} PGPASSWORD: {pw}"
        keys = {name: env.get("ADAPTEROPS_API_KEY") for name, env in clients}
        assert len(set(keys.values())) == 1 and None not in keys.values(), \
            f"{label}: ADAPTEROPS_API_KEY (the /admin key; workers send verdicts with it) differs or is missing: {keys}"


def test_workers_send_verdicts_to_serving_whose_fallback_is_on(k8s_docs, compose):
    """Every serving process runs the fallback policy (a config file that exists and enables it) and the workers'
    scheduled monitor posts its verdicts (ADAPTEROPS_SERVER_URL) to the serving Service / compose service."""
    from pipelines.cli import build_parser
    from pipelines.config import load
    from serving.fallback import FallbackConfig

    serve_lines = [line for _, line in _all_command_lines(k8s_docs, compose) if line[:2] == ["adapterops", "serve"]]
    assert len(serve_lines) == 4
    for line in serve_lines:
        path = build_parser().parse_args(line[1:]).fallback_config
        assert path and path.startswith("/app/"), line  # the image's source tree (infra/Dockerfile: WORKDIR /app)
        assert load(FallbackConfig, REPO / path.removeprefix("/app/")).enabled, path
    services = {d["metadata"]["name"]: d for _, d in k8s_docs if d["kind"] == "Service"}
    workers = [(label, env) for label, env in _k8s_clients(k8s_docs) if "worker" in label]
    workers += [("compose:" + n, env) for n, env in _compose_clients(compose) if "worker" in n]
    assert len(workers) == 2, workers
    for label, env in workers:
        url = urlparse(env.get("ADAPTEROPS_SERVER_URL", ""))
        if label.startswith("compose:"):
            cmd = _compose_argv(compose["services"][url.hostname])
            assert _runs(cmd, "adapterops", "serve") and url.port == 8000, (label, url)
        else:
            svc = services[url.hostname]
            assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "serving", label
            assert url.port == svc["spec"]["ports"][0]["port"], label
    flows = (REPO / "pipelines" / "flows.py").read_text()
    assert 'os.environ.get("ADAPTEROPS_SERVER_URL"' in flows and 'os.environ.get("ADAPTEROPS_API_KEY")' in flows


def test_compose_and_k8s_agree_on_settings_and_ports(k8s_docs, compose):
    k8s_env = dict(_k8s_clients(k8s_docs))["serving.yaml:serving"]
    compose_env = dict(_compose_clients(compose))["serving"]
    for var in SHARED:
        assert k8s_env[var] == compose_env[var], var
    services = {d["metadata"]["name"]: d for _, d in k8s_docs if d["kind"] == "Service"}
    s = compose["services"]
    assert any(p.endswith(":8000") for p in s["serving"]["ports"])
    assert services["adapterops-serving"]["spec"]["ports"][0]["port"] == 8000
    mlflow_k8s = {_argv(c)[i + 1] for _, d, pod in _pods(k8s_docs) for c in pod["containers"]
                  for i, a in enumerate(_argv(c)) if a == "--port" and _runs(c, "mlflow")}
    assert mlflow_k8s == {"5000"} and "--port 5000" in s["mlflow"]["command"]
    assert services["mlflow"]["spec"]["ports"][0]["port"] == urlparse(k8s_env["MLFLOW_TRACKING_URI"]).port == 5000
    assert services["prefect-server"]["spec"]["ports"][0]["port"] == urlparse(k8s_env["PREFECT_API_URL"]).port
    assert "--port 4200" in s["prefect-server"]["command"]
    # every host the clients are pointed at is a Service here or an external service the ConfigMap names
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "ADAPTEROPS_STATE_DB_URL"):
        host = urlparse(k8s_env[var]).hostname
        assert host in services or host in EXTERNAL_HOSTS, (var, host)
        assert urlparse(compose_env[var]).hostname in s, (var, "compose service")


def test_every_adapterops_variable_set_is_read_by_the_code(k8s_docs, compose):
    code = "\n".join(p.read_text() for d in ("pipelines", "serving", "registry", "monitoring", "infra")
                     for p in (REPO / d).rglob("*.py") if p.name != "prodtest.py")
    code += (REPO / "configs" / "profiles" / "production.yaml").read_text()
    names = {k for _, env in _k8s_clients(k8s_docs) + _compose_clients(compose) for k in env
             if k.startswith("ADAPTEROPS_")}
    assert "ADAPTEROPS_STATE_DB_URL" in names
    unread = sorted(n for n in names if n not in code)
    assert not unread, f"set in the deployments but read by no code: {unread}"


# -- volumes, claims, config maps, secrets -----------------------------------------------------------------------

def test_every_volume_claim_config_map_and_secret_key_referenced_exists(k8s_docs):
    claims = {d["metadata"]["name"] for _, d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    maps = {d["metadata"]["name"] for _, d in k8s_docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for p, d in k8s_docs if d["kind"] == "Secret"}
    assert p_is_template(k8s_docs), "the Secret is a template, never applied"
    for path, d, pod in _pods(k8s_docs):
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for v in vols.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{path.name}: PVC {v} is not defined"
        for c in _containers(pod):
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{path.name} {c['name']}: mounts undefined volume {m['name']}"
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in maps
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{path.name}: secret key {ref}"
            for e in c.get("env", []):  # secrets come from the Secret, never a literal
                if re.search(r"PASSWORD|SECRET|API_KEY|STORE_URI|CONNECTION_URL", e["name"]):
                    assert "valueFrom" in e, f"{path.name} {c['name']}: {e['name']} is a literal"


def p_is_template(k8s_docs) -> bool:
    return all(p == SECRET_TEMPLATE for p, d in k8s_docs if d["kind"] == "Secret") and \
        not SECRET_TEMPLATE.name.endswith(".yaml")


def test_worker_replicas_share_a_read_write_many_work_dir(k8s_docs):
    claims = {d["metadata"]["name"]: d for _, d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    (pod,) = [pod for _, d, pod in _pods(k8s_docs) if d["metadata"]["name"] == "adapterops-worker"]
    work = {v["name"]: v for v in pod["volumes"]}["work"]
    assert "ReadWriteMany" in claims[work["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]


def test_vllm_sidecar_sees_the_adapters_the_serving_container_loads(k8s_docs):
    (pod,) = [pod for p, d, pod in _pods(k8s_docs) if p.parent.name == "vllm"]
    (vllm,) = [c for c in _containers(pod) if "vllm" in c["image"]]
    (serving,) = [c for c in pod["containers"] if _runs(c, "adapterops", "serve")]
    work = {m["name"]: m["mountPath"] for m in serving["volumeMounts"]}["work"]
    assert {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}["work"] == work  # lora_path is a file path
    argv = _argv(serving)
    url = urlparse(argv[argv.index("--vllm-url") + 1])
    vargv = _argv(vllm)
    assert str(url.port) == vargv[vargv.index("--port") + 1] and url.hostname == vargv[vargv.index("--host") + 1]
    assert {e["name"]: e.get("value") for e in vllm["env"]}["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert vllm.get("restartPolicy") == "Always"  # a native sidecar: up before the serving container starts


def test_compose_volumes_and_bind_mounts_exist(compose):
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            m = re.match(r"\$\{[A-Z_]+:-([^}]+)\}:", v)  # ${VAR:-default}:/path
            src = m.group(1) if m else v.split(":")[0]
            if src.startswith((".", "/")):
                assert (INFRA / src).exists(), f"compose {name}: bind mount {src} does not exist"
            else:
                assert src in declared, f"compose {name}: volume {src} is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
    sql = (INFRA / "postgres" / "init.sql").read_text()
    state_db = urlparse(compose["services"]["serving"]["environment"]["ADAPTEROPS_STATE_DB_URL"]).path.lstrip("/")
    assert f"CREATE DATABASE {state_db};" in sql and "CREATE DATABASE prefect;" in sql
    # two serving replicas: distinct host ports and work volumes
    s1, s2 = compose["services"]["serving"], compose["services"]["serving-2"]
    assert {p.split(":")[0] for p in s1["ports"]}.isdisjoint(p.split(":")[0] for p in s2["ports"])
    assert s1["volumes"][0].split(":")[0] != s2["volumes"][0].split(":")[0]
