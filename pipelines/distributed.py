"""Training on several processes of one host: the torchrun launch, each rank's process group, the gradient sum, FSDP2.

Run:  adapterops train ... --nproc 2 [--strategy fsdp]        (TrainConfig.nproc / strategy)

pipelines.train.run with nproc > 1 calls launch(): PyTorch's own launcher (`python -m torch.distributed.run`) starts
nproc workers on this host (c10d rendezvous on 127.0.0.1 at a free port, no restarts), each of which runs
pipelines.train_worker -> pipelines.train.run again, now inside the process group (current() says which rank it is). Backend
gloo on the CPU, nccl on CUDA (rank r on cuda:r).

What each strategy does (pipelines.train calls the pieces below):
- Data: every rank builds the same data order (same seed, same BatchSource) and takes, of each optimizer step's
  grad_accum micro-batches, those with index k % world == rank (grad_accum must be a multiple of nproc). The
  global batch, its order and the loss scaling (1 / grad_accum per micro-batch) are those of one process, so the
  loss curve and the adapter equal one process's up to the order of floating-point sums.
- ddp: the model is replicated; after the backward, the gradients of the trainable (adapter) parameters are summed
  over the ranks with ONE all-reduce of a flat buffer (sum_grads). The frozen base has no gradients, so nothing
  else needs reducing; the adapter is a few MB, which is why torch's DistributedDataParallel wrapper (bucketing to
  overlap the all-reduce with the backward) is not used: it would save well under a millisecond per step and
  would change the module tree that saving and exporting walk.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer's FROZEN weights over the ranks (a
  layer is all-gathered just for its forward and backward). The adapter parameters are left out of the sharding
  (ignored_params): replicated, summed with sum_grads exactly as under ddp, so checkpoints, the health report's
  adapter factors and the exported adapter are plain tensors on every rank. The embeddings, final norm and output
  layer stay replicated (unsharded) too: the step calls the decoder and the output layer separately
  (train.batch_loss), and tied embeddings cannot sit in two FSDP units.
- Rank 0 alone writes checkpoints, the manifest and the adapters and logs; every rank reads a checkpoint on resume
  (they are world-size independent: a run may resume with another nproc).

A failing rank ends the run (torchrun stops the others); launch() raises DistributedTrainingFailed naming the first
rank that failed, its error and the tail of its log, or RankHealthCheckFailed with the report when that was
the cause (pipelines.train.run raises it as HealthCheckFailed).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = ("ddp", "fsdp")
LOG_MARK = "@@adapterops-train-log@@ "  # rank 0's log lines on its stdout, forwarded by launch() to its `log`
REPO = Path(__file__).resolve().parents[1]


class DistributedTrainingFailed(RuntimeError):
    """A rank of a multi-process training run failed; `rank` is the first to fail (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class RankHealthCheckFailed(DistributedTrainingFailed):
    """A rank's run ended in the trainer's health check; `report` is its report (pipelines.train.run raises it as
    HealthCheckFailed: this module does not import the trainer, which imports it)."""

    def __init__(self, report: dict, rank: int | None = None):
        super().__init__(f"training health check failed on rank {rank}", rank)
        self.report = report


@dataclass(frozen=True)
class Rank:
    """Where this process stands: rank of world (world 1 = not distributed), its device and strategy."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current(strategy: str = "ddp", device: str = "cpu") -> Rank:
    """The Rank of this process: world 1 unless a process group is up (launched by torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Rank(device=device)
    return Rank(dist.get_rank(), dist.get_world_size(), device, strategy)


def in_worker() -> bool:
    """True in a process that torchrun started (launch()'s workers, or a user's own torchrun of the CLI): then
    train.run joins the process group and trains instead of launching again."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def join(cfg) -> str:
    """Join this torchrun worker's process group (once; gloo on the CPU, nccl on CUDA) and return its device."""
    import datetime

    import torch
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.nproc:
        raise ValueError(f"this process runs under torchrun with WORLD_SIZE={world}, but the training config says "
                         f"nproc {cfg.nproc}; pass --nproc {world} (or let `adapterops train --nproc N` launch it)")
    device = worker_device(cfg.device)
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return device


def worker_device(device: str) -> str:
    """A rank's device: cuda:LOCAL_RANK for auto/cuda, cpu for cpu."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device: cpu (or auto)")
    if local >= torch.cuda.device_count():
        raise ValueError(f"rank with local rank {local} has no GPU: torch sees {torch.cuda.device_count()}; "
                         f"lower nproc to at most the number of GPUs")
    return f"cuda:{local}"


# -- the pieces the training step uses ------------------------------------------------------------------------------

def all_reduce_sum(t, rank: Rank):
    """Sum `t` over the ranks in place (nothing on one process); returns it."""
    if rank.distributed:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_grads(params, rank: Rank) -> None:
    """Sum the gradients of `params` (the adapter: replicated under both strategies) over the ranks, one flat
    all-reduce. A parameter without a gradient on this rank counts as zero (and gets the sum)."""
    import torch

    if not rank.distributed:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum(flat, rank)
    at = 0
    for p in params:
        p.grad.copy_(flat[at : at + p.numel()].view_as(p.grad))
        at += p.numel()


def broadcast_params(params, rank: Rank) -> None:
    """Rank 0's values of `params` on every rank (the adapter starts identical everywhere, whatever each loaded)."""
    if not rank.distributed:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def full_weight(w):
    """A frozen weight as a plain tensor: an FSDP2 shard (DTensor) is all-gathered (a collective: every rank calls
    it in the same order), anything else is returned as is."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def shard_model(model, rank: Rank) -> int:
    """FSDP2: shard each decoder layer's frozen weights over the ranks (the adapter parameters left out and
    replicated). Returns the number of layers sharded; the caller moves the rest of the model to the device."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        raise ValueError("strategy fsdp does not shard a bitsandbytes-quantized base (QLoRA, QPiSSA); "
                         "use strategy: ddp, or a method without base quantization")
    device = torch.device(rank.device)
    mesh = init_device_mesh(device.type, (rank.world,))
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(causal, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"strategy fsdp needs a decoder with .model.layers (Llama-like); "
                         f"{type(causal).__name__} has none: use strategy: ddp")
    adapter = {p for p in model.parameters() if p.requires_grad}
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True,
                    ignored_params={p for p in layer.parameters() if p in adapter})
    for p in adapter:  # left out of the sharding: move them like the rest of the unsharded model
        if not p.is_meta:  # a model built on the meta device is materialised by the caller (to_empty)
            p.data = p.data.to(device)
    return len(layers)


# -- the launcher and the worker ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver `sig` to this process when its parent dies (PR_SET_PDEATHSIG), so that killing a run (even
    with SIGKILL) leaves no orphan rank training on: workers get SIGKILL when torchrun dies, torchrun gets SIGTERM
    (it then stops its workers) when the process that launched it dies. Elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: the signal would never come
        os.kill(os.getpid(), sig)


def torchrun_command(nproc: int, log_dir: Path, entry: list[str], join_timeout_s: int = 120) -> list[str]:
    """The launcher's command line for `entry` (e.g. ["-m", "pipelines.distributed", spec]): PyTorch's own
    torch.distributed.run (through torchrun_main, which stops it when its parent dies) on one node, nproc
    workers, c10d rendezvous on 127.0.0.1 at a free port, no restarts (a failure is reported, not retried), each
    rank's stdout/stderr to log_dir, rank 0's echoed."""
    return [sys.executable, "-m", "pipelines.distributed", "--torchrun", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", uuid.uuid4().hex[:12],
            "--rdzv-conf", f"join_timeout={join_timeout_s}", "--log-dir", str(log_dir), "--redirects", "3",
            "--tee", "1", "--local-ranks-filter", "0", *entry]


def launch(cfg, base_path: Path, init_entry: Path, train_data: Path, val_data: Path, out: Path,
           parent: Path | None = None, log=print, identity: list | None = None) -> Path:
    """Run pipelines.train.run on cfg.nproc processes under torchrun; rank 0's log lines go to `log`. Returns
    `out` (written by rank 0). Raises RankHealthCheckFailed (a rank's health check failed) or
    DistributedTrainingFailed. `identity`: the run's identity as train.run computed it, handed to the ranks."""
    from dataclasses import asdict

    import torch

    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < cfg.nproc:
        raise ValueError(f"nproc {cfg.nproc} runs one process per GPU, but torch sees {torch.cuda.device_count()} "
                         f"GPU(s); lower nproc, or use device: cpu (gloo)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.dist-", dir=Path(out).parent))  # removed on success
    spec = work / "spec.json"
    spec.write_text(json.dumps({"config": asdict(cfg), "base": str(base_path), "init_entry": str(init_entry),
                                "train": str(train_data), "val": str(val_data), "out": str(out),
                                "parent": str(parent) if parent else None, "failures": str(work / "failures"),
                                "identity": identity}))
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                           str(threads)),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = torchrun_command(cfg.nproc, work / "logs", ["-m", "pipelines.train_worker", str(spec)],
                           join_timeout_s=cfg.dist_timeout_s)
    log(f"train: launching {cfg.nproc} processes ({cfg.strategy}) under torchrun; rank logs in {work / 'logs'}")
    tail: collections.deque[str] = collections.deque(maxlen=80)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    try:
        for line in proc.stdout:
            if LOG_MARK in line:
                log(line.split(LOG_MARK, 1)[1].rstrip("\n"))
            else:
                tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        _raise_failure(work, cfg.nproc, rc, list(tail))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return Path(out)


def _rank_log_tail(work: Path, rank: int, n: int = 25) -> str:
    logs = sorted((work / "logs").glob(f"**/attempt_*/{rank}/stderr.log"))
    if not logs:
        return "(no log)"
    lines = logs[-1].read_text(errors="replace").splitlines()
    return "\n".join(f"  | {x}" for x in lines[-n:])


def _summary_blocks(lines: list[str]) -> list[dict]:
    """The per-rank blocks of torchrun's failure summary ("[0]:", "rank : 1 (local_rank: 1)", "exitcode : -9 (pid:
    ..)", "traceback : Signal 9 (SIGKILL) received by PID .."), in order, each marked root (the "Root Cause" block)
    or not (the "Failures:" list)."""
    blocks, root, current = [], False, None
    for line in lines:
        text = line.strip()
        if text.startswith("Root Cause"):
            root, current = True, None
        elif text.startswith("[") and text.endswith("]:"):
            current = {"root": root, "rank": None, "exitcode": None, "parts": []}
            blocks.append(current)
        elif current is not None:
            key, _, value = text.partition(":")
            key, value = key.strip(), value.strip()
            if key == "rank" and value.split()[:1] and value.split()[0].isdigit():
                current["rank"] = int(value.split()[0])
            elif key in ("exitcode", "traceback") and value:
                current["parts"].append(f"{key} {value}")
                if key == "exitcode" and value.split()[0].lstrip("-").isdigit():
                    current["exitcode"] = int(value.split()[0])
    return blocks


def _root_cause(lines: list[str]) -> tuple[int | None, str]:
    """(rank, cause) from torchrun's failure summary; (None, why) without one. A rank killed by a signal (other than
    the SIGTERM torchrun sends the survivors) is the cause wherever the summary lists it: its peers then fail in a
    collective, and torchrun may observe one of them first (same poll, same timestamp) and call that the root."""
    blocks = _summary_blocks(lines)
    if not any(b["root"] for b in blocks):
        return None, "no rank recorded an exception, and torchrun printed no root cause"
    killed = [b for b in blocks if b["exitcode"] is not None and b["exitcode"] < 0 and b["exitcode"] != -15]
    chosen = killed[0] if killed else next(b for b in blocks if b["root"])
    return chosen["rank"], ("; ".join(chosen["parts"]) or
                            "no rank recorded an exception (killed by a signal or crashed)")


def _raise_failure(work: Path, nproc: int, rc: int, launcher_tail: list[str]):
    failures = sorted((json.loads(p.read_text()) for p in (work / "failures").glob("rank-*.json")),
                      key=lambda f: f["time"])
    rank, cause = _root_cause(launcher_tail)
    # a rank killed by a signal (OOM killer, kill -9) records nothing, and its peers then fail in a collective
    # (recording that): torchrun's root cause names the killed one. Otherwise the first recorded exception wins.
    if failures and "exitcode -" not in cause:
        if failures[0].get("health") is not None:
            raise RankHealthCheckFailed(failures[0]["health"], failures[0].get("rank"))
        rank, cause = failures[0]["rank"], failures[0]["error"]
    where = f"rank {rank} of {nproc}" if rank is not None else f"a rank of {nproc}"
    body = _rank_log_tail(work, rank) if rank is not None else "\n".join(f"  | {x}" for x in launcher_tail[-25:])
    raise DistributedTrainingFailed(
        f"distributed training failed: {where} failed first ({cause}); torchrun exited {rc}. Its log ends:\n{body}\n"
        f"All ranks' logs: {work / 'logs'}. Fix that rank's error and re-run (checkpoints, if any, resume).",
        rank)


def torchrun_main(argv: list[str]) -> None:
    """PyTorch's launcher (torch.distributed.run), set to stop when the process that started it dies."""
    from torch.distributed.run import main

    die_with_parent(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
    main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--torchrun"]:
        sys.exit("usage: python -m pipelines.distributed --torchrun TORCHRUN-ARGS (the ranks run "
                 "pipelines.train_worker)")
    torchrun_main(sys.argv[2:])
