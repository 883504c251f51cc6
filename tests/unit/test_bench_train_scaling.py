"""bench/train_scaling.py without GPUs: its Llama shapes have the sizes they are named after (built on the meta
device, no memory), and on a machine without 2 GPUs the default run says it is skipped and writes nothing."""

from __future__ import annotations

import pytest

from bench import train_scaling


@pytest.mark.parametrize(("shape", "billions"), [("1b", 1.1), ("7b", 6.7), ("13b", 13.0), ("34b", 33.7),
                                                 ("70b", 69.0)])
def test_shapes_have_their_sizes(shape, billions):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(train_scaling._llama_config(shape), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.03)


def test_without_two_gpus_the_default_run_is_skipped(tmp_path, capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the default run would measure")
    assert train_scaling.main(["--results-dir", str(tmp_path)]) == {}
    assert "skipped: needs >= 2 CUDA GPUs" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit, match="needs >= 2 CUDA GPUs"):
        train_scaling.main(["--device", "cuda"])
