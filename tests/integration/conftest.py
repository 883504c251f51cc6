"""Shared fixtures of the pipelines integration tests: a tiny dataset cut from the real Bitext CSV, trained adapters
on the real tiny base (trained once per session, reused by the train and merge tests) and a Prefect test harness.

Only tests that request a fixture pay for it; the harness in particular starts a Prefect server (tens of seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from vllm_fixtures import vllm_server  # noqa: F401  (the session's one vLLM server, for the tests that need it)

# On a shared 2-core machine torch's default of one OpenMP thread per core spins against the other tenants: measured
# here, 12 training steps of the tiny base took 30 s with 2 threads and 3 s with 1. One thread keeps the tier fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models" / "tiny-llama"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@dataclass(frozen=True)
class TinyData:
    train: Path
    """64 examples of the "before" categories."""
    val: Path
    """16 validation examples of the "before" categories."""
    new_train: Path
    """48 examples of the "after" categories (retraining's new data)."""
    new_val: Path
    """16 validation examples of the "after" categories."""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """Small JSONL splits written from the shipped Bitext CSV with pipelines.data (the code the demo uses)."""
    from pipelines import data

    root = tmp_path_factory.mktemp("data")
    examples = data.load_bitext()
    before = data.splits(examples, data.CATEGORIES_BEFORE)
    after = data.splits(examples, data.CATEGORIES_AFTER)
    return TinyData(
        train=data.write_jsonl(data.sample(before["train"], 64, 0), root / "train.jsonl"),
        val=data.write_jsonl(data.sample(before["val"], 16, 0), root / "val.jsonl"),
        new_train=data.write_jsonl(data.sample(after["train"], 48, 0), root / "new_train.jsonl"),
        new_val=data.write_jsonl(data.sample(after["val"], 16, 0), root / "new_val.jsonl"),
    )


def _small_train_config(**overrides):
    """12 steps of batch 4 at 64 tokens: a few seconds on one CPU thread, enough for the loss to fall."""
    from pipelines.train import TrainConfig

    return TrainConfig(**{"steps": 12, "batch_size": 4, "max_len": 64, "eval_every": 12, **overrides})


@pytest.fixture(scope="session")
def small_train_config():
    """small_train_config(**overrides) -> TrainConfig of the tiny training runs."""
    return _small_train_config


@pytest.fixture(scope="session")
def init_entry(tmp_path_factory):
    """init_entry(method) -> a cached init entry dir (rank 4) from one session-wide LocalStore."""
    from pipelines import init_cache
    from registry.store import LocalStore

    root = tmp_path_factory.mktemp("init")
    store = LocalStore(root / "store")
    entries: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in entries:
            cfg = init_cache.InitConfig(method=method, rank=4)
            entries[method] = init_cache.run(cfg, BASE, store, root / "scratch", log=lambda *a: None).path
        return entries[method]

    return get


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data, init_entry):
    """trained(method) -> a training output dir (adapter/, adapter_native/, manifest.json), trained once per session."""
    from pipelines import train

    root = tmp_path_factory.mktemp("trained")
    outs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in outs:
            outs[method] = train.run(_small_train_config(), BASE, init_entry(method), tiny_data.train, tiny_data.val,
                                     root / method, log=lambda *a: None)
        return outs[method]

    return get


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server + database for the session; only tests that request it start it."""
    from prefect.testing.utilities import prefect_test_harness

    # the temporary server's telemetry writes race the test database on SQLite ("database is locked" tracebacks)
    saved = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = saved
