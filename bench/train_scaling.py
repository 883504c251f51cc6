"""Training over several GPUs: DDP scaling (useful tok/s per GPU on N GPUs vs 1) and the largest base FSDP2 trains.

Run:  python -m bench.run train_scaling                 (CUDA, >= 2 GPUs: DDP 1.1B on 1, 2, 4, ... all GPUs; FSDP2
                                                          7B, 13B, 34B, 70B shapes on all GPUs)
      python -m bench.run train_scaling --gpus 1,2,4,8 --fsdp-models 7b,13b,34b,70b
      python -m bench.run train_scaling --device cpu --model tiny --gpus 1,2 --fsdp-models tiny --steps 3
                                                         (a CPU / gloo run of the same code: checks it, times nothing)

Every case is one torchrun launch (pipelines.distributed.torchrun_command: one node, 127.0.0.1 rendezvous) of this
module's worker, which trains with the trainer's own pieces as pipelines.train.run does with nproc > 1:
BatchSource (each rank takes its share of the step's micro-batches), train_step (the adapter's gradients summed in
one all-reduce), make_optimizer (fused AdamW), the fast path (fast_train.enable), and under fsdp
distributed.shard_model (each decoder layer's frozen weights sharded, the adapter replicated).
- Data and model: bench/train_throughput.py's GPU mode: real Bitext + SGD text tokenized with the project's
  tokenizer, packed rows of 1024 tokens, 8 rows per GPU per micro-batch, LoRA r16 on all seven linear kinds,
  random weights (fine for throughput), frozen base in bf16, adapter and optimizer fp32.
- DDP (weak scaling): each GPU runs one micro-batch of the same size per step (grad_accum = N), so the global
  batch grows with N; useful (non-pad) tok/s per GPU = all ranks' loss-taking rows' real tokens / seconds / N.
  Scaling efficiency = tok/s per GPU at N / tok/s at 1 (the issue's target: >= 0.9 at 2 GPUs on the 1.1B shape).
- FSDP2 (largest base): each shape is built on the meta device, sharded, then materialised (to_empty) with random
  values on each rank's shard: no rank ever holds the whole base. A shape that runs out of memory is reported
  as such (status oom) with its peak; the activations of a step (the trainer has no activation checkpointing)
  are what bounds the shape, hence the smaller per-GPU batch (--fsdp-batch-size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ratio, write_result

NAME = "train_scaling"
REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama shapes (vocab 32000); 1b and 7b are bench/train_throughput.py's LLAMA_1B / LLAMA_7B
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40},
    "34b": {"hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 48,
            "num_attention_heads": 64, "num_key_value_heads": 8},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8},
}


def _llama_config(shape: str):
    from transformers import AutoConfig, LlamaConfig

    if shape == "tiny":
        return AutoConfig.from_pretrained(REPO / "models" / "tiny-llama")
    return LlamaConfig(**SHAPES[shape], vocab_size=32000, max_position_embeddings=4096, attn_implementation="sdpa",
                       use_cache=False)


def _materialise(model, device: str) -> None:
    """A meta-device model (sharded or not) given storage on `device` and random values: weights N(0, 0.02), norms
    1, LoRA B 0 (the same seed on every rank, so the replicated parts agree); rotary buffers recomputed."""
    import torch

    model.to_empty(device=device)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal.tie_weights()  # to_empty gives each module its own tensor: re-tie the embeddings where the config ties them
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            if "lora_B" in name:
                t.zero_()
            elif p.dim() == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "config"):
                fresh = type(module)(module.config)
                for key, buf in fresh.named_buffers(recurse=False):
                    getattr(module, key).copy_(buf)


def build(shape: str, strategy: str, rank, device: str):
    """(LoRA model on the device, frozen base bf16 on CUDA / fp32 on the CPU, number of sharded layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.train_throughput import lora
    from pipelines import distributed, train

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = _llama_config(shape)
    if strategy == "fsdp":
        with torch.device("meta"):
            model = lora(AutoModelForCausalLM.from_config(cfg, dtype=dtype))
        sharded = distributed.shard_model(model, rank)
        _materialise(model, device)
        return model, sharded
    torch.manual_seed(0)  # as bench/train_throughput.build_model: the same random weights on every rank
    with torch.device(device):
        model = lora(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    return train.prepare_precision(model, "bf16" if device.startswith("cuda") else "fp32"), 0


def worker(case: dict, out: Path) -> None:
    """One rank of one case: train `steps` timed steps after `warmup`; rank 0 writes the case's result."""
    import datetime

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from bench.train_throughput import text_rows
    from pipelines import distributed, fast_train, train

    distributed.die_with_parent()
    local = int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local}" if case["device"] == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=case["timeout_s"]))
    rank = distributed.current(case["strategy"], device)
    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-llama")
    rows = text_rows(tok, case["max_len"], case["examples"])
    model, sharded = build(case["shape"], case["strategy"], rank, device)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    fast = fast_train.enable(model, device, precision=precision, compile="auto" if case["strategy"] == "ddp" else "off",
                             attention="auto" if device.startswith("cuda") else "varlen", log=lambda *a: None)
    model.train()
    cfg = train.TrainConfig(batch_size=case["batch_size"], max_len=case["max_len"], packing=True,
                            grad_accum=rank.world, nproc=rank.world, strategy=case["strategy"], device=case["device"],
                            precision=precision)
    batches = train.BatchSource(rows, cfg, tok.pad_token_id, device, rank.rank, rank.world)
    if fast.compiled:
        batches.width = cfg.max_len
    opt = train.make_optimizer(model, 1e-4)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(case["warmup"]):
        train.train_step(model, opt, batches, cfg.grad_accum, rank=rank)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    outs = [train.train_step(model, opt, batches, cfg.grad_accum, rank=rank) for _ in range(case["steps"])]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0],
                        device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank.main:
        useful = sum(o["real_tokens"] for o in outs)  # already summed over the ranks by train_step
        out.write_text(json.dumps({
            "status": "ok", "seconds": round(seconds, 3), "useful_tokens": useful,
            "tok_s_per_gpu": round(useful / seconds / rank.world, 1), "peak_gib_per_gpu": round(float(peak[0]), 2),
            "final_loss": round(outs[-1]["loss"], 4), "sharded_layers": sharded,
            "parameters_per_gpu": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                      for p in model.parameters()),
            "total_parameters": sum(p.numel() for p in model.parameters()), "fast_path": fast.describe()}))
    dist.destroy_process_group()


def run_case(case: dict, timeout_s: int) -> dict:
    """One torchrun launch of `case`; its result, or status oom / failed / timeout with the log's tail."""
    from pipelines.distributed import torchrun_command

    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = torchrun_command(case["nproc"], Path(tmp) / "logs",
                               ["-m", "bench.train_scaling", "--worker", json.dumps(case), str(out)])
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                 str(max(1, (os.cpu_count() or 1) // case["nproc"])))}
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "note": f"no result within {timeout_s} s"}
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        logs = "\n".join(p.read_text(errors="replace") for p in sorted(Path(tmp).glob("logs/**/stderr.log")))
        text = logs + proc.stdout + proc.stderr
        oom = "OutOfMemoryError" in text or "CUDA out of memory" in text
        tail = [x for x in text.splitlines() if x.strip()][-6:]
        return {"status": "oom" if oom else "failed", "note": " / ".join(tail)[-600:]}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]), Path(argv[2]))
        return {}
    p = argparse.ArgumentParser(prog="python -m bench.run train_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto (default): cuda with >= 2 GPUs, else skipped; cuda; cpu (a gloo run of the code)")
    p.add_argument("--model", default="1b", help="DDP scaling shape (1b, 7b; tiny on the CPU)")
    p.add_argument("--gpus", default=None, help="comma-separated process counts for DDP (default 1,2,4,.. all GPUs)")
    p.add_argument("--fsdp-models", default="7b,13b,34b,70b", help="comma-separated shapes for FSDP2 ('' = none)")
    p.add_argument("--fsdp-gpus", type=int, default=None, help="processes for the FSDP2 cases (default: all GPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per GPU per step (DDP)")
    p.add_argument("--fsdp-batch-size", type=int, default=2, help="packed rows per GPU per step (FSDP2)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--examples", type=int, default=4000, help="real examples to draw rows from")
    p.add_argument("--case-timeout", type=int, default=1800, help="seconds per case before it counts as failed")
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)

    import torch

    if args.device == "auto":
        if torch.cuda.device_count() < 2:
            print(f"  skipped: needs >= 2 CUDA GPUs (torch sees {torch.cuda.device_count()}); --device cpu checks "
                  f"the code on gloo", flush=True)
            return {}
        args.device = "cuda"
    if args.device == "cuda":
        n_gpu = torch.cuda.device_count()
        if n_gpu < 2:
            raise SystemExit(f"train_scaling needs >= 2 CUDA GPUs (torch sees {n_gpu}); "
                             f"--device cpu runs the same code on gloo as a check")
    else:
        n_gpu = 2
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else \
        sorted({1, *[2**k for k in range(1, 8) if 2**k <= n_gpu], n_gpu})
    common = {"device": args.device, "max_len": args.max_len, "steps": args.steps, "warmup": args.warmup,
              "examples": args.examples, "timeout_s": min(args.case_timeout, 900)}
    rows, ratios = [], []
    for n in gpus:
        case = {**common, "strategy": "ddp", "shape": args.model, "nproc": n, "batch_size": args.batch_size}
        print(f"  ddp {args.model} on {n}", flush=True)
        rows.append({"case": f"ddp_{args.model}_x{n}", "strategy": "ddp", "model": args.model, "gpus": n,
                     **run_case(case, args.case_timeout)})
        print(f"    {rows[-1]}", flush=True)
    base = next((r for r in rows if r["gpus"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if base and r["gpus"] > 1 and r["status"] == "ok":
            ratios.append(ratio(f"ddp scaling efficiency {args.model}, {r['gpus']} GPUs", r["tok_s_per_gpu"],
                                base["tok_s_per_gpu"], "useful tok/s per GPU at N / at 1 (target >= 0.9 at 2)"))
    n_fsdp = args.fsdp_gpus or max(gpus)
    for shape in [s for s in args.fsdp_models.split(",") if s]:
        case = {**common, "strategy": "fsdp", "shape": shape, "nproc": n_fsdp, "batch_size": args.fsdp_batch_size}
        print(f"  fsdp {shape} on {n_fsdp}", flush=True)
        rows.append({"case": f"fsdp_{shape}_x{n_fsdp}", "strategy": "fsdp", "model": shape, "gpus": n_fsdp,
                     **run_case(case, args.case_timeout)})
        print(f"    {rows[-1]}", flush=True)
    fits = [r["model"] for r in rows if r["strategy"] == "fsdp" and r["status"] == "ok"]
    result = {"title": f"Training scaling over GPUs ({args.device}): DDP tok/s per GPU, largest FSDP2 base",
              "description": __doc__.split("\n\n")[1].replace("\n", " "),
              "command": " ".join(["python -m bench.run", NAME, *argv]), "rows": rows, "ratios": ratios,
              "notes": [(f"largest FSDP2 shape that trained on {n_fsdp} GPUs: {fits[-1] if fits else 'none'} "
                         f"({args.fsdp_batch_size} x {args.max_len}-token rows per GPU)"),
                        "each case is one timed run of --steps steps after --warmup (seconds column)"]}
    name = NAME if args.device == "cuda" else f"{NAME}_cpu_smoke"
    path = write_result(name, result, **({"results_dir": Path(args.results_dir)} if args.results_dir else {}))
    print(f"  wrote {path}")
    return result


if __name__ == "__main__":
    main()
