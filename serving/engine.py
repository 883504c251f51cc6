"""The engine interface: the one small surface the control plane (serving/control.py) needs from whatever runs the model.

Two engines implement it:
- `serving.builtin.BuiltinEngine`: in process, base + adapters in memory, concurrent requests decoded together in
  batches (several adapters in one batch); the embedded default and what the tests and the demo run on.
- `serving.vllm_engine.VLLMEngine`: one or more vLLM OpenAI servers over HTTP; adapters loaded at run time through
  vLLM's `/v1/load_lora_adapter`; the production engine.

    engine.load("support-assistant@2", Path(".../adapter"), base_sha256="ab12...")
    [gen] = engine.generate([GenerationRequest("### Customer: hi\\n### Agent:", "support-assistant@2",
                                               SamplingParams(max_tokens=16))])
    gen.text, gen.stats["prompt_nll"], gen.finish_reason
    for delta in engine.stream(request): ...   # text pieces; the last one carries .final (a Generation)
    engine.prompt_logprobs(prompts, "support-assistant@2")   # for the train/serve parity check

Keys are "family@version" (None = the base, adapters off). Per-request statistics (monitoring.logit_stats
REQUEST_STATS) are computed by every engine with the same estimators (logit_stats.stats_from_logprobs), so the
monitors compare like with like whichever engine served the reference and the traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's and vLLM's default limit)."""

from monitoring.logit_stats import STATS_TOP_K  # noqa: E402  (engines return this many alternatives per step)


class EngineError(RuntimeError):
    """The engine cannot serve right now (down, restarting, timed out); the message names the service."""


class AdapterNotLoaded(KeyError):
    """The key names no adapter the engine holds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "adapter not loaded"


class AdapterLoadError(ValueError):
    """The adapter cannot be loaded onto this engine's base (wrong base, unreadable, unsupported, rank too high)."""


class ContextLengthExceeded(ValueError):
    """Prompt tokens + max_tokens exceed the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    """0: greedy (argmax). Above 0: sampling from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """With a seed, the same request gives the same sample (per request, whatever else is in the batch)."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings (not included in the text)."""
    logprobs: int | None = None
    """None: no logprobs in the answer; 0: the chosen token's; k (<= MAX_TOP_LOGPROBS): plus the top-k."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


@dataclass
class GenerationRequest:
    prompt: str
    """The full prompt text (a chat is already rendered with the tokenizer's chat template)."""
    adapter: str | None
    """Engine key "family@version", or None for the base with adapters off."""
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    """The top alternatives (token, logprob), best first; as many as SamplingParams.logprobs asked for."""


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (eos or a stop string) or "length" (max_tokens reached)."""
    stats: dict
    """monitoring.logit_stats REQUEST_STATS of this request: prompt_nll, gen_entropy, gen_max_prob."""
    response_nll: float = float("nan")
    """Mean NLL of the generated tokens under the serving model (the rollout compares it to its offline value)."""
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when SamplingParams.logprobs was set."""


@dataclass
class StreamDelta:
    text: str
    """New text since the previous delta (may be empty)."""
    logprobs: list[TokenLogprob] | None = None
    """The tokens since the previous delta, when logprobs were asked for: tokens whose text was held back (part of a
    possible stop string, an unfinished UTF-8 character) come with the delta that releases their text, or the last."""
    final: Generation | None = None
    """Set on the last delta only: the whole generation (stats, finish_reason, usage)."""


@dataclass
class PromptLogprobs:
    """What the parity check needs from an engine: for each prompt token t >= 1, log p(token_t | tokens < t)."""

    token_ids: list[int]
    logprobs: list[float]
    """len(token_ids) - 1 values: position 0 has no prediction."""
    top1_ids: list[int]
    """len(token_ids) - 1 argmax token ids at the same positions."""


@runtime_checkable
class Engine(Protocol):
    name: str
    """"builtin" or "vllm": shown in /v1/models, /health and the metrics."""
    base_path: Path
    base_sha256: str
    max_lora_rank: int | None
    """Highest LoRA rank the engine accepts (None: no limit); a higher one is refused with AdapterLoadError."""

    def load(self, key: str, adapter_dir: Path, base_sha256: str | None = None) -> None:
        """Load (or reload, if the path changed) a PEFT adapter under key; a no-op when loaded from that path.
        AdapterLoadError names what is wrong (base_sha256 differs from the served base, unreadable, DoRA where
        unsupported, rank above max_lora_rank, the engine refused it); EngineError when the engine is down."""

    def unload(self, key: str) -> None:
        """AdapterNotLoaded if key is not loaded."""

    def loaded(self) -> list[str]:
        """Keys held now."""

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | Exception]:
        """Serve a batch of requests (each its own adapter and sampling); one result per request, in order: a
        Generation, or the exception for that request alone (AdapterNotLoaded, ContextLengthExceeded, EngineError)."""

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]:
        """Yield text deltas as they are generated; the last delta carries `final`. Errors for the request itself
        (unknown adapter, context) raise by the first next() at the latest; closing the iterator early releases the
        request's resources in the engine."""

    def prompt_logprobs(self, prompts: list[str], key: str | None) -> list[PromptLogprobs]:
        """Per prompt, the log-probabilities of its own tokens (train/serve parity against golden logits)."""

    def health(self) -> dict:
        """{"status": "ok", ...} or raise EngineError naming what is down."""

    def close(self) -> None:
        """Stop background work and release the model (idempotent)."""
