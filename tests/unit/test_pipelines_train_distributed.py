"""Several-process training without a model or a process group: the settings' checks, each rank's share of the data
order (together exactly one process's, with the same state), the launcher's command line and its failure report.
The real 2-process runs are in tests/integration/test_pipelines_train_ddp.py."""

from __future__ import annotations

import json
import random
import time

import pytest

from pipelines import distributed
from pipelines.train import BatchSource, HealthCheckFailed, TrainConfig


def test_settings_are_checked():
    TrainConfig(nproc=2, grad_accum=4, strategy="fsdp")
    with pytest.raises(ValueError, match=r"grad_accum \(1\) must be a multiple of nproc \(2\)"):
        TrainConfig(nproc=2)
    with pytest.raises(ValueError, match=r"grad_accum \(3\) must be a multiple of nproc \(2\)"):
        TrainConfig(nproc=2, grad_accum=3)
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        TrainConfig(nproc=0)
    with pytest.raises(ValueError, match="names one GPU"):
        TrainConfig(nproc=2, grad_accum=2, device="cuda:1")


def _rows(n: int = 90, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(6, 40)
        out.append(([rng.randrange(5, 100) for _ in range(k)], [-100] * (k // 2) + [1] * (k - k // 2)))
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_the_ranks_together_take_one_process_batches_and_keep_its_state(packing):
    import torch

    rows = _rows()
    cfg = TrainConfig(batch_size=4, max_len=64, packing=packing, grad_accum=2, nproc=2)
    one = BatchSource(rows, cfg, 0)
    ranks = [BatchSource(rows, cfg, 0, rank=r, world=2) for r in range(2)]
    for step in range(40):  # several epochs: the reshuffles fall inside and between a step's micro-batches
        want = [next(one), next(one)]
        if step % 3 == 0:
            for src in ranks:
                src.prefetch()
        got = [next(ranks[0]), next(ranks[1])]
        for w, g in zip(want, got):
            assert torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]) and w[4:6] == g[4:6]
        assert ranks[0].queue == ranks[1].queue == one.queue
        assert ranks[0].rng.getstate() == ranks[1].rng.getstate() == one.rng.getstate()


def test_the_launcher_command_is_one_node_on_loopback_without_restarts(tmp_path):
    cmd = distributed.torchrun_command(4, tmp_path, ["-m", "pipelines.distributed", "spec.json"], join_timeout_s=60)
    line = " ".join(cmd)
    assert "-m pipelines.distributed --torchrun" in line and "--nproc-per-node 4" in line and "--nnodes 1" in line
    assert "--max-restarts 0" in line and "--rdzv-endpoint 127.0.0.1:" in line and "join_timeout=60" in line
    assert cmd[-3:] == ["-m", "pipelines.distributed", "spec.json"]
    port = int(line.split("--rdzv-endpoint 127.0.0.1:")[1].split()[0])
    assert 0 < port < 65536


TORCHRUN_SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
pipelines.distributed FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_21:40:00
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================""".splitlines()


def _work(tmp_path, failures=(), rank_log=None):
    (tmp_path / "failures").mkdir()
    for i, f in enumerate(failures):
        (tmp_path / "failures" / f"rank-{f['rank']}.json").write_text(json.dumps({"time": time.time() + i, **f}))
    if rank_log:
        rank, text = rank_log
        log = tmp_path / "logs" / "run_x" / "attempt_0" / str(rank) / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(text)
    return tmp_path


def test_a_rank_killed_by_a_signal_is_named_not_the_peer_that_then_failed(tmp_path):
    work = _work(tmp_path, [{"rank": 0, "error": "RuntimeError: Connection closed by peer", "health": None}],
                 rank_log=(1, "rank 1: step 3\n"))
    with pytest.raises(distributed.DistributedTrainingFailed) as err:
        distributed._raise_failure(work, 2, 1, TORCHRUN_SUMMARY)
    assert err.value.rank == 1
    assert "rank 1 of 2 failed first" in str(err.value) and "SIGKILL" in str(err.value)
    assert "rank 1: step 3" in str(err.value)


def test_the_first_recorded_exception_is_named_with_its_log(tmp_path):
    work = _work(tmp_path, [{"rank": 1, "error": "FileNotFoundError: val.jsonl", "health": None},
                            {"rank": 0, "error": "RuntimeError: Connection closed by peer", "health": None}],
                 rank_log=(1, "Traceback (most recent call last):\nFileNotFoundError: val.jsonl\n"))
    summary = [line.replace("-9 (pid: 4242)", "1 (pid: 4242)").replace("Signal 9 (SIGKILL) received by PID 4242",
                                                                      "<N/A>") for line in TORCHRUN_SUMMARY]
    with pytest.raises(distributed.DistributedTrainingFailed) as err:
        distributed._raise_failure(work, 2, 1, summary)
    assert err.value.rank == 1 and "FileNotFoundError: val.jsonl" in str(err.value)
    assert "  | Traceback (most recent call last):" in str(err.value)


def test_a_failed_health_check_on_the_ranks_is_raised_as_such(tmp_path):
    report = {"passed": False, "checks": [{"name": "delta_ratio", "value": 3.0, "threshold": 0.5, "passed": False}]}
    work = _work(tmp_path, [{"rank": 0, "error": "HealthCheckFailed: ...", "health": report}])
    with pytest.raises(distributed.RankHealthCheckFailed) as err:
        distributed._raise_failure(work, 2, 1, [])
    assert err.value.report == report and err.value.rank == 0
    assert "delta_ratio" in str(HealthCheckFailed(err.value.report))  # what pipelines.train.run raises from it


def test_a_killed_rank_listed_under_failures_is_named_though_torchrun_calls_a_peer_the_root(tmp_path):
    """Under load torchrun can observe the peer's connection error in the same poll as the SIGKILL and call the
    peer the root cause (seen on this box); the killed rank is still the one named."""
    summary = """pipelines.train_worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_21:40:00
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_21:40:00
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4241)
  error_file: /tmp/x/error.json
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================""".splitlines()
    work = _work(tmp_path, [{"rank": 0, "error": "RuntimeError: Connection reset by peer", "health": None}],
                 rank_log=(1, "rank 1: step 3\n"))
    with pytest.raises(distributed.DistributedTrainingFailed) as err:
        distributed._raise_failure(work, 2, 1, summary)
    assert err.value.rank == 1 and "SIGKILL" in str(err.value)
    assert distributed._root_cause(summary[:5] + summary[10:])[0] == 0  # no killed rank: torchrun's root cause
