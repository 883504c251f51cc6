"""Merge + quantize behind logit gates, on real trained adapters of the tiny base with real bitsandbytes (CPU).

Quantization top-1 bounds are loosened for the tiny base at this eval size (16 sequences of 64 tokens); the values
measured at the time of writing are in the comments and printed by test_clean_merge_passes_the_gates (-s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models" / "tiny-llama"
SMALL = dict(eval_examples=16, golden_prompts=4, max_len=64, reference_windows=4)


def _quiet(*_a):
    pass


def _merge_config(quantize: str, **gates):
    from pipelines.merge_quantize import GateConfig, MergeConfig, QuantThresholds

    # Measured on 12-step adapters (16 x 64 tokens): nf4 KL mean 0.039-0.040, p99 0.20-0.21, top-1 0.81 (PiSSA) /
    # 0.87 (LoRA); int8 KL mean 0.0007, p99 0.0034, top-1 0.975 / 0.986. The shipped top-1 bounds (0.85, 0.97) sit
    # inside that spread, so they are loosened here; the KL bounds are the shipped ones.
    quant = {"nf4": QuantThresholds(kl_mean=0.06, kl_p99=0.6, top1=0.75),
             "int8": QuantThresholds(kl_mean=0.005, kl_p99=0.08, top1=0.93)}
    return MergeConfig(quantize=quantize, **SMALL, gates=GateConfig(quant=quant, **gates))


def _run(cfg, adapter: Path, val: Path, out: Path, log=_quiet):
    from pipelines import merge_quantize

    return merge_quantize.run(cfg, BASE, adapter, val, out, log=log)


def _no_output_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind by a failed merge"
    assert not out.with_name(f".{out.name}.partial").exists(), "a staging directory was left behind"


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_clean_merge_passes_the_gates(trained, tiny_data, tmp_path, method, quantize):
    from serving.parity import GOLDEN_FILE, load_golden

    adapter = trained(method) / "adapter"
    out = _run(_merge_config(quantize), adapter, tiny_data.val, tmp_path / "merged")
    report = json.loads((out / "gates.json").read_text())
    values = {g["name"]: round(g["value"], 6) for g in report["gates"]}
    print(f"\n{method}/{quantize}: {values}")
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert {"merged_cosine", "merged_max_abs", "merged_top1", "merged_weights_max_rel", "forgetting_ppl_rise",
            "task_val_loss_delta", f"{quantize}_kl_mean", f"{quantize}_kl_p99", f"{quantize}_top1"} == set(values)
    assert values["merged_max_abs"] < 1e-3 and values["merged_top1"] == 1.0
    assert "Verdict: **PASS**" in (out / "gates.md").read_text()
    assert (out / "merged" / "model.safetensors").is_file() and (out / "quantized" / "config.json").is_file()
    golden = load_golden(out / "golden" / GOLDEN_FILE)
    assert len(golden.prompts) == 4 and golden.logits.shape[0] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gates_passed"] is True and manifest["kind"] == "merged"

    messages: list[str] = []
    assert _run(_merge_config(quantize), adapter, tiny_data.val, out, log=messages.append) == out
    assert any("reusing" in m for m in messages), messages
    assert json.loads((out / "manifest.json").read_text())["created"] == manifest["created"]


def test_strict_gates_fail_with_a_report(trained, tiny_data, tmp_path):
    from pipelines.merge_quantize import GateFailed, QuantThresholds

    cfg = _merge_config("nf4", forgetting_max_rise=0.0)
    cfg.gates.quant["nf4"] = QuantThresholds(kl_mean=1e-9, kl_p99=0.6, top1=0.75)
    out = tmp_path / "merged"
    with pytest.raises(GateFailed, match=r"forgetting_ppl_rise = .*threshold <= 0\.0.*nf4_kl_mean = .*<= 1e-09"):
        _run(cfg, trained("lora") / "adapter", tiny_data.val, out)
    report = json.loads((out / "gates.json").read_text())
    assert not report["passed"]
    assert {g["name"] for g in report["gates"] if not g["passed"]} == {"forgetting_ppl_rise", "nf4_kl_mean"}
    assert "**FAIL**" in (out / "gates.md").read_text()
    with pytest.raises(GateFailed, match="nf4_kl_mean"):  # the stored failure is not mistaken for a pass on rerun
        _run(cfg, trained("lora") / "adapter", tiny_data.val, out)


def test_cli_merge_exits_1_with_the_gate_report(trained, tiny_data, tmp_path):
    import yaml

    config = tmp_path / "strict.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "gates": {"forgetting_max_rise": 0.0}}))
    report_file = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "merge", "--base", str(BASE), "--adapter",
         str(trained("lora") / "adapter"), "--quantize", "int8", "--out", str(tmp_path / "merged"), "--val",
         str(tiny_data.val), "--config", str(config), "--report-json", str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "forgetting_ppl_rise" in proc.stderr
    report = json.loads(report_file.read_text())
    assert not report["passed"]
    by_name = {g["name"]: g for g in report["gates"]}
    assert {"value", "threshold", "op", "passed"} <= set(by_name["forgetting_ppl_rise"])
    assert by_name["forgetting_ppl_rise"]["threshold"] == 0.0 and not by_name["forgetting_ppl_rise"]["passed"]
    assert by_name["merged_cosine"]["passed"] and "int8_kl_mean" in by_name


def test_yaml_exponent_without_dot_is_not_taken_as_a_string(tmp_path):
    """YAML 1.1 reads `1e-9` as the string '1e-9'; a gate threshold must not silently become a str (the gate would then
    compare float <= str and crash with a TypeError mid-merge)."""
    from pipelines.config import ConfigError, load
    from pipelines.merge_quantize import MergeConfig

    config = tmp_path / "merge.yaml"
    config.write_text("gates:\n  forgetting_max_rise: 1e-9\n")
    try:
        value = load(MergeConfig, config).gates.forgetting_max_rise
    except ConfigError as e:
        assert "forgetting_max_rise" in str(e)
        return
    assert isinstance(value, float), f"forgetting_max_rise loaded as {value!r} ({type(value).__name__})"


def test_adapter_for_another_shape_is_refused(tiny_data, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    lora = get_peft_model(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "foreign")
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"does not fit base .*shapes or module names differ"):
        _run(_merge_config("nf4"), tmp_path / "foreign", tiny_data.val, out)
    _no_output_left(out)


def test_nan_in_adapter_weights_is_refused(trained, tiny_data, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(trained("lora") / "adapter", adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"non-finite values in .*lora_B"):
        _run(_merge_config("nf4"), adapter, tiny_data.val, out)
    _no_output_left(out)


def test_adapter_for_another_architecture_is_refused(tiny_data, tmp_path):
    """An adapter whose target modules the base does not have (a GPT-2 adapter: c_attn) names the mismatch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=64, n_layer=1, n_head=2, n_positions=128))
    lora = get_peft_model(other, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "gpt2-adapter")
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"does not fit base .*c_attn"):
        _run(_merge_config("none"), tmp_path / "gpt2-adapter", tiny_data.val, out)
    _no_output_left(out)


def test_nan_in_base_weights_is_refused(trained, tiny_data, tmp_path):
    from pipelines import merge_quantize
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = tmp_path / "adapter"  # without its training manifest and binding: no base-hash check refuses it first
    shutil.copytree(trained("lora") / "adapter", adapter)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"it was trained on base sha256:.*\(its adapterops.json\)"):
        merge_quantize.run(_merge_config("none"), base, adapter, tiny_data.val, out, log=_quiet)
    (adapter / "adapterops.json").unlink()
    with pytest.raises(ValueError, match=r"base .*base has non-finite values in .*up_proj"):
        merge_quantize.run(_merge_config("none"), base, adapter, tiny_data.val, out, log=_quiet)
    _no_output_left(out)


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_missing_or_empty_prompt_set_is_refused(trained, tiny_data, tmp_path, problem):
    from pipelines.data import DataError

    val = tmp_path / "val.jsonl"
    if problem == "empty":
        val.write_text("\n")
    out = tmp_path / "merged"
    with pytest.raises(DataError, match=r"prompt set .*pass --val"):
        _run(_merge_config("nf4"), trained("lora") / "adapter", val, out)
    _no_output_left(out)


def test_unavailable_quantization_scheme_fails_before_any_work(trained, tiny_data, tmp_path, monkeypatch):
    """bitsandbytes missing (simulated: its import fails) -> a clear error naming the fix, and nothing written."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match=r"nf4 needs bitsandbytes.*--quantize none"):
        _run(_merge_config("nf4"), trained("lora") / "adapter", tiny_data.val, out)
    _no_output_left(out)


# -- rebuilding a version: its golden logits are the regression reference -----------------------------------------

def test_rebuild_matches_the_stored_golden_logits(trained, tiny_data, tmp_path):
    from pipelines import merge_quantize
    from serving.parity import GOLDEN_FILE

    adapter = trained("rslora") / "adapter"
    v1 = _run(_merge_config("none"), adapter, tiny_data.val, tmp_path / "v1")
    golden = v1 / "golden" / GOLDEN_FILE
    rebuilt = merge_quantize.run(_merge_config("none"), BASE, adapter, tiny_data.val, tmp_path / "rebuild",
                                 expect_golden=golden, log=_quiet)
    gates = {g["name"]: g for g in json.loads((rebuilt / "gates.json").read_text())["gates"]}
    assert {"golden_cosine", "golden_max_abs", "golden_top1"} <= set(gates)
    assert all(g["passed"] for g in gates.values()), gates
    assert gates["golden_max_abs"]["value"] <= gates["golden_max_abs"]["threshold"]


def test_rebuild_that_computes_different_logits_is_blocked(trained, tiny_data, tmp_path):
    """A rebuild whose adapter is read differently (here: rsLoRA's flag lost, as a library change could do, so the
    delta is scaled alpha/r instead of alpha/sqrt(r)) is self-consistent, so merged-vs-unmerged passes; only the
    comparison with the version's stored golden logits can block it."""
    from pipelines import merge_quantize
    from serving.parity import GOLDEN_FILE

    adapter = trained("rslora") / "adapter"
    v1 = _run(_merge_config("none"), adapter, tiny_data.val, tmp_path / "v1")
    changed = tmp_path / "adapter"
    shutil.copytree(adapter, changed)
    config = json.loads((changed / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    config["use_rslora"] = False
    (changed / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "rebuild"
    with pytest.raises(merge_quantize.GateFailed, match="golden_max_abs") as e:
        merge_quantize.run(_merge_config("none"), BASE, changed, tiny_data.val, out,
                           expect_golden=v1 / "golden" / GOLDEN_FILE, log=_quiet)
    failed = {g["name"] for g in e.value.report["gates"] if not g["passed"]}
    assert "golden_max_abs" in failed
    assert not failed & {"merged_cosine", "merged_max_abs", "merged_top1", "merged_weights_max_rel"}, failed


def test_cli_rebuild_checks_the_stored_golden_logits(trained, tiny_data, tmp_path):
    """`adapterops merge --expect-golden FILE`: the same adapter rebuilt passes (exit 0); a rebuild that reads the
    adapter differently exits 1 and its report names the golden gate."""
    import yaml
    from pipelines import cli
    from serving.parity import GOLDEN_FILE

    adapter = trained("rslora") / "adapter"
    v1 = _run(_merge_config("none"), adapter, tiny_data.val, tmp_path / "v1")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "quantize": "none"}))
    common = ["merge", "--base", str(BASE), "--val", str(tiny_data.val), "--config", str(config),
              "--expect-golden", str(v1 / "golden" / GOLDEN_FILE)]
    assert cli.main([*common, "--adapter", str(adapter), "--out", str(tmp_path / "same")]) == 0
    changed = tmp_path / "adapter"
    shutil.copytree(adapter, changed)
    adapter_config = json.loads((changed / "adapter_config.json").read_text())
    adapter_config["use_rslora"] = False
    (changed / "adapter_config.json").write_text(json.dumps(adapter_config))
    report = tmp_path / "report.json"
    assert cli.main([*common, "--adapter", str(changed), "--out", str(tmp_path / "changed"),
                     "--report-json", str(report)]) == 1
    failed = {g["name"] for g in json.loads(report.read_text())["gates"] if not g["passed"]}
    assert "golden_max_abs" in failed


# -- the base binding inside the adapter directory (issue 16 item 7) -------------------------------------------------

def _perturbed_base(tmp_path: Path) -> Path:
    """A copy of the base with ONE weight matrix nudged: another content hash, and logits close enough that the
    gates alone (which compare the adapter on this base with its merge onto this base) would pass."""
    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "perturbed-base"
    shutil.copytree(BASE, base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return base


def test_training_writes_the_binding_into_both_adapter_dirs(trained):
    from registry.binding import BINDING_FILE, read_binding
    from registry.hashing import model_weights_hash

    base_sha = model_weights_hash(BASE)
    for method in ("lora", "pissa"):
        out = trained(method)
        exported = read_binding(out / "adapter")
        assert (exported["base"], exported["base_sha256"], exported["method"]) == ("plain", base_sha, method)
        native = read_binding(out / "adapter_native")
        assert native["base"] == ("pissa_residual" if method == "pissa" else "plain")
    config = json.loads((trained("pissa") / "adapter_native" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].startswith("PiSSA residual base of init-cache entry")
    assert "NOT to the plain base" in (trained("pissa") / "adapter_native" / BINDING_FILE).read_text()


def test_copied_adapter_onto_a_perturbed_base_is_refused(trained, tiny_data, tmp_path):
    """A copied adapter dir has no manifest beside it; its binding still names its base."""
    copied = tmp_path / "copied" / "adapter"
    shutil.copytree(trained("lora") / "adapter", copied)
    base = _perturbed_base(tmp_path)
    out = tmp_path / "merged"
    from pipelines import merge_quantize

    with pytest.raises(ValueError, match=r"it was trained on base sha256:[0-9a-f]{12} \(its adapterops.json\), but "
                                         r"this base is sha256:[0-9a-f]{12}; merge it into the base it was trained on"):
        merge_quantize.run(_merge_config("none"), base, copied, tiny_data.val, out, log=_quiet)
    _no_output_left(out)


def test_pissa_native_adapter_is_refused_on_the_plain_base(trained, tiny_data, tmp_path):
    from registry.binding import BindingMismatch

    out = tmp_path / "merged"
    with pytest.raises(BindingMismatch, match="it is the PiSSA adapter as trained, bound to the residual base"):
        _run(_merge_config("none"), trained("pissa") / "adapter_native", tiny_data.val, out)
    _no_output_left(out)


def test_old_adapter_without_binding_falls_back_to_the_manifest(trained, tiny_data, tmp_path, caplog):
    """Adapter dirs from before the binding: a warning, then the training manifest beside them decides."""
    run = tmp_path / "old-run"
    shutil.copytree(trained("lora"), run)
    (run / "adapter" / "adapterops.json").unlink()
    out = tmp_path / "merged"
    with caplog.at_level("WARNING", logger="registry.binding"):
        with pytest.raises(ValueError, match=r"was trained on base sha256:[0-9a-f]{12} \(its .*manifest.json\)"):
            _run_on(_perturbed_base(tmp_path), run / "adapter", tiny_data.val, out)
    assert "has no adapterops.json" in caplog.text
    _no_output_left(out)


def _run_on(base: Path, adapter: Path, val: Path, out: Path):
    from pipelines import merge_quantize

    return merge_quantize.run(_merge_config("none"), base, adapter, val, out, log=_quiet)
