"""Training throughput: our trainer versus a plain PEFT + Hugging Face `Trainer` loop, on the same model and text.

Run:  python -m bench.run train_throughput                      (CPU: the tiny base, a few steps per case)
      python -m bench.run train_throughput --device cuda --model 1b   (GPU: a random-weight TinyLlama-1.1B shape)

Every case trains the same LoRA (r16, all seven linear kinds) on the same real Bitext + SGD text, tokenized with the
project's tokenizer, and reports useful (non-pad) tokens per second over the timed steps (after warm-up steps) and the
peak GPU memory:
- plain: PEFT + transformers.Trainer, DataCollatorForSeq2Seq padding each random batch to its longest example (the
  default recipe), bf16 autocast on a GPU, loss over all positions' logits as the model computes it;
- plain, group_by_length: the same with the Trainer's own length grouping (a stronger baseline);
- ours: pipelines.train (BatchSource + train_step): packed rows (no padding), output layer only where a loss is taken,
  fused AdamW; also ours length-grouped without packing, and DoRA in our trainer (speed and memory vs LoRA).
Then PiSSA init at Llama-7B layer shapes on the same device: a cold exact SVD versus a cache hit (the stored A, B and
residual read from disk and copied into the layer).
Random weights are fine for throughput; the text is real so the length distribution (hence padding) is.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.common import ratio, row, timed, write_result

NAME = "train_throughput"
REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "models" / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def text_rows(tokenizer, max_len: int, n: int, seed: int = 0):
    """(ids, labels) for n real examples: Bitext support pairs and SGD dialogue turns, half each."""
    from pipelines.data import load_bitext, load_dialogue, sample
    from pipelines.lm import tokenize

    examples = sample(load_bitext(), n // 2, seed) + load_dialogue(n=n - n // 2, seed=seed)
    random.Random(seed).shuffle(examples)
    return tokenize(examples, tokenizer, max_len)


def build_model(kind: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if kind == "tiny":
        return AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=dtype).to(device)
    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_1B if kind == "1b" else LLAMA_7B), attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def lora(model, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                            use_dora=dora, task_type="CAUSAL_LM"))


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str):
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def quantized_model(args, compute_dtype: str = "float32"):
    """The bench model as the trainer loads a QLoRA / QPiSSA base (pipelines.lm.build_model): the same random
    weights saved and loaded back nf4-quantized by pipelines.lm.quantize (bitsandbytes; compute dtype float32 as the
    trainer asks, or `compute_dtype`), then peft's prepare_model_for_kbit_training."""
    import torch
    from peft import prepare_model_for_kbit_training

    from pipelines import lm

    full = build_model(args.model, args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory(prefix="bench-nf4-") as tmp:
        full.save_pretrained(tmp)
        del full
        gc.collect()
        model = lm.quantize(Path(tmp), "nf4", device=args.device, dtype=compute_dtype)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _setup(args, rows, pad_id, *, packing: bool, dora: str | None = None, fast: bool = False,
           batch_size: int | None = None, liger_layers: str = "auto", nf4: str | None = None,
           source_cls=None, compile: str = "auto"):
    """(model, optimizer, batches, fast path) as pipelines.train.run builds them, on a fresh model."""
    import torch
    from pipelines import fast_dora, fast_train, train

    if nf4:
        model = lora(quantized_model(args, nf4))
    else:
        model = lora(build_model(args.model, args.device, torch.float32), dora=dora is not None)
    if dora == "fast":
        fast_dora.enable(model)
    cfg = train.TrainConfig(batch_size=batch_size or args.batch_size, max_len=args.max_len, packing=packing,
                            steps=args.steps, device=args.device, precision=args.precision)
    device, precision = train.resolve_device_precision(cfg)
    model = train.prepare_precision(model, precision)
    fp = None
    if fast:
        fp = fast_train.enable(model, device, precision=precision, liger_layers=liger_layers, compile=compile,
                               attention="auto" if device.startswith("cuda") else "varlen")
    model.train()
    opt = train.make_optimizer(model, 1e-4)
    batches = (source_cls or train.BatchSource)(rows, cfg, pad_id, device)
    if fp is not None and fp.compiled:
        batches.width = cfg.max_len  # as pipelines.train.run does: one shape every step
    return model, opt, batches, fp, cfg, device


def _warm(step, warmup: int) -> int:
    """Warm-up until a step compiles nothing new (at most 8 more steps): a graph compiled inside the timed steps
    (seen: the varlen bound turning dynamic at its second value) would be counted as training time."""
    from torch._dynamo.utils import counters

    extra = 0
    while True:
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(warmup if extra == 0 else 1):
            step()
        if counters["stats"]["unique_graphs"] == graphs or extra >= 8:
            return extra
        extra += 1


_ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def _timed_steps(step, n: int, device: str) -> dict:
    """n steps: total seconds, per-step milliseconds (each step ends on the host's read of its loss), the caching
    allocator's device mallocs/frees/retries and the time Python's garbage collector ran, over these steps."""
    import torch

    gpu = device.startswith("cuda")
    gc_time = [0.0, 0]
    t_gc = {}

    def on_gc(phase, info):
        if phase == "start":
            t_gc["t"] = time.perf_counter()
        elif "t" in t_gc:
            gc_time[0] += time.perf_counter() - t_gc.pop("t")
            gc_time[1] += 1

    stats0 = torch.cuda.memory_stats() if gpu else {}
    gc.callbacks.append(on_gc)
    try:
        _sync(device)
        t0 = last = time.perf_counter()
        per, outs = [], []
        for _ in range(n):
            outs.append(step())
            now = time.perf_counter()
            per.append(round((now - last) * 1e3, 1))
            last = now
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(on_gc)
    stats1 = torch.cuda.memory_stats() if gpu else {}
    alloc = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in _ALLOC_KEYS if k in stats1}
    return {"seconds": seconds, "step_ms": per, "outs": outs, "allocator": alloc,
            "gc_ms": round(gc_time[0] * 1e3, 1), "gc_runs": gc_time[1]}


def ours(args, rows, pad_id, *, packing: bool, dora: str | None = None, fast: bool = False,
         batch_size: int | None = None, profile: bool = False, liger_layers: str = "auto",
         nf4: str | None = None, compile: str = "auto", step: str = "trainer") -> dict:
    """Our trainer's step loop (the functions pipelines.train.run uses) on a fresh model; dora: "fast" (ours, the
    trainer's default) or "peft" (PEFT's own DoRA forward); fast: pipelines.fast_train's CUDA path as run() turns it
    on (on the CPU, only its varlen attention, through the reference kernel); nf4: an nf4 base (QLoRA) with this
    compute dtype ("float32": the trainer's); profile: a torch.profiler table of two more steps; step: "trainer"
    (pipelines.train.train_step) or "deferred" (deferred_step: the change proposed for it)."""
    from pipelines import train
    from torch._dynamo.utils import counters

    model, opt, batches, fp, cfg, device = _setup(args, rows, pad_id, packing=packing, dora=dora, fast=fast,
                                                  batch_size=batch_size, liger_layers=liger_layers, nf4=nf4,
                                                  compile=compile)
    _reset_peak(device)
    pending = []

    def one():
        if step == "trainer":
            return train.train_step(model, opt, batches, 1)
        r = deferred_step(model, opt, batches)
        pending.append(r["loss"])
        return {**r, "loss": float(pending.pop(0)) if len(pending) > 1 else None}

    breaks0, graphs0 = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    extra = _warm(one, args.warmup)
    graphs_timed = counters["stats"]["unique_graphs"]
    t = _timed_steps(one, args.steps, device)
    outs = t.pop("outs")
    final = float(pending[-1]) if pending else outs[-1]["loss"]
    result = {"seconds": t["seconds"], "useful_tokens": sum(o["real_tokens"] for o in outs),
              "padded_tokens": sum(o["padded_tokens"] for o in outs), "peak_gib": _peak_gib(device),
              "final_loss": final, "rows": cfg.batch_size, "steps": args.steps, "extra_warmup": extra,
              **{k: v for k, v in t.items() if k != "seconds"}}
    if fp is not None:
        result["fast_path"] = fp.describe()
        breaks = {k: v - breaks0.get(k, 0) for k, v in counters["graph_break"].items() if v > breaks0.get(k, 0)}
        result["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs0  # all steps, warm-up included
        result["graphs_compiled_timed"] = counters["stats"]["unique_graphs"] - graphs_timed
        result["graph_breaks"] = sum(breaks.values())
        result["graph_break_reasons"] = [k[:200] for k in sorted(breaks, key=breaks.get, reverse=True)[:3]]
    if profile:
        result["profile"] = _profile(one, device)
    del model, opt
    return result


def deferred_step(model, opt, batches) -> dict:
    """pipelines.train.train_step's GPU branch (fused AdamW, one micro-batch, one process) with no host wait: the
    token counts stay host integers (train_step copies them into a device tensor from pageable memory, which waits
    for the device's queue to drain, right after the backward) and "loss" is a 0-dim device tensor the caller reads
    after the next step is queued. Measured here as the change proposed for pipelines/train.py (not ours to edit)."""
    import torch
    from pipelines import train

    opt.zero_grad(set_to_none=True)
    ids, labels, mask, pos, n_real, n_padded, meta = next(batches)
    with train.autocast_for(model):
        loss_sum, n = train.batch_loss(model, ids, labels, mask, pos, meta)
    (loss_sum / max(n, 1)).backward()
    total = loss_sum.detach().double()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    if opt.defaults.get("fused"):
        opt.found_inf = (~torch.isfinite(total)).float()  # the step is skipped on the device, as train_step does
        try:
            opt.step()
        finally:
            del opt.found_inf
        batches.prefetch()
    elif math.isfinite(float(total)):  # not fused (CPU): the host has to look
        opt.step()
    return {"loss": total / max(n, 1), "loss_tokens": n, "real_tokens": n_real, "padded_tokens": n_padded}


def _traced_source():
    """BatchSource whose batch fetch and prefetch are named ranges in a torch.profiler trace."""
    from torch.profiler import record_function

    from pipelines import train

    class Traced(train.BatchSource):
        def __next__(self):
            with record_function("phase:next_batch"):
                return super().__next__()

        def prefetch(self):
            with record_function("phase:prefetch"):
                return super().prefetch()

    return Traced


class _Phases:
    """Names the parts of a training step in a torch.profiler trace (instrumentation for the idle-time analysis
    only): batch_loss (its decoder forward and head loss), backward, grad clipping and the optimizer step."""

    def __init__(self, opt):
        self.opt = opt

    def __enter__(self):
        import torch
        from torch.profiler import record_function

        from pipelines import fast_train, train

        def named(name, fn):
            def wrapper(*a, **k):
                with record_function(name):
                    return fn(*a, **k)
            return wrapper

        self.saved = [(train, "batch_loss", train.batch_loss), (fast_train, "fused_head_loss",
                                                                fast_train.fused_head_loss),
                      (torch.Tensor, "backward", torch.Tensor.backward),
                      (torch.nn.utils, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_)]
        train.batch_loss = named("phase:forward", train.batch_loss)
        fast_train.fused_head_loss = named("phase:head_loss", fast_train.fused_head_loss)
        torch.Tensor.backward = named("phase:backward", torch.Tensor.backward)
        torch.nn.utils.clip_grad_norm_ = named("phase:clip", torch.nn.utils.clip_grad_norm_)
        self.opt.step = named("phase:opt_step", self.opt.step)
        return self

    def __exit__(self, *exc):
        for owner, name, value in self.saved:
            setattr(owner, name, value)
        del self.opt.step


def idle_summary(events: list[dict], step_name: str = "diag_step") -> dict:
    """Where the device idles in a chrome trace (torch.profiler): the union of kernel/memcpy/memset intervals inside
    the `step_name` ranges, the gaps between them, and what the host was doing during each gap: the named phases
    (phase:*), the CUDA runtime calls (a cudaStreamSynchronize there is the host waiting, a cudaMalloc/cudaFree the
    caching allocator going to the driver) and the host-side ops, each by the idle time it overlaps."""
    import bisect

    X = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in X if e.get("name") == step_name
                   and e.get("cat") == "user_annotation")
    if not steps:
        return {"error": f"no {step_name} ranges in the trace"}
    lo, hi = steps[0][0], steps[-1][1]
    dev = sorted((e["ts"], e["ts"] + e["dur"]) for e in X if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy: list[list[float]] = []
    for a, z in dev:
        a, z = max(a, lo), min(z, hi)
        if z <= a:
            continue
        if busy and a <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], z)
        else:
            busy.append([a, z])
    gaps, at = [], lo
    for a, z in busy:
        if a > at:
            gaps.append((at, a))
        at = max(at, z)
    if at < hi:
        gaps.append((at, hi))
    starts = [g[0] for g in gaps]

    def overlap(a, z):
        i = max(0, bisect.bisect_right(starts, a) - 1)
        total = 0.0
        while i < len(gaps) and gaps[i][0] < z:
            total += max(0.0, min(z, gaps[i][1]) - max(a, gaps[i][0]))
            i += 1
        return total

    by = {"phase": {}, "runtime": {}, "op": {}}
    for e in X:
        cat, name = e.get("cat"), e.get("name", "")
        kind = ("phase" if cat == "user_annotation" and name.startswith("phase:") else
                "runtime" if cat in ("cuda_runtime", "cuda_driver") else "op" if cat == "cpu_op" else None)
        if kind is None:
            continue
        o = overlap(e["ts"], e["ts"] + e["dur"])
        c = by[kind].setdefault(name, [0, 0.0, 0.0])
        c[0] += 1
        c[1] += o
        c[2] += e["dur"]
    idle = sum(z - a for a, z in gaps)
    window = hi - lo
    n = len(steps)

    def top(d, k):
        rows_ = sorted(d.items(), key=lambda kv: -kv[1][1])[:k]
        return [{"name": name[:90], "calls_per_step": round(c[0] / n, 1), "idle_overlap_ms_per_step":
                 round(c[1] / n / 1e3, 2), "host_ms_per_step": round(c[2] / n / 1e3, 2)} for name, c in rows_]

    sizes = {"<10us": [0, 0.0], "10-100us": [0, 0.0], "0.1-1ms": [0, 0.0], ">1ms": [0, 0.0]}
    for a, z in gaps:
        d = z - a
        key = "<10us" if d < 10 else "10-100us" if d < 100 else "0.1-1ms" if d < 1000 else ">1ms"
        sizes[key][0] += 1
        sizes[key][1] += d
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in X if e.get("cat") == "user_annotation"
                    and e.get("name", "").startswith("phase:"))
    biggest = []
    for a, z in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        step_i = max(0, bisect.bisect_right([s[0] for s in steps], a) - 1)
        inside = [p[2] for p in phases if p[0] < z and p[1] > a]
        biggest.append({"ms": round((z - a) / 1e3, 2), "at_ms_in_step": round((a - steps[step_i][0]) / 1e3, 1),
                        "phases": inside[:4]})
    return {"steps": n, "window_ms_per_step": round(window / n / 1e3, 1),
            "busy_ms_per_step": round((window - idle) / n / 1e3, 1), "idle_ms_per_step": round(idle / n / 1e3, 1),
            "idle_fraction": round(idle / window, 4),
            "gaps_per_step": {k: {"count": round(v[0] / n, 1), "ms": round(v[1] / n / 1e3, 2)}
                              for k, v in sizes.items()},
            "idle_by_phase": top(by["phase"], 12), "idle_by_runtime_call": top(by["runtime"], 12),
            "idle_by_host_op": top(by["op"], 15), "largest_gaps": biggest}


def idle_text(idle: dict, k: int = 6) -> str:
    """idle_summary as a few lines of text: totals, gap sizes, then the top k of each attribution."""
    if "error" in idle:
        return idle["error"]
    lines = [f"per step: window {idle['window_ms_per_step']} ms, device busy {idle['busy_ms_per_step']} ms, idle "
             f"{idle['idle_ms_per_step']} ms ({idle['idle_fraction']:.1%}); gaps "
             + ", ".join(f"{key}: {g['count']} = {g['ms']} ms" for key, g in idle["gaps_per_step"].items())]
    for title, key in (("idle overlapping named phases", "idle_by_phase"),
                       ("idle overlapping CUDA runtime calls", "idle_by_runtime_call"),
                       ("idle overlapping host ops (nested ops overlap)", "idle_by_host_op")):
        lines.append(f"{title} (idle ms / host ms / calls, per step):")
        lines += [f"  {x['idle_overlap_ms_per_step']:>7} / {x['host_ms_per_step']:>7} / {x['calls_per_step']:>7}  "
                  f"{x['name']}" for x in idle[key][:k]]
    lines.append("largest gaps (ms, at ms into the step, phases): " + "; ".join(
        f"{g['ms']} @ {g['at_ms_in_step']} {'+'.join(p[6:] for p in g['phases'])}" for g in idle["largest_gaps"][:k]))
    return "\n".join(lines)


def sync_sites(step, max_sites: int = 12) -> list[dict]:
    """The host<->device synchronisations one step makes (torch.cuda.set_sync_debug_mode), by Python call site."""
    import traceback
    import warnings

    import torch

    sites: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        here = " <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in frames[-4:][::-1])
        key = f"{str(message)[:60]} @ {here}"
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"site": k, "count": v} for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:max_sites]]


def diagnose(args, rows, pad) -> dict:
    """Where the idle device time of ours (fast path, one model) goes, and what removing each cause gives: the same
    model and optimizer stepped as the trainer does with Liger's loss (two syncs per step), with our sync-free head
    loss, and with that plus the loss read deferred by a step (deferred_step: a change proposed for
    pipelines/train.py). For each: timed steps (tok/s, per-step ms, allocator and gc counts), the sync sites of one
    step, and an idle analysis of a 3-step torch.profiler trace (idle_summary)."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from pipelines import fast_train, train

    b = args.ours_batches[0]
    model, opt, batches, fp, cfg, device = _setup(args, rows, pad, packing=True, fast=True, batch_size=b,
                                                  source_cls=_traced_source())
    out = {"rows": b, "fast_path": fp.describe(), "variants": {}}
    pending = []

    def deferred():
        r = deferred_step(model, opt, batches)
        pending.append(r["loss"])
        if len(pending) > 1:
            float(pending.pop(0))  # the previous step's loss, read after this step is queued
        return {**r, "loss": None}

    variants = [("liger_loss", "liger", lambda: train.train_step(model, opt, batches, 1)),
                ("nosync_loss", "nosync", lambda: train.train_step(model, opt, batches, 1)),
                ("nosync_loss_deferred_read", "nosync", deferred)]
    for name, head, step in variants:
        if args.only and name not in args.only:
            continue
        fast_train.HEAD_LOSS = head
        extra = _warm(step, args.warmup)
        t = _timed_steps(step, args.steps, device)
        outs = t.pop("outs")
        useful = sum(o["real_tokens"] for o in outs)
        v = {"useful_tok_s": round(useful / t["seconds"], 1), "extra_warmup": extra, **t}
        v["sync_sites"] = sync_sites(step)
        with tempfile.TemporaryDirectory() as tmp:
            with _Phases(opt), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    with record_function("diag_step"):
                        step()
                _sync(device)
            prof.export_chrome_trace(f"{tmp}/trace.json")
            events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
        v["idle"] = idle_summary(events)
        pending.clear()
        out["variants"][name] = v
        print(f"  diagnose {name}: {v['useful_tok_s']:.0f} useful tok/s, idle {v['idle'].get('idle_fraction')}, "
              f"step ms {t['step_ms']}", flush=True)
        if args.partial:
            Path(args.partial).write_text(json.dumps(out, indent=1, default=str))
    fast_train.HEAD_LOSS = "nosync"
    return out


def _profile(step, device: str, n: int = 2, top: int = 25) -> str:
    """torch.profiler table (by self device time) of n steps: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def matmul_peak_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate (n x n x n, random data, mean of `repeats` after 3 warm-ups): the MFU denominator."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def flops_per_token(model_cfg, seq_len: float) -> float:
    """Model FLOPs of one trained token with LoRA: 4x the matmul parameters (forward 2, input gradients 2; the
    frozen weights get no weight gradient; adapters are negligible) plus causal attention (QK and PV, forward and
    the two backward products: 6 * ctx * hidden per layer, ctx the example's length on average)."""
    h, i, n = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers
    kv = h * model_cfg.num_key_value_heads // model_cfg.num_attention_heads
    matmul = n * (2 * h * h + 2 * h * kv + 3 * h * i) + h * model_cfg.vocab_size
    return 4 * matmul + 6 * seq_len * h * n


def liger_compile(args, batch: int) -> dict:
    """The strongest library stack: PEFT LoRA + Liger (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) + torch.
    compile of each decoder layer, bf16 weights, bf16 autocast, fused AdamW, on synthetic full rows (every token a
    real token, loss over all positions)."""
    import torch

    from pipelines import fast_train

    import sys

    gpu = args.device.startswith("cuda")
    base = build_model(args.model, args.device, torch.bfloat16 if gpu else torch.float32)
    notes = []
    modeling = sys.modules[type(base).__module__]
    saved = dict(vars(modeling))  # Liger rebinds module names (RoPE, RMSNorm, MLP): put back after this case
    if gpu and fast_train.liger_available() is None:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    else:
        notes.append("no liger")
    model = lora(base)
    if gpu:
        for layer in fast_train.decoder_layers(model):
            layer.compile()
    else:
        notes.append("no compile")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=gpu)
    vocab = base.config.vocab_size
    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, args.max_len), device=args.device, generator=g)
    _reset_peak(args.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(args.device)
            t0 = time.perf_counter()
        loss = step()
    _sync(args.device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "useful_tokens": batch * args.max_len * args.steps, "padded_tokens":
           batch * args.max_len * args.steps, "peak_gib": _peak_gib(args.device), "final_loss": float(loss.detach()),
           "rows": batch, "steps": args.steps, "notes": notes}
    del model, opt, base
    for name, value in saved.items():
        if vars(modeling).get(name) is not value:
            setattr(modeling, name, value)
    return out


def plain(args, rows, *, group_by_length: bool, batch_size: int | None = None) -> dict:
    """PEFT + transformers.Trainer with ordinary padding; the batches it trains on are counted as they go."""
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu and args.precision != "fp32" else torch.float32
    model = lora(build_model(args.model, args.device, dtype))
    data = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in rows]
    counts: list[tuple[int, int]] = []
    clock: dict[str, float] = {}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if len(counts) == args.warmup:
                _sync(args.device)
                clock["t0"] = time.perf_counter()
            counts.append((int(inputs["attention_mask"].sum()), int(inputs["attention_mask"].numel())))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        fields = TrainingArguments.__dataclass_fields__
        if "train_sampling_strategy" in fields:  # transformers >= 5.2x; older: a boolean
            grouping = {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
        else:
            grouping = {"group_by_length": group_by_length}
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size or args.batch_size,
                                  max_steps=args.warmup + args.steps, learning_rate=1e-4, bf16=dtype == torch.bfloat16,
                                  logging_strategy="no", save_strategy="no", report_to=[], **grouping,
                                  dataloader_num_workers=0, remove_unused_columns=False, seed=0,
                                  use_cpu=not on_gpu, disable_tqdm=True)
        collator = DataCollatorForSeq2Seq(tokenizer=AutoTokenizer.from_pretrained(TINY_BASE), padding="longest",
                                          label_pad_token_id=-100)
        _reset_peak(args.device)
        trainer = CountingTrainer(model=model, args=targs, train_dataset=_ListDataset(data), data_collator=collator)
        trainer.train()
        _sync(args.device)
    seconds = time.perf_counter() - clock["t0"]
    timed_counts = counts[args.warmup:]
    return {"seconds": seconds, "useful_tokens": sum(c[0] for c in timed_counts),
            "padded_tokens": sum(c[1] for c in timed_counts), "peak_gib": _peak_gib(args.device)}


class _ListDataset:
    """A list as a map-style dataset (with the lengths the Trainer's group_by_length reads)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pissa_cold_vs_hit(device: str, rank: int, repeats: int) -> tuple[list[dict], list[dict]]:
    """Exact SVD of Llama-7B layer shapes on `device` versus loading the stored (A, B, residual) into the layer."""
    import torch
    from safetensors.torch import load_file, save_file

    from bench.init_cache import SHAPES_7B, pissa_from_svd

    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="bench-pissa-") as tmp, torch.no_grad():
        for label, shape in SHAPES_7B.items():
            W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
            pissa_from_svd(W, rank, 1.0, None)  # warm-up: kernels, workspace
            cold = timed(lambda: (pissa_from_svd(W, rank, 1.0, None), _sync(device)), repeats)
            path = Path(tmp) / "entry.safetensors"
            save_file({k: v.cpu() for k, v in pissa_from_svd(W, rank, 1.0, None).items()}, str(path))
            layer = torch.empty_like(W)

            def hit():
                got = load_file(str(path))
                layer.copy_(got["residual"].to(device))
                got["lora_A"].to(device), got["lora_B"].to(device)
                _sync(device)

            hits = timed(hit, repeats)
            rows += [row(f"PiSSA {label} r{rank} on {device}: cold exact SVD", cold),
                     row(f"PiSSA {label} r{rank} on {device}: cache hit (read + copy into layer)", hits)]
            ratios.append(ratio(f"pissa_hit_vs_cold {label}", median(hits), median(cold), "target <= 0.05"))
    return rows, ratios


def versus_liger(args, rows, tok, lengths) -> dict:
    """GPU suite, one process: ours (fast path, and plain) on packed real rows vs PEFT + Liger + compile on full rows
    at its best batch; DoRA vs LoRA in ours; MFU against the measured matmul peak. Writes partial JSON as it goes."""
    import json

    import torch
    from transformers import LlamaConfig

    gpu = args.device.startswith("cuda")
    model_cfg = (LlamaConfig(**LLAMA_1B) if args.model == "1b" else
                 LlamaConfig.from_pretrained(TINY_BASE) if args.model == "tiny" else LlamaConfig(**LLAMA_7B))
    peak = matmul_peak_tflops(args.device) if gpu else None
    cases: dict[str, dict] = {}
    mean_len = sum(lengths) / len(lengths)
    ctx = sum(n * n for n in lengths) / sum(lengths)  # a token's average example length (packed: its own example)

    def record(name, r, seq_len):
        r["useful_tok_s"] = r["useful_tokens"] / r["seconds"]
        r["padding_fraction"] = 1 - r["useful_tokens"] / max(r["padded_tokens"], 1)
        if peak:
            r["mfu"] = r["useful_tok_s"] * flops_per_token(model_cfg, seq_len) / (peak * 1e12)
        cases[name] = r
        print(f"  {name}: {r['useful_tok_s']:.0f} useful tok/s, rows {r.get('rows')}, peak {r['peak_gib']} GiB, "
              f"mfu {r.get('mfu')}", flush=True)
        if args.partial:
            Path(args.partial).write_text(json.dumps({"peak_tflops": peak, "cases": cases}, indent=1, default=str))
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    def wanted(base):
        return not args.only or base in args.only

    def attempt(name, fn, seq_len):
        try:
            record(name, fn(), seq_len)
        except Exception as e:  # keep the other cases: a broken one is a result too
            cases[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"  {name}: FAILED {cases[name]['error']}", flush=True)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()

    pad = tok.pad_token_id
    for i, b in enumerate(args.ours_batches):  # ours at each token budget; the best one is compared
        if wanted("ours_fast"):
            attempt(f"ours_fast_r{b}", lambda: ours(args, rows, pad, packing=True, fast=True, batch_size=b,
                                                     profile=args.profile and i == 0), ctx)
    fast_ok = {k: c for k, c in cases.items() if k.startswith("ours_fast_r") and "error" not in c}
    best_rows = (max(fast_ok.values(), key=lambda c: c["useful_tok_s"])["rows"] if fast_ok
                 else args.ours_batches[0])
    if wanted("ours_fast_dora"):
        attempt(f"ours_fast_dora_r{best_rows}", lambda: ours(args, rows, pad, packing=True, fast=True, dora="fast",
                                                              batch_size=best_rows), ctx)
    if wanted("ours_fast_deferred"):  # the trainer with the change proposed for pipelines/train.py
        attempt(f"ours_fast_deferred_r{best_rows}",
                lambda: ours(args, rows, pad, packing=True, fast=True, batch_size=best_rows, step="deferred"), ctx)
    for compute in args.qlora_compute:  # QLoRA: nf4 base (bitsandbytes), same rows as the DoRA comparison
        if wanted("ours_fast_qlora"):
            name = f"ours_fast_qlora_{compute}_r{best_rows}"
            attempt(name, lambda: ours(args, rows, pad, packing=True, fast=True, nf4=compute, batch_size=best_rows),
                    ctx)
            if "error" in cases[name]:  # e.g. torch.compile through bitsandbytes' layers: say how it runs without
                attempt(f"ours_fast_nocompile_qlora_{compute}_r{best_rows}",
                        lambda: ours(args, rows, pad, packing=True, fast=True, nf4=compute, batch_size=best_rows,
                                     compile="off"), ctx)
    if wanted("ours_fast_liger_layers"):  # the previous fast path: Liger's kernels inside the compiled layers
        attempt(f"ours_fast_liger_layers_r{args.ours_batches[0]}",
                lambda: ours(args, rows, pad, packing=True, fast=True, liger_layers="on",
                             batch_size=args.ours_batches[0]), ctx)
    if wanted("ours_plain"):
        attempt(f"ours_plain_r{args.ours_batches[0]}",
                lambda: ours(args, rows, pad, packing=True, batch_size=args.ours_batches[0]), ctx)
    for b in args.liger_batches:
        if wanted("liger_compile"):
            attempt(f"liger_compile_b{b}", lambda: liger_compile(args, b), args.max_len)
    ok = {k: c for k, c in cases.items() if "error" not in c}
    liger = [c for k, c in ok.items() if k.startswith("liger_compile")]
    best = max(liger, key=lambda c: c["useful_tok_s"]) if liger else None

    def val(name, key="useful_tok_s"):
        return ok.get(name, {}).get(key)

    fast = {k: c for k, c in ok.items() if k.startswith("ours_fast_r")}
    best_ours_name = max(fast, key=lambda k: fast[k]["useful_tok_s"]) if fast else None
    best_ours = fast.get(best_ours_name) if best_ours_name else None
    ratios = []
    if best and best_ours:
        ratios.append(ratio("useful_tok_s_vs_liger_compile", best_ours["useful_tok_s"], best["useful_tok_s"],
                            f"ours (fast path, packed real rows, best of {sorted(c['rows'] for c in fast.values())} "
                            f"rows: {best_ours['rows']}) vs PEFT + Liger + compile at its best batch "
                            f"({best['rows']} full rows); target >= 1.0"))
    plain_name = f"ours_plain_r{args.ours_batches[0]}"
    same_rows = f"ours_fast_r{args.ours_batches[0]}"
    if best and val(f"ours_fast_deferred_r{best_rows}"):
        ratios.append(ratio("useful_tok_s_vs_liger_compile_deferred", val(f"ours_fast_deferred_r{best_rows}"),
                            best["useful_tok_s"], f"ours with the change proposed for pipelines/train.py (no host "
                            f"wait inside a step; bench deferred_step), {best_rows} rows, vs the same library stack"))
    if best and val(plain_name):
        ratios.append(ratio("useful_tok_s_vs_liger_compile_plain_path", val(plain_name), best["useful_tok_s"],
                            f"ours with the fast path off ({args.ours_batches[0]} rows)"))
    if val(same_rows) and val(plain_name):
        ratios.append(ratio("fast_path_speedup", val(same_rows), val(plain_name),
                            f"ours fast vs ours plain, {args.ours_batches[0]} rows each"))
    old_fast = f"ours_fast_liger_layers_r{args.ours_batches[0]}"
    if val(same_rows) and val(old_fast):
        ratios.append(ratio("fast_path_vs_liger_in_layers", val(same_rows), val(old_fast),
                            "this fast path (Inductor fuses norm/RoPE/SwiGLU, fused LoRA linears) vs Liger's kernels "
                            f"inside the compiled layers, {args.ours_batches[0]} rows each"))
    if best_ours and best_ours.get("mfu"):
        ratios.append({"ratio": "mfu", "value": round(best_ours["mfu"], 4),
                       "note": f"ours fast path ({best_ours['rows']} rows), model FLOPs / measured bf16 matmul peak "
                               f"{peak:.0f} TFLOP/s; target >= 0.40"})
    if best and best.get("mfu"):
        ratios.append({"ratio": "mfu_liger_compile", "value": round(best["mfu"], 4), "note": "the library stack"})
    dora_name = next((k for k in ok if k.startswith("ours_fast_dora_r")), None)
    if dora_name and val(f"ours_fast_r{ok[dora_name]['rows']}"):
        ref = f"ours_fast_r{ok[dora_name]['rows']}"
        ratios += [ratio("dora_speed_ratio", val(dora_name), val(ref),
                         f"fast path both, {ok[dora_name]['rows']} rows; target >= 0.85"),
                   ratio("dora_memory_ratio", val(dora_name, "peak_gib"), val(ref, "peak_gib"),
                         "peak allocated, same rows; target <= 1.2")]
    for k in [k for k in ok if k.startswith("ours_fast_qlora_")]:
        compute, r = k[len("ours_fast_qlora_"):].rsplit("_r", 1)
        ref = f"ours_fast_r{r}"
        if val(ref):
            suffix = "" if compute == "float32" else f"_{compute}"
            ratios += [ratio(f"qlora_speed_vs_lora{suffix}", val(k), val(ref),
                             f"nf4 base (bitsandbytes, compute dtype {compute}"
                             f"{': the trainer' + chr(39) + 's' if compute == 'float32' else ''}) vs bf16 base, "
                             f"LoRA r16, fast path both, {r} rows"),
                       ratio(f"qlora_memory_ratio{suffix}", val(k, "peak_gib"), val(ref, "peak_gib"),
                             "peak allocated, same rows")]

    def label_of(k):
        rows_part = k.rsplit("_r", 1)[-1]
        for prefix, text in (("ours_fast_dora", "ours, packed real rows, fast path, DoRA (pipelines.fast_dora)"),
                             ("ours_fast_qlora_float32", "ours, packed real rows, fast path, QLoRA (nf4 base, "
                                                         "compute dtype float32 as the trainer loads it)"),
                             ("ours_fast_qlora_bfloat16", "ours, packed real rows, fast path, QLoRA (nf4 base, "
                                                          "compute dtype bfloat16)"),
                             ("ours_fast_nocompile_qlora", "ours, packed real rows, fast path without compile, "
                                                           "QLoRA (nf4 base)"),
                             ("ours_fast_deferred", "ours, packed real rows, fast path, proposed train_step change: "
                                                    "no host wait in a step"),
                             ("ours_fast_liger_layers", "ours, packed real rows, previous fast path (Liger "
                                                        "kernels inside the compiled layers)"),
                             ("ours_fast", "ours, packed real rows, fast path"),
                             ("ours_plain", "ours, packed real rows, plain path")):
            if k.startswith(prefix):
                return f"{text}, {rows_part} rows"
        return f"PEFT + Liger + compile, {k.rsplit('_b', 1)[-1]} full rows"

    rows_out = []
    for k, c in cases.items():
        name = f"{args.model} LoRA r16: " + label_of(k)
        if "error" in c:
            rows_out.append({"case": name, "median_s": None, "min_s": None, "repeats": 0, "error": c["error"][:300]})
            continue
        rows_out.append(row(name, [c["seconds"]], steps=c["steps"], rows=c["rows"],
                            useful_tok_s=round(c["useful_tok_s"], 1), padding=round(c["padding_fraction"], 4),
                            peak_gib=c["peak_gib"], mfu=round(c["mfu"], 4) if c.get("mfu") else None,
                            loss=round(c["final_loss"], 4), step_ms_median=_median(c.get("step_ms"))))
    notes = [f"{args.model} shape, random weights, LoRA r16 on all seven linear kinds, bf16; {args.warmup} warm-up + "
             f"{args.steps} timed steps per case; ours: {args.ours_batches} packed rows of {args.max_len} tokens from "
             f"{len(rows)} real examples (mean {mean_len:.0f} tokens); the library stack: synthetic full "
             f"{args.max_len}-token rows.",
             "MFU: 4 x matmul parameters per token (output layer counted at every position for both) + causal "
             f"attention at each token's own example length (ours: {ctx:.0f} on average; full rows: "
             f"{args.max_len}); peak = measured {args.device} bf16 8192^3 matmul"
             + (f" {peak:.0f} TFLOP/s." if peak else "."),
             *[f"{k}: {c['fast_path']}; graphs compiled {c.get('graphs_compiled')} (in the timed steps "
               f"{c.get('graphs_compiled_timed')}; extra warm-up steps {c.get('extra_warmup')}), graph breaks "
               f"{c.get('graph_breaks')} {c.get('graph_break_reasons') or ''}; timed steps: allocator "
               f"{c.get('allocator')}, gc {c.get('gc_runs')} runs {c.get('gc_ms')} ms, step ms {c.get('step_ms')}"
               for k, c in cases.items() if "fast_path" in c]]
    prof = next((c for k, c in ok.items() if c.get("profile")), None)
    if prof:
        notes.append(f"Profile of ours, fast path, {prof['rows']} rows (2 steps, by self device time):\n```\n"
                     + prof["profile"] + "\n```")
    return {"rows": rows_out, "ratios": ratios, "notes": notes}


def _median(xs):
    return median(xs) if xs else None


def machine() -> dict:
    """bench.common's machine info plus the GPU-path libraries' versions (None: not importable here)."""
    from importlib import metadata

    from bench.common import machine_info

    info = machine_info()
    for dist in ("liger-kernel", "bitsandbytes", "triton", "accelerate"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def diagnose_result(args, diag: dict) -> dict:
    """The idle-time diagnosis as a results file: one row per variant, ratios between them, the idle tables."""
    import json

    v = diag["variants"]
    rows_out = [row(f"{args.model} LoRA r16, ours fast path, {diag['rows']} packed rows: {name}",
                    [c["seconds"]], steps=args.steps, useful_tok_s=c["useful_tok_s"],
                    idle_fraction=c["idle"].get("idle_fraction"), idle_ms_per_step=c["idle"].get("idle_ms_per_step"),
                    busy_ms_per_step=c["idle"].get("busy_ms_per_step"), step_ms_median=_median(c["step_ms"]),
                    syncs_per_step=sum(x["count"] for x in c["sync_sites"]))
                for name, c in v.items()]
    ratios = []
    if "liger_loss" in v:
        for name in ("nosync_loss", "nosync_loss_deferred_read"):
            if name in v:
                ratios.append(ratio(f"{name}_vs_liger_loss", v[name]["useful_tok_s"], v["liger_loss"]["useful_tok_s"],
                                    "same model and optimizer, consecutive timed steps"))
    notes = [f"Variants: liger_loss = the trainer's step (pipelines.train.train_step) with Liger's fused linear "
             f"cross-entropy; nosync_loss = the same with pipelines.fast_train's sync-free head loss (now the "
             f"default); nosync_loss_deferred_read = the same step with no host wait in it: token counts kept on the "
             f"host and each step's loss read only after the next step is queued (bench deferred_step; proposed "
             f"for pipelines/train.py). {args.warmup} warm-up + "
             f"{args.steps} timed steps each, then one step under torch.cuda.set_sync_debug_mode and a 3-step "
             f"torch.profiler trace analysed for device idle time (bench.train_throughput.idle_summary)."]
    for name, c in v.items():
        notes.append(f"{name}: sync sites {json.dumps(c['sync_sites'])}; allocator {c['allocator']}; gc "
                     f"{c['gc_runs']} runs {c['gc_ms']} ms; step ms {c['step_ms']}; idle:\n```\n"
                     + idle_text(c["idle"]) + "\n```")
    return {"title": f"Training: where the device idles ({'GPU' if args.device.startswith('cuda') else 'CPU'}, "
                     f"{args.model}, ours fast path)",
            "description": diagnose.__doc__.replace("\n", " "), "rows": rows_out, "ratios": ratios, "notes": notes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.run train_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--model", default=None, choices=["tiny", "1b", "7b"], help="default: tiny on cpu, 1b on cuda")
    p.add_argument("--suite", default=None, choices=["trainer", "liger"],
                   help="trainer: ours vs HF Trainer (default on cpu); liger: ours (fast path and plain) vs PEFT + "
                        "Liger + compile, DoRA, MFU (default on cuda)")
    p.add_argument("--liger-batches", default=None, help="comma-separated full-row batches for the library stack "
                                                         "(its best is compared; default 16,32 on cuda)")
    p.add_argument("--only", default="", help="liger suite: comma-separated cases to run (ours_fast, ours_fast_dora, "
                                              "ours_fast_qlora, ours_fast_deferred, "
                                              "ours_fast_liger_layers, ours_plain, liger_compile); "
                                              "--diagnose: variants (liger_loss, nosync_loss, "
                                              "nosync_loss_deferred_read); default all")
    p.add_argument("--ours-batches", default=None, help="liger suite: comma-separated packed-row counts for ours "
                                                        "fast path (its best is compared; default --batch-size)")
    p.add_argument("--partial", default=None, help="also write the cases as they finish to this JSON file")
    p.add_argument("--suffix", default="", help="liger suite: appended to the result's name (a second run of other "
                                               "cases beside the main one)")
    p.add_argument("--profile", action="store_true", help="liger suite: a torch.profiler table of ours, fast path")
    p.add_argument("--diagnose", action="store_true", help="GPU: only the idle-time diagnosis of ours, fast path, "
                                                           "at the first --ours-batches (see diagnose())")
    p.add_argument("--qlora-compute", default="float32", help="liger suite: comma-separated nf4 compute dtypes of "
                                                              "the QLoRA cases (float32: the trainer's; bfloat16)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8 on cuda, 4 on cpu)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per example / packed row (1024 cuda, 256 cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (20 cuda, 6 cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--examples", type=int, default=4000, help="real examples to draw batches from")
    p.add_argument("--repeats", type=int, default=3, help="PiSSA timing repeats")
    p.add_argument("--skip-pissa", action="store_true")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("1b" if gpu else "tiny")
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.max_len = args.max_len or (1024 if gpu else 256)
    args.steps = args.steps or (20 if gpu else 6)
    args.only = [c for c in args.only.split(",") if c]
    args.suite = args.suite or ("liger" if gpu else "trainer")
    args.liger_batches = [int(b) for b in (args.liger_batches or ("16,32" if gpu else "2")).split(",")]
    args.ours_batches = [int(b) for b in (args.ours_batches or str(args.batch_size)).split(",")]
    args.qlora_compute = [c for c in args.qlora_compute.split(",") if c]
    for c in args.qlora_compute:
        if c not in ("float32", "bfloat16"):
            raise SystemExit(f"--qlora-compute: {c!r} is not float32 or bfloat16")

    import torch
    from transformers import AutoTokenizer

    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    rows = text_rows(tok, args.max_len, args.examples)
    lengths = sorted(len(r[0]) for r in rows)
    print(f"  {len(rows)} examples, tokens median {lengths[len(lengths) // 2]}, max {lengths[-1]}", flush=True)

    if args.diagnose:
        if not gpu:
            raise SystemExit("--diagnose needs --device cuda (it profiles device idle time)")
        result = diagnose_result(args, diagnose(args, rows, tok.pad_token_id))
        result["command"] = " ".join(["python -m bench.run", NAME, *(argv or [])])
        path = write_result(f"{NAME}_idle_cuda_{args.model}{args.suffix}", result, machine=machine())
        print(f"  wrote {path}")
        return result
    if args.suite == "liger":
        out = versus_liger(args, rows, tok, lengths)
        name = f"{NAME}_{'cuda' if gpu else 'cpu'}_{args.model}{args.suffix}"
        result = {"title": f"Training throughput vs PEFT + Liger + compile ({'GPU' if gpu else 'CPU'}, {args.model})",
                  "description": versus_liger.__doc__.replace("\n", " "),
                  "command": " ".join(["python -m bench.run", NAME, *(argv or [])]), **out}
        path = write_result(name, result, machine=machine())
        print(f"  wrote {path}")
        return result
    cases = {}
    mean_len = sum(lengths) / len(lengths)
    equal_bs = max(args.batch_size, round(args.batch_size * args.max_len / mean_len))
    for name, fn in [("plain", lambda: plain(args, rows, group_by_length=False)),
                     ("plain_grouped", lambda: plain(args, rows, group_by_length=True)),
                     ("plain_equal_tokens", lambda: plain(args, rows, group_by_length=False, batch_size=equal_bs)),
                     ("ours_grouped", lambda: ours(args, rows, tok.pad_token_id, packing=False)),
                     ("ours_packed", lambda: ours(args, rows, tok.pad_token_id, packing=True)),
                     ("ours_packed_dora", lambda: ours(args, rows, tok.pad_token_id, packing=True, dora="fast")),
                     ("ours_packed_dora_peft", lambda: ours(args, rows, tok.pad_token_id, packing=True, dora="peft"))]:
        r = fn()
        r["useful_tok_s"] = r["useful_tokens"] / r["seconds"]
        r["padding_fraction"] = 1 - r["useful_tokens"] / max(r["padded_tokens"], 1)
        cases[name] = r
        print(f"  {name}: {r['useful_tok_s']:.0f} useful tok/s, padding {r['padding_fraction']:.1%}, "
              f"peak {r['peak_gib']} GiB", flush=True)
        gc.collect()  # the last case's model and optimizer must not count against the next one's peak
        if gpu:
            torch.cuda.empty_cache()
    labels = {"plain": "plain PEFT + HF Trainer (pad to longest)",
              "plain_grouped": "plain PEFT + HF Trainer, group_by_length",
              "plain_equal_tokens": f"plain PEFT + HF Trainer, batch {equal_bs} (as many real tokens per step as ours)",
              "ours_packed_dora_peft": "ours, packed rows, DoRA with PEFT's forward",
              "ours_grouped": "ours, length-grouped batches", "ours_packed": "ours, packed rows",
              "ours_packed_dora": "ours, packed rows, DoRA (pipelines.fast_dora)"}
    rows_out = [row(f"{args.model} LoRA r16: {labels[k]}", [c["seconds"]], steps=args.steps,
                    useful_tok_s=round(c["useful_tok_s"], 1), padding=round(c["padding_fraction"], 4),
                    peak_gib=c["peak_gib"]) for k, c in cases.items()]
    prefix = "" if gpu else "cpu_"
    ratios = [
        ratio(f"{prefix}useful_tokens_ratio_vs_plain_peft", cases["ours_packed"]["useful_tok_s"],
              cases["plain"]["useful_tok_s"], "target >= 2.0"),
        ratio(f"{prefix}useful_tokens_ratio_vs_plain_peft_grouped", cases["ours_packed"]["useful_tok_s"],
              cases["plain_grouped"]["useful_tok_s"], "against the Trainer's own length grouping"),
        ratio(f"{prefix}useful_tokens_ratio_vs_plain_peft_equal_tokens", cases["ours_packed"]["useful_tok_s"],
              cases["plain_equal_tokens"]["useful_tok_s"], "plain with a batch as large in real tokens as ours"),
        ratio(f"{prefix}dora_speed_ratio", cases["ours_packed_dora"]["useful_tok_s"],
              cases["ours_packed"]["useful_tok_s"], "target >= 0.85"),
        ratio(f"{prefix}dora_speed_ratio_peft_forward", cases["ours_packed_dora_peft"]["useful_tok_s"],
              cases["ours_packed"]["useful_tok_s"], "PEFT's DoRA forward in the same loop"),
    ]
    if gpu:
        ratios += [ratio("dora_memory_ratio", cases["ours_packed_dora"]["peak_gib"],
                         cases["ours_packed"]["peak_gib"], "peak allocated; target <= 1.2"),
                   ratio("dora_memory_ratio_peft_forward", cases["ours_packed_dora_peft"]["peak_gib"],
                         cases["ours_packed"]["peak_gib"], "PEFT's DoRA forward")]
    if not args.skip_pissa:
        pr, pq = pissa_cold_vs_hit(args.device, 16, args.repeats)
        rows_out += pr
        ratios += [dict(q, ratio=prefix + q["ratio"]) for q in pq]
    notes = [f"Batch {args.batch_size} rows, max {args.max_len} tokens, {args.warmup} warm-up + {args.steps} timed "
             f"steps per case; {len(rows)} real examples (Bitext + SGD, median {lengths[len(lengths) // 2]} tokens).",
             "useful tokens = non-pad tokens processed (prompt and response); packed rows hold several examples, so "
             "ours sees more examples per step: throughput is per token, not per step."]
    result = {"title": f"Training throughput ({'GPU' if gpu else 'CPU'}, {args.model})",
              "description": __doc__.split("\n\n")[1].replace("\n", " "),
              "command": " ".join(["python -m bench.run", NAME, *(argv or [])]),
              "rows": rows_out, "ratios": ratios, "notes": notes}
    path = write_result(NAME if gpu else NAME + "_cpu", result)
    print(f"  wrote {path}")
    return result
