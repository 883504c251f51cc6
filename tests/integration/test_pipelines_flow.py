"""The Prefect flows end to end on the tiny base: build_version registers v1 in MLflow (SQLite) with lineage and
artifacts; after promotion, retrain warm-starts from the champion (init cache hit) and registers v2 as challenger;
a retrain while v2 awaits its canary is skipped; missing data is named before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
FAMILY = "support-assistant"
INIT = {"method": "pissa", "rank": 4}
TRAIN = {"steps": 8, "batch_size": 4, "max_len": 64, "eval_every": 8}
MERGE = {
    "quantize": "nf4", "eval_examples": 16, "golden_prompts": 4, "max_len": 64, "reference_windows": 4,
    "gates": {
        # the tiny base's clean nf4 top-1 agreement measures ~0.8 at this eval size (shipped bound 0.85)
        "quant": {"nf4": {"kl_mean": 0.06, "kl_p99": 0.6, "top1": 0.7}},
    },
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("ws")
    return Workspace.create(root, BASE, tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def v1(prefect_harness, workspace, tiny_data):
    from pipelines.flows import build_version

    return build_version(workspace, FAMILY, "v1", INIT, TRAIN, MERGE, tiny_data.train, tiny_data.val,
                         reference_prompts=20, max_tokens=8)


def test_build_version_registers_v1_with_lineage(v1, workspace, tiny_data):
    from registry.hashing import model_weights_hash, sha256_file

    assert v1["version"] == "1" and v1["init_hit"] is False and v1["method"] == "pissa"
    reg = workspace.registry()
    info = reg.get(FAMILY, "1")
    tags = info.tags
    assert tags["base_sha256"] == model_weights_hash(BASE)
    assert tags["dataset_sha256"] == sha256_file(tiny_data.train)
    assert tags["init_key"] == v1["init_key"] and tags["init_key"].startswith("init/pissa-r4-")
    assert tags["method"] == "pissa" and tags["code_version"] and tags["gates_passed"] == "true"
    gates = json.loads(tags["gates"])
    assert gates and all(gates.values()) and "nf4_kl_mean" in gates and "forgetting_ppl_rise" in gates
    report = json.loads((Path(v1["run_dir"]) / "merged" / "gates.json").read_text())
    print(f"\nv1 gates: { {g['name']: round(g['value'], 6) for g in report['gates']} }")

    client = reg.client
    top = {a.path for a in client.list_artifacts(v1["run_id"])}
    assert {"adapter", "adapter_native", "gates", "monitoring"} <= top, top
    adapter_files = {Path(a.path).name for a in client.list_artifacts(v1["run_id"], "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors", "parity_golden.safetensors"} <= adapter_files
    history = client.get_metric_history(v1["run_id"], "train_loss")
    assert sorted(m.step for m in history) == list(range(1, TRAIN["steps"] + 1))
    assert client.get_run(v1["run_id"]).info.status == "FINISHED"


def test_retrain_warm_starts_from_the_champion(v1, workspace, tiny_data):
    from pipelines.flows import retrain

    reg = workspace.registry()
    reg.promote(FAMILY, v1["version"], actor="test", reason="first version")
    assert reg.alias(FAMILY, "champion") == "1"

    v2 = retrain(workspace, FAMILY, "v2", INIT, TRAIN, MERGE, tiny_data.new_train, tiny_data.new_val,
                 tiny_data.train, tiny_data.val, replay_ratio=0.2, reference_prompts=20, max_tokens=8)
    assert v2["init_hit"] is True and v2["init_key"] == v1["init_key"]
    assert v2["parent_version"] == "1" and v2["version"] == "2"
    assert reg.alias(FAMILY, "challenger") == "2" and reg.alias(FAMILY, "champion") == "1"
    tags = reg.get(FAMILY, "2").tags
    assert tags["parent_version"] == "1" and tags["gates_passed"] == "true"
    gates = json.loads(tags["gates"])
    assert gates.get("old_categories_loss_rise") is True, gates
    report = json.loads((Path(v2["run_dir"]) / "merged" / "gates.json").read_text())
    rise = {g["name"]: g["value"] for g in report["gates"]}["old_categories_loss_rise"]
    print(f"\nv2 gates: { {g['name']: round(g['value'], 6) for g in report['gates']} } (old_categories_loss_rise "
          f"{rise:.4f}: negative = v2 is better than v1 on the old categories)")
    train_manifest = json.loads((Path(v2["train_dir"]) / "manifest.json").read_text())
    assert train_manifest["inputs"]["parent"] is not None

    # another alert while v2 awaits its canary: no retrain (it would replace v2 before it was judged)
    again = retrain(workspace, FAMILY, "v2-again", INIT, TRAIN, MERGE, tiny_data.new_train, tiny_data.new_val,
                    tiny_data.train, tiny_data.val, replay_ratio=0.2, reference_prompts=20, max_tokens=8)
    assert again["skipped"] is True and again["challenger"] == "2" and "awaits its canary" in again["reason"]
    assert sorted(v.version for v in reg.list_versions(FAMILY)) == ["1", "2"]
    assert reg.alias(FAMILY, "challenger") == "2" and not (workspace.root / "runs" / "v2-again").exists()


def test_retrain_names_missing_data_before_it_touches_anything(prefect_harness, workspace, tiny_data, tmp_path):
    from pipelines.flows import retrain

    missing = tmp_path / "new" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=f"retrain of {FAMILY}: missing data new_train={missing}"):
        retrain(workspace, FAMILY, None, INIT, TRAIN, MERGE, missing, tiny_data.new_val, tiny_data.train,
                tiny_data.val)
    assert not list(workspace.root.glob(f"data/retrain-{FAMILY}-*.jsonl"))  # no replay mix written, no run started
