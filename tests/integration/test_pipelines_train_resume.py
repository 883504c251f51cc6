"""The trainer's runtime features on the real tiny base: a run killed mid-way (SIGKILL, a real process) resumes from its
last checkpoint and ends where an uninterrupted run ends; packed rows compute exactly the loss of unpacked ones;
the fast DoRA forward has PEFT's values and gradients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models" / "tiny-llama"

RUN_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from pipelines import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]),
          log=lambda *a: print(*a, flush=True))
"""


def _manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def _cfg_dict(**kw) -> dict:
    return {"steps": 30, "batch_size": 4, "max_len": 64, "eval_every": 10, "checkpoint_every": 5, **kw}


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(init_entry, tiny_data, tmp_path):
    from pipelines import train

    entry = init_entry("lora")
    reference = train.run(train.TrainConfig(**_cfg_dict()), BASE, entry, tiny_data.train, tiny_data.val,
                          tmp_path / "reference", log=lambda *a: None)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(_cfg_dict()), str(BASE), str(entry),
                             str(tiny_data.train), str(tiny_data.val), str(out)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = train.checkpoint_dir(out)
    deadline = time.time() + 240
    try:
        while not list(ckpt.glob("step-*")):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stdout.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave an output directory"
    step = int(sorted(ckpt.glob("step-*"))[-1].name.split("-")[1])
    assert 0 < step < 30

    logs: list[str] = []
    train.run(train.TrainConfig(**_cfg_dict()), BASE, entry, tiny_data.train, tiny_data.val, out,
              log=lambda *a: logs.append(" ".join(map(str, a))))
    resumed, ref = _manifest(out), _manifest(reference)
    assert any("resuming from the checkpoint at step" in line for line in logs), logs
    assert resumed["metrics"]["resumed_from_step"] >= step
    assert len(resumed["curve"]) == len(ref["curve"]) == 30
    for a, b in zip(resumed["curve"], ref["curve"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4), (a, b)
    assert resumed["metrics"]["val_loss"] == pytest.approx(ref["metrics"]["val_loss"], abs=1e-4)
    assert resumed["fingerprint"] == ref["fingerprint"]
    assert not ckpt.exists(), "the checkpoints are removed once the run has finished"


def test_a_checkpoint_of_other_inputs_is_discarded_not_resumed(init_entry, tiny_data, tmp_path):
    from pipelines import train

    entry = init_entry("lora")
    out = tmp_path / "run"
    # leave a checkpoint behind: a run with seed 1 that fails its health check after checkpoints were written
    bad = train.TrainConfig(**_cfg_dict(steps=10, seed=1, health=train.HealthConfig(max_delta_ratio=1e-9)))
    with pytest.raises(train.HealthCheckFailed):
        train.run(bad, BASE, entry, tiny_data.train, tiny_data.val, out, log=lambda *a: None)
    assert list(train.checkpoint_dir(out).glob("step-*")), "the failed run should have left its checkpoint"
    logs: list[str] = []
    train.run(train.TrainConfig(**_cfg_dict(steps=10)), BASE, entry, tiny_data.train, tiny_data.val, out,
              log=lambda *a: logs.append(" ".join(map(str, a))))
    assert any("discarding checkpoint" in line for line in logs), logs
    assert _manifest(out)["metrics"]["resumed_from_step"] is None


def test_packed_rows_give_the_loss_of_unpacked_examples(tiny_data):
    import torch
    from pipelines.data import read_jsonl
    from pipelines.lm import collate, tokenize
    from pipelines.train import batch_loss, collate_packed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    rows = tokenize(read_jsonl(tiny_data.train)[:9], tok, 96)
    with torch.no_grad():
        loss, n = batch_loss(model, *collate(rows, tok.pad_token_id))
        ids, labels, pos, real = collate_packed([rows[:4], rows[4:7], rows[7:]], tok.pad_token_id)
        packed_loss, packed_n = batch_loss(model, ids, labels, None, pos)
        # without the restarting position ids, attention would cross examples: the loss must differ
        crossing, _ = batch_loss(model, ids, labels, None, None)
    assert packed_n == n and real == sum(len(x) for x, _ in rows)
    assert float(packed_loss) == pytest.approx(float(loss), rel=1e-5)
    assert abs(float(crossing) - float(loss)) > 1e-3 * float(loss)


def test_packing_trains_with_almost_no_padding(init_entry, tiny_data, small_train_config, tmp_path):
    from pipelines import train

    out = train.run(small_train_config(packing=True, max_len=256, batch_size=2), BASE, init_entry("lora"),
                    tiny_data.train, tiny_data.val, tmp_path / "packed", log=lambda *a: None)
    m = _manifest(out)
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"]
    assert m["metrics"]["padding_fraction"] < 0.1
    assert m["config"]["packing"] is True


def test_fast_dora_has_peft_values_and_gradients():
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from pipelines import fast_dora
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 use_dora=True, lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: B non-zero, magnitudes off the initial norms
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    fast = copy.deepcopy(peft_model)
    assert fast_dora.enable(fast) == 3 * 4  # three targets in each of the four layers
    ids = torch.randint(0, 4096, (2, 24))
    results = []
    for model in (peft_model, fast):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert g1.keys() == g2.keys() and any("lora_magnitude" in n for n in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-3, atol=1e-4 * float(g1[name].abs().max()) + 1e-9)
