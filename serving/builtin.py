"""The built-in batching engine: our own Llama forward over the base's weights, a slot KV cache, continuous batching,
and requests for different LoRA / rsLoRA / DoRA / PiSSA-as-LoRA adapters decoded together in one batch.

    engine = BuiltinEngine(Path("models/tiny-llama"), device="cpu")       # cuda: bf16 and CUDA graphs
    engine.load("support-assistant@2", Path(".../adapter"), base_sha256="ab12...")
    [gen] = engine.generate([GenerationRequest(prompt, "support-assistant@2", SamplingParams(max_tokens=16))])
    for delta in engine.stream(request): ...
    engine.close()

How it works (a vLLM-lite, for one Llama-architecture base):
- The HF model is loaded once for its tensors; q/k/v and gate/up are fused into one matrix each, so a layer is four
  matmuls. RMSNorm, RoPE (the rotary tables come from the HF model's own rotary embedding, so any static rope scaling
  of the config is honoured), GQA, SwiGLU and a tied or untied lm_head are computed here.
- KV cache: [layers, max_batch, kv_heads, max_seq_len, head_dim], one slot per running request. A scheduler thread
  admits queued requests into free slots (one padded prefill for all of them), then runs one decode step for every
  slot together; the batch row of a request is its slot, rows finish and free independently.
- Adapters live in per-layer packed tensors, one per fused matrix: A [(max_loras+1)*g*w, in],
  B^T [(max_loras+1)*g*w, out] (slot 0 = no adapter, zeros; w = the widest loaded rank, others zero-padded;
  g = matrices fused) with the scale folded into B. The packed A is stored as extra rows under the base weight
  ([W; A] is one tensor), so one matmul gives W x and x A^T for every slot; masked to each row's own slot (a one-hot
  mask), then one addmm with B^T adds the adapters — no per-row gather and no per-adapter loop, whatever the mix. A
  batch that shares one adapter skips the mask and uses its slot's block of B only (its own CUDA graph too).
  DoRA: y = g * (W x + s B A x) + bias, g = magnitude / ||W + s B A||_row precomputed at load (PEFT's definition).
- On CUDA the decode step is captured as a CUDA graph per (batch bucket, attention-length bucket, mode), so a step
  costs the GPU's time rather than ~1000 Python kernel launches; the one-hot mask is a static input, so switching
  and mixing adapters never re-captures.

Per-request statistics come from monitoring.logit_stats.stats_from_logprobs over the top-STATS_TOP_K log-probs, the
same estimator every engine uses.

Failures stay bounded: every caller's wait ends (a dead scheduler, or one that makes no progress for request_timeout_s,
answers EngineError); a closed stream frees its row at the next step; a row whose logits turn non-finite fails alone
(its KV rows cleared); non-finite adapter weights are refused at load (the masked matmul of a mixed batch multiplies
every slot's B by 0, and 0 * inf = NaN would reach every adapter's rows).

Tests: tests/integration/test_serving_builtin.py (parity with PEFT/transformers and the PoolEngine).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from monitoring.logit_stats import STATS_TOP_K, stats_from_logprobs
from registry.hashing import model_weights_hash
from serving.engine import (
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineError,
    Generation,
    GenerationRequest,
    PromptLogprobs,
    StreamDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
"""The fused matrices of a layer and the HF modules each one stacks (their outputs concatenated in this order)."""
MODULE_GROUP = {m: (g, i) for g, mods in GROUPS.items() for i, m in enumerate(mods)}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""Rope types whose frequencies do not depend on the sequence length (dynamic NTK / longrope do: refused)."""
FORWARD_VARIANTS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config", "monteclora_config",
                    "kasa_config", "use_qalora")
"""PEFT LoraConfig fields that switch a layer to another forward (PEFT's lora_variants; aLoRA applies only after its
invocation tokens, Arrow routes between experts, ...): refused, never served as plain LoRA."""
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")


# ---------------------------------------------------------------------------------------------------- adapters


@dataclass
class _AdapterWeights:
    """One adapter as the engine holds it: per (layer, module) A [r, in], B*scale [out, r], and the DoRA magnitude
    [out] (read_adapter) which BuiltinEngine.load turns into g - 1 = magnitude / ||W + s B A||_row - 1, or None."""

    path: Path
    rank: int
    dora: bool
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def read_adapter(key: str, adapter_dir: Path, n_layers: int, max_rank: int | None) -> _AdapterWeights:
    """Read a PEFT LoRA directory into per-module tensors (fp32, CPU), refusing what this engine cannot serve."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{adapter_dir} has no adapter_config.json; pass a PEFT adapter directory "
                               f"(save_pretrained output)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read the PEFT config {cfg_path}: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterLoadError(f"adapter {key} is a {cfg.get('peft_type')} adapter; the built-in engine serves LoRA "
                               f"adapters (LoRA, rsLoRA, DoRA, PiSSA exported as LoRA) only")
    for field_name in ("modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters"):
        if cfg.get(field_name):
            raise AdapterLoadError(f"adapter {key} sets {field_name}={cfg[field_name]!r}, which the built-in engine "
                                   f"does not serve; merge it into the base instead")
    for field_name in FORWARD_VARIANTS:
        if cfg.get(field_name):
            raise AdapterLoadError(f"adapter {key} sets {field_name}={cfg[field_name]!r}, a LoRA variant whose forward "
                                   f"is not y = W x + s B A x; the built-in engine serves LoRA, rsLoRA and DoRA only")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise AdapterLoadError(f"adapter {key} trains biases (bias={cfg.get('bias')!r}, lora_bias="
                               f"{cfg.get('lora_bias')}); the built-in engine serves bias-free LoRA only")
    if cfg.get("fan_in_fan_out"):
        raise AdapterLoadError(f"adapter {key} has fan_in_fan_out=true (a Conv1D base); this base is a Llama")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init == "mica":
        raise AdapterLoadError(f"adapter {key} is a MiCA adapter (a LoRA variant with its own forward); the built-in "
                               f"engine serves LoRA, rsLoRA and DoRA only")
    if init.startswith(("pissa", "corda", "olora")):
        raise AdapterLoadError(f"adapter {key} is a native {init} adapter (it needs the residual base it was "
                               f"trained on); serve the export converted to plain LoRA (save_pretrained with "
                               f"path_initial_model_for_weight_conversion, what pipelines/train.py writes to adapter/)")
    st, bin_ = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    try:
        if st.is_file():
            sd = load_file(str(st))
        elif bin_.is_file():
            sd = torch.load(str(bin_), map_location="cpu", weights_only=True)
        else:
            raise AdapterLoadError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)")
    except AdapterLoadError:
        raise
    except Exception as exc:
        raise AdapterLoadError(f"cannot read the weights of adapter {key} in {adapter_dir}: {exc}") from exc
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = _KEY.search(name)
        if m is None:
            raise AdapterLoadError(f"adapter {key} holds {name!r}, which is not a LoRA weight of a decoder layer's "
                                   f"linear; the built-in engine serves LoRA on {', '.join(MODULE_GROUP)} only")
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULE_GROUP:
            raise AdapterLoadError(f"adapter {key} targets {module}, which the built-in engine does not serve "
                                   f"(supported: {', '.join(MODULE_GROUP)})")
        if layer >= n_layers:
            raise AdapterLoadError(f"adapter {key} has weights for layer {layer}; the base has {n_layers} layers")
        parts.setdefault((layer, module), {})[kind] = t.float()
    if not parts:
        raise AdapterLoadError(f"adapter {key} in {adapter_dir} holds no LoRA weights")
    rslora, alpha = bool(cfg.get("use_rslora")), float(cfg.get("lora_alpha", 8))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    dora = bool(cfg.get("use_dora"))
    modules, top_rank = {}, 0
    for (layer, module), p in sorted(parts.items()):
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterLoadError(f"adapter {key}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = p["lora_A"], p["lora_B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterLoadError(f"adapter {key}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}, which do not share a rank")
        if max_rank is not None and r > max_rank:
            raise AdapterLoadError(f"adapter {key} has rank {r} (layer {layer} {module}), above this engine's "
                                   f"max_lora_rank {max_rank}; start the engine with a higher max_lora_rank or "
                                   f"serve a lower-rank version (a PiSSA export has twice the trained rank)")
        full = f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{module}"
        pat = get_pattern_key(list(alpha_pattern), full) if alpha_pattern else None
        a_mod = float(alpha_pattern[pat]) if pat in alpha_pattern else alpha
        scale = a_mod / math.sqrt(r) if rslora else a_mod / r
        mag = p.get("lora_magnitude_vector")
        if dora and mag is None:
            raise AdapterLoadError(f"adapter {key} is DoRA but layer {layer} {module} has no lora_magnitude_vector")
        modules[(layer, module)] = (a, b * scale, mag)
        top_rank = max(top_rank, r)
    return _AdapterWeights(adapter_dir, top_rank, dora, modules)


@dataclass
class _Slot:
    index: int
    key: str
    weights: _AdapterWeights
    refs: int = 0
    """Requests queued or running on it; an adapter is freed (unload, eviction, replacement) only at 0."""
    retired: bool = False
    """Unloaded or replaced: takes no new requests, freed once refs reaches 0."""


# ---------------------------------------------------------------------------------------------------- requests


@dataclass
class _Seq:
    req: GenerationRequest
    ids: list[int]
    slot: _Slot | None
    stream: deque | None = None
    gen: torch.Generator | None = None
    row: int = -1
    pos: int = 0
    """Tokens in the KV cache (the next one is written at this position)."""
    next_token: int = -1
    out_ids: list[int] = field(default_factory=list)
    steps: int = 0
    chosen_lp: list[float] = field(default_factory=list)
    top_lp: list[list[float]] = field(default_factory=list)
    token_lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lp: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    """Characters of text already streamed."""
    lp_emitted: int = 0
    """Entries of token_lps already streamed."""
    pinned: bool = True
    """Holds a ref on slot (released exactly once, when the request is finished)."""
    cancelled: Exception | None = None
    """Set by a caller that stopped waiting (stream closed, timeout): the scheduler drops the request at its next step
    with this error."""
    finish: str | None = None
    result: Generation | Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.monotonic)


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------------- engine


class BuiltinEngine:
    """serving.engine.Engine in process: continuous batching, mixed adapters per batch, sampling, streaming."""

    name = "builtin"

    def __init__(self, base_path: Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_lora_rank: int = 64, max_loras: int = 8, max_batch: int | None = None,
                 max_seq_len: int | None = None, cuda_graphs: bool | None = None, max_prefill_tokens: int = 8192,
                 unload_timeout_s: float = 120.0, request_timeout_s: float = 300.0):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.base_path = Path(base_path)
        self.device = torch.device(device)
        if max_lora_rank < 1 or max_loras < 1:
            raise ValueError(f"max_lora_rank and max_loras must be >= 1, got {max_lora_rank}, {max_loras}")
        for what, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("max_prefill_tokens",
                                                                                   max_prefill_tokens)):
            if v is not None and v < 1:
                raise ValueError(f"{what} must be >= 1, got {v}")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; this engine runs on {self.device}")
        config = AutoConfig.from_pretrained(self.base_path)
        archs = list(getattr(config, "architectures", None) or [type(config).__name__])
        if not set(archs) & set(SUPPORTED_ARCHITECTURES) or config.model_type != "llama":
            raise ValueError(f"the built-in engine runs Llama-architecture bases ({', '.join(SUPPORTED_ARCHITECTURES)}"
                             f"); {self.base_path} is {'/'.join(archs)} (model_type {config.model_type!r}); serve it "
                             f"with --engine vllm or the pool engine")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"{self.base_path}: hidden_act {config.hidden_act!r}; the built-in engine runs SwiGLU "
                             f"(silu) Llamas only")
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in STATIC_ROPE:
            raise ValueError(f"{self.base_path}: rope_type {rope_type!r} changes its frequencies with the sequence "
                             f"length; the built-in engine supports {', '.join(STATIC_ROPE)}")
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.base_sha256 = model_weights_hash(self.base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        hf = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype).to(self.device).eval()
        self.config = config
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        eos = hf.generation_config.eos_token_id if hf.generation_config else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._take_weights(hf)
        del hf
        self.max_batch = max_batch or (256 if self.device.type == "cuda" else 32)
        self.max_seq_len = min(max_seq_len or self.context_length, self.context_length)
        shape = (self.n_layers, self.max_batch, self.kv_heads, self.max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_prefill_tokens = max_prefill_tokens
        self.unload_timeout_s = unload_timeout_s
        self.request_timeout_s = request_timeout_s
        """A caller waiting on a request gets EngineError once the scheduler has made no progress (no prefill, no
        decode step) for this long: a wedged scheduler never leaves a caller waiting for ever."""
        # adapters: slot 0 is "no adapter"; packs are rebuilt when the widest rank grows
        self._slots: list[_Slot | None] = [None] * (max_loras + 1)
        self._keys: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._width = 0
        self._packs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self._gm1: list[dict[str, torch.Tensor]] = []  # DoRA g - 1 per slot [n_slots, out] (zeros: not DoRA)
        self._wa: list[dict[str, torch.Tensor]] = []  # per layer and fused matrix: [W; every slot's A], one tensor
        self._dora_slots: set[int] = set()
        # scheduling
        self._cv = threading.Condition()
        self._tok_lock = threading.Lock()  # a fast tokenizer shared by threads raises "Already borrowed"
        self._model_lock = threading.Lock()  # one forward at a time; pack writes between steps
        self._waiting: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}
        self._free_rows = list(range(self.max_batch))
        self._admitting: list[_Seq] = []  # taken off _waiting, being prefilled (in neither queue)
        self._progress_t = time.monotonic()  # when the scheduler last finished a prefill or a decode step: callers
        # watch it to tell a busy engine from a stuck one
        self._closed = False
        self._error: BaseException | None = None
        self._sample_gen = torch.Generator(device=self.device)
        self._sample_gen.seed()
        self.steps = 0
        """Decode steps run (all rows together count once)."""
        # CUDA graphs of the decode step
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._graph_pool = None
        nb = self.max_batch
        self._st_tok = torch.zeros(nb, dtype=torch.long, device=self.device)
        self._st_pos = torch.zeros(nb, dtype=torch.long, device=self.device)
        self._st_onehot = torch.zeros(nb, max_loras + 1, dtype=self.dtype, device=self.device)
        self._thread = threading.Thread(target=self._loop, name="builtin-engine-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ base weights

    def _take_weights(self, hf) -> None:
        cfg = hf.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        m = hf.model
        self.embed = m.embed_tokens.weight.detach()
        self.final_norm = m.norm.weight.detach()
        self.lm_head = hf.lm_head.weight.detach()
        self.layers = []
        self.sub_out: dict[str, list[int]] = {}
        for layer in m.layers:
            at, mlp = layer.self_attn, layer.mlp
            mods = {"q_proj": at.q_proj, "k_proj": at.k_proj, "v_proj": at.v_proj, "o_proj": at.o_proj,
                    "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
            entry = {"ln1": layer.input_layernorm.weight.detach(), "ln2": layer.post_attention_layernorm.weight.detach()}
            for g, names in GROUPS.items():
                w = torch.cat([mods[n].weight.detach() for n in names]) if len(names) > 1 else mods[names[0]].weight.detach()
                bs = [mods[n].bias for n in names]
                b = torch.cat([x.detach() for x in bs]) if all(x is not None for x in bs) else None
                if any(x is not None for x in bs) and b is None:
                    raise ValueError(f"{self.base_path}: some of {names} have a bias and some not")
                entry[g] = (w.contiguous(), b)
                self.sub_out[g] = [mods[n].weight.shape[0] for n in names]
            self.layers.append(entry)
        self.sub_in = {g: self.layers[0][g][0].shape[1] for g in GROUPS}
        rot = m.rotary_emb
        inv_freq = rot.inv_freq.detach().float().to(self.device)
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        n_pos = int(getattr(cfg, "max_position_embeddings", 2048))
        freqs = torch.arange(n_pos, device=self.device, dtype=torch.float32)[:, None] * inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(self.dtype)
        self.sin = (emb.sin() * scaling).to(self.dtype)
        self.attn_scale = self.head_dim ** -0.5

    # ------------------------------------------------------------------ forward pieces

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _linear(self, x: torch.Tensor, li: int, g: str, lora) -> torch.Tensor:
        """x [N, in] through fused matrix g of layer li plus its adapters. lora: None (base), ("one", slot) or
        ("mask", onehot [N, S], masks {g: [N, S*gw]}, dora)."""
        w, b = self.layers[li][g]
        if lora is None:
            return F.linear(x, w, b)
        # W and every slot's A are rows of one matrix: one matmul gives W x and all the x A^T columns (at decode
        # sizes a separate small matmul costs a kernel launch more than its arithmetic); the bias is added after
        # DoRA's scale, as PEFT scales W x + s B A x only
        out = w.shape[0]
        ya = F.linear(x, self._wa[li][g])
        y, xa = ya[:, :out], ya[:, out:]
        bt = self._packs[li][g][1]
        if lora[0] == "one":
            s = lora[1]
            gw = self._width * len(GROUPS[g])
            y = torch.addmm(y, xa[:, s * gw:(s + 1) * gw], bt[s * gw:(s + 1) * gw])
            if s in self._dora_slots:  # y + y (g - 1), not y * g: in bf16 1 + (g - 1) rounds to steps of 1/128
                y = torch.addcmul(y, y, self._gm1[li][g][s])
        else:
            _, onehot, masks, dora = lora
            y = torch.addmm(y, xa * masks[g], bt)
            if dora:
                y = torch.addcmul(y, y, onehot @ self._gm1[li][g])
        return y if b is None else y + b

    def _lora_ctx(self, onehot: torch.Tensor | None, single: int | None, dora: bool):
        if single is not None:
            return None if single == 0 else ("one", single)
        if onehot is None:
            return None
        n, s = onehot.shape
        masks = {g: onehot[:, :, None].expand(n, s, self._width * len(mods)).reshape(n, -1)
                 for g, mods in GROUPS.items()}
        return ("mask", onehot, masks, dora)

    def _layer_mlp(self, h: torch.Tensor, li: int, lora) -> torch.Tensor:
        x = self._norm(h, self.layers[li]["ln2"])
        gu = self._linear(x, li, "gate_up", lora)
        inter = gu.shape[-1] // 2
        return h + self._linear(F.silu(gu[:, :inter]) * gu[:, inter:], li, "down", lora)

    def _qkv(self, h: torch.Tensor, li: int, lora, pos: torch.Tensor):
        x = self._norm(h, self.layers[li]["ln1"])
        qkv = self._linear(x, li, "qkv", lora)
        nq, nk = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        n = h.shape[0]
        q = qkv[:, :nq].view(n, self.n_heads, self.head_dim)
        k = qkv[:, nq:nq + nk].view(n, self.kv_heads, self.head_dim)
        v = qkv[:, nq + nk:].view(n, self.kv_heads, self.head_dim)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(h, self.final_norm), self.lm_head)

    def _prefill_forward(self, ids: torch.Tensor, lora, rows: torch.Tensor | None) -> torch.Tensor:
        """Right-padded prompts ids [B, T] from position 0 -> hidden states [B, T, d]; K/V written to the cache
        rows `rows` (None: not written, a pure forward)."""
        bsz, t = ids.shape
        pos = torch.arange(t, device=self.device).repeat(bsz)
        h = self.embed[ids.reshape(-1)]
        for li in range(self.n_layers):
            q, k, v = self._qkv(h, li, lora, pos)
            q = q.view(bsz, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            if rows is not None:
                self.k_cache[li, rows, :, :t] = k
                self.v_cache[li, rows, :, :t] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale,
                                               enable_gqa=self.kv_heads != self.n_heads)
            h = h + self._linear(o.transpose(1, 2).reshape(bsz * t, -1), li, "o", lora)
            h = self._layer_mlp(h, li, lora)
        return h.view(bsz, t, -1)

    def _decode_forward(self, nb: int, length: int, lora) -> torch.Tensor:
        """One token per cache row 0..nb-1 (self._st_tok / _st_pos) over attention length `length` -> logits
        [nb, V]. Fixed shapes and no host sync: what a CUDA graph captures."""
        tok, pos = self._st_tok[:nb], self._st_pos[:nb]
        rows = torch.arange(nb, device=self.device)
        h = self.embed[tok]
        valid = torch.arange(length, device=self.device)[None, :] <= pos[:, None]  # [nb, L]
        bias = torch.zeros(nb, length, dtype=torch.float32, device=self.device).masked_fill_(~valid, float("-inf"))
        bias = bias[:, None, None, :]
        grp = self.n_heads // self.kv_heads
        for li in range(self.n_layers):
            q, k, v = self._qkv(h, li, lora, pos)
            self.k_cache[li][rows, :, pos] = k
            self.v_cache[li][rows, :, pos] = v
            kc = self.k_cache[li, :nb, :, :length]  # [nb, kvh, L, hd]
            vc = self.v_cache[li, :nb, :, :length]
            qg = q.view(nb, self.kv_heads, grp, self.head_dim)
            scores = (qg @ kc.transpose(-1, -2)).float() * self.attn_scale + bias
            p = torch.softmax(scores, dim=-1).to(self.dtype)
            o = (p @ vc).reshape(nb, -1)
            h = h + self._linear(o, li, "o", lora)
            h = self._layer_mlp(h, li, lora)
        return self._logits(h)

    # ------------------------------------------------------------------ adapter packs

    def _alloc_packs(self, width: int) -> None:
        """(Re)build every layer's packed A / B^T at rank width `width` from the slots' weights."""
        s = self.max_loras + 1
        packs, gm1, was = [], [], []
        for li in range(self.n_layers):
            lp, lg, lw = {}, {}, {}
            for g, mods in GROUPS.items():
                cols = s * width * len(mods)
                w, b = self.layers[li][g]
                out = w.shape[0]
                wa = torch.zeros(out + cols, self.sub_in[g], dtype=self.dtype, device=self.device)
                wa[:out] = w
                self.layers[li][g] = (wa[:out], b)  # the base weight is now the first rows of [W; A_packed]
                lw[g] = wa
                lp[g] = (wa[out:], torch.zeros(cols, sum(self.sub_out[g]), dtype=self.dtype, device=self.device))
                lg[g] = torch.zeros(s, sum(self.sub_out[g]), dtype=self.dtype, device=self.device)
                del w
            packs.append(lp)
            gm1.append(lg)
            was.append(lw)
        self._packs, self._gm1, self._wa, self._width = packs, gm1, was, width
        self._graphs.clear()
        for slot in self._slots:
            if slot is not None:
                self._write_slot(slot)

    def _write_slot(self, slot: _Slot) -> None:
        """Write an adapter's A, scaled B and DoRA g - 1 into its slot's block of the packs (in place)."""
        w, si, aw = self._width, slot.index, slot.weights
        for li in range(self.n_layers):
            for g, mods in GROUPS.items():
                a_pack, bt_pack = self._packs[li][g]
                gw = w * len(mods)
                blk_a, blk_bt = a_pack[si * gw:(si + 1) * gw], bt_pack[si * gw:(si + 1) * gw]
                blk_a.zero_()
                blk_bt.zero_()
                self._gm1[li][g][si].zero_()
                off = 0
                for j, mod in enumerate(mods):
                    out = self.sub_out[g][j]
                    ent = aw.modules.get((li, mod))
                    if ent is not None:
                        a, bs, gm1 = ent
                        r = a.shape[0]
                        blk_a[j * w:j * w + r] = a
                        blk_bt[j * w:j * w + r, off:off + out] = bs.t()
                        if gm1 is not None:
                            self._gm1[li][g][si, off:off + out] = gm1
                    off += out
        if aw.dora:
            self._dora_slots.add(si)
        else:
            self._dora_slots.discard(si)

    # ------------------------------------------------------------------ Engine: adapters

    def load(self, key: str, adapter_dir: Path, base_sha256: str | None = None) -> None:
        adapter_dir = Path(adapter_dir).resolve()
        if base_sha256 is not None and base_sha256.removeprefix("sha256:") != self.base_sha256:
            raise AdapterLoadError(
                f"adapter {key} was trained on base sha256:{base_sha256.removeprefix('sha256:')[:12]}…, but the served "
                f"base is sha256:{self.base_sha256[:12]}…; re-train it or serve the matching base")
        with self._cv:
            self._check_up_locked()
            old = self._keys.get(key)
            if old is not None and old.weights.path == adapter_dir:
                self._keys.move_to_end(key)
                return
        weights = read_adapter(key, adapter_dir, self.n_layers, self.max_lora_rank)
        self._prepare(key, weights)
        with self._cv:
            index = self._free_slot_locked(key)
            slot = _Slot(index, key, weights)
            self._slots[index] = slot  # reserved: nothing routes to it until it is in _keys
        try:
            with self._model_lock:
                if self._closed:  # close() released the packs
                    raise EngineError("the built-in engine is closed")
                width = max(weights.rank, self._width)
                if self.device.type == "cuda":
                    width = -(-width // 8) * 8  # tensor-core friendly, and fewer re-packs
                if width != self._width:
                    self._alloc_packs(width)
                else:
                    self._write_slot(slot)
        except BaseException:
            with self._cv:
                self._slots[index] = None
            raise
        with self._cv:
            old = self._keys.pop(key, None)
            self._keys[key] = slot
            if old is not None:
                self._retire_locked(old)

    def _prepare(self, key: str, weights: _AdapterWeights) -> None:
        """Check an adapter against this base and put its tensors in the engine's device/dtype (in place), the DoRA
        magnitude turned into g - 1. Nothing non-finite may reach the packs: a mixed batch multiplies every slot's
        B by a zero mask, and 0 * inf is NaN, so one broken adapter would poison every other adapter's rows."""
        for (li, mod), (a, bs, mag) in list(weights.modules.items()):
            g, j = MODULE_GROUP[mod]
            out = self.sub_out[g][j]
            if a.shape[1] != self.sub_in[g] or bs.shape[0] != out:
                raise AdapterLoadError(f"adapter {key}: layer {li} {mod} is {tuple(bs.shape)}x{tuple(a.shape)}, "
                                       f"which does not fit this base ({out}x{self.sub_in[g]}); it "
                                       f"was trained on another base")
            a, bs = a.to(self.device), bs.to(self.device)
            gm1 = None
            if mag is not None:
                if mag.shape != (out,):
                    raise AdapterLoadError(f"adapter {key}: layer {li} {mod} has a DoRA magnitude of shape "
                                           f"{tuple(mag.shape)}, expected ({out},)")
                off = sum(self.sub_out[g][:j])
                base_w = self.layers[li][g][0][off:off + out].float()
                gm1 = (mag.to(self.device) / torch.linalg.norm(base_w + bs @ a, dim=1) - 1).to(self.dtype)
            a, bs = a.to(self.dtype), bs.to(self.dtype)
            if not all(bool(torch.isfinite(t).all()) for t in (a, bs, gm1) if t is not None):
                raise AdapterLoadError(f"adapter {key}: layer {li} {mod} has non-finite weights (NaN/inf"
                                       f"{', or overflow in ' + str(self.dtype) if self.dtype != torch.float32 else ''}"
                                       f"); it cannot be served")
            weights.modules[(li, mod)] = (a, bs, gm1)

    def _free_slot_locked(self, key: str) -> int:
        for i in range(1, len(self._slots)):
            if self._slots[i] is None:
                return i
        for k, s in list(self._keys.items()):  # least recently used first
            if s.refs == 0:
                del self._keys[k]
                self._slots[s.index] = None
                return s.index
        raise AdapterLoadError(f"cannot load {key}: max_loras={self.max_loras} adapters are loaded and every one has "
                               f"requests queued or running ({', '.join(self._keys)}); unload one or start the engine "
                               f"with a higher max_loras")

    def _retire_locked(self, slot: _Slot) -> None:
        slot.retired = True
        if slot.refs == 0 and self._slots[slot.index] is slot:
            self._slots[slot.index] = None
        self._cv.notify_all()

    def unload(self, key: str) -> None:
        """Stop routing to key at once; wait (up to unload_timeout_s) for its queued and running requests to finish,
        then free its slot. EngineError if they do not finish in time (the slot is then freed when they do)."""
        with self._cv:
            slot = self._keys.pop(key, None)
            if slot is None:
                raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {list(self._keys)}")
            self._retire_locked(slot)
            deadline = time.monotonic() + self.unload_timeout_s
            while slot.refs > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineError(f"unload of {key}: {slot.refs} requests still use it after "
                                      f"{self.unload_timeout_s:.0f} s; it takes no new requests and is freed when "
                                      f"they finish")
                self._cv.wait(left)

    def loaded(self) -> list[str]:
        with self._cv:
            return list(self._keys)

    # ------------------------------------------------------------------ Engine: requests

    def _submit(self, req: GenerationRequest, stream: bool) -> _Seq:
        """Validate and queue one request (raises its error)."""
        p = req.params
        with self._tok_lock:
            ids = self.tokenizer(req.prompt).input_ids
        if not ids:
            raise ValueError("the prompt has no tokens; send a non-empty prompt")
        limit = min(self.context_length, self.max_seq_len)
        if len(ids) + p.max_tokens > limit:
            what = "the model's context" if limit == self.context_length else "this engine's max_seq_len"
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {p.max_tokens}, more than {what} of {limit} "
                f"tokens; shorten the prompt or lower max_tokens")
        if len(ids) > self.max_prefill_tokens:
            raise ContextLengthExceeded(f"the prompt has {len(ids)} tokens, more than max_prefill_tokens "
                                        f"{self.max_prefill_tokens}")
        gen = None
        if p.temperature > 0 and p.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(p.seed))
        with self._cv:
            self._check_up_locked()
            slot = None
            if req.adapter is not None:
                slot = self._keys.get(req.adapter)
                if slot is None:
                    raise AdapterNotLoaded(f"adapter {req.adapter} is not loaded; loaded: {list(self._keys)}")
                self._keys.move_to_end(req.adapter)
                slot.refs += 1
            seq = _Seq(req, ids, slot, stream=deque() if stream else None, gen=gen)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | Exception]:
        seqs: list[_Seq | Exception] = []
        for req in requests:
            try:
                seqs.append(self._submit(req, stream=False))
            except Exception as exc:  # noqa: BLE001  (per request: the others are still served)
                seqs.append(exc)
        out = []
        for s in seqs:
            if isinstance(s, Exception):
                out.append(s)
                continue
            with self._cv:
                self._wait_locked(s, s.done.is_set)
            out.append(s.result)
        return out

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]:
        seq = self._submit(request, stream=True)  # errors raise here, before the first delta
        return self._drain(seq)

    def _drain(self, seq: _Seq) -> Iterator[StreamDelta]:
        try:
            while True:
                with self._cv:
                    self._wait_locked(seq, lambda: bool(seq.stream) or seq.done.is_set())
                    items = list(seq.stream)
                    seq.stream.clear()
                    done = seq.done.is_set()
                yield from items
                if done and not items:
                    if isinstance(seq.result, Exception):
                        raise seq.result
                    return
        finally:  # the caller closed the stream (or stopped iterating on an error): free the row at the next step
            if not seq.done.is_set():
                self._cancel(seq, EngineError("the stream was closed before the request finished"))

    def _wait_locked(self, seq: _Seq, ready) -> None:
        """Wait (holding _cv) until ready(); if the scheduler is gone or makes no progress for request_timeout_s,
        answer seq with EngineError instead of waiting for ever."""
        while not ready():
            self._cv.wait(0.5)
            if ready():
                return
            if not self._thread.is_alive():
                why = self._error if self._error is not None else "it stopped"
                self._finish_locked(seq, EngineError(f"the built-in engine's scheduler is not running ({why!r}); "
                                                     f"restart the engine"))
                return
            if time.monotonic() - max(self._progress_t, seq.t_submit) > self.request_timeout_s:
                err = EngineError(f"the built-in engine made no progress for {self.request_timeout_s:.0f} s "
                                  f"(scheduler stuck); request {seq.req.request_id or seq.req.prompt[:40]!r} dropped")
                self._cancel_locked(seq, err)
                if not seq.done.is_set():  # running: answer now, the scheduler frees its row when it gets there
                    seq.result = err
                    seq.done.set()
                return

    def _cancel(self, seq: _Seq, error: Exception) -> None:
        with self._cv:
            self._cancel_locked(seq, error)

    def _cancel_locked(self, seq: _Seq, error: Exception) -> None:
        """Drop a request: at once if still queued, else at the scheduler's next step (it owns running rows)."""
        if seq.done.is_set():
            return
        seq.cancelled = error
        try:
            self._waiting.remove(seq)
        except ValueError:
            self._cv.notify_all()
            return
        self._finish_locked(seq, error)

    def _check_up_locked(self) -> None:
        if self._closed:
            raise EngineError("the built-in engine is closed")
        if self._error is not None:
            raise EngineError(f"the built-in engine's scheduler died: {self._error!r}; restart the engine")
        if not self._thread.is_alive():
            raise EngineError("the built-in engine's scheduler is not running; restart the engine")

    def prompt_logprobs(self, prompts: list[str], key: str | None) -> list[PromptLogprobs]:
        logits, mask, ids = self._full_logits(prompts, key)
        out = []
        for i in range(len(prompts)):
            n = int(mask[i].sum())
            logp = torch.log_softmax(logits[i, : n - 1].float(), -1)
            tok = ids[i, 1:n]
            out.append(PromptLogprobs(ids[i, :n].tolist(), logp.gather(-1, tok[:, None]).squeeze(-1).tolist(),
                                      logp.argmax(-1).tolist()))
        return out

    def prompt_logits(self, prompts: list[str], key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, V] float32 logits, [B, T] mask) of right-padded prompts, as AdapterPool.prompt_logits gives."""
        logits, mask, _ = self._full_logits(prompts, key)
        return logits, mask

    def _full_logits(self, prompts: list[str], key: str | None):
        if not prompts:
            raise ValueError("prompt_logprobs needs at least one prompt")
        with self._tok_lock:
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right")
        ids = batch.input_ids
        if ids.shape[1] > self.context_length:
            raise ContextLengthExceeded(f"a prompt has {ids.shape[1]} tokens, more than the model's context of "
                                        f"{self.context_length}")
        if int(batch.attention_mask.sum(-1).min()) == 0:
            raise ValueError("a prompt has no tokens; send non-empty prompts")
        with self._cv:
            self._check_up_locked()
            slot = None
            if key is not None:
                slot = self._keys.get(key)
                if slot is None:
                    raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {list(self._keys)}")
                self._keys.move_to_end(key)
                slot.refs += 1
        try:
            with self._model_lock, torch.inference_mode():
                lora = self._lora_ctx(None, slot.index if slot else 0, False)
                h = self._prefill_forward(ids.to(self.device), lora, rows=None)
                logits = self._logits(h.reshape(-1, h.shape[-1])).view(*ids.shape, -1)
        finally:
            self._release(slot)
        return logits.float().cpu(), batch.attention_mask, ids

    def _release(self, slot: _Slot | None) -> None:
        if slot is None:
            return
        with self._cv:
            slot.refs -= 1
            if slot.refs == 0 and slot.retired and self._slots[slot.index] is slot:
                self._slots[slot.index] = None
            self._cv.notify_all()

    def health(self) -> dict:
        with self._cv:
            self._check_up_locked()
            return {"status": "ok", "engine": self.name, "running": len(self._running), "waiting": len(self._waiting),
                    "loaded": list(self._keys), "device": str(self.device), "max_batch": self.max_batch,
                    "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank, "steps": self.steps}

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)  # it stops between two steps
        with self._cv:
            for s in list(self._waiting) + self._admitting + list(self._running.values()):
                self._finish_locked(s, EngineError("the built-in engine was closed before the request finished"))
            self._waiting.clear()
            self._admitting = []
            self._running.clear()
        if self._thread.is_alive():  # a step longer than 30 s: leave the tensors to it, it exits when done
            log.warning("the built-in engine's scheduler did not stop within 30 s of close()")
            return
        with self._model_lock:  # release the model (a prompt_logprobs call in flight finishes first)
            self._graphs.clear()
            self._graph_pool = None
            self.k_cache = self.v_cache = None
            self._packs, self._gm1, self._wa, self.layers = [], [], [], []
            self.embed = self.lm_head = self.final_norm = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ scheduler

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._closed:
                        return
                    for s in [s for s in self._running.values() if s.cancelled is not None]:
                        self._finish_locked(s, s.cancelled)
                    admit, t_max = [], 0
                    self._free_rows.sort()  # lowest rows first: the decode batch stays as short as it can
                    while self._waiting and self._free_rows:
                        s = self._waiting[0]
                        if admit and max(t_max, len(s.ids)) * (len(admit) + 1) > self.max_prefill_tokens:
                            break
                        t_max = max(t_max, len(s.ids))
                        self._waiting.popleft()
                        if s.slot is not None and self._slots[s.slot.index] is not s.slot:
                            self._finish_locked(s, AdapterNotLoaded(f"adapter {s.req.adapter} was unloaded"))
                            continue
                        s.row = self._free_rows.pop(0)
                        admit.append(s)
                    self._admitting = admit
                with torch.inference_mode():
                    if admit:
                        with self._model_lock:
                            self._prefill(admit)
                        with self._cv:
                            for s in admit:
                                if s.row >= 0:  # not finished at its first token
                                    self._running[s.row] = s
                            self._admitting = []
                            self._progress_t = time.monotonic()
                            self._cv.notify_all()
                    with self._cv:
                        running = dict(self._running)
                    if running:
                        with self._model_lock:
                            self._decode(running)
                        with self._cv:
                            self._progress_t = time.monotonic()
        except BaseException as exc:  # every waiting caller must hear of it
            log.exception("the built-in engine's scheduler failed; every queued and running request gets EngineError")
            with self._cv:
                self._error = exc
                for s in list(self._waiting) + self._admitting + list(self._running.values()):
                    self._finish_locked(s, EngineError(f"the built-in engine's scheduler failed: {exc!r}"))
                self._waiting.clear()
                self._admitting = []
                self._running.clear()

    def _onehot(self, seqs: list[_Seq], n: int, rows: list[int] | None = None) -> tuple[torch.Tensor, bool]:
        idx = torch.zeros(n, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[s.row if rows is None else rows[i]] = s.slot.index if s.slot else 0
        onehot = F.one_hot(idx, self.max_loras + 1).to(self.dtype)
        return onehot, any(s.slot is not None and s.slot.index in self._dora_slots for s in seqs)

    def _prefill(self, seqs: list[_Seq]) -> None:
        t = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), t), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
        ids = ids.to(self.device)
        slots = {s.slot.index if s.slot else 0 for s in seqs}
        if len(slots) == 1:
            lora = self._lora_ctx(None, slots.pop(), False)
        else:
            onehot, dora = self._onehot(seqs, len(seqs), rows=list(range(len(seqs))))
            onehot = onehot.to(self.device).repeat_interleave(t, dim=0)
            lora = self._lora_ctx(onehot, None, dora)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        h = self._prefill_forward(ids, lora, rows)
        logits = self._logits(h.reshape(-1, h.shape[-1])).view(len(seqs), t, -1).float()
        logp = torch.log_softmax(logits, -1)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        tok_lp = logp.gather(-1, nxt[..., None]).squeeze(-1).cpu()
        last = torch.tensor([len(s.ids) - 1 for s in seqs], device=self.device)
        last_logits = logits[torch.arange(len(seqs), device=self.device), last]
        for i, s in enumerate(seqs):
            s.prompt_lp = tok_lp[i, : len(s.ids) - 1].tolist()
            s.pos = len(s.ids)
        self._sample_and_advance(seqs, last_logits)

    def _decode(self, running: dict[int, _Seq]) -> None:
        seqs = list(running.values())
        n = max(running) + 1
        length = max(s.pos for s in seqs) + 1
        if self.cuda_graphs:
            nb = min(self.max_batch, 1 << (n - 1).bit_length())
            length = min(self.max_seq_len, -(-length // 64) * 64)
        else:
            nb = n
        tok = torch.zeros(nb, dtype=torch.long)
        pos = torch.zeros(nb, dtype=torch.long)
        for s in seqs:
            tok[s.row] = s.next_token
            pos[s.row] = s.pos
        self._st_tok[:nb].copy_(tok, non_blocking=True)
        self._st_pos[:nb].copy_(pos, non_blocking=True)
        slots = {s.slot.index if s.slot else 0 for s in seqs}
        dora = any(i in self._dora_slots for i in slots)
        if self.cuda_graphs:
            if slots == {0}:
                mode = "base"
            elif len(slots) == 1 and 0 not in slots:  # one adapter for every row: its own block, no mask
                [si] = slots
                mode = f"one:{si}:{int(dora)}"
            else:
                mode = "dora" if dora else "lora"
                onehot, _ = self._onehot(seqs, nb)
                self._st_onehot[:nb].copy_(onehot, non_blocking=True)
            try:
                logits = self._graph_step(nb, length, mode)
            except RuntimeError as exc:  # an op that cannot be captured on this torch/driver: serve eagerly
                log.warning("CUDA graph capture of the decode step failed (%r); the built-in engine decodes without "
                            "CUDA graphs from now on", exc)
                self.cuda_graphs = False
                self._graphs.clear()
                return self._decode(running)
        else:
            if len(slots) == 1:
                lora = self._lora_ctx(None, next(iter(slots)), False)
            else:
                onehot, _ = self._onehot(seqs, nb)
                self._st_onehot[:nb].copy_(onehot)
                lora = self._lora_ctx(self._st_onehot[:nb], None, dora)
            logits = self._decode_forward(nb, length, lora)
        for s in seqs:
            s.pos += 1
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        self._sample_and_advance(seqs, logits[rows].float())
        self.steps += 1

    def _graph_step(self, nb: int, length: int, mode: str) -> torch.Tensor:
        key = (nb, length, mode, self._width)
        entry = self._graphs.get(key)
        if entry is None:
            def fn():
                if mode == "base":
                    lora = None
                elif mode.startswith("one:"):
                    lora = ("one", int(mode.split(":")[1]))
                else:
                    lora = self._lora_ctx(self._st_onehot[:nb], None, mode == "dora")
                return self._decode_forward(nb, length, lora)

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up (idempotent: it rewrites the same K/V at the same positions)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = fn()
            entry = self._graphs[key] = (graph, out)
        graph, out = entry
        graph.replay()
        return out

    def _decode_text(self, ids: list[int], skip: bool = True) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def _sample_and_advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Choose each row's next token from logits [n, V] (float32), record log-probs, finish rows."""
        logp = torch.log_softmax(logits, -1)
        bad = set((~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist())
        k_top = max([STATS_TOP_K] + [s.req.params.logprobs or 0 for s in seqs])
        top_v, top_i = logp.topk(min(k_top, logp.shape[-1]), dim=-1)
        chosen = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if s.req.params.temperature > 0 and i not in bad]
        if sampled:
            chosen = chosen.clone()
            for i in sampled:
                p = seqs[i].req.params
                probs = torch.softmax(logits[i] / p.temperature, -1)
                if p.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = (sp.cumsum(0) - sp) < p.top_p
                    keep[0] = True
                    probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                chosen[i] = torch.multinomial(probs, 1, generator=seqs[i].gen or self._sample_gen)[0]
        chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1)
        chosen_l, chosen_lp_l = chosen.tolist(), chosen_lp.tolist()
        top_v_l = top_v.tolist()
        top_i_l = top_i.tolist() if any(s.req.params.logprobs for s in seqs) else None
        finished, failed = [], []
        for i, s in enumerate(seqs):
            if i in bad:  # one request's NaN/inf (a broken adapter, an overflow) fails that request, not the engine
                failed.append(s)
                continue
            tok = chosen_l[i]
            p = s.req.params
            s.steps += 1
            s.chosen_lp.append(chosen_lp_l[i])
            s.top_lp.append(top_v_l[i][:STATS_TOP_K])
            if p.logprobs is not None:
                top = [(self._decode_text([t], False), lp) for t, lp in zip(top_i_l[i][: p.logprobs],
                                                                          top_v_l[i][: p.logprobs])] \
                    if p.logprobs else []
                s.token_lps.append(TokenLogprob(self._decode_text([tok], False), chosen_lp_l[i], top))
            if tok in self.eos_ids:
                s.finish = "stop"
            else:
                s.out_ids.append(tok)
                s.next_token = tok
                if p.stop or s.stream is not None:
                    s.text = self._decode_text(s.out_ids)
                    if p.stop:
                        cut = min((j for j in (s.text.find(x) for x in p.stop if x) if j >= 0), default=-1)
                        if cut >= 0:
                            s.text, s.finish = s.text[:cut], "stop"
                if s.finish is None and s.steps >= p.max_tokens:
                    s.finish = "length"
            if s.finish is not None:
                finished.append(s)
            elif s.stream is not None:
                safe = s.text.rstrip("\ufffd")
                safe = safe[: len(safe) - _stop_holdback(safe, p.stop)]
                if len(safe) > s.emitted:  # tokens whose text is held back ride with the next delta
                    lps = s.token_lps[s.lp_emitted:] if p.logprobs is not None else None
                    with self._cv:
                        s.stream.append(StreamDelta(safe[s.emitted:], lps))
                        self._cv.notify_all()
                    s.emitted, s.lp_emitted = len(safe), len(s.token_lps)
        for s in failed:  # its K/V rows may hold NaN, which would leak into the next occupant's masked positions
            self.k_cache[:, s.row].zero_()
            self.v_cache[:, s.row].zero_()
        if finished or failed:
            with self._cv:
                for s in finished:
                    self._finish_locked(s, None)
                for s in failed:
                    self._finish_locked(s, EngineError(
                        f"the model gave non-finite logits for request {s.req.request_id or s.req.prompt[:40]!r} "
                        f"on adapter {s.req.adapter} at token {s.steps}; check the adapter's weights"))

    def _finish_locked(self, s: _Seq, error: Exception | None) -> None:
        """Answer a request (a Generation, or `error`) and free its row and its adapter pin. Caller holds _cv."""
        if s.result is None:  # (a stuck-scheduler timeout answers first; the row is freed here when it gets here)
            if error is not None:
                s.result = error
            else:
                p = s.req.params
                text = s.text if (p.stop or s.stream is not None) else self._decode_text(s.out_ids)
                s.result = Generation(
                    text=text, prompt_tokens=len(s.ids), completion_tokens=s.steps, finish_reason=s.finish,
                    stats=stats_from_logprobs(s.prompt_lp, s.top_lp),
                    response_nll=-sum(s.chosen_lp) / len(s.chosen_lp),
                    logprobs=list(s.token_lps) if p.logprobs is not None else None)
                if s.stream is not None:
                    s.stream.append(StreamDelta(text[s.emitted:], s.token_lps[s.lp_emitted:]
                                                if p.logprobs is not None else None, final=s.result))
        if s.row >= 0:
            self._running.pop(s.row, None)
            self._free_rows.append(s.row)
            s.row = -1
        slot = s.slot
        if slot is not None and s.pinned:
            s.pinned = False
            slot.refs -= 1
            if slot.refs == 0 and slot.retired and self._slots[slot.index] is slot:
                self._slots[slot.index] = None
        s.done.set()
        self._cv.notify_all()
