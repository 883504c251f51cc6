"""Init cache on the real tiny base: PiSSA's SVD runs once per (base content, config), a hit runs none, corrupt
entries are evicted, bad inputs fail before anything is stored, and the cached init reproduces the base's logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
PISSA = dict(method="pissa", rank=4)


def _quiet(*_a):
    pass


def _run(cfg, store, scratch: Path, base: Path = BASE, log=_quiet):
    from pipelines import init_cache

    return init_cache.run(cfg, base, store, scratch, log=log)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from registry.store import LocalStore

    return LocalStore(tmp_path_factory.mktemp("init-store"))


@pytest.fixture(scope="module")
def pissa_miss(store, tmp_path_factory):
    """The first PiSSA (exact SVD) run against an empty store: a miss."""
    from pipelines.init_cache import InitConfig

    assert store.list() == []
    return _run(InitConfig(**PISSA), store, tmp_path_factory.mktemp("scratch"))


def _forbid_svd(monkeypatch):
    import peft.tuners.lora.layer as lora_layer
    import torch

    def boom(*_a, **_k):
        raise AssertionError("an SVD ran, but a cache hit must not decompose anything")

    # peft's pissa_init calls torch.linalg.svd (exact) and its own module-level `svd_lowrank` (pissa_niter_N)
    monkeypatch.setattr(torch.linalg, "svd", boom)
    monkeypatch.setattr(torch, "svd_lowrank", boom)
    monkeypatch.setattr(torch, "svd", boom)
    monkeypatch.setattr(lora_layer, "svd_lowrank", boom)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def _prompt_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    return tok(["### Customer: where is my order?\n### Agent:", "### Customer: I want to cancel my account\n"
                "### Agent: Sure"], return_tensors="pt", padding=True).input_ids


def test_pissa_miss_stores_a_complete_entry(pissa_miss, store):
    import json

    assert not pissa_miss.hit
    entry = pissa_miss.path
    assert (entry / "residual.safetensors").is_file()
    assert (entry / "initial_adapter" / "adapter_config.json").is_file()
    assert (entry / "initial_adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"] == pissa_miss.key and manifest["kind"] == "init_cache"
    assert manifest["config"]["method"] == "pissa" and manifest["config"]["svd_niter"] is None
    # loading the initial adapter must never re-run the SVD
    assert json.loads((entry / "initial_adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert store.exists(pissa_miss.key) and store.verify(pissa_miss.key) == []
    stored = set(store.index(pissa_miss.key)["files"])
    assert {"residual.safetensors", "manifest.json", "initial_adapter/adapter_model.safetensors"} <= stored


def test_second_run_is_a_hit_and_runs_no_svd(pissa_miss, store, tmp_path, monkeypatch):
    from pipelines.init_cache import InitConfig
    from pipelines.lm import build_model
    from registry.hashing import tree_hash

    _forbid_svd(monkeypatch)
    hit = _run(InitConfig(**PISSA), store, tmp_path / "scratch")
    assert hit.hit and hit.key == pissa_miss.key
    assert tree_hash(hit.path) == tree_hash(pissa_miss.path)
    build_model(BASE, hit.path, trainable=False)  # the way training consumes a hit: still no SVD


def test_different_base_is_a_miss_with_a_different_key(pissa_miss, store, tmp_path):
    from pipelines.init_cache import InitConfig
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(BASE, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})

    res = _run(InitConfig(**PISSA), store, tmp_path / "scratch", base=other)
    assert not res.hit
    assert res.key != pissa_miss.key
    assert store.exists(res.key) and store.exists(pissa_miss.key)


def test_corrupted_entry_is_evicted_and_recomputed(tmp_path):
    from pipelines.init_cache import InitConfig
    from registry.store import LocalStore
    from safetensors.torch import load_file

    store = LocalStore(tmp_path / "store")
    first = _run(InitConfig(**PISSA), store, tmp_path / "scratch1")
    original = load_file(str(first.path / "residual.safetensors"))
    stored = store.root / first.key / "residual.safetensors"
    blob = bytearray(stored.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 16] = bytes(b ^ 0xFF for b in blob[mid : mid + 16])
    stored.write_bytes(bytes(blob))
    assert store.verify(first.key), "the flipped bytes should make the stored entry fail verification"

    messages: list[str] = []
    again = _run(InitConfig(**PISSA), store, tmp_path / "scratch2", log=messages.append)
    assert not again.hit and again.key == first.key
    assert any("corrupt" in m and "evict" in m for m in messages), messages
    assert store.verify(first.key) == []
    recomputed = load_file(str(again.path / "residual.safetensors"))
    assert set(recomputed) == set(original)
    for name, t in original.items():
        assert (recomputed[name] - t).abs().max() < 1e-5, name


def test_pissa_fast_svd(store, pissa_miss, tmp_path, monkeypatch):
    import peft.tuners.lora.layer as lora_layer
    import torch
    from pipelines.init_cache import InitConfig
    from pipelines.lm import build_model, load_base

    calls = []
    real = lora_layer.svd_lowrank

    def spy(*a, **k):
        calls.append(k.get("niter"))
        return real(*a, **k)

    monkeypatch.setattr(lora_layer, "svd_lowrank", spy)
    fast = _run(InitConfig(**PISSA, svd_niter=2), store, tmp_path / "scratch")
    assert not fast.hit and fast.key != pissa_miss.key
    assert calls and set(calls) == {2}, f"PEFT's randomized SVD should run with niter=2 (calls: {calls})"
    assert (fast.path / "residual.safetensors").is_file()

    ids = _prompt_ids()
    want = _logits(load_base(BASE).eval(), ids)
    got = _logits(build_model(BASE, fast.path, trainable=False).eval(), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides, base, error, match",
    [
        (dict(target_modules=("qkv_fused",)), None, ValueError, r"\['qkv_fused'\] match no linear layer"),
        (dict(rank=200, target_modules=("k_proj",)), None, ValueError, r"rank 200 exceeds the smaller dimension"),
        ({}, "missing", FileNotFoundError, r"missing-base"),
        (dict(device="gpu"), None, ValueError, r"init device 'gpu' is not usable on this machine .*--device cpu"),
    ],
    ids=["targets-match-nothing", "rank-too-large", "missing-base", "unknown-device"],
)
def test_bad_input_fails_clearly_and_stores_nothing(tmp_path, overrides, base, error, match):
    from pipelines.init_cache import InitConfig
    from registry.store import LocalStore

    store = LocalStore(tmp_path / "store")
    base_path = tmp_path / "missing-base" if base == "missing" else BASE
    with pytest.raises(error, match=match):
        _run(InitConfig(**{**PISSA, **overrides}), store, tmp_path / "scratch", base=base_path)
    assert store.list() == []
    assert [p for p in store.root.rglob("*") if p.is_file()] == []
    scratch = tmp_path / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_missing_base_error_says_the_directory_is_missing(tmp_path):
    from pipelines.init_cache import InitConfig
    from registry.store import LocalStore

    with pytest.raises(FileNotFoundError) as err:
        _run(InitConfig(**PISSA), LocalStore(tmp_path / "store"), tmp_path / "scratch", base=tmp_path / "nope")
    assert "safetensors" not in str(err.value) and ("config.json" in str(err.value) or "exist" in str(err.value))


def test_build_model_reproduces_the_base_before_training(pissa_miss):
    """PiSSA moves the top singular directions into the adapter: W_res + s*B@A must give back W."""
    import torch
    from pipelines.lm import build_model, load_base

    base = load_base(BASE).eval()
    model = build_model(BASE, pissa_miss.path, trainable=False).eval()
    w = dict(base.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    w_res = layer.get_base_layer().weight
    assert (w_res - w).abs().max() > 1e-2, "the residual should differ from W (the principal part moved out)"
    rebuilt = w_res + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(rebuilt, w, atol=1e-4, rtol=0)

    ids = _prompt_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("svd_niter", [None, 2], ids=["exact-svd", "fast-svd"])
def test_layer_by_layer_init_equals_peft_whole_model_init(tmp_path, svd_niter):
    """compute() initialises one layer at a time; with the same seed it must give exactly what PEFT's get_peft_model
    gives for the whole model (fast SVD included: the RNG is consumed in the same order)."""
    import re

    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from pipelines.init_cache import InitConfig, compute
    from pipelines.lm import load_base
    from safetensors.torch import load_file

    cfg = InitConfig(**PISSA, svd_niter=svd_niter)
    messages: list[str] = []
    entry = compute(BASE, cfg, tmp_path / "entry", log=messages.append)
    torch.manual_seed(cfg.seed)
    whole = get_peft_model(load_base(BASE), cfg.lora_config())

    want_adapter = get_peft_model_state_dict(whole)
    got_adapter = load_file(str(entry / "initial_adapter" / "adapter_model.safetensors"))
    assert got_adapter.keys() == want_adapter.keys() and len(got_adapter) == 2 * 28
    for name, t in want_adapter.items():
        assert torch.equal(got_adapter[name], t), name
    residual = load_file(str(entry / "residual.safetensors"))
    bases = {n.replace(".base_layer", ""): p for n, p in whole.base_model.model.named_parameters() if ".base_layer." in n}
    assert residual.keys() == bases.keys()
    for name, t in bases.items():
        assert torch.equal(residual[name], t), name

    progress = [m for m in messages if m.startswith("init layer ")]
    assert len(progress) == 28
    assert re.fullmatch(r"init layer 1/28 model\.layers\.0\.self_attn\.q_proj \(\d+\.\d+s\)", progress[0]), progress[0]
    assert progress[-1].startswith("init layer 28/28 model.layers.3.mlp.down_proj ")


def test_qpissa_reuses_the_pissa_weights_and_its_hit_runs_no_svd(pissa_miss, store, tmp_path, monkeypatch):
    """QPiSSA's entry holds PiSSA's fp32 weights under its own key: after a PiSSA miss it is stored without an SVD,
    a hit runs none either, and build_model quantizes the residual (nf4 base, fp32 adapter)."""
    import json

    from pipelines.init_cache import InitConfig
    from pipelines.lm import build_model
    from registry.hashing import sha256_file

    _forbid_svd(monkeypatch)
    messages: list[str] = []
    first = _run(InitConfig(method="qpissa", rank=4), store, tmp_path / "scratch1", log=messages.append)
    assert not first.hit and first.key != pissa_miss.key and first.key.startswith("init/qpissa-r4-")
    assert any("reusing the weights of " + pissa_miss.key in m for m in messages), messages
    for rel in ("residual.safetensors", "initial_adapter/adapter_model.safetensors"):
        assert sha256_file(first.path / rel) == sha256_file(pissa_miss.path / rel), rel
    config = json.loads((first.path / "manifest.json").read_text())["config"]
    assert config["method"] == "pissa" and config["base_quant"] == "nf4"

    hit = _run(InitConfig(method="pissa", base_quant="nf4", rank=4), store, tmp_path / "scratch2")
    assert hit.hit and hit.key == first.key
    model = build_model(BASE, hit.path, trainable=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer().weight).__name__ == "Params4bit"
    assert layer.lora_A["default"].weight.requires_grad and not layer.get_base_layer().weight.requires_grad


def test_quantized_base_without_bitsandbytes_fails_before_any_work(tmp_path, monkeypatch):
    import sys

    from pipelines.init_cache import InitConfig
    from registry.store import LocalStore

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is missing
    store = LocalStore(tmp_path / "store")
    messages: list[str] = []
    with pytest.raises(RuntimeError, match=r"base_quant nf4 \(QLoRA / QPiSSA\) needs bitsandbytes.*--base-quant none"):
        _run(InitConfig(method="qpissa", rank=4), store, tmp_path / "scratch", log=messages.append)
    assert messages == [] and store.list() == []
    assert not (tmp_path / "scratch").exists()


def test_s3_endpoint_down_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    """Down from the start: the error comes before any SVD. Down after the SVD: the upload fails, nothing is kept."""
    import boto3
    from moto.server import ThreadedMotoServer
    from pipelines.init_cache import InitConfig
    from registry.store import S3Store, StoreUnreachable

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    down = S3Store("init-cache", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=1)
    messages: list[str] = []
    with pytest.raises(StoreUnreachable, match=r"S3 endpoint http://127\.0\.0\.1:9 is unreachable: .*start it or fix"):
        _run(InitConfig(**PISSA), down, tmp_path / "scratch", log=messages.append)
    assert not any(m.startswith("init layer") for m in messages), "no SVD should run against a store that is down"

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="init-cache")
        store = S3Store("init-cache", endpoint_url=endpoint, max_attempts=1, connect_timeout=1)

        def stop_after_the_svd(msg: str) -> None:
            if msg.startswith("init pissa r=4 on cpu"):
                server.stop()

        with pytest.raises(StoreUnreachable, match=r"S3 endpoint .* is unreachable"):
            _run(InitConfig(**PISSA), store, tmp_path / "scratch", log=stop_after_the_svd)
    finally:
        server.stop()
    scratch = tmp_path / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())


def test_method_aliases_and_quantized_dora():
    from pipelines.init_cache import InitConfig, cache_key

    assert InitConfig(method="qlora") == InitConfig(method="lora", base_quant="nf4")
    assert InitConfig(method="qpissa", svd_niter=4) == InitConfig(method="pissa", base_quant="nf4", svd_niter=4)
    assert cache_key("ab", InitConfig(method="qlora")) != cache_key("ab", InitConfig(method="lora"))
    with pytest.raises(ValueError, match="base_quant nf4 does not support dora"):
        InitConfig(method="dora", base_quant="nf4")
    with pytest.raises(ValueError, match="base_quant 'int4' is not one of none, nf4"):
        InitConfig(base_quant="int4")
