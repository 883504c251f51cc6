"""The method and quantizer registries (pipelines/methods.py, pipelines.lm.QUANTIZERS) are the one place each is
described: the configs, the CLI's choices and the gates' defaults come from them, and a new entry is all a new
method needs."""

from __future__ import annotations

import pytest

from pipelines import cli, lm, methods
from pipelines.init_cache import InitConfig
from pipelines.merge_quantize import GateConfig, MergeConfig


def _choices(parser, command: str, flag: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_cli_choices_come_from_the_registries():
    parser = cli.build_parser()
    for command in ("train", "init-cache"):
        assert _choices(parser, command, "--method") == methods.CHOICES == (
            "lora", "rslora", "dora", "pissa", "qlora", "qpissa")
    assert _choices(parser, "merge", "--quantize") == lm.SCHEMES == ("nf4", "int8", "none")


def test_every_method_builds_its_peft_config():
    for name, m in methods.METHODS.items():
        cfg = InitConfig(method=name).lora_config()
        assert cfg.use_dora == bool(m.peft.get("use_dora")) and cfg.use_rslora == bool(m.peft.get("use_rslora"))
        assert cfg.init_lora_weights == (m.residual_init if m.residual else True)


def test_aliases_and_nf4():
    assert methods.QUANT_ALIASES == {"qlora": "lora", "qpissa": "pissa"}
    for alias, name in methods.QUANT_ALIASES.items():
        cfg = InitConfig(method=alias)
        assert (cfg.method, cfg.base_quant) == (name, "nf4")
    for name, m in methods.METHODS.items():
        if m.nf4:
            assert InitConfig(method=name, base_quant="nf4").base_quant == "nf4"
        else:
            with pytest.raises(ValueError, match=f"base_quant nf4 does not support {name}: "):
                InitConfig(method=name, base_quant="nf4")


def test_defaults_by_method():
    assert {n: (m.lr, m.warmup) for n, m in methods.METHODS.items()} == {
        "lora": (2e-3, 0.05), "rslora": (1e-3, 0.05), "dora": (2e-3, 0.05), "pissa": (1e-3, 0.1)}
    assert methods.get("pissa").init_lora_weights(4) == "pissa_niter_4"
    with pytest.raises(ValueError, match=r"method 'bogus' is not one of lora, rslora, dora, pissa \(or qlora, qpissa"):
        methods.get("bogus")


def test_a_new_method_is_one_entry(monkeypatch):
    """What adding a residual-init method takes: its entry; the config, the init and the SVD option follow."""
    monkeypatch.setitem(methods.METHODS, "milora", methods.Method("milora", lr=1e-3, warmup=0.1, residual_init="milora",
                                                                  export=methods.export_as_plain_lora))
    cfg = InitConfig(method="milora", svd_niter=2)
    assert cfg.peft_init() == "milora_niter_2"
    with pytest.raises(ValueError, match="svd_niter applies to method pissa / milora only"):
        InitConfig(method="lora", svd_niter=2)


def test_every_quantizer_has_gate_defaults_and_a_config():
    gates = GateConfig()
    assert set(gates.quant) == set(lm.QUANTIZERS)
    for name, q in lm.QUANTIZERS.items():
        assert (gates.quant[name].kl_mean, gates.quant[name].kl_p99, gates.quant[name].top1) == (
            q.kl_mean, q.kl_p99, q.top1)
        assert MergeConfig(quantize=name).quantize == name
    nf4, int8 = lm.QUANTIZERS["nf4"].config("bfloat16"), lm.QUANTIZERS["int8"].config("float32")
    assert (nf4.load_in_4bit, nf4.bnb_4bit_quant_type, str(nf4.bnb_4bit_compute_dtype)) == (True, "nf4", "torch.bfloat16")
    assert int8.load_in_8bit and not int8.load_in_4bit
    with pytest.raises(ValueError, match="is not one of"):
        MergeConfig(quantize="fp3")
