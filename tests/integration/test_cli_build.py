"""`adapterops build` (the CLI over pipelines.onboard, its options generated from BuildConfig) end to end on the tiny
base with a real MLflow on SQLite under the work dir: a first version built, gated, registered and promoted from the
user's files, its data left where the retrain deployments read it; a second build of the family is refused with one
line pointing at `adapterops retrain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines import cli

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
FAMILY = "cli-built"


@pytest.fixture(scope="module")
def run_build(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("cli-build")
    configs = {}
    for name, data in (("init", {"rank": 4}), ("train", {"steps": 4, "batch_size": 4, "max_len": 64, "eval_every": 4}),
                       ("merge", {"quantize": "none", "eval_examples": 8, "golden_prompts": 4, "max_len": 64,
                                  "reference_windows": 4})):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(data))
    wd = root / "wd"

    def build(capsys, *extra: str) -> tuple[int, str, str]:
        code = cli.main(["build", "--family", FAMILY, "--train", str(tiny_data.train), "--val", str(tiny_data.val),
                         "--method", "lora", "--init-config", str(configs["init"]), "--train-config",
                         str(configs["train"]), "--merge-config", str(configs["merge"]), "--reference-prompts", "8",
                         "--max-tokens", "4", "--workdir", str(wd), "--base", str(BASE), *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return {"wd": wd, "build": build, "data": tiny_data}


@pytest.fixture
def env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "ADAPTEROPS_DATA_DIR", "ADAPTEROPS_STATE_DB_URL", "ADAPTEROPS_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        monkeypatch.setenv(var, "1")


def test_build_registers_and_promotes_then_refuses_a_second_build(run_build, env, capsys):
    from registry.versions import AdapterRegistry

    code, out, err = run_build["build"](capsys, "--json")
    assert code == 0, err[-3000:]
    summary = json.loads(out)  # --json: only the summary on stdout
    assert (summary["family"], summary["version"], summary["promoted"], summary["method"]) == (FAMILY, "1", True,
                                                                                              "lora")
    assert summary["configs"]["train"]["steps"] == 4 and summary["configs"]["init"]["rank"] == 4  # the YAMLs held
    assert f"build {FAMILY}:" in err
    wd = run_build["wd"]
    reg = AdapterRegistry(f"sqlite:///{wd / 'mlflow.db'}", create=False)
    assert reg.alias(FAMILY, "champion") == "1"
    champion = wd / "data" / FAMILY / "champion"  # where the retrain deployment reads the replay source
    assert (champion / "train.jsonl").read_bytes() == Path(run_build["data"].train).read_bytes()

    code, out, err = run_build["build"](capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {FAMILY} already has 1 version(s)") and "adapterops retrain" in err
    assert err.count("\n") == 1
