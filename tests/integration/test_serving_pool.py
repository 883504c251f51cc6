"""AdapterPool and the parity check on the tiny base with real PEFT adapters."""


import pytest
import torch

from registry.hashing import model_weights_hash
from serving.parity import GOLDEN_FILE, check_parity, load_golden, save_golden
from serving.pool import AdapterLoadError, AdapterNotLoaded, AdapterPool, ContextLengthExceeded

from test_serving_fixtures import BASE, PROMPTS, make_adapter, scaled_copy, training_side_logits

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"1": make_adapter(root / "a1", seed=1), "2": make_adapter(root / "a2", seed=2)}


@pytest.fixture(scope="module")
def pool(adapters):
    p = AdapterPool(BASE, max_adapters=4)
    p.load("fam@1", adapters["1"])
    p.load("fam@2", adapters["2"])
    return p


def test_base_hash_and_outputs_differ_per_adapter(pool):
    assert pool.base_sha256 == model_weights_hash(BASE)
    prompt = PROMPTS[0]
    out = {k: pool.complete(prompt, k, max_tokens=6) for k in (None, "fam@1", "fam@2")}
    texts = {k: c.text for k, c in out.items()}
    assert len(set(texts.values())) == 3, texts
    for c in out.values():
        assert c.prompt_tokens > 3 and 1 <= c.completion_tokens <= 6
        assert set(c.stats) == {"prompt_nll", "gen_entropy", "gen_max_prob"}
        assert 0.0 < c.stats["gen_max_prob"] <= 1.0 and c.stats["prompt_nll"] > 0
        assert c.finish_reason in ("stop", "length") and c.response_nll > 0
    # deterministic greedy decoding, and the base output is the plain model's output (adapters disabled)
    assert pool.complete(prompt, "fam@1", max_tokens=6).text == texts["fam@1"]
    assert pool.complete(prompt, None, max_tokens=6).text == texts[None]


def test_kv_cache_generation_matches_full_recompute(pool):
    c = pool.complete(PROMPTS[1], "fam@2", max_tokens=5, logprobs=True)
    assert len(c.logprobs) == c.completion_tokens and all(lp <= 0 for lp in c.logprobs)
    # recompute greedily without a cache: same tokens
    ids = pool.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with pool._lock, pool._use("fam@2") as model, torch.no_grad():
        for _ in range(c.completion_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    n = pool.tokenizer(PROMPTS[1], return_tensors="pt").input_ids.shape[1]
    assert pool.tokenizer.decode(ids[0, n:], skip_special_tokens=True) == c.text


def test_switching_between_loaded_adapters_serves_each_adapters_own_logits(pool, adapters):
    """The pool's fast switch (the active-adapter pointer only) must be PEFT's set_adapter in effect: after any
    sequence of switches each key gives exactly the logits of a pool holding that adapter alone, and no adapter
    weight becomes trainable. (How fast a switch is, is measured by bench/serving.py.)"""
    alone = {}
    for v in ("1", "2"):
        single = AdapterPool(BASE, max_adapters=1)
        single.load(f"fam@{v}", adapters[v])
        alone[v] = single.prompt_logits(PROMPTS[:2], f"fam@{v}")[0]
    for key in ["fam@2", "fam@1", "fam@1", "fam@2", None, "fam@1", "fam@2"]:
        got = pool.prompt_logits(PROMPTS[:2], key)[0]
        if key is None:
            assert not torch.allclose(got, alone["1"]) and not torch.allclose(got, alone["2"])
            continue
        torch.testing.assert_close(got, alone[key.split("@")[1]], rtol=0, atol=1e-5)
    trainable = [n for n, p in pool._peft.named_parameters() if p.requires_grad]
    assert not trainable, trainable[:4]
    assert pool.switches > 0


def test_load_is_idempotent_and_lru_evicts(adapters, tmp_path):
    p = AdapterPool(BASE, max_adapters=2)
    p.load("f@1", adapters["1"])
    p.load("f@1", adapters["1"])  # no-op
    assert p.loaded() == ["f@1"]
    p.load("f@2", adapters["2"])
    p.complete(PROMPTS[0], "f@1", max_tokens=1)  # f@1 is now the most recently used
    p.load("f@3", adapters["2"])
    assert p.loaded() == ["f@1", "f@3"]  # f@2 evicted
    with pytest.raises(AdapterNotLoaded):
        p.complete(PROMPTS[0], "f@2", max_tokens=1)
    p.unload("f@1")
    with pytest.raises(AdapterNotLoaded):
        p.unload("f@1")
    assert p.loaded() == ["f@3"]
    # reloading a key from another path replaces it
    before = p.complete(PROMPTS[0], "f@3", max_tokens=4).text
    p.load("f@3", adapters["1"])
    assert p.complete(PROMPTS[0], "f@3", max_tokens=4).text != before


def test_load_errors(pool, tmp_path):
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        pool.load("bad@1", tmp_path)
    with pytest.raises(AdapterLoadError, match="trained on base"):
        pool.load("fam@9", tmp_path, base_sha256="0" * 64)
    with pytest.raises(ContextLengthExceeded):
        pool.complete("word " * 600, None, max_tokens=4)
    assert "bad@1" not in pool.loaded()


def test_parity_passes_for_same_adapter_and_fails_for_planted_mismatch(pool, adapters, tmp_path):
    golden_logits, golden_mask = training_side_logits(adapters["1"], PROMPTS)
    ok = check_parity(pool, "fam@1", PROMPTS, golden_logits, golden_mask)
    assert ok["passed"], ok
    assert ok["cosine"] >= 0.9999 and ok["max_abs"] <= 1e-3 and ok["top1_agreement"] == 1.0
    assert ok["thresholds"] == {"min_cosine": 0.9999, "max_abs": 1e-3, "min_top1": 1.0}

    scaled = scaled_copy(adapters["1"], tmp_path / "scaled", 1.5)
    bad_logits, bad_mask = training_side_logits(scaled, PROMPTS)
    bad = check_parity(pool, "fam@1", PROMPTS, bad_logits, bad_mask)
    assert not bad["passed"] and bad["failures"] and bad["max_abs"] > 1e-3

    # a golden of other prompts does not line up at all
    other = check_parity(pool, "fam@1", PROMPTS[:1], golden_logits[:1, :3], golden_mask[:1, :3])
    assert not other["passed"]

    # round trip of the golden file
    save_golden(tmp_path / GOLDEN_FILE, PROMPTS, golden_logits, golden_mask)
    g = load_golden(tmp_path / GOLDEN_FILE)
    assert g.prompts == PROMPTS and torch.equal(g.logits, golden_logits) and torch.equal(g.mask.bool(),
                                                                                         golden_mask.bool())
