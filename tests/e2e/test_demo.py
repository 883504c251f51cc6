"""End to end: `make demo` (the README's command) on a fresh work dir, then the summary contract and MLflow state.

This runs the real thing: PiSSA init, PEFT training, merge + nf4 + gates, MLflow on SQLite, Prefect's temporary
server, the HTTP server on 127.0.0.1, drift monitors with MiniLM, retraining with replay, and two canaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    config = os.environ.get("ADAPTEROPS_E2E_CONFIG", str(REPO / "configs" / "demo-small.yaml"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    engine = os.environ.get("ADAPTEROPS_E2E_ENGINE", "builtin")  # vllm: add --vllm-launch
    args = f"--config {config} --engine {engine}" + (" --vllm-launch" if engine == "vllm" else "")
    proc = subprocess.run(["make", "-C", str(REPO), "demo", f"WORKDIR={workdir}", f"DEMO_ARGS={args}"],
                          capture_output=True, text=True, timeout=1800, env=env)
    (workdir / "demo.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"make demo failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((workdir / "summary.json").read_text())
    return workdir, summary, proc.stdout


def test_summary_contract(demo_run):
    workdir, s, _ = demo_run
    for key in ("family", "base_model_path", "workdir", "champion", "versions", "alerts", "rollouts", "init_cache",
                "stage_seconds", "mlflow_tracking_uri", "engine"):
        assert key in s, f"summary lacks {key}"
    assert s["engine"] == os.environ.get("ADAPTEROPS_E2E_ENGINE", "builtin")
    assert Path(s["base_model_path"]).is_dir()
    assert Path(s["workdir"]) == workdir.resolve()
    assert [v["version"] for v in s["versions"]] == ["1", "2", "3"]
    assert all(v["gates_passed"] is True for v in s["versions"])
    assert all((Path(v["adapter_path"]) / "adapter_config.json").is_file() for v in s["versions"])
    assert s["versions"][0]["method"] == "pissa"
    assert s["champion"] == "2"
    assert [(r["version"], r["outcome"]) for r in s["rollouts"]] == [("2", "promoted"), ("3", "rolled_back")]
    assert s["init_cache"] == {"hits": 2, "misses": 1}
    assert all(v > 0 for v in s["stage_seconds"].values())


def test_monitors_quiet_before_and_fire_after(demo_run):
    _, s, _ = demo_run
    before = [a for a in s["alerts"] if a["phase"] == "before"]
    after = [a for a in s["alerts"] if a["phase"] == "after"]
    assert before and after
    for a in s["alerts"]:
        assert set(a) >= {"phase", "monitor", "statistic", "p_value", "fired"}
    assert not any(a["fired"] for a in before), before
    assert any(a["fired"] for a in after), after
    assert any(a["monitor"] == "embedding_max_cos" for a in after)


def test_registry_state_and_audit(demo_run):
    workdir, s, stdout = demo_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": s["mlflow_tracking_uri"]}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "registry", "list", s["family"]], env=env,
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert "champion" in rows["2"] and "previous" in rows["1"]
    assert "champion" not in rows["3"] and "challenger" not in rows["3"]
    hist = subprocess.run([sys.executable, "-m", "pipelines.cli", "registry", "history", s["family"]], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert hist.returncode == 0, hist.stderr
    assert "promote" in hist.stdout and "canary" in hist.stdout
    assert "where to look" in stdout and "mlflow ui --backend-store-uri" in stdout
    assert (workdir / "alerts.jsonl").is_file()
    assert (workdir / "reports" / "drift-after.html").is_file()
