"""Training on 2 processes (torchrun, gloo, CPU) on the real tiny base: the loss curve and the adapter equal one
process's; a 2-process run killed after its first checkpoint (SIGKILL to the launcher's process group) resumes and
ends where an uninterrupted run ends; a failing rank gives an error naming it.

Tolerance: both runs see the same batches in the same order with the same 1/grad_accum scaling; a 2-process step
sums the two ranks' gradients (g0 + g1, exact in fp32 for two terms and what one process's accumulation computes
too), but the ranks run with other OpenMP thread counts than the in-process reference and the eval sums are
split, so matmul blocking and sum order may differ in the last bits (~1e-7 relative in fp32). Over 12 AdamW steps
that stays far below 1e-4 in the loss (rounded to 5 digits in the manifest) and 1e-5 (+1e-4 relative) in the weights.
"""

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
import json, sys
from pathlib import Path
from pipelines import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]),
          log=lambda *a: print(*a, flush=True))
"""


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def _cfg(**kw) -> dict:
    return {"steps": 12, "batch_size": 4, "grad_accum": 2, "max_len": 64, "eval_every": 6, "checkpoint_every": 3,
            **kw}


def _manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def _assert_same_run(got: Path, want: Path) -> None:
    import torch
    from safetensors.torch import load_file

    a, b = _manifest(got), _manifest(want)
    assert a["fingerprint"] == b["fingerprint"]
    assert len(a["curve"]) == len(b["curve"]) == 12
    for x, y in zip(a["curve"], b["curve"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4), (x, y)
    assert a["metrics"]["val_loss"] == pytest.approx(b["metrics"]["val_loss"], abs=1e-4)
    assert a["metrics"]["processes"] == 2 and b["metrics"]["processes"] == 1
    assert sorted(p.name for p in (got / "adapter").iterdir()) == sorted(p.name for p in (want / "adapter").iterdir())
    wa, wb = load_file(str(got / "adapter" / "adapter_model.safetensors")), \
        load_file(str(want / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    moved = 0
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and wa[key].shape == wb[key].shape, key
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
        moved += int("lora_B" in key and float(wb[key].abs().max()) > 1e-4)
    assert moved, "the reference adapter should have trained (B moved off zero)"
    ca, cb = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (got, want))
    ca["target_modules"], cb["target_modules"] = sorted(ca["target_modules"]), sorted(cb["target_modules"])  # a set
    assert ca == cb


@pytest.fixture(scope="module")
def one_process(init_entry, tiny_data, tmp_path_factory):
    from pipelines import train

    return train.run(train.TrainConfig(**_cfg()), BASE, init_entry("lora"), tiny_data.train, tiny_data.val,
                     tmp_path_factory.mktemp("ddp") / "one", log=lambda *a: None)


def test_two_processes_give_one_process_loss_curve_and_adapter(one_process, init_entry, tiny_data, tmp_path):
    from pipelines import train

    logs: list[str] = []
    out = train.run(train.TrainConfig(**_cfg(nproc=2)), BASE, init_entry("lora"), tiny_data.train, tiny_data.val,
                    tmp_path / "two", log=lambda *a: logs.append(" ".join(map(str, a))))
    _assert_same_run(out, one_process)
    assert any("launching 2 processes (ddp) under torchrun" in x for x in logs), logs
    assert any("step 6/12" in x for x in logs), "rank 0's log lines reach the caller's log"
    assert sum("wrote" in x for x in logs) == 1, "rank 0 alone writes the output"
    assert not train.checkpoint_dir(out).exists()


def test_a_killed_two_process_run_resumes_and_ends_like_an_uninterrupted_run(one_process, init_entry, tiny_data,
                                                                              tmp_path):
    import psutil

    from pipelines import train

    entry, out = init_entry("lora"), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(_cfg(nproc=2)), str(BASE), str(entry),
                             str(tiny_data.train), str(tiny_data.val), str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = train.checkpoint_dir(out)
    deadline = time.time() + 240
    family: list = []
    try:
        while not list(ckpt.glob("step-*")):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)  # torchrun and its two ranks
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"ranks outlived their killed launcher: {alive}"
    assert len(family) >= 3, family
    assert not out.exists(), "a killed run must not leave an output directory"
    step = int(max(ckpt.glob("step-*")).name.split("-")[1])
    assert 0 < step < 12

    logs: list[str] = []
    train.run(train.TrainConfig(**_cfg(nproc=2)), BASE, entry, tiny_data.train, tiny_data.val, out,
              log=lambda *a: logs.append(" ".join(map(str, a))))
    assert any("resuming from the checkpoint at step" in x for x in logs), logs
    assert _manifest(out)["metrics"]["resumed_from_step"] >= step
    _assert_same_run(out, one_process)
    assert not ckpt.exists(), "the checkpoints are removed once the run has finished"


def test_fsdp_shards_the_frozen_base_and_gives_one_process_results(one_process, init_entry, tiny_data, tmp_path):
    """FSDP2 on gloo: each decoder layer's frozen weights are split over the 2 ranks (each holds about half the
    layers' parameters), the adapter is replicated, and the run equals one process's."""
    from pipelines import train

    logs: list[str] = []
    out = train.run(train.TrainConfig(**_cfg(nproc=2, strategy="fsdp")), BASE, init_entry("lora"),
                    tiny_data.train, tiny_data.val, tmp_path / "fsdp",
                    log=lambda *a: logs.append(" ".join(map(str, a))))
    _assert_same_run(out, one_process)
    m = _manifest(out)["metrics"]
    assert any("frozen weights of 4 decoder layers sharded over 2 processes" in x for x in logs), logs
    assert m["total_parameters"] == _manifest(one_process)["metrics"]["total_parameters"]
    assert m["parameters_per_process"] < 0.8 * m["total_parameters"], m
    assert _manifest(out)["settings"]["strategy"] == "fsdp"


def test_a_failing_rank_gives_an_error_naming_it(init_entry, tiny_data, tmp_path):
    from pipelines import distributed, train

    out = tmp_path / "fails"
    train.checkpoint_dir(out).write_text("a file where rank 0 must write its checkpoint directory")
    with pytest.raises(distributed.DistributedTrainingFailed) as err:
        train.run(train.TrainConfig(**_cfg(nproc=2, steps=6)), BASE, init_entry("lora"), tiny_data.train,
                  tiny_data.val, out, log=lambda *a: None)
    message = str(err.value)
    assert err.value.rank == 0
    assert "rank 0 of 2 failed first" in message and "FileExistsError" in message, message
    assert "Traceback" in message and "save_checkpoint" in message, "the message carries the rank's log tail"
    assert not out.exists()


def test_a_rank_killed_by_a_signal_is_named(init_entry, tiny_data, tmp_path):
    """Rank 1 dies as the OOM killer would kill it (SIGKILL, nothing recorded): the error names rank 1 and the
    signal, not rank 0 (which then fails in the gradient all-reduce)."""
    import threading

    import psutil

    from pipelines import distributed, train

    started, result = threading.Event(), {}

    def log(*a):
        if "fast path" in " ".join(map(str, a)):
            started.set()

    def target():
        try:
            train.run(train.TrainConfig(**_cfg(nproc=2, steps=400, checkpoint_every=0)), BASE, init_entry("lora"),
                      tiny_data.train, tiny_data.val, tmp_path / "killed_rank", log=log)
        except Exception as e:  # noqa: BLE001  (what the test looks at)
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        assert started.wait(240), "rank 0 never reached training"
        ranks = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.environ().get("RANK") == "1":
                    ranks.append(child)
            except psutil.Error:  # a process that ended since the listing
                pass
        assert len(ranks) == 1, ranks
        ranks[0].kill()
    finally:
        thread.join(240)
    error = result.get("error")
    assert isinstance(error, distributed.DistributedTrainingFailed), error
    assert error.rank == 1 and "rank 1 of 2 failed first" in str(error) and "SIGKILL" in str(error), str(error)


@pytest.mark.skipif(_cuda_count() < 2, reason="needs >= 2 CUDA GPUs (nccl)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_over_nccl_give_one_gpu_results(strategy, init_entry, tiny_data, tmp_path):
    """The same on 2 GPUs (nccl, bf16 frozen base): equal to one GPU within bf16 tolerance."""
    from pipelines import train

    kw = {"device": "cuda", "checkpoint_every": 0}
    one = train.run(train.TrainConfig(**_cfg(**kw)), BASE, init_entry("lora"), tiny_data.train, tiny_data.val,
                    tmp_path / "one", log=lambda *a: None)
    two = train.run(train.TrainConfig(**_cfg(nproc=2, strategy=strategy, **kw)), BASE, init_entry("lora"),
                    tiny_data.train, tiny_data.val, tmp_path / "two", log=lambda *a: None)
    a, b = _manifest(two), _manifest(one)
    assert a["metrics"]["processes"] == 2 and a["metrics"]["device"] == "cuda:0"
    for x, y in zip(a["curve"], b["curve"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=2e-2), (x, y)
    assert a["metrics"]["val_loss"] == pytest.approx(b["metrics"]["val_loss"], abs=2e-2)
