"""BuiltinEngine (serving/builtin.py) against PEFT/transformers and the PoolEngine on the tiny base, real PEFT adapters.

    .venv/bin/python -m pytest -q tests/integration/test_serving_builtin.py -x

Adapters are made directly with peft (init_lora_weights=False, so A and B are random and change the outputs; DoRA
magnitudes perturbed), saved to tmp dirs: LoRA on all 7 linears, rsLoRA, DoRA, other ranks/alphas, partial targets,
rank/alpha patterns. Every test runs on CPU; on a machine with CUDA the engine tests run a second time on it (fp32, CUDA
graphs on), against the same CPU references.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_serving_fixtures import BASE, PROMPTS
from transformers import AutoModelForCausalLM

from serving.builtin import BuiltinEngine
from serving.engine import (
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
)

pytestmark = pytest.mark.integration

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS_MORE = PROMPTS + [
    "### Customer: my package arrived damaged and the box was open, what can I do about it?\n### Agent:",
    "User: I want to find a salon in San Jose.\nAssistant:",
]
SPECS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ALL7},
    "rslora": {"r": 8, "lora_alpha": 6, "target_modules": ALL7, "use_rslora": True},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ALL7, "use_dora": True},
    "r16": {"r": 16, "lora_alpha": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "qv": {"r": 2, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
                "rank_pattern": {"k_proj": 8}, "alpha_pattern": {"o_proj": 2, "down_proj": 16},
                "layers_to_transform": [1, 3]},
    "pissa": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "init_lora_weights": "pissa_niter_4"},  # exported as plain LoRA of rank 2r, what training ships
}
KEYS = {name: f"{name}@1" for name in SPECS}
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def _make(dest: Path, seed: int, init_lora_weights=False, **spec) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=init_lora_weights, **spec))
    if init_lora_weights is not False:  # PiSSA: save the init, "train" (perturb), export converted to plain LoRA
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(dest.with_name(dest.name + "-init"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if init_lora_weights is not False and "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
            elif "lora_B" in name:
                p.mul_(0.5)
            if "lora_magnitude_vector" in name:  # at init g = 1: make the magnitude matter
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
    if init_lora_weights is not False:
        peft_model.save_pretrained(dest, path_initial_model_for_weight_conversion=str(dest.with_name(
            dest.name + "-init")))
    else:
        peft_model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builtin-adapters")
    return {name: _make(root / name, seed, **spec) for seed, (name, spec) in enumerate(SPECS.items(), start=1)}


class Refs:
    """PEFT/transformers references on CPU in fp32, one model per adapter (None: the plain base), built lazily."""

    def __init__(self, adapters: dict[str, Path]):
        self.adapters = adapters
        self.models: dict[str | None, torch.nn.Module] = {}

    def model(self, name: str | None):
        if name not in self.models:
            base = AutoModelForCausalLM.from_pretrained(BASE).eval()
            self.models[name] = base if name is None else PeftModel.from_pretrained(base, str(self.adapters[name])).eval()
        return self.models[name]

    @torch.no_grad()
    def prompt_logprobs(self, name: str | None, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(name)(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1), logp.argmax(-1)

    @torch.no_grad()
    def greedy(self, name: str | None, ids: list[int], n: int):
        out = self.model(name).generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                        dtype=torch.long), max_new_tokens=n, do_sample=False, pad_token_id=3,
                                        return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(ids):].tolist()
        return new, torch.log_softmax(torch.cat(out.logits).float(), -1)


@pytest.fixture(scope="module")
def refs(adapters) -> Refs:
    return Refs(adapters)


@pytest.fixture(scope="module", params=DEVICES)
def engine(request, adapters):
    device = request.param
    eng = BuiltinEngine(BASE, device=device, dtype=torch.float32, max_lora_rank=16, max_loras=10, max_batch=8,
                        cuda_graphs=device == "cuda")
    for name, path in adapters.items():
        eng.load(KEYS[name], path)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def pool_engine(adapters):
    from serving.pool import AdapterPool, PoolEngine

    pool = AdapterPool(BASE, max_adapters=8)
    for name, path in adapters.items():
        pool.load(KEYS[name], path)
    return PoolEngine(pool)


def req(prompt: str, name: str | None, **params) -> GenerationRequest:
    """A request on adapter `name` (a SPECS name, or any other engine key as it is)."""
    return GenerationRequest(prompt, KEYS.get(name, name), SamplingParams(**params))


def gen1(engine, prompt: str, name: str | None, **params) -> Generation:
    [out] = engine.generate([req(prompt, name, **params)])
    if isinstance(out, Exception):
        raise out
    return out


def assert_idle(engine, timeout: float = 10.0) -> None:
    """No request left running or queued, every cache row free, no adapter pinned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = engine.health()
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.02)
    h = engine.health()
    assert h["running"] == 0 and h["waiting"] == 0, h
    assert sorted(engine._free_rows) == list(range(engine.max_batch))
    assert all(s is None or s.refs == 0 for s in engine._slots), [(s.key, s.refs) for s in engine._slots if s]


# ---------------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", [None, *SPECS])
def test_prompt_logprobs_match_peft(engine, refs, name):
    got = engine.prompt_logprobs(PROMPTS_MORE, None if name is None else KEYS[name])
    assert len(got) == len(PROMPTS_MORE)
    for prompt, pl in zip(PROMPTS_MORE, got):
        assert pl.token_ids == engine.tokenizer(prompt).input_ids
        want_lp, want_top1 = refs.prompt_logprobs(name, pl.token_ids)
        assert len(pl.logprobs) == len(pl.token_ids) - 1 == len(pl.top1_ids)
        torch.testing.assert_close(torch.tensor(pl.logprobs), want_lp, rtol=0, atol=1e-4)
        assert pl.top1_ids == want_top1.tolist()
    if name is not None:  # the adapter really changes the model (else the test proves nothing)
        base = engine.prompt_logprobs(PROMPTS_MORE[:1], None)[0].logprobs
        assert max(abs(a - b) for a, b in zip(base, got[0].logprobs)) > 0.05
    assert_idle(engine)


def test_engine_protocol_and_rank_widths(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "builtin" and engine.max_lora_rank == 16
    assert engine._width >= 16  # r16 widened the pack; the rank-2 and rank-4 adapters are zero-padded in it
    assert sorted(engine.loaded()) == sorted(KEYS.values())


# ---------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("name", [None, *SPECS])
def test_greedy_matches_hf_generate_and_pool(engine, refs, pool_engine, name):
    for prompt in PROMPTS_MORE[:3]:
        ids = engine.tokenizer(prompt).input_ids
        want_ids, _ = refs.greedy(name, ids, 10)
        g = gen1(engine, prompt, name, max_tokens=10)
        assert g.text == engine.tokenizer.decode(want_ids, skip_special_tokens=True)
        [p] = pool_engine.generate([req(prompt, name, max_tokens=10)])
        assert g.text == p.text and g.finish_reason == p.finish_reason == "length"
        assert g.completion_tokens == p.completion_tokens == 10 and g.prompt_tokens == p.prompt_tokens == len(ids)


def test_long_context_greedy_and_logprobs(engine, refs):
    """Positions far into the cache (prompt ~300 tokens, 120 generated, near the 512-token context)."""
    prompt = " ".join(PROMPTS_MORE) * 3
    ids = engine.tokenizer(prompt).input_ids
    assert 250 < len(ids) < 512 - 120
    want_ids, want_logp = refs.greedy("rslora", ids, 120)
    g = gen1(engine, prompt, "rslora", max_tokens=120, logprobs=0)
    assert g.text == engine.tokenizer.decode(want_ids, skip_special_tokens=True)
    got = torch.tensor([t.logprob for t in g.logprobs])
    torch.testing.assert_close(got, want_logp.gather(-1, torch.tensor(want_ids)[:, None]).squeeze(-1), rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize("name", [None, "lora", "dora", "pattern"])
def test_stats_match_pool_engine(engine, pool_engine, name):
    for prompt in PROMPTS_MORE[:3]:
        g = gen1(engine, prompt, name, max_tokens=8)
        [p] = pool_engine.generate([req(prompt, name, max_tokens=8)])
        assert set(g.stats) == {"prompt_nll", "gen_entropy", "gen_max_prob"}
        for k, v in g.stats.items():
            assert v == pytest.approx(p.stats[k], rel=1e-4, abs=1e-5), (k, g.stats, p.stats)
            assert torch.isfinite(torch.tensor(v))
        assert g.response_nll > 0 and g.response_nll == pytest.approx(p.response_nll, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- batching

MIX = [(PROMPTS_MORE[i % len(PROMPTS_MORE)], name) for i, name in enumerate(
    [None, "lora", "rslora", "dora", "r16", "qv", "pattern", "pissa", None, "dora", "qv", "rslora"])]


def _solo(engine, items, **params):
    return [gen1(engine, p, n, **params) for p, n in items]


def test_mixed_batch_equals_solo(engine):
    solo = _solo(engine, MIX, max_tokens=12, logprobs=2)
    batch = engine.generate([req(p, n, max_tokens=12, logprobs=2) for p, n in MIX])  # 12 > max_batch 8: queued
    for s, b, (p, n) in zip(solo, batch, MIX):
        assert isinstance(b, Generation), b
        assert (b.text, b.finish_reason, b.completion_tokens) == (s.text, s.finish_reason, s.completion_tokens), n
        torch.testing.assert_close(torch.tensor([t.logprob for t in b.logprobs]),
                                   torch.tensor([t.logprob for t in s.logprobs]), rtol=0, atol=1e-4)
        for k in s.stats:
            assert b.stats[k] == pytest.approx(s.stats[k], rel=1e-4, abs=1e-5)
    # the one batch really mixed adapters (else it is the single-adapter path again)
    assert len({n for _, n in MIX}) == 8
    if engine.device.type == "cuda":  # decoded through CUDA graphs (no silent fall back to eager)
        modes = {k[2] for k in engine._graphs}  # the mixed batch ("dora": it holds DoRA rows); solos: "one:<slot>"
        assert engine.cuda_graphs and "dora" in modes and any(m.startswith("one:") for m in modes), modes
    assert_idle(engine)


def test_rows_finish_independently(engine):
    """Different max_tokens in one batch: rows finish (at the prefill, too) and free while the others decode on."""
    lengths = [1, 5, 12, 2, 9, 1, 7, 3]
    solo = [gen1(engine, p, n, max_tokens=m) for (p, n), m in zip(MIX, lengths)]
    batch = engine.generate([req(p, n, max_tokens=m) for (p, n), m in zip(MIX, lengths)])
    assert [(b.text, b.completion_tokens) for b in batch] == [(s.text, s.completion_tokens) for s in solo]
    assert [b.completion_tokens for b in batch] == lengths
    assert_idle(engine)


def test_prefill_token_budget_splits_admission(engine):
    eng = BuiltinEngine(BASE, max_batch=4, max_prefill_tokens=45)
    try:
        items = [(p, None) for p in PROMPTS_MORE] * 2
        want = [gen1(engine, p, None, max_tokens=6).text for p, _ in items]
        assert [g.text for g in eng.generate([req(p, n, max_tokens=6) for p, n in items])] == want
        [long] = eng.generate([req("word " * 60, None, max_tokens=2)])
        assert isinstance(long, ContextLengthExceeded) and "max_prefill_tokens" in str(long)
        assert_idle(eng)
    finally:
        eng.close()


def test_sixteen_threads_with_mixed_adapters(engine):
    items = [(PROMPTS_MORE[i % len(PROMPTS_MORE)], [None, *SPECS][i % (len(SPECS) + 1)]) for i in range(16)]
    solo = _solo(engine, items, max_tokens=10)
    results: list = [None] * 16
    barrier = threading.Barrier(16)

    def worker(i):
        try:
            barrier.wait(timeout=30)
            results[i] = gen1(engine, *items[i], max_tokens=10)
        except Exception as exc:  # noqa: BLE001  (reported below)
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i, (r, s) in enumerate(zip(results, solo)):
        assert isinstance(r, Generation), (i, r)
        assert r.text == s.text and r.completion_tokens == s.completion_tokens, (i, items[i][1])
    assert_idle(engine)


# ---------------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling(engine):
    prompt = PROMPTS_MORE[4]
    a = gen1(engine, prompt, "lora", max_tokens=16, temperature=1.0, seed=7)
    companions = [req(p, n, max_tokens=16, temperature=0.9, seed=i) for i, (p, n) in enumerate(MIX[:5])]
    batch = engine.generate(companions[:2] + [req(prompt, "lora", max_tokens=16, temperature=1.0, seed=7)]
                            + companions[2:])
    assert batch[2].text == a.text
    assert gen1(engine, prompt, "lora", max_tokens=16, temperature=1.0, seed=7).text == a.text
    texts = {gen1(engine, prompt, "lora", max_tokens=16, temperature=1.0, seed=s).text for s in range(5)}
    assert len(texts) >= 2, texts
    greedy = gen1(engine, prompt, "lora", max_tokens=16)
    assert gen1(engine, prompt, "lora", max_tokens=16, temperature=0.0, seed=3).text == greedy.text
    assert gen1(engine, prompt, "lora", max_tokens=16, temperature=1.5, top_p=1e-6, seed=3).text == greedy.text
    unseeded = gen1(engine, prompt, None, max_tokens=4, temperature=1.0)
    assert unseeded.completion_tokens == 4 and unseeded.finish_reason == "length"
    assert_idle(engine)


# ---------------------------------------------------------------------------------------------------- finishing


def test_stop_strings_and_length(engine):
    prompt = PROMPTS_MORE[4]
    full = gen1(engine, prompt, "qv", max_tokens=24)
    assert full.finish_reason == "length" and full.completion_tokens == 24
    stop = full.text[8:11]
    assert stop.strip() and full.text.find(stop) >= 0
    g = gen1(engine, prompt, "qv", max_tokens=24, stop=("zzzz-never", stop))
    assert g.finish_reason == "stop" and g.text == full.text[:full.text.find(stop)]
    assert g.completion_tokens < 24
    one = gen1(engine, prompt, "qv", max_tokens=1)
    assert one.finish_reason == "length" and one.completion_tokens == 1
    assert_idle(engine)


def test_eos_finishes_with_stop(engine, monkeypatch):
    """The tiny base rarely emits its eos on these prompts: declare its third greedy token an eos."""
    prompt = PROMPTS_MORE[1]
    ids = engine.tokenizer(prompt).input_ids
    full = gen1(engine, prompt, "dora", max_tokens=6, logprobs=0)
    out_ids = engine.tokenizer(prompt + full.text).input_ids[len(ids):]
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {out_ids[2]})
    g = gen1(engine, prompt, "dora", max_tokens=6, logprobs=0)
    assert g.finish_reason == "stop" and g.completion_tokens == 3
    assert g.text == engine.tokenizer.decode(out_ids[:2])
    assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in full.logprobs[:3]], abs=1e-5)


# ---------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("params", [{"max_tokens": 20}, {"max_tokens": 20, "logprobs": 3},
                                    {"max_tokens": 30, "temperature": 1.0, "seed": 11}])
def test_stream_equals_generate(engine, params):
    for prompt, name in MIX[:4]:
        want = gen1(engine, prompt, name, **params)
        deltas = list(engine.stream(req(prompt, name, **params)))
        assert "".join(d.text for d in deltas) == want.text
        assert all(d.final is None for d in deltas[:-1]) and deltas[-1].final is not None
        final = deltas[-1].final
        assert final.text == want.text and final.finish_reason == want.finish_reason
        assert final.stats == pytest.approx(want.stats, rel=1e-4, abs=1e-5)
        if params.get("logprobs") is not None:
            streamed = [t for d in deltas for t in (d.logprobs or [])]
            assert [(t.token, len(t.top)) for t in streamed] == [(t.token, len(t.top)) for t in want.logprobs]
    assert_idle(engine)


def test_stream_with_stop_string(engine):
    prompt = PROMPTS_MORE[4]
    full = gen1(engine, prompt, "rslora", max_tokens=24)
    stop = full.text[6:10]
    want = gen1(engine, prompt, "rslora", max_tokens=24, stop=(stop,))
    deltas = list(engine.stream(req(prompt, "rslora", max_tokens=24, stop=(stop,))))
    assert "".join(d.text for d in deltas) == want.text == full.text[:full.text.find(stop)]
    assert deltas[-1].final.finish_reason == "stop"


def test_stream_closed_early_frees_its_row(engine, adapters):
    steps = engine.steps
    it = engine.stream(req(PROMPTS_MORE[3], "lora", max_tokens=400))
    first = next(it)
    assert first.final is None
    it.close()
    assert_idle(engine)
    assert engine.steps - steps < 100  # dropped at once, not decoded on to max_tokens for nobody
    engine.unload(KEYS["lora"])  # not pinned by the abandoned stream
    engine.load(KEYS["lora"], adapters["lora"])
    assert gen1(engine, PROMPTS[0], "lora", max_tokens=3).completion_tokens == 3


# ---------------------------------------------------------------------------------------------------- logprobs


def test_logprobs_top_k_and_chosen_match_reference(engine, refs):
    prompt = PROMPTS_MORE[0]
    ids = engine.tokenizer(prompt).input_ids
    g = gen1(engine, prompt, "rslora", max_tokens=8, logprobs=5)
    want_ids, want_logp = refs.greedy("rslora", ids, 8)
    assert len(g.logprobs) == 8
    for step, t in enumerate(g.logprobs):
        assert len(t.top) == 5 and t.top[0][0] == t.token  # greedy: the chosen token is the best
        assert t.logprob == pytest.approx(float(want_logp[step, want_ids[step]]), abs=1e-4)
        top_v = want_logp[step].topk(5).values.tolist()
        assert [lp for _, lp in t.top] == pytest.approx(top_v, abs=1e-4)
    # the chosen log-probs are the prompt-scored ones of the same token sequence
    scored = refs.prompt_logprobs("rslora", ids + want_ids)[0][len(ids) - 1:]
    assert [t.logprob for t in g.logprobs] == pytest.approx(scored.tolist(), abs=1e-4)
    none = gen1(engine, prompt, "rslora", max_tokens=2)
    assert none.logprobs is None
    zero = gen1(engine, prompt, "rslora", max_tokens=2, logprobs=0)
    assert [len(t.top) for t in zero.logprobs] == [0, 0]


# ---------------------------------------------------------------------------------------------------- errors


def test_request_errors_are_per_request(engine):
    out = engine.generate([req(PROMPTS[0], "lora", max_tokens=4),
                           GenerationRequest(PROMPTS[1], "nope@1", SamplingParams(max_tokens=4)),
                           req("word " * 600, None, max_tokens=4),
                           req(PROMPTS[2], None, max_tokens=500),
                           req(PROMPTS[2], "dora", max_tokens=4)])
    assert isinstance(out[0], Generation) and isinstance(out[4], Generation)
    assert isinstance(out[1], AdapterNotLoaded) and "nope@1" in str(out[1])
    assert isinstance(out[2], ContextLengthExceeded) and isinstance(out[3], ContextLengthExceeded)
    assert out[0].text == gen1(engine, PROMPTS[0], "lora", max_tokens=4).text
    with pytest.raises(AdapterNotLoaded):
        engine.stream(GenerationRequest(PROMPTS[0], "nope@1"))
    with pytest.raises(AdapterNotLoaded):
        engine.prompt_logprobs(PROMPTS[:1], "nope@1")
    with pytest.raises(ContextLengthExceeded):
        engine.prompt_logprobs(["word " * 600], None)
    with pytest.raises(AdapterNotLoaded):
        engine.unload("nope@1")
    assert_idle(engine)


def test_load_errors(engine, adapters, tmp_path):
    with pytest.raises(AdapterLoadError, match="trained on base"):
        engine.load("bad@1", adapters["lora"], base_sha256="0" * 64)
    engine.load("same@1", adapters["qv"], base_sha256="sha256:" + engine.base_sha256)  # the right base is fine
    engine.unload("same@1")
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        engine.load("bad@1", tmp_path)
    broken = shutil.copytree(adapters["lora"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match="cannot read"):
        engine.load("bad@1", broken)
    bad_cfg = shutil.copytree(adapters["lora"], tmp_path / "badcfg")
    (bad_cfg / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="config"):
        engine.load("bad@1", bad_cfg)
    variant = shutil.copytree(adapters["lora"], tmp_path / "variant")
    cfg = json.loads((variant / "adapter_config.json").read_text())
    (variant / "adapter_config.json").write_text(json.dumps({**cfg, "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(AdapterLoadError, match="alora_invocation_tokens"):
        engine.load("bad@1", variant)
    big = _make(tmp_path / "r32", 9, r=32, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AdapterLoadError, match="max_lora_rank 16"):
        engine.load("big@1", big)
    emb = _make(tmp_path / "emb", 9, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterLoadError):
        engine.load("emb@1", emb)
    assert "bad@1" not in engine.loaded() and "big@1" not in engine.loaded() and "emb@1" not in engine.loaded()
    assert all(s is None or s.key in KEYS.values() for s in engine._slots)
    # the engine still serves every adapter it holds, unchanged
    assert gen1(engine, PROMPTS[0], "lora", max_tokens=4).completion_tokens == 4


# ---------------------------------------------------------------------------------------------------- adapters


def test_reload_idempotent_and_replace(engine, adapters):
    before = gen1(engine, PROMPTS[0], "qv", max_tokens=6).text
    engine.load(KEYS["qv"], adapters["qv"])  # same path: no-op
    assert gen1(engine, PROMPTS[0], "qv", max_tokens=6).text == before
    engine.load(KEYS["qv"], adapters["lora"])  # another path replaces it
    assert gen1(engine, PROMPTS[0], "qv", max_tokens=6).text == gen1(engine, PROMPTS[0], "lora", max_tokens=6).text
    engine.load(KEYS["qv"], adapters["qv"])
    assert gen1(engine, PROMPTS[0], "qv", max_tokens=6).text == before
    assert sorted(engine.loaded()) == sorted(KEYS.values())
    assert_idle(engine)


def test_unload_while_other_adapters_run(engine, adapters):
    engine.load("tmp@1", adapters["dora"])
    long_items = [(PROMPTS_MORE[3], "lora"), (PROMPTS_MORE[4], "r16")]
    solo = _solo(engine, long_items, max_tokens=80)
    results: list = []
    t = threading.Thread(target=lambda: results.extend(
        engine.generate([req(p, n, max_tokens=80) for p, n in long_items])))
    t.start()
    deadline = time.monotonic() + 30
    while engine.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.unload("tmp@1")  # not used by the running requests: returns at once
    assert "tmp@1" not in engine.loaded()
    [gone] = engine.generate([GenerationRequest(PROMPTS[0], "tmp@1")])
    assert isinstance(gone, AdapterNotLoaded)
    t.join(timeout=60)
    assert [r.text for r in results] == [s.text for s in solo]
    assert_idle(engine)


def test_unload_waits_for_its_own_running_requests(engine, adapters):
    engine.load("tmp@2", adapters["r16"])
    want = gen1(engine, PROMPTS_MORE[3], None, max_tokens=60).text
    results: list = []
    t = threading.Thread(target=lambda: results.extend(engine.generate([
        GenerationRequest(PROMPTS_MORE[3], "tmp@2", SamplingParams(max_tokens=60)),
        req(PROMPTS_MORE[3], None, max_tokens=60)])))
    t.start()
    deadline = time.monotonic() + 30
    while engine.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.unload("tmp@2")
    assert all(s is None or s.key != "tmp@2" for s in engine._slots)  # freed once its request finished
    t.join(timeout=60)
    assert isinstance(results[0], Generation) and results[0].completion_tokens == 60
    assert results[1].text == want
    assert_idle(engine)


def test_lru_eviction_and_max_seq_len(adapters):
    eng = BuiltinEngine(BASE, max_loras=2, max_batch=4, max_seq_len=40)
    try:
        eng.load("a@1", adapters["lora"])
        eng.load("b@1", adapters["qv"])
        [a] = eng.generate([GenerationRequest(PROMPTS[0], "a@1", SamplingParams(max_tokens=4))])  # a: most recent
        eng.load("c@1", adapters["dora"])
        assert eng.loaded() == ["a@1", "c@1"]
        out = eng.generate([GenerationRequest(PROMPTS[0], "b@1", SamplingParams(max_tokens=4)),
                            GenerationRequest(PROMPTS[0], "a@1", SamplingParams(max_tokens=4))])
        assert isinstance(out[0], AdapterNotLoaded) and out[1].text == a.text
        # the KV cache holds max_seq_len positions: longer is refused, exactly max_seq_len is served
        n = len(eng.tokenizer(PROMPTS[0]).input_ids)
        with pytest.raises(ContextLengthExceeded, match="max_seq_len"):
            gen1(eng, PROMPTS[0], "c@1", max_tokens=40 - n + 1)
        g = gen1(eng, PROMPTS[0], "c@1", max_tokens=40 - n)
        assert g.completion_tokens == 40 - n
        assert_idle(eng)
    finally:
        eng.close()


def test_evicted_slot_serves_the_new_adapter(adapters, engine):
    eng = BuiltinEngine(BASE, max_loras=1, max_batch=2)
    try:
        eng.load("a@1", adapters["lora"])
        eng.load("b@1", adapters["dora"])  # evicts a@1 into the same slot
        assert eng.loaded() == ["b@1"]
        for prompt in PROMPTS[:2]:
            assert gen1(eng, prompt, None, max_tokens=8).text == gen1(engine, prompt, None, max_tokens=8).text
            [b] = eng.generate([GenerationRequest(prompt, "b@1", SamplingParams(max_tokens=8))])
            assert b.text == gen1(engine, prompt, "dora", max_tokens=8).text
    finally:
        eng.close()


# ---------------------------------------------------------------------------------------------------- lifecycle


def test_close_is_idempotent_and_stops_the_thread(adapters):
    eng = BuiltinEngine(BASE, max_batch=2)
    eng.load("a@1", adapters["lora"])
    assert eng.health()["status"] == "ok"
    eng.close()
    assert not eng._thread.is_alive()
    eng.close()
    [out] = eng.generate([GenerationRequest(PROMPTS[0], None)])
    assert isinstance(out, EngineError)
    with pytest.raises(EngineError):
        eng.stream(GenerationRequest(PROMPTS[0], None))
    with pytest.raises(EngineError):
        eng.health()
    with pytest.raises(EngineError):
        eng.prompt_logprobs(PROMPTS[:1], None)
    with pytest.raises(EngineError):
        eng.load("b@1", adapters["qv"])


def test_close_answers_requests_in_flight(adapters):
    eng = BuiltinEngine(BASE, max_batch=2)
    results: list = []
    t = threading.Thread(target=lambda: results.extend(eng.generate(
        [GenerationRequest(PROMPTS[i % 3], None, SamplingParams(max_tokens=400)) for i in range(4)])))
    t.start()
    deadline = time.monotonic() + 30
    while eng.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    eng.close()
    t.join(timeout=30)
    assert not t.is_alive() and len(results) == 4
    assert all(isinstance(r, (Generation, EngineError)) for r in results), results
    assert any(isinstance(r, EngineError) for r in results)


@pytest.mark.parametrize("where", ["_prefill", "_decode"])
def test_scheduler_failure_answers_every_request(adapters, monkeypatch, where):
    eng = BuiltinEngine(BASE, max_batch=2)
    try:
        boom = RuntimeError("planted failure")

        def fail(*a, **k):
            raise boom

        monkeypatch.setattr(eng, where, fail)
        results: list = []
        t = threading.Thread(target=lambda: results.extend(eng.generate(
            [GenerationRequest(PROMPTS[i % 3], None, SamplingParams(max_tokens=8)) for i in range(4)])))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "generate hung after the scheduler died"
        assert len(results) == 4 and all(isinstance(r, EngineError) for r in results), results
        assert "planted failure" in str(results[0])
        with pytest.raises(EngineError, match="planted failure"):
            eng.health()
        [again] = eng.generate([GenerationRequest(PROMPTS[0], None)])
        assert isinstance(again, EngineError)
        with pytest.raises(EngineError):
            list(eng.stream(GenerationRequest(PROMPTS[0], None)))
    finally:
        eng.close()


def test_a_non_finite_adapter_is_refused_and_a_non_finite_row_fails_alone(engine, adapters, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    nan = shutil.copytree(adapters["qv"], tmp_path / "nan")
    f = nan / "adapter_model.safetensors"
    save_file({k: (v.clone().fill_(float("nan")) if "lora_B" in k else v) for k, v in load_file(str(f)).items()},
              str(f))
    with pytest.raises(AdapterLoadError, match="non-finite"):  # in the packs it would poison every mixed batch
        engine.load("nan@1", nan)
    assert "nan@1" not in engine.loaded()

    # at run time (an overflow): that request fails, its batch companions do not notice, its KV rows are cleared
    real = engine._sample_and_advance

    def poison(seqs, logits):
        for i, s in enumerate(seqs):
            if s.req.request_id == "poison" and s.steps == 2:
                logits[i] = float("nan")
                engine.k_cache[:, s.row] = float("nan")
                engine.v_cache[:, s.row] = float("nan")
        return real(seqs, logits)

    monkeypatch.setattr(engine, "_sample_and_advance", poison)
    items = [(PROMPTS[0], "lora"), (PROMPTS[1], "qv"), (PROMPTS[2], None), (PROMPTS[0], "dora")]
    solo = [gen1(engine, p, n, max_tokens=6) for p, n in items]
    batch = [req(p, n, max_tokens=6) for p, n in items]
    batch[1].request_id = "poison"
    out = engine.generate(batch)
    assert isinstance(out[1], EngineError) and "non-finite" in str(out[1]) and "poison" in str(out[1])
    assert [o.text for i, o in enumerate(out) if i != 1] == [s.text for i, s in enumerate(solo) if i != 1]
    assert_idle(engine)
    names = (None, "lora", "qv", "dora")
    want = {n: gen1(engine, PROMPTS_MORE[3], n, max_tokens=6).text for n in names}
    again = engine.generate([req(PROMPTS_MORE[3], n, max_tokens=6) for n in names] * 2)  # every row, the failed one too
    assert [g.text for g in again] == [want[n] for n in names] * 2


def test_unload_timeout_and_all_slots_busy(adapters, monkeypatch):
    eng = BuiltinEngine(BASE, max_loras=1, max_batch=2)
    try:
        eng.load("a@1", adapters["lora"])
        results: list = []
        t = threading.Thread(target=lambda: results.extend(eng.generate(
            [GenerationRequest(PROMPTS_MORE[3], "a@1", SamplingParams(max_tokens=300))])))
        t.start()
        deadline = time.monotonic() + 30
        while eng.health()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(AdapterLoadError, match="max_loras=1"):  # its one slot is pinned by a running request
            eng.load("b@1", adapters["qv"])
        monkeypatch.setattr(eng, "unload_timeout_s", 0.05)
        with pytest.raises(EngineError, match="still use it"):
            eng.unload("a@1")
        assert eng.loaded() == []
        t.join(timeout=60)
        assert isinstance(results[0], Generation) and results[0].completion_tokens == 300  # served to the end
        assert_idle(eng)
        assert eng._slots == [None, None]  # freed when its last request finished
        eng.load("b@1", adapters["qv"])
    finally:
        eng.close()


def test_a_stuck_scheduler_answers_with_engine_error(adapters, monkeypatch):
    eng = BuiltinEngine(BASE, max_batch=2, request_timeout_s=1.0)
    release = threading.Event()
    real_decode = eng._decode

    def stuck(running):
        release.wait(30)
        return real_decode(running)

    monkeypatch.setattr(eng, "_decode", stuck)
    try:
        t0 = time.monotonic()
        out = eng.generate([GenerationRequest(PROMPTS[i], None, SamplingParams(max_tokens=4)) for i in range(3)])
        assert all(isinstance(o, EngineError) and "no progress" in str(o) for o in out), out
        assert time.monotonic() - t0 < 6  # one timeout for the whole batch (two running, one queued), not three
        it = eng.stream(GenerationRequest(PROMPTS[1], None, SamplingParams(max_tokens=4)))
        with pytest.raises(EngineError, match="no progress"):
            list(it)
        release.set()
        assert_idle(eng)  # the scheduler, unstuck, drops both requests and frees their rows
        monkeypatch.setattr(eng, "_decode", real_decode)
        assert gen1(eng, PROMPTS[0], None, max_tokens=3).completion_tokens == 3
    finally:
        release.set()
        eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_engine_is_as_close_to_fp32_as_transformers_in_bf16(adapters, refs, device):
    """bf16 (the default on a GPU, with CUDA graphs): its distance to the fp32 reference is no worse than that of
    transformers + PEFT run in bf16 on the same device (random-init adapters have near-ties, so a bare top-1 threshold
    would measure the adapters, not the engine)."""
    eng = BuiltinEngine(BASE, device=device, dtype=torch.bfloat16, max_batch=16)
    try:
        assert eng.cuda_graphs == (device == "cuda")
        for name in ("lora", "dora", "pissa"):
            eng.load(KEYS[name], adapters[name])
        for name in (None, "lora", "dora", "pissa"):
            hf = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
            if name is not None:
                hf = PeftModel.from_pretrained(hf, str(adapters[name]))
            hf = hf.to(device).eval()
            err = {"engine": [], "hf": []}
            agree = {"engine": 0, "hf": 0}
            for pl in eng.prompt_logprobs(PROMPTS_MORE, KEYS.get(name)):
                want, top1 = refs.prompt_logprobs(name, pl.token_ids)
                with torch.no_grad():
                    logits = hf(input_ids=torch.tensor([pl.token_ids], device=device)).logits[0, :-1].float().cpu()
                hf_logp = torch.log_softmax(logits, -1)
                hf_lp = hf_logp.gather(-1, torch.tensor(pl.token_ids[1:])[:, None]).squeeze(-1)
                err["engine"].append(torch.tensor(pl.logprobs) - want)
                err["hf"].append(hf_lp - want)
                agree["engine"] += int((torch.tensor(pl.top1_ids) == top1).sum())
                agree["hf"] += int((hf_logp.argmax(-1) == top1).sum())
            e_engine, e_hf = (float(torch.cat(err[k]).abs().mean()) for k in ("engine", "hf"))
            n = sum(len(e) for e in err["engine"])
            assert e_engine <= 2 * e_hf + 0.01, (name, e_engine, e_hf)
            assert agree["engine"] >= agree["hf"] - 0.05 * n, (name, agree, n)
        out = eng.generate([req(q, n, max_tokens=24) for q in PROMPTS_MORE for n in (None, "lora", "dora", "pissa")])
        assert all(isinstance(g, Generation) and g.completion_tokens == 24 for g in out), out
        if device == "cuda":
            assert eng.cuda_graphs and eng._graphs
        assert_idle(eng)
    finally:
        eng.close()


def test_cuda_graphs_need_cuda():
    if CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda_graphs"):
        BuiltinEngine(BASE, cuda_graphs=True)


@pytest.fixture(scope="module")
def biased_base(tmp_path_factory) -> Path:
    """The tiny base made into the other Llama shapes: random q/k/v/o and MLP biases (PEFT adds them outside DoRA's
    scale, and so must the engine), an untied lm_head and YaRN rope scaling (attention_scaling != 1)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("biased-base")
    cfg = AutoConfig.from_pretrained(BASE)
    cfg.attention_bias = cfg.mlp_bias = True
    cfg.tie_word_embeddings = False
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                           "original_max_position_embeddings": 256}
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(BASE).state_dict(), strict=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            if name == "lm_head.weight":
                p.add_(torch.randn_like(p) * 0.02)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(BASE).save_pretrained(root)
    return root


def test_biased_base_with_lora_and_dora(biased_base, tmp_path, monkeypatch):
    monkeypatch.setattr("test_serving_builtin.BASE", biased_base)
    dirs = {n: _make(tmp_path / n, i, **SPECS[n]) for i, n in enumerate(("lora", "dora"), start=20)}
    refs = Refs(dirs)
    eng = BuiltinEngine(biased_base, max_batch=4)
    try:
        assert float(eng.cos[300].abs().max()) > 1.0  # YaRN's attention scaling is in the tables
        assert not torch.equal(eng.lm_head, eng.embed)
        for n, d in dirs.items():
            eng.load(KEYS[n], d)
        for name in (None, "lora", "dora"):
            got = eng.prompt_logprobs(PROMPTS, None if name is None else KEYS[name])
            for pl in got:
                want, top1 = refs.prompt_logprobs(name, pl.token_ids)
                torch.testing.assert_close(torch.tensor(pl.logprobs), want, rtol=0, atol=1e-4)
                assert pl.top1_ids == top1.tolist()
        mixed = eng.generate([req(PROMPTS[0], n, max_tokens=8) for n in (None, "lora", "dora")])
        for g, n in zip(mixed, (None, "lora", "dora")):
            ids = eng.tokenizer(PROMPTS[0]).input_ids
            assert g.text == eng.tokenizer.decode(refs.greedy(n, ids, 8)[0], skip_special_tokens=True)
    finally:
        eng.close()
