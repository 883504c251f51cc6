"""`adapterops ingest`, `adapterops build` and `adapterops train --nproc` through the config-generated CLI
(pipelines.ingest.IngestConfig, pipelines.onboard.BuildConfig, pipelines.train.TrainConfig.nproc), in process.

ingest runs for real on a SQLite prediction log written with the store's writer API (log, then feedback by request
id, as serving does); build's happy path (a real first version on the tiny base) is in
tests/integration/test_cli_build.py, here its inputs are refused before anything is created."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.config import REPO_ROOT

BASE = REPO_ROOT / "models" / "tiny-llama"
FAM = "cli-ingest"


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        monkeypatch.setenv(var, "1")
    for var in ("ADAPTEROPS_DEBUG", "ADAPTEROPS_DATA_DIR", "ADAPTEROPS_STATE_DB_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def logged(tmp_path):
    """A work dir whose predictions.db holds 12 answered requests of FAM: 10 rated well, 2 badly."""
    from monitoring.sql_log import open_prediction_log

    wd = tmp_path / "wd"
    wd.mkdir()
    log = open_prediction_log(wd / "predictions.db")
    try:
        for i in range(12):
            log.log({"request_id": f"r{i}", "family": FAM, "version": "1", "prompt": f"question {i}",
                     "response": f" answer {i}"})
        log.flush()
        for i in range(12):
            assert log.add_feedback(f"r{i}", 0.2 if i >= 10 else 1.0)
    finally:
        log.close()
    return wd


def test_ingest_writes_the_retrain_window_and_prints_its_manifest(logged, tmp_path, capsys, clean_env):
    data = tmp_path / "data"
    code = cli.main(["ingest", "--family", FAM, "--workdir", str(logged), "--since", "0", "--min-examples", "4",
                     "--val-fraction", "0.25", "--data-dir", str(data), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads(out)  # --json: stdout holds only the manifest, progress went to stderr
    assert manifest["family"] == FAM and manifest["config"]["val_fraction"] == 0.25
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 10 and manifest["counts"]["bad"] == 2
    new = data / FAM / "new"
    lines = (new / "train.jsonl").read_text().splitlines() + (new / "val.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["prompt"] for x in lines) == sorted(f"question {i}" for i in range(10))
    assert f"ingest {FAM}:" in err


def test_ingest_refusals_are_one_line(logged, tmp_path, capsys, clean_env):
    data = tmp_path / "data"
    assert cli.main(["ingest", "--family", FAM, "--workdir", str(logged), "--since", "0", "--data-dir",
                     str(data)]) == 2  # 10 examples < min_examples 32
    err = capsys.readouterr().err
    assert err.startswith("error: ingest cli-ingest: 10 examples, min_examples=32") and err.count("\n") == 1
    assert not data.exists()
    assert cli.main(["ingest", "--family", FAM, "--workdir", str(tmp_path / "nowhere")]) == 2
    assert "holds no predictions.db" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert cli.main(["ingest", "--family", FAM, "--workdir", str(logged), "--since", "last week"]) == 2
    assert "since 'last week' is neither a duration" in capsys.readouterr().err
    assert cli.main(["ingest", "--family", FAM, "--workdir", str(logged), "--extra", str(tmp_path / "no.jsonl")]) == 2
    assert "--extra" in capsys.readouterr().err


def test_build_inputs_are_refused_before_anything_is_created(tmp_path, capsys, clean_env):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    init = tmp_path / "init.yaml"
    init.write_text("method: lora\nrank: 4\n")
    wd = tmp_path / "wd"
    base = ["build", "--family", "fam", "--workdir", str(wd), "--base", str(BASE)]
    cases = [
        ([*base, "--train", str(tmp_path / "no.jsonl"), "--val", str(good)], ["--train", "no.jsonl does not exist"]),
        ([*base, "--train", str(good), "--val", str(good), "--method", "dora", "--init-config", str(init)],
         ["method 'dora' disagrees with method 'lora'"]),
        ([*base, "--train", str(good), "--val", str(good), "--train-config", str(tmp_path / "t.yaml")],
         ["--train-config", "does not exist"]),
        (["build", "--family", "bad/name", "--workdir", str(wd), "--train", str(good), "--val", str(good)],
         ["invalid family name 'bad/name'"]),
    ]
    for argv, needles in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert all(n in err for n in needles), err
    assert not wd.exists()


def test_train_nproc_reaches_the_train_config(tmp_path, capsys, clean_env):
    from pipelines.train import TrainConfig

    opts = cli.command_options()["train",]["train"]
    args = cli.build_parser().parse_args(["train", "--train", "t", "--val", "v", "--out", "o", "--nproc", "2",
                                          "--grad-accum", "4", "--strategy", "fsdp"])
    cfg = opts.build(args, base=TrainConfig())
    assert (cfg.nproc, cfg.grad_accum, cfg.strategy) == (2, 4, "fsdp")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    # TrainConfig's own rule, before the init cache is touched
    assert cli.main(["train", "--train", str(good), "--val", str(good), "--out", str(tmp_path / "out"), "--store",
                     str(tmp_path / "store"), "--nproc", "2", "--grad-accum", "3"]) == 2
    err = capsys.readouterr().err
    assert "grad_accum (3) must be a multiple of nproc (2)" in err and not (tmp_path / "store").exists()


def test_schedules_serve_against_a_dead_prefect_server_is_one_line(tmp_path, monkeypatch, capsys, clean_env):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    start = time.monotonic()
    assert cli.main(["schedules", "serve", "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the Prefect server at http://127.0.0.1:{port}/api is not answering") and \
        err.count("\n") == 1 and "PREFECT_API_URL" in err
    assert time.monotonic() - start < 15
