"""Stage 2, training: a PEFT adapter trained from a cached init (or warm-started from a parent adapter).

Run:  adapterops train --base models/tiny-llama --init-entry DIR --train train.jsonl --val val.jsonl --out DIR

Output directory: adapter/ (PEFT format, deployable on the ORIGINAL base: PiSSA is exported converted to plain
LoRA), adapter_native/ (the adapter as trained, on the cached residual; what a warm start continues from),
manifest.json (config, input hashes, metrics, loss curve, health report).

Loss is on response tokens only, and the output layer runs only where a loss is taken. No compute goes to padding:
either batches are grouped by length, or (packing) several examples share a row, kept apart by position ids that
restart at each example (transformers then builds a block-diagonal causal mask). On a CUDA device the frozen base runs
in bf16 under autocast while the adapter and optimizer stay fp32.
With `checkpoint_every`, a resumable checkpoint (adapter, optimizer moments, data order, RNG: safetensors + JSON, no
pickle) is written next to the output; re-running the same command after a kill resumes from the last one.
Health checks fail the run (HealthCheckFailed, with the report) instead of shipping a broken adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines import lm, manifest, methods
from pipelines.data import category_counts, read_jsonl

PRECISIONS = ("auto", "fp32", "bf16")
# Settings that change how a run is watched or made resumable, not what it computes: not part of the fingerprint.
# nproc/strategy too: N processes compute one process's batches and updates (pipelines.distributed), equal up to the
# order of floating-point sums, and a checkpoint of one resumes under the other.
NOT_IDENTITY = ("checkpoint_every", "progress", "device", "fast_dora", "fast_kernels", "compile", "attention",
                "nproc", "strategy", "dist_timeout_s")


@dataclass
class HealthConfig:
    """Thresholds of the checks that fail a run; defaults are loose on purpose (a false fail blocks a retrain)."""

    max_delta_ratio: float = 0.5
    """Largest allowed ||dW||_F / ||W||_F per module: above it the adapter overpowers the base."""
    min_effective_rank_frac: float = 0.1
    """Effective rank (exp of the entropy of the singular values) of each dW must reach this fraction of r."""
    max_val_over_best: float = 1.5
    """Final validation loss may not exceed this multiple of the best validation loss seen (divergence)."""
    max_val_train_gap: float = 2.0
    """Final validation loss minus final training loss, in nats."""


@dataclass
class TrainConfig:
    """How to train. `lr` and `warmup_ratio` default by method (pipelines.methods: Method.lr, Method.warmup)."""

    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Rows per micro-batch: examples, or with `packing` rows of up to max_len tokens holding several examples."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: effective batch = batch_size * grad_accum."""
    max_len: int = 128
    """Tokens per example (prompt + response, truncated), and per row when packing."""
    packing: bool = False
    """Pack several examples into each row (no padding at all, attention kept within each example). Off: batches
    of similar-length examples (little padding). Packing pays on a GPU with long rows; a step then sees more examples,
    so fewer steps (or a smaller batch) do the same work."""
    lr: float | None = None
    """Learning rate of A (and DoRA's magnitudes); null = the method's default (Method.lr), divided by 4 under
    LoRA+ (ratio > 1), whose B then learns at 4x the plain rate rather than 16x (16x blew the adapter past the
    delta_ratio health bound on the tiny base within 12 steps)."""
    loraplus_lr_ratio: float = 1.0
    """LoRA+: learning rate of B = lr * ratio (the paper suggests 16); 1 = plain LoRA."""
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    eval_every: int = 50
    early_stopping_patience: int = 0
    """Evaluations without improvement before stopping; 0 = never stop early."""
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 on a CUDA device that supports it, else fp32) | fp32 | bf16 (frozen base in bf16 under autocast;
    the adapter and the optimizer state stay fp32)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0 = never). A re-run with the same inputs resumes."""
    progress: bool = True
    """A progress bar on stderr when it is a terminal."""
    fast_dora: bool = True
    """DoRA only: train with pipelines.fast_dora's forward (same function and gradients as PEFT's, less time and
    memory); false = PEFT's own forward."""
    fast_kernels: str = "auto"
    """CUDA fast path (pipelines.fast_train): Liger's RoPE, RMSNorm, SwiGLU and fused output layer + loss. auto/on:
    used when the device is CUDA and liger-kernel imports (extra `gpu`), else the plain path with a log line; off."""
    compile: str = "auto"
    """torch.compile of each decoder layer: auto/on = on a CUDA device, off = never."""
    attention: str = "auto"
    """Attention over packed rows: auto (CUDA + bf16: varlen, else sdpa) | varlen (flash attention per example, no
    mask) | flex (transformers' flex attention, block-sparse mask) | sdpa (a dense block-diagonal mask)."""
    nproc: int = 1
    """Processes on this host (pipelines.distributed: torchrun, gloo on the CPU, nccl on CUDA with one GPU per
    process). Each takes grad_accum / nproc of every step's micro-batches: the same global batch and updates as one
    process, so grad_accum must be a multiple of nproc."""
    strategy: str = "ddp"
    """With nproc > 1: ddp (the model replicated on every process, for bases that fit one device) | fsdp (FSDP2:
    each decoder layer's frozen weights sharded over the processes, for bases that do not; the adapter replicated)."""
    dist_timeout_s: int = 900
    """With nproc > 1: seconds a collective (the gradient sum, a checkpoint's wait) may block before the run fails
    (a hung or dead peer); also bounds the wait for all processes to start."""
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        for name, allowed in (("fast_kernels", ("auto", "on", "off")), ("compile", ("auto", "on", "off")),
                              ("attention", ("auto", "varlen", "flex", "sdpa"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self._check_distributed()

    def _check_distributed(self) -> None:
        from pipelines.distributed import STRATEGIES

        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dist_timeout_s < 10:
            raise ValueError(f"dist_timeout_s must be >= 10, got {self.dist_timeout_s}")
        if self.nproc > 1 and self.grad_accum % self.nproc:
            raise ValueError(f"grad_accum ({self.grad_accum}) must be a multiple of nproc ({self.nproc}): each process "
                             f"takes grad_accum / nproc of a step's micro-batches, so that the effective batch "
                             f"(batch_size * grad_accum) is one process's; set grad_accum (--grad-accum) to "
                             f"{self.nproc} or a multiple")
        if self.nproc > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} names one GPU, but nproc {self.nproc} uses one GPU per process "
                             f"(cuda:0..{self.nproc - 1}); use device: cuda (or auto), and CUDA_VISIBLE_DEVICES "
                             f"to pick the GPUs")


class HealthCheckFailed(RuntimeError):
    def __init__(self, report: dict):
        failed = [c for c in report["checks"] if not c["passed"]]
        lines = "; ".join(f"{c['name']}: {c['value']} vs threshold {c['threshold']} ({c.get('where', '')})"
                          for c in failed)
        super().__init__(f"training health check failed: {lines}. Lower the learning rate or fix the data.")
        self.report = report


def length_grouped_batches(n_tokens: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within mega-batches of 16 batches by length, then shuffle the batches."""
    idx = list(range(len(n_tokens)))
    rng.shuffle(idx)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(idx), mega):
        chunk = sorted(idx[i : i + mega], key=lambda j: n_tokens[j])
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def packed_batches(n_tokens: list[int], batch_size: int, max_len: int, rng: random.Random) -> list[list[list[int]]]:
    """Batches of rows, each row a list of example indices whose lengths sum to <= max_len.

    First-fit decreasing within shuffled chunks of 64 rows' worth of examples: rows come out nearly full, and each
    epoch's order is random. Returns [batch][row][example index]."""
    idx = list(range(len(n_tokens)))
    rng.shuffle(idx)
    rows: list[list[int]] = []
    chunk_tokens, chunk = 0, []
    for j in idx + [None]:
        if j is not None:
            chunk.append(j)
            chunk_tokens += n_tokens[j]
        if chunk and (j is None or chunk_tokens >= 64 * max_len):
            bins: list[list[int]] = []
            space: list[int] = []
            for e in sorted(chunk, key=lambda k: -n_tokens[k]):
                for b, free in enumerate(space):
                    if n_tokens[e] <= free:
                        bins[b].append(e)
                        space[b] -= n_tokens[e]
                        break
                else:
                    bins.append([e])
                    space.append(max_len - n_tokens[e])
            rows.extend(bins)
            chunk_tokens, chunk = 0, []
    rng.shuffle(rows)
    return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]


def collate_packed(packed: list[list[tuple[list[int], list[int]]]], pad_id: int, width: int | None = None):
    """Several examples per row: (ids, labels, position ids, real-token count). Position ids restart at 0 for each
    example, which is how transformers recognises packed sequences (attention_mask=None) and keeps them apart; the
    padded tail of a row (if any) is one more sequence of its own with no labels. `width`: at least this many
    columns (a fixed shape for compiled layers)."""
    import torch

    width = max(width or 0, max(sum(len(x) for x, _ in row) for row in packed))
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packed), width), -100, dtype=torch.long)
    pos = torch.zeros((len(packed), width), dtype=torch.long)
    real = 0
    for i, row in enumerate(packed):
        at = 0
        for x, y in row:
            ids[i, at : at + len(x)] = torch.tensor(x)
            labels[i, at + 1 : at + len(y)] = torch.tensor(y[1:])  # never predict across an example boundary
            pos[i, at : at + len(x)] = torch.arange(len(x))
            at += len(x)
        pos[i, at:] = torch.arange(width - at)
        real += at
    return ids, labels, pos, real


def _lm_parts(model):
    """(decoder, output layer) of a causal LM (or a PEFT model around one), or None where the logits need more than
    `head(decoder(x))` (e.g. Gemma's soft-capping)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, "base_model", None)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if decoder is None or decoder is causal or head is None or getattr(causal.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def batch_loss(model, ids, labels, mask=None, position_ids=None, meta=None):
    """Sum of response-token NLL and the token count (so means are exact across batches).

    The output layer (vocabulary-sized) runs only at the positions that predict a response token. `meta` (packed
    batches, from BatchSource): the loss positions, their targets and the examples' bounds computed on the CPU, so
    that the step needs no device-to-host copy (the same rows in the same order as the boolean mask would pick)."""
    import torch

    from pipelines import fast_train

    meta = meta or {}
    parts = _lm_parts(model)
    fast = fast_train.state(model)
    extra = {}
    if fast is not None and fast.attention == "varlen" and position_ids is not None:
        # the packed examples' bounds, once per batch for every layer (flash attention's varlen form)
        cu = meta.get("cu_seqlens")
        extra = {"cu_seq_lens_q": cu if cu is not None else fast_train.cu_seqlens(position_ids),
                 "max_length_q": meta.get("max_seqlen", ids.shape[1])}
    if "loss_index" in meta:
        index, tgt, n = meta["loss_index"], meta["loss_target"], meta["n_loss"]

        def pick(h):
            return h.reshape(-1, h.shape[-1]).index_select(0, index)
    else:
        target = labels[:, 1:]
        keep = target != -100
        tgt, n = target[keep], None

        def pick(h):
            return h[:, :-1][keep]
    if parts is None:
        logits = pick(model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                            use_cache=False, **extra).logits)
    else:
        decoder, head = parts
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False, **extra).last_hidden_state  # a KV cache would also turn off packed masking
        if fast is not None and fast.fused_loss:
            return fast_train.fused_head_loss(head, pick(hidden), tgt), n if n is not None else int(keep.sum())
        logits = head(pick(hidden))
    loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum")
    return loss, n if n is not None else int(keep.sum())


def eval_loss(model, rows, pad_id: int, batch_size: int = 16, rank=None) -> float:
    """Mean response-token NLL of `rows` under `model` (used by training and by the merge gates). `rank`
    (pipelines.distributed.Rank, several processes): each takes every world-th batch and the sums are all-reduced;
    under fsdp every rank runs the same number of forwards (they are collective), repeating a batch at weight 0."""
    import torch

    from pipelines import distributed

    rank = rank or distributed.Rank()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    chunks = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    rounds = -(-len(chunks) // rank.world) * rank.world if rank.strategy == "fsdp" else len(chunks)
    with torch.no_grad():
        for k in range(rank.rank, rounds, rank.world):
            ids, labels, mask = lm.collate([rows[i] for i in chunks[k % len(chunks)]], pad_id)
            with autocast_for(model):
                loss, n = batch_loss(model, ids.to(device), labels.to(device), mask.to(device))
            if k < len(chunks):
                total += float(loss)
                count += n
    if rank.distributed:
        sums = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device), rank)
        total, count = float(sums[0]), int(sums[1])
    model.train(was_training)
    return total / max(count, 1)


def autocast_for(model):
    """bf16 autocast for a model whose frozen weights are bf16 (see prepare_precision), else nothing."""
    import contextlib

    import torch

    p = next(model.parameters())
    if any(q.dtype == torch.bfloat16 for q in model.parameters()):
        return torch.autocast(p.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device_precision(cfg: TrainConfig) -> tuple[str, str]:
    """The concrete (device, precision) for a config's "auto" values, with a clear error for impossible ones."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device: cpu (or auto)")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return device, precision


def prepare_precision(model, precision: str):
    """bf16: cast the frozen floating-point weights to bf16 (half the memory and bandwidth); trainable adapter
    weights stay fp32 (master weights), and the forward runs under autocast (autocast_for)."""
    import torch

    if precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad and p.dtype in (torch.float32, torch.float16):
                p.data = p.data.to(torch.bfloat16)
    return model


def adapter_deltas(peft_model, initial: dict | None = None) -> dict[str, dict]:
    """Per LoRA module: ||dW||_F / ||W||_F and the effective rank of dW (relative to the initial adapter).

    W is read dequantized on a bitsandbytes base (QLoRA, QPiSSA): the raw Params4bit holds packed nf4 codes; an
    FSDP2-sharded W is all-gathered one module at a time (every rank must call this).
    """
    import torch
    from peft.utils.integrations import dequantize_module_weight

    from pipelines.distributed import full_weight

    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        A = module.lora_A["default"].weight.detach().float()
        B = module.lora_B["default"].weight.detach().float()
        s = module.scaling["default"]
        delta = s * (B @ A)
        base_w = full_weight(dequantize_module_weight(module.get_base_layer())).detach().float()
        if initial is not None and name in initial:
            A0, B0 = initial[name]
            init_prod = s * (B0 @ A0)
            delta = delta - init_prod
            base_w = base_w + init_prod  # PiSSA: the original W = W_res + s * B0 A0
        sv = torch.linalg.svdvals(delta)
        p = sv / sv.sum() if float(sv.sum()) > 0 else sv
        erank = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if float(sv.sum()) > 0 else 0.0
        out[name] = {"delta_ratio": float(delta.norm() / base_w.norm()), "effective_rank": erank,
                     "finite": bool(torch.isfinite(A).all() and torch.isfinite(B).all())}
    return out


def health_report(peft_model, initial, cfg: TrainConfig, rank: int, train_loss: float, val_loss: float,
                  best_val: float, trainable: int) -> dict:
    h = cfg.health
    deltas = adapter_deltas(peft_model, initial)
    worst_ratio = max(deltas.items(), key=lambda kv: kv[1]["delta_ratio"])
    worst_rank = min(deltas.items(), key=lambda kv: kv[1]["effective_rank"])
    nonfinite = [n for n, d in deltas.items() if not d["finite"]]
    checks = [
        {"name": "trainable_parameters", "value": trainable, "threshold": "> 0", "passed": trainable > 0},
        {"name": "finite_loss", "value": train_loss, "threshold": "finite",
         "passed": math.isfinite(train_loss) and math.isfinite(val_loss)},
        {"name": "finite_weights", "value": len(nonfinite), "threshold": 0, "passed": not nonfinite,
         "where": ", ".join(nonfinite[:3])},
        {"name": "delta_ratio", "value": round(worst_ratio[1]["delta_ratio"], 5), "threshold": h.max_delta_ratio,
         "passed": worst_ratio[1]["delta_ratio"] <= h.max_delta_ratio, "where": worst_ratio[0]},
        {"name": "effective_rank", "value": round(worst_rank[1]["effective_rank"], 3),
         "threshold": round(h.min_effective_rank_frac * rank, 3),
         "passed": worst_rank[1]["effective_rank"] >= h.min_effective_rank_frac * rank, "where": worst_rank[0]},
        {"name": "val_over_best", "value": round(val_loss / best_val, 4) if best_val > 0 else None,
         "threshold": h.max_val_over_best, "passed": val_loss <= h.max_val_over_best * best_val},
        {"name": "val_train_gap", "value": round(val_loss - train_loss, 4), "threshold": h.max_val_train_gap,
         "passed": val_loss - train_loss <= h.max_val_train_gap},
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


class BatchSource:
    """The training data order: length-grouped batches or packed rows, reshuffled each epoch from a seeded RNG.
    Its whole state (rng + queue) is JSON, so a checkpoint can restore the exact order. `width`: packed rows get at
    least this many columns (set for compiled layers: one shape every step). `rank`, `world` (several processes):
    every process keeps the same queue and each __next__ consumes `world` batches, returning the rank-th: the
    processes together see one process's batches, and the state (hence a checkpoint) does not depend on `world`."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], cfg: TrainConfig, pad_id: int, device: str = "cpu",
                 rank: int = 0, world: int = 1):
        self.rows, self.cfg, self.pad_id, self.device = rows, cfg, pad_id, device
        self.rank, self.world = rank, world
        self.lengths = [len(ids) for ids, _ in rows]
        self.rng = random.Random(cfg.seed)
        self.queue: list = []
        self.width: int | None = None
        self._ready = None  # (batch, collated tuple) made by prefetch() for the batch now last in the queue

    def _to(self, t):
        if str(self.device).startswith("cuda"):
            return t.pin_memory().to(self.device, non_blocking=True)  # no wait on the work already queued
        return t.to(self.device)

    def __next__(self):
        """(ids, labels, attention mask or None, position ids or None, real tokens, padded tokens, meta); meta (packed
        rows): loss positions, targets, count and the examples' bounds, computed here on the CPU (see batch_loss)."""
        for i in range(self.world):
            popped = self._pop()
            if i == self.rank:
                batch = popped
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] is batch:
            return ready[1]
        return self._collate(batch)

    def _pop(self):
        cfg = self.cfg
        if not self.queue:
            self.queue = (packed_batches(self.lengths, cfg.batch_size, cfg.max_len, self.rng) if cfg.packing
                          else length_grouped_batches(self.lengths, cfg.batch_size, self.rng))
        return self.queue.pop()

    def prefetch(self) -> None:
        """Collate the next batch now (and start its copy to the device), so that the next __next__ returns at once:
        called while the device is still busy with a step. Only peeks at the queue (the data order, the RNG and the
        checkpointed state are unchanged); nothing when this rank's next batch is not in the queue yet (the next
        epoch's shuffle stays where it was)."""
        if len(self.queue) > self.rank:
            mine = self.queue[-1 - self.rank]
            if self._ready is None or self._ready[0] is not mine:
                self._ready = (mine, self._collate(mine))

    def _collate(self, batch):
        cfg = self.cfg
        if cfg.packing:
            from pipelines.fast_train import cu_seqlens, max_seqlen_bucket

            ids, labels, pos, real = collate_packed([[self.rows[i] for i in row] for row in batch], self.pad_id,
                                                    self.width)
            target = labels[:, 1:]
            keep = target != -100
            b, t = keep.nonzero(as_tuple=True)
            cu = cu_seqlens(pos)
            meta = {"loss_index": self._to(b * ids.shape[1] + t), "loss_target": self._to(target[keep]),
                    "n_loss": int(b.numel()), "cu_seqlens": self._to(cu),
                    "max_seqlen": max_seqlen_bucket(cu, ids.shape[1])}
            return self._to(ids), self._to(labels), None, self._to(pos), real, ids.numel(), meta
        ids, labels, mask = lm.collate([self.rows[i] for i in batch], self.pad_id)
        return self._to(ids), self._to(labels), self._to(mask), None, int(mask.sum()), ids.numel(), {}


def train_step(model, opt, batches: BatchSource, grad_accum: int, max_grad_norm: float = 1.0, rank=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches (mean response-token loss). The step is not applied when
    the loss is not finite. Returns loss, loss tokens, real (non-pad) and padded token counts.

    With a fused optimizer on the GPU the finiteness check runs on the device (the optimizer's found_inf skips the
    update) and the loss is read once, after the whole step is queued: no device-to-host wait inside the step.
    `rank` (several processes): this process runs grad_accum / world of the micro-batches (BatchSource hands it its
    share), each still scaled by 1 / grad_accum; the adapter's gradients and the loss sums are then summed over the
    processes, so every process applies the same update, the one a single process would."""
    import torch

    from pipelines import distributed

    rank = rank or distributed.Rank()
    opt.zero_grad(set_to_none=True)
    sums, counts = [], [0, 0, 0]  # loss tokens, real tokens, padded tokens
    for _ in range(grad_accum // rank.world):
        ids, labels, mask, pos, n_real, n_padded, meta = next(batches)
        with autocast_for(model):
            loss_sum, n = batch_loss(model, ids, labels, mask, pos, meta)
        (loss_sum / max(n, 1) / grad_accum).backward()
        sums.append(loss_sum.detach().double().reshape(1))
        counts = [counts[0] + n, counts[1] + n_real, counts[2] + n_padded]
    params = [p for p in model.parameters() if p.requires_grad]
    on_device = bool(getattr(opt, "defaults", {}).get("fused")) and sums[0].is_cuda
    stats = torch.cat(sums).sum().reshape(1)  # the loss sum; the token counts stay host ints in one process
    if rank.distributed:
        # the counts join the all-reduce; copied from pinned memory without blocking: a plain torch.tensor(...,
        # device=cuda) from pageable memory waits for the stream and left the GPU idle (~7% at 1.1B on an H200)
        c = torch.tensor(counts, dtype=torch.float64)
        if stats.is_cuda:
            c = c.pin_memory().to(stats.device, non_blocking=True)
        stats = torch.cat([stats, c])
        distributed.sum_grads(params, rank)
        distributed.all_reduce_sum(stats, rank)
    if on_device:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.found_inf = (~torch.isfinite(stats[0])).float()
        try:
            opt.step()
        finally:
            del opt.found_inf
        if hasattr(batches, "prefetch"):
            batches.prefetch()  # the next batch's collation overlaps this step's queued device work
    values = stats.tolist()
    loss_total, (loss_tokens, real, padded) = values[0], (values[1:] if rank.distributed else counts)
    loss = loss_total / max(loss_tokens, 1)
    if not on_device and math.isfinite(loss):
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    return {"loss": loss, "loss_tokens": int(loss_tokens), "real_tokens": int(real), "padded_tokens": int(padded)}


def make_optimizer(model, lr: float, loraplus_lr_ratio: float = 1.0, weight_decay: float = 0.0):
    """AdamW over the trainable parameters; LoRA+ gives the B matrices lr * ratio (group key lr_mult). Fused on CUDA."""
    import torch

    b_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    fused = all(p.is_cuda for p in b_params + other)
    return torch.optim.AdamW([{"params": other, "lr_mult": 1.0}, {"params": b_params, "lr_mult": loraplus_lr_ratio}],
                             lr=lr, weight_decay=weight_decay, fused=fused)


def checkpoint_dir(out: Path) -> Path:
    """Where the resumable checkpoints of a run writing `out` live (removed when the run finishes)."""
    out = Path(out)
    return out.with_name(f".{out.name}.ckpt")


def save_checkpoint(root: Path, fp: str, step: int, model, opt, rng: random.Random, state: dict) -> Path:
    """Adapter weights, optimizer moments, torch RNG (safetensors) + step, data order, curves (JSON); atomic: the
    directory appears under its final name only when complete, and older checkpoints go after it does."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    osd = opt.state_dict()
    scalars = []
    for i, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                if v.dim() == 0:
                    scalars.append(f"opt.{i}.{k}")
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    s = rng.getstate()
    meta = {"fingerprint": fp, "step": step, "param_groups": osd["param_groups"], "scalars": scalars,
            "rng": [s[0], list(s[1]), s[2]], **state}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, fp: str, model, opt, rng: random.Random, log=print) -> dict | None:
    """Restore the newest complete checkpoint of this exact run (same fingerprint) into model/opt/rng; its JSON
    state, or None when there is none. A checkpoint of other inputs is discarded, never resumed."""
    import torch
    from safetensors.torch import load_file

    found = sorted(root.glob("step-*")) if root.is_dir() else []
    if not found:
        return None
    meta = json.loads((found[-1] / "state.json").read_text())
    if meta.get("fingerprint") != fp:
        log(f"train: discarding checkpoint {found[-1]} (it was made with other inputs or settings)")
        shutil.rmtree(root, ignore_errors=True)
        return None
    tensors = load_file(str(found[-1] / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key[len("param."):]].copy_(value)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = value.reshape(()) if key in meta["scalars"] else value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return meta


def _progress(cfg: TrainConfig, method: str, start: int):
    """A tqdm bar on a terminal; a no-op object otherwise (logs carry the progress then)."""
    if cfg.progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=cfg.steps, initial=start, desc=f"train {method}", unit="step", dynamic_ncols=True)

    class _Quiet:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Quiet()


def _bind(tmp: Path, method: str, base_sha256: str, init_key: str, init_entry: Path) -> None:
    """Write the base binding into both adapter directories (registry/binding.py). A PiSSA adapter_native/ applies
    to the cached residual only: its binding and its config's base_model_name_or_path say so, so nothing loads it on
    the plain base by mistake."""
    from registry.binding import write_binding

    write_binding(tmp / "adapter", base_sha256, "plain", method, init_key)
    residual = (Path(init_entry) / "residual.safetensors").is_file()
    write_binding(tmp / "adapter_native", base_sha256, "pissa_residual" if residual else "plain", method, init_key)
    if residual:
        cfg_path = tmp / "adapter_native" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = f"PiSSA residual base of init-cache entry {init_key} (see adapterops.json)"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def run(cfg: TrainConfig, base_path: Path, init_entry: Path, train_data: Path, val_data: Path, out: Path,
        parent: Path | None = None, log=print, identity: list | None = None) -> Path:
    """Train an adapter, warm-started from `parent` (a previous output, same init entry) if given. nproc > 1: runs
    this on nproc processes under torchrun, handing them `identity` (hashes, fingerprint): none re-hashes the base."""
    from pipelines import distributed

    device, precision = resolve_device_precision(cfg)
    if distributed.in_worker():
        device = distributed.join(cfg)
    init_manifest, inputs, config, fp = identity or _identity(cfg, base_path, init_entry, train_data, val_data,
                                                              parent, precision)
    if manifest.reusable(out, "adapter", fp) is not None:
        log(f"train: {out} already holds this adapter (manifest matches); reusing it")
        return Path(out)
    if cfg.nproc > 1 and not distributed.in_worker():
        try:
            return distributed.launch(cfg, base_path, init_entry, train_data, val_data, out, parent, log,
                                      identity=[init_manifest, inputs, config, fp])
        except distributed.RankHealthCheckFailed as e:
            raise HealthCheckFailed(e.report) from None
    rank = distributed.current(cfg.strategy, device)
    method = init_manifest["config"]["method"]
    spec = methods.get(method)
    if not rank.main:
        log = _quiet
    random.seed(cfg.seed)
    import torch

    torch.manual_seed(cfg.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_examples, val_examples = read_jsonl(train_data), read_jsonl(val_data)
    train_rows = lm.tokenize(train_examples, tokenizer, cfg.max_len)
    val_rows = lm.tokenize(val_examples, tokenizer, cfg.max_len)
    model, fast, initial = _build_model(cfg, spec, base_path, init_entry, parent, device, precision, rank, log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise HealthCheckFailed({"passed": False, "checks": [{"name": "trainable_parameters", "value": 0,
                                                              "threshold": "> 0", "passed": False}]})
    lr = cfg.lr or (spec.lr / (4 if cfg.loraplus_lr_ratio > 1 else 1))
    opt = make_optimizer(model, lr, cfg.loraplus_lr_ratio, cfg.weight_decay)
    pad_id = tokenizer.pad_token_id
    batches = BatchSource(train_rows, cfg, pad_id, device, rank.rank, rank.world)
    if fast.compiled:
        batches.width = cfg.max_len  # one shape every step: no recompiles of the layers
    st = _resume(cfg, fp, out, model, opt, batches, method, log)
    warmup = cfg.warmup_ratio if cfg.warmup_ratio is not None else spec.warmup
    t0 = time.time()
    stopped_early = _train_loop(cfg, model, opt, batches, st, _lr_schedule(lr, warmup, cfg.steps),
                                lambda: eval_loss(model, val_rows, pad_id, rank=rank), checkpoint_dir(out), fp,
                                method, rank, log)
    val_loss = st["evals"][-1]["val_loss"] if st["evals"] else eval_loss(model, val_rows, pad_id, rank=rank)
    base_val = None
    with model.disable_adapter():
        if not spec.residual:  # else the adapter-less model is the residual, not the base
            base_val = eval_loss(model, val_rows, pad_id, rank=rank)
    health = health_report(model, initial, cfg, init_manifest["config"]["rank"], st["train_loss"], val_loss,
                           st["best_val"], trainable)
    metrics = {
        "train_loss": round(st["train_loss"], 5), "val_loss": round(val_loss, 5),
        "best_val_loss": round(st["best_val"], 5),
        "base_val_loss": round(base_val, 5) if base_val is not None else None,
        "steps": len(st["curve"]), "seconds": round(time.time() - t0, 2), "lr": lr, "warmup_ratio": warmup,
        "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_second": round(st["tokens_seen"] / max(st["train_seconds"], 1e-9), 1),
        "padding_fraction": round(1 - st["tokens_seen"] / max(st["padded_seen"], 1), 4),
        "train_examples": len(train_rows), "val_examples": len(val_rows),
        "device": device, "precision": precision, "stopped_early": stopped_early,
        "resumed_from_step": st["resumed_from"], "processes": rank.world,
        "parameters_per_process": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                      for p in model.parameters()),  # below total_parameters under fsdp
    }
    if not health["passed"]:
        raise HealthCheckFailed(health)
    if rank.main:
        _write_output(model, spec, cfg, out, base_path, init_entry, parent, init_manifest, inputs, config, metrics,
                      st, health, train_examples, method, precision)
        log(f"train: wrote {out} (val loss {val_loss:.3f}, {metrics['tokens_per_second']:.0f} tok/s)")
    return Path(out)


def _quiet(*args) -> None:
    """The log of a rank other than 0 (rank 0 alone reports)."""


def _identity(cfg: TrainConfig, base_path, init_entry, train_data, val_data, parent, precision: str):
    """(init manifest, input hashes, identity config, fingerprint) of a run, after checking that the inputs fit
    together (the init entry is of this base; a parent started from this init)."""
    from registry.hashing import model_weights_hash, sha256_file

    init_manifest = manifest.read(init_entry)
    inputs = {
        "base_sha256": model_weights_hash(Path(base_path)),
        "init_key": init_manifest["key"],
        "train_sha256": sha256_file(Path(train_data)),
        "val_sha256": sha256_file(Path(val_data)),
        "parent": manifest.read(parent)["fingerprint"] if parent else None,
        "precision": precision,
    }
    if inputs["base_sha256"] != init_manifest["base_sha256"]:
        raise ValueError(f"init entry {init_entry} was computed for base sha256:{init_manifest['base_sha256'][:12]}, "
                         f"but {base_path} is sha256:{inputs['base_sha256'][:12]}; warm the cache for this base")
    if parent is not None:
        pm = manifest.read(parent)
        if pm["inputs"]["init_key"] != init_manifest["key"]:
            raise ValueError(f"parent adapter {parent} started from init {pm['inputs']['init_key']}, not "
                             f"{init_manifest['key']}; warm-start only from the same init (method, rank, base)")
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    return init_manifest, inputs, config, manifest.fingerprint("adapter", config, inputs)


def _build_model(cfg: TrainConfig, spec, base_path, init_entry, parent, device: str, precision: str, rank, log):
    """(model in train mode on its device, fast path, initial adapter factors or None). Under fsdp the frozen
    decoder layers are sharded over the ranks before anything moves to the device."""
    from pipelines import distributed, fast_train

    model = lm.build_model(Path(base_path), Path(init_entry),
                           adapter=(Path(parent) / "adapter_native") if parent else None)
    fsdp = rank.distributed and cfg.strategy == "fsdp"
    if fsdp:
        model = prepare_precision(model, precision)
        n = distributed.shard_model(model, rank)
        model = model.to(device)
        log(f"train: fsdp: the frozen weights of {n} decoder layers sharded over {rank.world} processes")
    else:
        model = prepare_precision(model.to(device), precision)
    if spec.fast_forward is not None and cfg.fast_dora:
        spec.fast_forward(model)
    # regional torch.compile is off under fsdp: FSDP2's per-layer hooks would be traced into each graph
    fast = fast_train.enable(model, device, fast_kernels=cfg.fast_kernels, compile="off" if fsdp else cfg.compile,
                             attention=cfg.attention, precision=precision, log=log)
    model.train()
    initial = None
    if spec.residual or parent is not None:  # the adapter does not start at zero: health measures from its start
        initial = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
                   for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    return model, fast, initial


def _lr_schedule(lr: float, warmup: float, steps: int):
    """lr_at(step): linear warm-up over warmup * steps steps (at least 1), then cosine decay to 0."""
    warmup_steps = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_at


def _resume(cfg: TrainConfig, fp: str, out: Path, model, opt, batches: BatchSource, method: str, log) -> dict:
    """The run's state (curves, counters, and `start`: the step to continue from): restored from the newest
    checkpoint of this exact run when checkpoints are on (every rank reads it), else fresh. Stale checkpoints go."""
    st = {"curve": [], "evals": [], "best_val": float("inf"), "bad_evals": 0, "tokens_seen": 0, "padded_seen": 0,
          "train_loss": float("nan"), "train_seconds": 0.0, "resumed_from": None, "start": 0}
    ckpt_root = checkpoint_dir(out)
    if cfg.checkpoint_every:
        meta = load_checkpoint(ckpt_root, fp, model, opt, batches.rng, log=log)
        if meta is not None:
            st["start"], batches.queue = meta["step"], meta["queue"]
            st.update({k: meta[k] for k in st if k in meta and k != "start"})
            st["resumed_from"] = st["start"]
            log(f"train {method}: resuming from the checkpoint at step {st['start']} ({ckpt_root})")
    elif ckpt_root.exists() and batches.rank == 0:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return st


def _train_loop(cfg: TrainConfig, model, opt, batches: BatchSource, st: dict, lr_at, evaluate, ckpt_root: Path,
                fp: str, method: str, rank, log) -> bool:
    """Steps st["start"] .. cfg.steps: optimizer steps, evaluations (early stopping), checkpoints (rank 0 writes
    them). Updates `st` in place; True when it stopped early."""
    bar = _progress(cfg, method, st["start"])  # a worker's stderr is a log file: no bar there
    t0 = time.time()
    try:
        for step in range(st["start"], cfg.steps):
            t_step = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step) * g["lr_mult"]
            out_step = train_step(model, opt, batches, cfg.grad_accum, rank=rank)
            train_loss = out_step["loss"]
            if not math.isfinite(train_loss):
                raise HealthCheckFailed({"passed": False, "checks": [
                    {"name": "finite_loss", "value": train_loss, "threshold": "finite", "passed": False,
                     "where": f"step {step + 1}"}]})
            st["tokens_seen"] += out_step["real_tokens"]
            st["padded_seen"] += out_step["padded_tokens"]
            st["train_seconds"] += time.perf_counter() - t_step
            st["train_loss"] = train_loss
            st["curve"].append({"step": step + 1, "train_loss": round(train_loss, 5), "lr": lr_at(step)})
            bar.update(1)
            bar.set_postfix_str(f"loss {train_loss:.3f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = evaluate()
                st["evals"].append({"step": step + 1, "val_loss": round(val, 5)})
                log(f"train {method}: step {step + 1}/{cfg.steps} loss {train_loss:.3f} val {val:.3f} "
                    f"({time.time() - t0:.0f}s)")
                if val < st["best_val"] - 1e-4:
                    st["best_val"], st["bad_evals"] = val, 0
                else:
                    st["bad_evals"] += 1
                    if cfg.early_stopping_patience and st["bad_evals"] >= cfg.early_stopping_patience:
                        log(f"train: early stop at step {step + 1} (no val improvement in {st['bad_evals']} evals)")
                        return True
            if rank.main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(ckpt_root, fp, step + 1, model, opt, batches.rng,
                                {**{k: v for k, v in st.items() if k != "start"}, "queue": batches.queue})
    finally:
        bar.close()
    return False


def _write_output(model, spec, cfg: TrainConfig, out: Path, base_path, init_entry, parent, init_manifest: dict,
                  inputs: dict, config: dict, metrics: dict, st: dict, health: dict, train_examples, method: str,
                  precision: str) -> None:
    """The output directory (adapter/, adapter_native/, bindings, manifest), atomically; then the checkpoints go."""
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # fsdp: the adapter itself is fp32 already
    if precision == "bf16" and not sharded:  # save fp32 adapters, whatever the frozen base ran in
        model = model.float()
    for peft_cfg in model.peft_config.values():  # a warm start loaded its parent's marked native config
        peft_cfg.base_model_name_or_path = str(base_path)
    with manifest.staging(out) as tmp:
        model.save_pretrained(tmp / "adapter_native")
        spec.export(model, tmp, init_entry)
        _bind(tmp, method, inputs["base_sha256"], init_manifest["key"], init_entry)
        manifest.write(tmp, "adapter", config, inputs, method=method, rank=init_manifest["config"]["rank"],
                       metrics=metrics, curve=st["curve"], evals=st["evals"], health=health,
                       data={"train_categories": category_counts(train_examples)}, base_path=str(base_path),
                       parent_path=str(parent) if parent else None,
                       settings={k: getattr(cfg, k) for k in NOT_IDENTITY})
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
