"""`build` (pipelines.onboard): a family's first version from the user's own files, end to end on the tiny base and a
real MLflow on SQLite: registered with lineage, promoted to champion, its data left where retraining reads it; and
the refusals: a family that already has versions, malformed or missing files (file and line named), gates that fail
(nothing registered, no MLflow run left RUNNING)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
FAMILY = "onboarded"
TRAIN = {"steps": 6, "batch_size": 4, "max_len": 64, "eval_every": 6}
MERGE = {"quantize": "none", "eval_examples": 8, "golden_prompts": 4, "max_len": 64, "reference_windows": 4}


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("onboard-ws")
    return Workspace.create(root, BASE, tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("onboard-cfg")
    return {"init": _yaml(d / "init.yaml", {"rank": 4}), "train": _yaml(d / "train.yaml", TRAIN),
            "merge": _yaml(d / "merge.yaml", MERGE),
            "bad_merge": _yaml(d / "bad_merge.yaml", {**MERGE, "gates": {"task_max_delta": -1.0}})}


def _config(tiny_data, configs, **kw):
    from pipelines.onboard import BuildConfig

    args = dict(family=FAMILY, train=str(tiny_data.train), val=str(tiny_data.val), method="lora",
                init_config=configs["init"], train_config=configs["train"], merge_config=configs["merge"],
                reference_prompts=8, max_tokens=4)
    return BuildConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def built(workspace, tiny_data, configs):
    from pipelines.onboard import run

    return run(_config(tiny_data, configs), workspace, log=lambda *a: None)


def _running_runs(reg) -> list:
    exps = [e.experiment_id for e in reg.client.search_experiments()]
    return [r for r in reg.client.search_runs(exps, "attributes.status = 'RUNNING'")] if exps else []


def test_build_registers_and_promotes_the_first_version(built, workspace, tiny_data):
    from registry.hashing import model_weights_hash, sha256_file

    reg = workspace.registry()
    assert built["version"] == "1" and built["promoted"] is True and built["method"] == "lora"
    assert reg.alias(FAMILY, "champion") == "1"
    tags = reg.get(FAMILY, "1").tags
    assert tags["base_sha256"] == model_weights_hash(BASE)
    assert tags["dataset_sha256"] == sha256_file(tiny_data.train) and tags["val_sha256"] == sha256_file(tiny_data.val)
    assert tags["method"] == "lora" and tags["rank"] == "4" and tags["parent_version"] == ""
    assert tags["gates_passed"] == "true" and all(json.loads(tags["gates"]).values())
    assert tags["init_key"] == built["init_key"] and tags["init_key"].startswith("init/lora-r4-")
    assert reg.client.get_run(built["run_id"]).info.status == "FINISHED" and not _running_runs(reg)
    top = {a.path for a in reg.client.list_artifacts(built["run_id"])}
    assert {"adapter", "adapter_native", "gates", "monitoring", "golden"} <= top, top
    steps = sorted(m.step for m in reg.client.get_metric_history(built["run_id"], "train_loss"))
    assert steps == list(range(1, TRAIN["steps"] + 1))  # the train YAML reached training
    promote = [h for h in reg.history(FAMILY) if h.op == "promote"]
    assert len(promote) == 1 and promote[0].actor == "onboard" and promote[0].to_version == "1"
    # what the retrain flow reads as the champion's data (infra/README.md, "Data")
    champion = workspace.root / "data" / FAMILY / "champion"
    assert (champion / "train.jsonl").read_bytes() == tiny_data.train.read_bytes()
    assert (champion / "val.jsonl").read_bytes() == tiny_data.val.read_bytes()
    assert json.loads((Path(built["run_dir"]) / "build.json").read_text())["configs"]["merge"]["quantize"] == "none"


def test_a_family_with_versions_is_refused_pointing_to_retrain(built, workspace, tiny_data, configs):
    from pipelines.onboard import BuildRefused, run

    with pytest.raises(BuildRefused, match=r"onboarded already has 1 version\(s\) \(v1; champion v1\).*adapterops "
                                           r"retrain --family onboarded"):
        run(_config(tiny_data, configs, name="second"), workspace, log=lambda *a: None)
    assert [v.version for v in workspace.registry().list_versions(FAMILY)] == ["1"]
    assert not (workspace.root / "runs" / "second").exists()


def test_no_promote_registers_without_an_alias_and_leaves_the_champion_data_alone(built, workspace, tiny_data,
                                                                                    configs):
    from pipelines.onboard import run

    lines: list[str] = []
    # the same run name reuses the trained adapter, its gates and reference (every stage is idempotent)
    out = run(_config(tiny_data, configs, family="quiet", name=f"build-{FAMILY}", promote=False), workspace,
              log=lines.append)
    reg = workspace.registry()
    assert out["version"] == "1" and out["promoted"] is False and reg.aliases("quiet") == {}
    assert reg.get("quiet", "1").gates_passed() and reg.history("quiet") == []
    assert not (workspace.root / "data" / "quiet" / "champion").exists()
    assert (workspace.root / "data" / "quiet" / "versions" / "1" / "train.jsonl").is_file()  # replayed once champion
    assert any("not promoted" in x and "adapterops registry promote quiet 1" in x for x in lines), lines


def test_bad_files_and_options_are_named_before_anything_runs(workspace, tiny_data, configs, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.data import DataError
    from pipelines.onboard import BuildConfig, run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": " b"}\n\n{"prompt": "c", "response": " d"\n')
    with pytest.raises(DataError, match=f"{bad}:3 is not valid JSON"):
        run(_config(tiny_data, configs, family="fresh", train=bad), workspace)
    bad.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "", "response": " d"}\n')
    with pytest.raises(DataError, match=f"{bad}:2 needs a non-empty string 'prompt'"):
        run(_config(tiny_data, configs, family="fresh", val=bad), workspace)
    bad.write_bytes(b'{"prompt": "a", "response": " \xff"}\n')
    with pytest.raises(DataError, match=f"{bad}:1 is not UTF-8"):
        run(_config(tiny_data, configs, family="fresh", train=bad), workspace)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"val data {missing} does not exist"):
        run(_config(tiny_data, configs, family="fresh", val=missing), workspace)
    with pytest.raises(ValueError, match="method 'pissa' disagrees with method 'lora'"):
        BuildConfig(family="fresh", train=tiny_data.train, val=tiny_data.val, method="pissa",
                    init_config=_yaml(tmp_path / "i.yaml", {"method": "lora"}))
    with pytest.raises(ValueError, match="method 'lorax' is not one of lora, rslora, dora, pissa"):
        BuildConfig(family="fresh", train=tiny_data.train, val=tiny_data.val, method="lorax")
    with pytest.raises(ConfigError, match="unknown key.*stepz"):
        BuildConfig(family="fresh", train=tiny_data.train, val=tiny_data.val,
                    train_config=_yaml(tmp_path / "t.yaml", {"stepz": 3}))
    assert "fresh" not in workspace.registry().families()
    assert not (workspace.root / "runs" / "build-fresh").exists()


def test_failing_gates_register_nothing_and_leave_no_running_run(built, workspace, tiny_data, configs):
    from pipelines.merge_quantize import GateFailed
    from pipelines.onboard import run

    reg = workspace.registry()
    # the same run name reuses the trained adapter (train is idempotent by its manifest): only the gates run again
    cfg = _config(tiny_data, configs, family="gated-out", name=f"build-{FAMILY}", merge_config=configs["bad_merge"])
    with pytest.raises(GateFailed, match=r"merge gates failed: task_val_loss_delta = .* \(threshold <= -1.0\)"):
        run(cfg, workspace, log=lambda *a: None)
    assert "gated-out" not in reg.families()
    assert not _running_runs(reg)
    assert not (workspace.root / "data" / "gated-out").exists()


def test_built_champion_plus_ingested_feedback_is_what_retrain_reads(prefect_harness, built, workspace, tiny_data,
                                                                      configs):
    """The layout contract end to end: build leaves <data>/<family>/champion/, ingest writes <data>/<family>/new/
    from the logged traffic that got good feedback, and the retrain flow trains v2 from exactly those paths."""
    from monitoring.store import PredictionLog
    from pipelines.data import read_jsonl
    from pipelines.flows import retrain
    from pipelines.ingest import IngestConfig
    from pipelines.ingest import run as ingest

    log = PredictionLog(workspace.prediction_log_target)
    try:
        for i, e in enumerate(read_jsonl(tiny_data.new_train)[:24]):
            log.log({"request_id": f"r{i}", "family": FAMILY, "version": "1", "prompt": e.prompt,
                     "response": e.response})
        log.flush()
        for i in range(24):
            assert log.add_feedback(f"r{i}", 1.0 if i % 4 else 0.0)  # every fourth answer rated bad
    finally:
        log.close()
    new = ingest(IngestConfig(family=FAMILY, min_examples=12), workspace, log=lambda *a: None)
    champion = workspace.root / "data" / FAMILY / "champion"
    assert new == workspace.root / "data" / FAMILY / "new"
    assert len(read_jsonl(new / "train.jsonl")) + len(read_jsonl(new / "val.jsonl")) == 18

    from pipelines.data import champion_training_data

    data_dir = workspace.root / "data"
    versions = data_dir / FAMILY / "versions"
    assert read_jsonl(versions / "1" / "train.jsonl") == read_jsonl(champion / "train.jsonl")  # build recorded v1's
    v2 = retrain(workspace, FAMILY, "v2", built["configs"]["init"], TRAIN, MERGE, new / "train.jsonl",
                 new / "val.jsonl", champion / "train.jsonl", champion / "val.jsonl", reference_prompts=8,
                 max_tokens=4, data_dir=str(data_dir))
    assert v2["version"] == "2" and v2["parent_version"] == "1" and v2["init_hit"] is True
    reg = workspace.registry()
    assert reg.alias(FAMILY, "challenger") == "2" and reg.alias(FAMILY, "champion") == "1"
    assert json.loads(reg.get(FAMILY, "2").tags["dataset_categories"]).get("traffic", 0) > 0
    # v2's own data is recorded: once a canary promotes it, the next retrain replays what v2 was trained on (the
    # new window + v1's replay sample), and its old-categories gate sees v1's and the new window's val data
    assert v2["version_data"] == str(versions / "2")
    v2_train = read_jsonl(versions / "2" / "train.jsonl")
    assert {e.prompt for e in read_jsonl(new / "train.jsonl")} <= {e.prompt for e in v2_train}
    assert len(read_jsonl(versions / "2" / "val.jsonl")) == (len(read_jsonl(champion / "val.jsonl"))
                                                            + len(read_jsonl(new / "val.jsonl")))
    reg.promote(FAMILY, "2", actor="test", reason="the canary promoted it")
    train2, val2, where = champion_training_data(data_dir / FAMILY, reg.alias(FAMILY, "champion"),
                                                 champion / "train.jsonl", champion / "val.jsonl")
    assert (train2, val2) == (versions / "2" / "train.jsonl", versions / "2" / "val.jsonl") and "v2" in where
