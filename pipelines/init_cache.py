"""Stage 1, init cache: compute an adapter initialisation once per (base content, method, rank, targets, ...).

Run:  adapterops init-cache warm --base models/tiny-llama --method pissa --rank 8 --store work/cache

PiSSA puts the top-r singular directions of each target weight into the adapter (A, B) and leaves the residual
W_res = W - B A in the base. The SVD is the expensive part (minutes per 7B model on a GPU, hours on a CPU), so the
residual weights and the initial adapter are stored under a content-addressed key. A hit loads them and runs no SVD.
For LoRA-family methods the cached entry holds the seeded initial A (and DoRA's magnitudes) for reproducibility.

Entry layout: residual.safetensors (PiSSA only: the mutated target weights), initial_adapter/ (PEFT format, its
config saved with init_lora_weights=True so that loading it never re-runs the SVD), manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METHODS = ("lora", "rslora", "dora", "pissa")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16")


@dataclass
class InitConfig:
    """What the initial adapter is; every field is part of the cache key."""

    method: str = "pissa"
    """lora | rslora | dora | pissa."""
    rank: int = 8
    """Adapter rank r; higher adapts more and costs memory linearly."""
    alpha: float = 16.0
    """Scaling numerator: LoRA scales BA by alpha/r (rsLoRA by alpha/sqrt(r))."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    svd_niter: int | None = None
    """PiSSA only: None = exact SVD; N = randomized SVD with N subspace iterations (PEFT's pissa_niter_N), far faster."""
    dtype: str = "float32"
    """Dtype the SVD runs in; PiSSA must be initialised in full precision (QPiSSA quantizes the residual after)."""
    seed: int = 0
    device: str = "cpu"
    """Where to run the decomposition (not part of the key: results agree to rounding)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one linear layer, e.g. q_proj")
        if self.svd_niter is not None and (self.method != "pissa" or self.svd_niter < 1):
            raise ValueError("svd_niter applies to method pissa only and must be >= 1 (or null for exact SVD)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        self.target_modules = tuple(self.target_modules)

    def peft_init(self) -> str | bool:
        if self.method != "pissa":
            return True
        return "pissa" if self.svd_niter is None else f"pissa_niter_{self.svd_niter}"

    def lora_config(self, init_lora_weights: str | bool | None = None):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            use_rslora=self.method == "rslora",
            use_dora=self.method == "dora",
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
    fields["target_modules"] = sorted(fields["target_modules"])
    payload = json.dumps({"base": base_sha256, "init": fields, "peft": peft.__version__}, sort_keys=True)
    return f"init/{cfg.method}-r{cfg.rank}-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_base(base_path: Path, dtype: str = "float32"):
    """Load the base model, with an error that says what to do when the path is wrong."""
    import torch
    from transformers import AutoModelForCausalLM

    base_path = Path(base_path)
    if not (base_path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {base_path} has no config.json; pass the directory of a causal LM saved with "
            f"save_pretrained (the project's own is models/tiny-llama)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    except ValueError as e:
        raise ValueError(f"{base_path} is not a causal language model transformers can load: {e}") from None
    return model


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


def compute(base_path: Path, cfg: InitConfig, out: Path, log=print) -> Path:
    """Run the initialisation (the SVD for PiSSA) and write an entry directory at `out`."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    model = load_base(base_path, cfg.dtype).to(cfg.device)
    _check_targets(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t0 = time.time()
    peft_model = get_peft_model(model, cfg.lora_config())
    log(f"init {cfg.method} r={cfg.rank} on {cfg.device}: {time.time() - t0:.2f}s")
    out.mkdir(parents=True, exist_ok=True)
    residual = {}
    for name, p in peft_model.base_model.model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in before and not torch.equal(before[clean], p.detach()):
            residual[clean] = p.detach().to("cpu").contiguous()
    if cfg.method == "pissa":
        if not residual:
            raise RuntimeError("PiSSA init changed no base weight; the PEFT version may have changed its behaviour")
        save_file(residual, str(out / "residual.safetensors"))
    for c in peft_model.peft_config.values():
        c.init_lora_weights = True  # loading this adapter must never run the SVD again
    peft_model.save_pretrained(out / "initial_adapter")
    return out


def run(cfg: InitConfig, base_path: Path, store, scratch: Path, log=print) -> InitResult:
    """Return a local, verified cache entry for (base, cfg), computing and storing it on a miss."""
    from registry.hashing import model_weights_hash
    from registry.store import CorruptArtifact

    t0 = time.time()
    if not (Path(base_path) / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {base_path} does not exist or has no config.json; pass the "
                                f"directory of a causal LM saved with save_pretrained (e.g. models/tiny-llama)")
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
        entry = compute(Path(base_path), cfg, Path(tmp) / "entry", log=log)
        meta = {"kind": "init_cache", "base_sha256": base_sha, "config": asdict(cfg), "key": key}
        (entry / "manifest.json").write_text(json.dumps(meta, indent=2, default=list))
        store.put_dir(key, entry, meta=meta)
    if local.exists():
        shutil.rmtree(local)
    store.get_dir(key, local)
    log(f"init cache miss {key}: computed and stored")
    return InitResult(key, local, False, time.time() - t0)


def build_model(base_path: Path, entry: Path, adapter: Path | None = None, trainable: bool = True):
    """Base + cached residual + an adapter (the cached initial one, or a trained one that started from it).

    `adapter` is how warm starts work: the champion's native adapter was trained on this same residual.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    model = load_base(base_path)
    residual_file = Path(entry) / "residual.safetensors"
    if residual_file.is_file():
        residual = load_file(str(residual_file))
        params = dict(model.named_parameters())
        unknown = sorted(set(residual) - set(params))
        if unknown:
            raise ValueError(f"cached residual has tensors {unknown[:3]} the base lacks; the entry is for another base")
        with torch.no_grad():
            for name, value in residual.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"cached residual {name} has shape {tuple(value.shape)}, base has "
                                     f"{tuple(params[name].shape)}; the entry is for another base")
                params[name].copy_(value)
    return PeftModel.from_pretrained(model, str(adapter or Path(entry) / "initial_adapter"), is_trainable=trainable)
