"""Stage 1, init cache: compute an adapter initialisation once per (base content, method, rank, targets, ...).

Run:  adapterops init-cache warm --base models/tiny-llama --method pissa --rank 8 --store work/cache

PiSSA puts the top-r singular directions of each target weight into the adapter (A, B) and leaves the residual
W_res = W - B A in the base. The SVD is the expensive part (minutes per 7B model on a GPU, hours on a CPU), so the
residual weights and the initial adapter are stored under a content-addressed key. A hit loads them and runs no SVD.
For LoRA-family methods the cached entry holds the seeded initial A (and DoRA's magnitudes) for reproducibility.

The initialisation runs layer by layer: the base stays on the CPU and each target layer's weight alone visits
`device` (GPU for speed, CPU when the GPU is too small) for PEFT's own init of that layer, so the peak extra memory is
one layer, and each layer is logged as it finishes.

QLoRA / QPiSSA (base_quant nf4): the entry holds the same full-precision weights (the SVD cannot run on a quantized
model); pipelines.lm.build_model quantizes the base (PiSSA: the residual) to bitsandbytes nf4 and keeps the adapter
in fp32.

Entry layout: residual.safetensors (PiSSA only: the mutated target weights), initial_adapter/ (PEFT format, its
config saved with init_lora_weights=True so that loading it never re-runs the SVD), manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipelines import lm, methods

BASE_QUANTS = ("none", "nf4")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16")


@dataclass
class InitConfig:
    """What the initial adapter is; every field is part of the cache key."""

    method: str = "pissa"
    """A pipelines.methods.METHODS name: lora | rslora | dora | pissa (aliases: qlora, qpissa = lora, pissa with
    base_quant nf4)."""
    rank: int = 8
    """Adapter rank r; higher adapts more and costs memory linearly."""
    alpha: float = 16.0
    """Scaling numerator: LoRA scales BA by alpha/r (rsLoRA by alpha/sqrt(r))."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    svd_niter: int | None = None
    """PiSSA only: None = exact SVD; N = randomized SVD with N subspace iterations (PEFT's pissa_niter_N), far faster."""
    dtype: str = "float32"
    """Dtype the SVD runs in; PiSSA must be initialised in full precision (QPiSSA quantizes the residual after)."""
    base_quant: str = "none"
    """none | nf4: train on a bitsandbytes nf4 base (QLoRA; with pissa, QPiSSA: the residual is quantized). Costs
    accuracy (nf4 rounding of the base), saves ~7/8 of the base's memory; needs bitsandbytes."""
    seed: int = 0
    device: str = "cpu"
    """Where each layer's init runs, one layer at a time (cpu, cuda, cuda:1). Not part of the key: exact SVD agrees
    across devices to rounding; fast SVD draws its random projection from that device's generator, so it gives
    another (equally good) approximation of the top-r subspace."""

    def __post_init__(self) -> None:
        if self.base_quant not in BASE_QUANTS:
            raise ValueError(f"base_quant {self.base_quant!r} is not one of {', '.join(BASE_QUANTS)}")
        if self.method in methods.QUANT_ALIASES:
            self.method, self.base_quant = methods.QUANT_ALIASES[self.method], "nf4"
        m = methods.get(self.method)
        if self.base_quant != "none" and not m.nf4:
            raise ValueError(f"base_quant {self.base_quant} does not support {m.name}: {m.nf4_refused}; use "
                             f"{' or '.join(methods.QUANT_ALIASES.values())} with {self.base_quant}, or {m.name} with "
                             "base_quant none")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one linear layer, e.g. q_proj")
        if self.svd_niter is not None and (not m.residual or self.svd_niter < 1):
            svd = " / ".join(n for n, x in methods.METHODS.items() if x.residual)
            raise ValueError(f"svd_niter applies to method {svd} only and must be >= 1 (or null for exact SVD)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        self.target_modules = tuple(self.target_modules)

    def peft_init(self) -> str | bool:
        return methods.get(self.method).init_lora_weights(self.svd_niter)

    def lora_config(self, init_lora_weights: str | bool | None = None):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            **methods.get(self.method).peft,
            init_lora_weights=self.peft_init() if init_lora_weights is None else init_lora_weights,
        )


@dataclass
class InitResult:
    key: str
    path: Path
    hit: bool
    seconds: float


def cache_key(base_sha256: str, cfg: InitConfig) -> str:
    import peft

    fields = {k: v for k, v in asdict(cfg).items() if k != "device"}
    if cfg.base_quant == "none":
        del fields["base_quant"]  # entries written before base_quant existed keep their keys
    fields["target_modules"] = sorted(fields["target_modules"])
    payload = json.dumps({"base": base_sha256, "init": fields, "peft": peft.__version__}, sort_keys=True)
    label = cfg.method if cfg.base_quant == "none" else f"q{cfg.method}"
    return f"init/{label}-r{cfg.rank}-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def _check_targets(model, cfg: InitConfig) -> None:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = {t for t in cfg.target_modules if any(n.split(".")[-1] == t for n in names)}
    missing = sorted(set(cfg.target_modules) - matched)
    if missing:
        leaves = sorted({n.split(".")[-1] for n in names})
        raise ValueError(f"target module(s) {missing} match no linear layer of the base; its linear layers are {leaves}")
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in cfg.target_modules:
            if cfg.rank > min(m.in_features, m.out_features):
                raise ValueError(
                    f"rank {cfg.rank} exceeds the smaller dimension of {n} ({m.out_features}x{m.in_features}); "
                    f"use rank <= {min(m.in_features, m.out_features)}"
                )


def _check_device(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for "not compiled with CUDA"
        raise ValueError(f"init device {device!r} is not usable on this machine ({e}); use cpu (slower, needs no GPU "
                         f"memory: init-cache --device cpu, train --init-device cpu) or a device it has, e.g. cuda"
                         ) from None


def compute(base_path: Path, cfg: InitConfig, out: Path, log=print) -> Path:
    """Run the initialisation layer by layer (the SVD for PiSSA) and write an entry directory at `out`.

    The PEFT model is built with no init (adapters only); then each target layer's base weight alone moves to
    cfg.device, PEFT's own update_layer initialises it there (pissa_init, LoRA's seeded A, DoRA's magnitudes) and the
    layer moves back. The RNG is seeded and consumed in the same order as get_peft_model's whole-model init, so the
    entry is the same as that would produce (exactly, fast SVD included) with one layer's extra memory.
    """
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    _check_device(cfg.device)
    model = lm.load_base(base_path, cfg.dtype)
    _check_targets(model, cfg)
    peft_model = get_peft_model(model, cfg.lora_config(init_lora_weights=False))
    layers = [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    config = cfg.lora_config()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    for i, (name, layer) in enumerate(layers, 1):
        t = time.time()
        layer.get_base_layer().to(cfg.device)
        layer.update_layer("default", cfg.rank, lora_alpha=cfg.alpha, config=config, target_name=name)
        layer.to("cpu")
        log(f"init layer {i}/{len(layers)} {name} ({time.time() - t:.2f}s)")
    log(f"init {cfg.method} r={cfg.rank} on {cfg.device}: {time.time() - t0:.2f}s")
    out.mkdir(parents=True, exist_ok=True)
    if methods.get(cfg.method).residual:
        residual = {f"{name}.weight": layer.get_base_layer().weight.detach().contiguous() for name, layer in layers}
        save_file(residual, str(out / "residual.safetensors"))
    for c in peft_model.peft_config.values():
        c.init_lora_weights = True  # loading this adapter must never run the SVD again
    peft_model.save_pretrained(out / "initial_adapter")
    return out


def _reuse_sibling(store, base_sha: str, cfg: InitConfig, dest: Path, log) -> bool:
    """Fill `dest` from the entry of the same init with another base_quant, if stored: the weights are the same
    (the quantization happens in lm.build_model), so QPiSSA after PiSSA (or the reverse) repeats no SVD."""
    from registry.store import CorruptArtifact

    if not methods.get(cfg.method).nf4:
        return False
    for quant in BASE_QUANTS:
        if quant == cfg.base_quant:
            continue
        key = cache_key(base_sha, replace(cfg, base_quant=quant))
        if store.exists(key):
            try:
                store.get_dir(key, dest)
            except CorruptArtifact as e:
                log(f"init cache entry {key} is corrupt ({e}); not reusing it")
                continue
            log(f"init: reusing the weights of {key} (base_quant {quant}); no SVD")
            return True
    return False


def run(cfg: InitConfig, base_path: Path, store, scratch: Path, log=print) -> InitResult:
    """Return a local, verified cache entry for (base, cfg), computing and storing it on a miss."""
    from registry.hashing import model_weights_hash
    from registry.store import CorruptArtifact

    t0 = time.time()
    if not (Path(base_path) / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {base_path} does not exist or has no config.json; pass the "
                                f"directory of a causal LM saved with save_pretrained (e.g. models/tiny-llama)")
    if cfg.base_quant != "none":
        lm.require_bitsandbytes(cfg.base_quant)
    base_sha = model_weights_hash(Path(base_path))
    key = cache_key(base_sha, cfg)
    local = Path(scratch) / key.replace("/", "__")
    if store.exists(key):
        try:
            if local.exists():
                shutil.rmtree(local)
            store.get_dir(key, local)
            log(f"init cache hit {key}")
            return InitResult(key, local, True, time.time() - t0)
        except CorruptArtifact as e:
            log(f"init cache entry {key} is corrupt ({e}); evicting and recomputing")
            store.delete(key)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        entry = Path(tmp) / "entry"
        if not _reuse_sibling(store, base_sha, cfg, entry, log):
            compute(Path(base_path), cfg, entry, log=log)
        meta = {"kind": "init_cache", "base_sha256": base_sha, "config": asdict(cfg), "key": key}
        (entry / "manifest.json").write_text(json.dumps(meta, indent=2, default=list))
        store.put_dir(key, entry, meta=meta)
    if local.exists():
        shutil.rmtree(local)
    store.get_dir(key, local)
    log(f"init cache miss {key}: stored")
    return InitResult(key, local, False, time.time() - t0)
