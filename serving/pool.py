"""Adapter pool: one base model in memory, LoRA adapters hot-loaded onto it, greedy generation with a KV cache.

    pool = AdapterPool(Path("models/tiny-llama"), max_adapters=8)
    pool.load("support-assistant@2", Path("work/adapters/support-assistant/2/adapter"))
    c = pool.complete("### Customer: where is my order?\\n### Agent:", "support-assistant@2", max_tokens=32)
    c.text, c.stats["prompt_nll"], c.finish_reason

The base and the tokenizer are loaded once; adapters are PEFT adapters injected next to the base weights, so loading,
unloading and switching never restart anything. The model is shared, so one lock covers "activate adapter + forward":
requests are served one at a time (on CPU the matmuls already use every core). Switching to a loaded adapter is only
PEFT's set_adapter (well under a millisecond on the tiny model); a request for the adapter that is already active
does not even do that.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from monitoring.logit_stats import request_stats
from registry.hashing import model_weights_hash


from serving.engine import (  # noqa: E402  (one set of exception classes for every engine)
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    Generation,
    GenerationRequest,
    PromptLogprobs,
    StreamDelta,
    TokenLogprob,
)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict
    """monitoring.logit_stats.request_stats(...) of this request: prompt_nll, gen_entropy, gen_max_prob."""
    finish_reason: str
    """"stop" (eos or a stop string) or "length" (max_tokens reached)."""
    logprobs: list[float] | None
    """Log-probability of each generated token, when asked for."""
    tokens: list[str] | None = None
    """The generated tokens as strings, when logprobs were asked for."""
    response_nll: float = float("nan")
    """Mean NLL of the generated tokens under the serving model (what the rollout compares to its offline value)."""


@dataclass
class _Adapter:
    name: str
    """PEFT adapter name (keys like "family@2" may hold characters PEFT's module dicts refuse, e.g. '.')."""
    path: Path
    loaded_at: float = field(default_factory=time.time)


class AdapterPool:
    """Base model + hot-swappable LoRA adapters, thread-safe."""

    def __init__(self, base_path: Path, device: str = "cpu", max_adapters: int = 8):
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.base_path = Path(base_path)
        self.device = torch.device(device)
        self.max_adapters = max_adapters
        self.base_sha256 = model_weights_hash(self.base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.base = AutoModelForCausalLM.from_pretrained(self.base_path).to(self.device).eval()
        self.context_length = int(getattr(self.base.config, "max_position_embeddings", 2048))
        eos = self.base.generation_config.eos_token_id if self.base.generation_config else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._peft = None  # PeftModel, created with the first adapter
        self._tuner_layers: list = []
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # least recently used first
        self._active: str | None = None  # PEFT name of the adapter set active last
        self._names = 0
        self._lock = threading.RLock()
        self.switches = 0
        """How many times an adapter switch (set_adapter) was needed; a sanity number for metrics."""

    # ------------------------------------------------------------------ adapters

    def load(self, key: str, adapter_dir: Path, base_sha256: str | None = None) -> None:
        """Load (or reload, if the path changed) an adapter under `key`; a no-op when already loaded from that path.

        base_sha256, when given, is the base the adapter was trained on; a different served base is refused.
        """
        from peft import PeftConfig, PeftModel

        adapter_dir = Path(adapter_dir).resolve()
        if base_sha256 is not None and base_sha256.removeprefix("sha256:") != self.base_sha256:
            raise AdapterLoadError(
                f"adapter {key} was trained on base sha256:{base_sha256.removeprefix('sha256:')[:12]}…, but the served "
                f"base is sha256:{self.base_sha256[:12]}…; re-train it or serve the matching base")
        if not (adapter_dir / "adapter_config.json").is_file():
            raise AdapterLoadError(f"{adapter_dir} has no adapter_config.json; pass a PEFT adapter directory "
                                   f"(save_pretrained output)")
        try:
            PeftConfig.from_pretrained(str(adapter_dir))
        except Exception as exc:
            raise AdapterLoadError(f"cannot read the PEFT config in {adapter_dir}: {exc}") from exc
        with self._lock:
            old = self._adapters.get(key)
            if old is not None and old.path == adapter_dir:
                self._adapters.move_to_end(key)
                return
            self._names += 1
            name = f"adapter_{self._names}"
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name,
                                                           is_trainable=False)
                    self._peft.eval()
                    self._active = name
                else:
                    self._peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            except Exception as exc:
                self._drop_name(name)
                raise AdapterLoadError(f"cannot load adapter {key} from {adapter_dir} onto base "
                                       f"{self.base_path}: {exc}") from exc
            self._refresh_layers()
            self._adapters[key] = _Adapter(name, adapter_dir)
            self._adapters.move_to_end(key)
            if old is not None:
                self._drop_name(old.name)
            while len(self._adapters) > self.max_adapters:
                lru_key = next(iter(self._adapters))
                self._drop_name(self._adapters.pop(lru_key).name)

    def unload(self, key: str) -> None:
        with self._lock:
            entry = self._adapters.pop(key, None)
            if entry is None:
                raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {list(self._adapters)}")
            self._drop_name(entry.name)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def path_of(self, key: str) -> Path | None:
        with self._lock:
            entry = self._adapters.get(key)
            return entry.path if entry else None

    def _drop_name(self, name: str) -> None:
        if self._peft is not None and name in self._peft.peft_config:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "adapter was active, now X is": we re-activate on the next use
                self._peft.delete_adapter(name)
            self._refresh_layers()
        if self._active == name:
            self._active = None

    def _activate(self, name: str) -> None:
        """PEFT's set_adapter without its walk over every module of the model: only the LoRA layers (cached)."""
        cfg = self._peft.peft_config[name]
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            self._peft.set_adapter(name, inference_mode=True)  # auxiliary modules need PEFT's full path
            return
        # BaseTunerLayer.set_adapter(name, inference_mode=True) also re-freezes every loaded adapter's weights, on
        # every layer and every switch (layers x adapters calls: ~7 ms with 8 adapters on the tiny base). Served
        # adapters are loaded frozen and never unfrozen, so that part is a no-op here; what remains is the pointer.
        active = [name]
        for layer in self._tuner_layers:
            layer._active_adapter = active
        self._peft.base_model.active_adapter = name

    def _refresh_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def _use(self, key: str | None):
        """Inside the lock: the model to call with `key`'s adapter active (None: adapters disabled)."""
        if key is None:
            if self._peft is None or not self._adapters:
                yield self._peft if self._peft is not None else self.base
                return
            try:
                with self._peft.disable_adapter():
                    yield self._peft
            finally:
                # leaving disable_adapter() re-enables the active adapter through set_adapter(inference_mode=False),
                # which marks its weights trainable; served weights stay frozen (inference runs without autograd,
                # but nothing should be left looking trainable)
                for p in self._peft.parameters():
                    if p.requires_grad:
                        p.requires_grad_(False)
            return
        entry = self._adapters.get(key)
        if entry is None:
            raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {list(self._adapters)}")
        self._adapters.move_to_end(key)
        if self._active != entry.name:
            self._activate(entry.name)
            self._active = entry.name
            self.switches += 1
        yield self._peft

    # ------------------------------------------------------------------ inference

    def complete(self, prompt: str, key: str | None, max_tokens: int = 32, logprobs: bool = False,
                 stop: list[str] | None = None) -> Completion:
        """Greedy decoding with the KV cache until eos, a stop string or max_tokens."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stop = [s for s in (stop or []) if s]
        with self._lock:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
            n_prompt = ids.shape[1]
            if n_prompt == 0:
                raise ValueError("the prompt has no tokens; send a non-empty prompt")
            if n_prompt + max_tokens > self.context_length:
                raise ContextLengthExceeded(
                    f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}, more than the model's context "
                    f"of {self.context_length} tokens; shorten the prompt or lower max_tokens")
            gen_ids: list[int] = []
            gen_logits: list[torch.Tensor] = []
            token_logprobs: list[float] = []
            finish = "length"
            text, cut_at_stop = "", False
            with torch.inference_mode(), self._use(key) as model:
                out = model(input_ids=ids, use_cache=True)
                prompt_logits = out.logits[0].float()
                past, next_logits = out.past_key_values, prompt_logits[-1]
                while True:
                    tok = int(next_logits.argmax())
                    gen_logits.append(next_logits)
                    token_logprobs.append(float(torch.log_softmax(next_logits, -1)[tok]))
                    if tok in self.eos_ids:
                        finish = "stop"
                        break
                    gen_ids.append(tok)
                    if stop:
                        text = self.tokenizer.decode(gen_ids, skip_special_tokens=True)
                        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                        if cut >= 0:
                            text, finish, cut_at_stop = text[:cut], "stop", True
                            break
                    if len(gen_logits) >= max_tokens:
                        break
                    out = model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=past,
                                use_cache=True)
                    past, next_logits = out.past_key_values, out.logits[0, -1].float()
            if not cut_at_stop:
                text = self.tokenizer.decode(gen_ids, skip_special_tokens=True)
            stats = request_stats(prompt_logits, ids[0], torch.stack(gen_logits))
            tokens = [self.tokenizer.decode([t]) for t in gen_ids] if logprobs else None
        nll = -sum(token_logprobs) / len(token_logprobs)
        return Completion(text=text, prompt_tokens=n_prompt, completion_tokens=len(gen_logits), stats=stats,
                          finish_reason=finish, logprobs=token_logprobs if logprobs else None, tokens=tokens,
                          response_nll=nll)

    def prompt_logits(self, prompts: list[str], key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, V] float32 logits, [B, T] mask) of right-padded prompts — the train/serve parity check's input."""
        if not prompts:
            raise ValueError("prompt_logits needs at least one prompt")
        with self._lock:
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right")
            with torch.inference_mode(), self._use(key) as model:
                logits = model(input_ids=batch.input_ids.to(self.device),
                               attention_mask=batch.attention_mask.to(self.device)).logits
        return logits.float().cpu(), batch.attention_mask.cpu()


class PoolEngine:
    """serving.engine.Engine over an AdapterPool: one request at a time, greedy only.

    The reference implementation the batching engine (serving/builtin.py) is checked against, and what the
    registration-time monitoring reference runs through. Sampling (temperature > 0) is refused, not ignored.
    """

    name = "pool"

    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self.base_path = pool.base_path
        self.base_sha256 = pool.base_sha256
        self.max_lora_rank = None

    def load(self, key: str, adapter_dir: Path, base_sha256: str | None = None) -> None:
        self.pool.load(key, adapter_dir, base_sha256=base_sha256)

    def unload(self, key: str) -> None:
        self.pool.unload(key)

    def loaded(self) -> list[str]:
        return self.pool.loaded()

    def _one(self, req: GenerationRequest) -> Generation:
        p = req.params
        if p.temperature > 0:
            raise ValueError("the pool engine decodes greedily only; send temperature 0 or serve with the built-in "
                             "engine (--engine builtin)")
        c = self.pool.complete(req.prompt, req.adapter, max_tokens=p.max_tokens, logprobs=p.logprobs is not None,
                               stop=list(p.stop))
        lps = None
        if c.logprobs is not None:
            lps = [TokenLogprob(t, lp) for t, lp in zip(c.tokens or [], c.logprobs)]
        return Generation(text=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                          finish_reason=c.finish_reason, stats=c.stats, response_nll=c.response_nll, logprobs=lps)

    def generate(self, requests: list[GenerationRequest]) -> list:
        out = []
        for req in requests:
            try:
                out.append(self._one(req))
            except Exception as exc:  # per request: the others are still answered
                out.append(exc)
        return out

    def stream(self, request: GenerationRequest):
        gen = self._one(request)
        yield StreamDelta(gen.text, gen.logprobs, final=gen)

    def prompt_logprobs(self, prompts: list[str], key: str | None) -> list[PromptLogprobs]:
        logits, mask = self.pool.prompt_logits(prompts, key)
        out = []
        for i, prompt in enumerate(prompts):
            n = int(mask[i].sum())
            ids = self.pool.tokenizer(prompt).input_ids[:n]
            logp = torch.log_softmax(logits[i, : n - 1].float(), -1)
            tok = torch.tensor(ids[1:], dtype=torch.long)
            out.append(PromptLogprobs(list(ids), logp.gather(-1, tok[:, None]).squeeze(-1).tolist(),
                                      logp.argmax(-1).tolist()))
        return out

    def health(self) -> dict:
        return {"status": "ok", "engine": self.name, "loaded": self.loaded()}

    def close(self) -> None:
        pass
