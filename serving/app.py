"""OpenAI-compatible HTTP server over the adapter pool, with canary routing, feedback, metrics and admin endpoints.

    state = ServerState(pool=AdapterPool(base_dir), router=Router(), rollout=controller, log=PredictionLog(db),
                        api_key="secret")
    server = BackgroundServer(create_app(state)); url = server.start()      # uvicorn on 127.0.0.1, in a thread
    httpx.post(f"{url}/v1/completions", json={"model": "support-assistant", "prompt": "...", "max_tokens": 16})
    server.stop()

`model` is a family (routed: champion, or the challenger for its traffic share while a rollout runs; the family's
fallback takes the champion's share while one is set), `family@3` (pinned to a version) or "base" (adapters
disabled). The response id is the request id that the prediction log and POST /v1/feedback use. Endpoints are plain
`def`s: FastAPI runs them in its thread pool, and the pool's lock serialises the model itself.

With a FallbackPolicy (serving/fallback.py), POST /admin/drift takes the monitors' verdicts and the server routes a
family with severe drift to its fallback until a new champion arrives (a rollout promoted, or the registry's
champion alias moved, read every `registry_poll_s`); /v1/models and the gauge adapterops_fallback_active say so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.fallback import FallbackPolicy
from serving.metrics import ServingMetrics
from serving.parity import GOLDEN_FILE, check_parity, load_golden
from serving.pool import AdapterLoadError, AdapterNotLoaded, AdapterPool, ContextLengthExceeded
from serving.rollout import RolloutConfig, RolloutController, RolloutError
from serving.router import BASE, ROUTE_CANARY, ROUTE_CHAMPION, ROUTE_FALLBACK, Router, UnknownFamily

log = logging.getLogger(__name__)

ROUTE_PINNED = "pinned"
ROUTE_BASE = "base"
CHAT_STOP = ["###"]
_RECENT_IDS = 100_000
UNLOAD_DRAIN_S = 60.0  # how long an unload waits for the requests already routed to the adapter


@dataclass
class ServerState:
    pool: AdapterPool
    router: Router
    rollout: RolloutController | None = None
    log: Any = None
    """monitoring.store.PredictionLog, or None to log nothing."""
    api_key: str | None = None
    """Bearer token of the /admin endpoints; None disables them (403)."""
    families: dict[str, dict[str, Path]] = field(default_factory=dict)
    """family -> version -> adapter directory: what may be served (reloaded on demand if the pool evicted it)."""
    max_prompt_chars: int = 4000
    max_tokens_limit: int = 256
    registry: Any = None
    """registry.versions.AdapterRegistry: lets POST /admin/adapters/load take {"ref": "family@3"} instead of a path."""
    adapter_cache: Path | None = None
    """dest_root for registry downloads."""
    require_parity: bool = False
    """Refuse a rollout whose challenger has no golden logits (GOLDEN_FILE) to check against."""
    parity_thresholds: dict = field(default_factory=dict)
    """Keyword overrides for check_parity (min_cosine, max_abs, min_top1)."""
    fallback: FallbackPolicy | None = None
    """Acts on POST /admin/drift verdicts (severe drift -> the family's fallback); None: that endpoint answers 409."""
    auto_canary_poll_s: float | None = None
    """Every N s, start a canary for each family whose registry `challenger` alias names a version that is not
    serving and not tried yet (a scheduled retrain registers one); None: rollouts start only by POST
    /admin/rollout/start. Needs `registry` and `rollout`."""


def load_from_registry(state: ServerState, family: str, version: str, ref: str | None = None) -> Path:
    """Download `ref` (default family@version) from the registry, hash-verified and refused (BaseMismatch) when
    trained on another base, and load it into the pool as family@version; returns its directory. The caller records
    it in state.families."""
    if state.registry is None or state.adapter_cache is None:
        raise LookupError(f"cannot load {family}@{version}: this server has no registry (and adapter_cache) to "
                          f"resolve it from; POST /admin/adapters/load with a path")
    resolved = state.registry.resolve(ref or f"{family}@{version}", state.adapter_cache,
                                      expected_base_sha256=state.pool.base_sha256)
    state.pool.load(f"{family}@{version}", resolved.path, base_sha256=resolved.base_sha256)
    return Path(resolved.path).resolve()


class APIError(Exception):
    """An error answered as OpenAI-style JSON {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.extra = (status, message, type, param,
                                                                                   code, extra)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        if self.extra:
            body["error"].update(self.extra)
        return JSONResponse(body, status_code=self.status)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str
    max_tokens: int = 16
    logprobs: int | bool | None = None
    user: str | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage]
    max_tokens: int = 16
    logprobs: bool | None = None
    user: str | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class FeedbackRequest(BaseModel):
    id: str
    score: float


class LoadRequest(BaseModel):
    family: str
    version: str
    path: str | None = None
    ref: str | None = None
    base_sha256: str | None = None


class VersionRequest(BaseModel):
    family: str
    version: str


class RolloutStartRequest(BaseModel):
    family: str
    challenger: str | None = None
    """None: the registry's challenger alias."""
    champion: str | None = None
    offline_nll: float | None = None
    steps: list[float] | None = None
    requests_per_step: int | None = None
    gradual_rollback: bool | None = None
    """steps / requests_per_step / gradual_rollback override the server's RolloutConfig for this rollout."""


class RolloutAbortRequest(BaseModel):
    family: str
    reason: str = "aborted by operator"


class FallbackRequest(BaseModel):
    family: str
    fallback: str | None = None


class DriftVerdict(BaseModel):
    family: str
    drift: bool | None
    """The window's verdict; None (or details.status "insufficient_data"): too little data to say."""
    severe: bool = False
    """The sender's own judgement that the drift is severe (engages at once)."""
    version: str | None = None
    """The version the window was compared against; a verdict about another than the champion is ignored."""
    details: dict = {}
    """monitoring.drift.DriftResult.as_dict(): its tests' p-values feed FallbackConfig.severe_alpha."""


@dataclass
class _Target:
    family: str
    version: str
    route: str
    key: str | None  # pool key; None = base


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The prompt format the adapters are trained on, from the last user message."""
    users = [m.content for m in messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages holds no message with role 'user'; send at least one", param="messages")
    return f"### Customer: {users[-1]}\n### Agent:"


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stop = threading.Event()
        cfg = state.fallback.config if state.fallback is not None else None
        intervals = [x for x in (cfg.registry_poll_s if cfg is not None else None, state.auto_canary_poll_s) if x]
        poller = None
        if intervals and state.registry is not None:
            poller = threading.Thread(target=poll_registry, args=(stop, min(intervals)), name="registry-poll",
                                      daemon=True)
            poller.start()
        try:
            yield
        finally:
            stop.set()
            if poller is not None:
                poller.join(10.0)
            if state.rollout is not None:
                state.rollout.flush()  # samples since the last periodic save survive a clean shutdown

    app = FastAPI(title="adapterops serving", version="0.1.0", lifespan=lifespan)
    metrics = ServingMetrics()
    metrics.adapters_loaded.set_function(lambda: len(state.pool.loaded()))
    metrics.adapter_switches.set_function(lambda: state.pool.switches)
    metrics.watch_fallbacks(state.router.families)
    lock = threading.RLock()  # guards state.families and composite admin operations
    inflight: Counter = Counter()  # adapter key -> requests routed to it, not yet answered
    drained = threading.Condition(lock)  # notified when a key's in-flight count drops to 0 (unload waits on it)
    recent_ids: OrderedDict[str, None] = OrderedDict()
    app.state.serving = state
    app.state.metrics = metrics

    # ------------------------------------------------------------------ rollout, fallback <-> router

    def known_versions(family: str) -> dict[str, Path]:
        with lock:
            return dict(state.families.get(family, {}))

    def ensure_version(family: str, version: str) -> None:
        """Make family@version servable: known already, or loaded (verified) from the registry."""
        if version == BASE or version in known_versions(family):
            return
        path = load_from_registry(state, family, version)  # outside the lock: requests read state.families
        with lock:
            state.families.setdefault(family, {})[version] = path

    def sync_router(family: str) -> None:
        champion, challenger, weight = state.rollout.weight(family)
        if champion is not None:
            state.router.set(family, champion, challenger, weight)
            metrics.rollout_weight.labels(family).set(weight)
            if state.fallback is not None and not state.rollout.is_active(family):
                follow_champion(family, champion)

    def follow_champion(family: str, champion: str) -> None:
        """`champion` serves the family now: a new one releases a fallback engaged for the old one; the same one
        engages a severe drift's fallback that waited for a rollout to end (or failed before)."""
        undone = state.fallback.champion_changed(family, champion)
        if undone is not None:
            state.router.set_fallback(family, None)
            log.warning("family %s has a new champion %s: fallback %s released", family, champion, undone["version"])
        elif state.fallback.should_engage(family) and not (state.rollout is not None
                                                           and state.rollout.is_active(family)):
            engage_fallback(family)

    def engage_fallback(family: str) -> str | None:
        """Route the family's champion share to the configured fallback; the error, if it could not."""
        policy = state.fallback
        try:
            version = BASE
            if policy.config.target == "previous":
                if state.registry is None:
                    raise LookupError("fallback target 'previous' needs a registry; this server has none")
                version = state.registry.alias(family, "previous")
                if version is None:
                    raise LookupError(f"the registry has no 'previous' version of {family} (its first champion?); "
                                      f"set fallback target 'base' or promote through the registry")
                ensure_version(family, version)
            state.router.set_fallback(family, version)
        except Exception as exc:
            msg = f"cannot engage the fallback of {family}: {type(exc).__name__}: {exc}"
            log.error(msg)
            policy.mark_failed(family, msg)
            return msg
        policy.mark_engaged(family, version)
        log.warning("family %s is on fallback %s: %s", family, version, policy.status(family)["reason"])
        return None

    def restore_fallback(family: str) -> None:
        """Put back a fallback engaged before a restart, unless the family has had a new champion since."""
        version = state.fallback.engaged().get(family) if state.fallback is not None else None
        if version is None:
            return
        try:
            if state.fallback.champion_changed(family, state.router.get(family).champion) is not None:
                return
            ensure_version(family, version)
            state.router.set_fallback(family, version)
        except UnknownFamily:
            return
        except Exception as exc:
            log.error("cannot restore the fallback %s of %s: %s", version, family, exc)
            state.fallback.mark_failed(family, f"restore after restart: {type(exc).__name__}: {exc}")

    def poll_registry(stop: threading.Event, interval: float) -> None:
        """While no rollout of a family runs: with a fallback policy, follow the registry's champion alias (a
        promotion or rollback made elsewhere); with auto_canary_poll_s, start the canary of a new challenger."""
        errors: dict[str, str] = {}
        tried: dict[str, set[str]] = {}  # family -> challengers already started (or refused): never retried
        while not stop.wait(interval):
            for family, route in state.router.families().items():
                if state.rollout is not None and state.rollout.is_active(family):
                    continue
                try:
                    champion = state.registry.alias(family, "champion") if state.fallback is not None else None
                    if champion is not None and champion != route.champion:
                        ensure_version(family, champion)
                        state.router.set(family, champion)
                        log.warning("registry moved the champion of %s: %s -> %s", family, route.champion, champion)
                        follow_champion(family, champion)
                    if state.auto_canary_poll_s and state.rollout is not None:
                        challenger = state.registry.alias(family, "challenger")
                        seen = tried.setdefault(family, set())
                        if challenger not in (None, state.router.get(family).champion) and challenger not in seen:
                            seen.add(challenger)
                            try:
                                start_rollout(family, challenger)
                                log.warning("registry challenger %s@%s: canary started", family, challenger)
                            except APIError as exc:
                                log.error("registry challenger %s@%s: canary not started: %s", family, challenger,
                                          exc)
                    errors.pop(family, None)
                except Exception as exc:
                    if errors.get(family) != str(exc):  # once per distinct error, not every interval
                        log.warning("registry poll of %s failed: %s: %s", family, type(exc).__name__, exc)
                    errors[family] = str(exc)

    if state.rollout is not None:
        state.rollout.subscribe(sync_router)
        for family in state.rollout.status()["rollouts"]:
            if state.rollout.is_active(family):
                sync_router(family)
    for family in state.router.families():
        restore_fallback(family)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('msg')}",
                            code="invalid_json").response()
        param = ".".join(loc) or None
        return APIError(400, f"invalid request: {param or 'body'}: {first.get('msg', 'malformed')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    # ------------------------------------------------------------------ helpers

    def admin(request: Request) -> None:
        if state.api_key is None:
            raise APIError(403, "admin endpoints are disabled: start the server with an api_key",
                           type="permission_error")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] != state.api_key:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <api_key>'",
                           type="authentication_error", code="invalid_api_key")

    def resolve(model: str, user: str | None) -> _Target:
        if model == BASE:
            return _Target(BASE, BASE, ROUTE_BASE, None)
        family, sep, version = model.partition("@")
        versions = known_versions(family)
        if sep:
            if version == BASE:
                return _Target(family, BASE, ROUTE_PINNED, None)
            if version not in versions:
                raise APIError(404, f"model {model!r} does not exist: family {family!r} has versions "
                                    f"{sorted(versions)}; see GET /v1/models", param="model", code="model_not_found")
            return _Target(family, version, ROUTE_PINNED, model)
        try:
            version, route = state.router.choose(family, user)
        except UnknownFamily:
            raise APIError(404, f"model {model!r} does not exist; use a family, 'family@version' or 'base' "
                                f"(see GET /v1/models)", param="model", code="model_not_found") from None
        if version == BASE:
            return _Target(family, BASE, route, None)
        if version not in versions:
            raise APIError(503, f"family {family!r} routes to version {version}, which is not loaded on this server; "
                                f"load it with POST /admin/adapters/load", type="server_error",
                           code="adapter_unavailable")
        return _Target(family, version, route, f"{family}@{version}")

    def validate(prompt: str, max_tokens: int, stream: bool, n: int) -> None:
        if stream:
            raise APIError(400, "stream=true is not supported by this server; send stream=false", param="stream")
        if n != 1:
            raise APIError(400, f"n={n} is not supported; this server returns one choice", param="n")
        if len(prompt) > state.max_prompt_chars:
            raise APIError(413, f"the prompt has {len(prompt)} characters, more than the limit of "
                                f"{state.max_prompt_chars}; shorten it", param="prompt", code="prompt_too_large")
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", param="prompt")
        if not 1 <= max_tokens <= state.max_tokens_limit:
            raise APIError(400, f"max_tokens must be in [1, {state.max_tokens_limit}], got {max_tokens}",
                           param="max_tokens", code="invalid_value")

    def generate(target: _Target, prompt: str, max_tokens: int, logprobs: bool, stop: list[str]):
        try:
            return state.pool.complete(prompt, target.key, max_tokens=max_tokens, logprobs=logprobs, stop=stop)
        except AdapterNotLoaded:
            path = known_versions(target.family).get(target.version)
            if path is None:
                raise
            state.pool.load(target.key, path)  # evicted by the pool's LRU: bring it back
            return state.pool.complete(prompt, target.key, max_tokens=max_tokens, logprobs=logprobs, stop=stop)

    def serve(kind: str, model: str, prompt: str, max_tokens: int, logprobs: bool, user: str | None,
              stop: list[str]) -> tuple[str, _Target, Any]:
        t0 = time.perf_counter()
        try:
            with lock:  # routed and counted in one step, so an unload cannot slip in between (see admin_unload)
                target = resolve(model, user)
                if target.key:
                    inflight[target.key] += 1
        except APIError as e:
            metrics.error("unknown", "unknown", e.code or str(e.status))
            raise
        rid = f"{kind}-{uuid.uuid4().hex}"
        error: str | None = None
        completion = None
        try:
            completion = generate(target, prompt, max_tokens, logprobs, stop)
        except ContextLengthExceeded as e:
            metrics.error(target.family, target.version, "context_length_exceeded")
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except Exception as e:  # the model failed: count it against the adapter, answer 500, keep serving
            log.exception("completion failed for %s", model)
            error = f"{type(e).__name__}: {e}"
        finally:
            if target.key:
                with lock:
                    inflight[target.key] -= 1
                    if inflight[target.key] <= 0:
                        del inflight[target.key]
                        drained.notify_all()
        latency_ms = (time.perf_counter() - t0) * 1e3
        status = "500" if error else "200"
        metrics.observe(target.family, target.version, target.route, status, latency_ms / 1e3,
                        completion.completion_tokens if completion else 0)
        if error:
            metrics.error(target.family, target.version, "generation_failed")
        record_request(rid, target, prompt, completion, latency_ms, error)
        if error:
            raise APIError(500, f"generation failed for {model!r} (request {rid}): {error}", type="server_error",
                           code="generation_failed")
        return rid, target, completion

    def record_request(rid: str, target: _Target, prompt: str, completion, latency_ms: float, error: str | None):
        with lock:
            recent_ids[rid] = None
            if len(recent_ids) > _RECENT_IDS:
                recent_ids.popitem(last=False)
        if (state.rollout is not None and target.route in (ROUTE_CHAMPION, ROUTE_CANARY, ROUTE_FALLBACK)
                and state.rollout.is_active(target.family)):
            state.rollout.record(target.family, target.version, rid, latency_ms, error is not None,
                                 completion.response_nll if completion else None)
        if state.log is not None:
            stats = completion.stats if completion else {}
            record = {"request_id": rid, "ts": time.time(), "family": target.family, "version": target.version,
                      "prompt": prompt, "response": completion.text if completion else None,
                      "prompt_nll": stats.get("prompt_nll"), "gen_entropy": stats.get("gen_entropy"),
                      "gen_max_prob": stats.get("gen_max_prob"), "latency_ms": latency_ms, "error": error,
                      # the prediction log stores the champion route as NULL (its default)
                      "route": None if target.route == ROUTE_CHAMPION else target.route}
            try:
                state.log.log(record)  # enqueue only; a background thread writes
            except Exception:
                metrics.log_failures.inc()
                log.exception("prediction log refused request %s", rid)

    def served_model(target: _Target) -> str:
        return BASE if target.key is None and target.family == BASE else f"{target.family}@{target.version}"

    def logprobs_body(c) -> dict | None:
        if c.logprobs is None:
            return None
        return {"tokens": c.tokens, "token_logprobs": c.logprobs}

    def usage(c) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def meta(target: _Target) -> dict:
        return {"family": target.family, "version": target.version, "route": target.route}

    def stops(stop: str | list[str] | None, default: list[str]) -> list[str]:
        if stop is None:
            return default
        return [stop] if isinstance(stop, str) else list(stop)

    # ------------------------------------------------------------------ OpenAI endpoints

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        validate(req.prompt, req.max_tokens, req.stream, req.n)
        rid, target, c = serve("cmpl", req.model, req.prompt, req.max_tokens, bool(req.logprobs), req.user,
                               stops(req.stop, []))
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": served_model(target),
                "choices": [{"index": 0, "text": c.text, "logprobs": logprobs_body(c),
                             "finish_reason": c.finish_reason}],
                "usage": usage(c), "adapterops": meta(target)}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if not req.messages:
            raise APIError(400, "messages is empty", param="messages")
        prompt = chat_prompt(req.messages)
        validate(prompt, req.max_tokens, req.stream, req.n)
        rid, target, c = serve("chatcmpl", req.model, prompt, req.max_tokens, bool(req.logprobs), req.user,
                               stops(req.stop, CHAT_STOP))
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": served_model(target),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text.strip()},
                             "logprobs": logprobs_body(c), "finish_reason": c.finish_reason}],
                "usage": usage(c), "adapterops": meta(target)}

    @app.get("/v1/models")
    def models():
        loaded = set(state.pool.loaded())
        data = [{"id": BASE, "object": "model", "owned_by": "adapterops",
                 "adapterops": {"path": str(state.pool.base_path), "sha256": state.pool.base_sha256}}]
        routes = state.router.families()
        with lock:
            families = {f: dict(v) for f, v in state.families.items()}
        for family in sorted(set(families) | set(routes)):
            route = routes.get(family)
            versions = sorted(families.get(family, {}), key=lambda v: (len(v), v))
            info = {"champion": route.champion if route else None, "challenger": route.challenger if route else None,
                    "weight": route.weight if route else 0.0, "fallback": route.fallback if route else None,
                    "versions": versions, "loaded": [v for v in versions if f"{family}@{v}" in loaded]}
            if state.fallback is not None:
                info["drift"] = state.fallback.status(family)  # why a fallback is engaged (or pending)
            data.append({"id": family, "object": "model", "owned_by": "adapterops", "adapterops": info})
            for v in versions:
                data.append({"id": f"{family}@{v}", "object": "model", "owned_by": "adapterops",
                             "adapterops": {"loaded": f"{family}@{v}" in loaded}})
        return {"object": "list", "data": data,
                "base": {"path": str(state.pool.base_path), "sha256": state.pool.base_sha256},
                "fallbacks": {f: r.fallback for f, r in routes.items() if r.fallback is not None}}

    @app.post("/v1/feedback")
    def feedback(req: FeedbackRequest):
        if not 0.0 <= req.score <= 1.0:
            raise APIError(400, f"score must be in [0, 1], got {req.score}", param="score")
        in_log = bool(state.log.add_feedback(req.id, req.score)) if state.log is not None else False
        in_rollout = state.rollout.record_feedback(req.id, req.score) if state.rollout is not None else False
        with lock:
            seen = req.id in recent_ids
        if not (in_log or in_rollout or seen):
            raise APIError(404, f"no completion with id {req.id!r}; send the 'id' of a completion response",
                           param="id", code="completion_not_found")
        metrics.feedback.inc()
        return {"id": req.id, "score": req.score, "recorded": {"log": in_log, "rollout": in_rollout}}

    # ------------------------------------------------------------------ health, metrics

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        missing = []
        for family, route in state.router.families().items():
            versions = known_versions(family)
            for v in (route.champion, route.challenger, route.fallback):
                if v is not None and v != BASE and v not in versions:
                    missing.append(f"{family}@{v}")
        if missing:
            raise APIError(503, f"routed versions are not loaded: {missing}", type="server_error", code="not_ready")
        return {"status": "ready", "base_sha256": state.pool.base_sha256, "loaded": state.pool.loaded()}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ admin

    @app.post("/admin/adapters/load")
    def admin_load(req: LoadRequest, request: Request):
        admin(request)
        key = f"{req.family}@{req.version}"
        if "@" in req.family or not req.family or not req.version or req.version == BASE:
            raise APIError(400, f"invalid family/version {key!r}", param="family")
        if req.path is not None:
            path = Path(req.path)
            try:
                state.pool.load(key, path, base_sha256=req.base_sha256)
            except AdapterLoadError as e:
                raise APIError(400, str(e), param="path", code="adapter_load_failed") from None
        elif state.registry is not None:
            if state.adapter_cache is None:
                raise APIError(400, "the server has a registry but no adapter_cache directory to download into")
            try:
                path = load_from_registry(state, req.family, req.version, req.ref)
            except AdapterLoadError as e:
                raise APIError(400, str(e), param="ref", code="adapter_load_failed") from None
            except Exception as e:
                raise APIError(409 if type(e).__name__ == "BaseMismatch" else 400, f"cannot resolve {req.ref or key}"
                                    f" in the registry: {e}", code="registry_error") from None
        else:
            raise APIError(400, "send 'path' (this server has no registry to resolve a ref)", param="path")
        new_route = False
        with lock:
            state.families.setdefault(req.family, {})[req.version] = Path(path).resolve()
            try:
                state.router.get(req.family)
            except UnknownFamily:
                state.router.set(req.family, req.version)  # the first version of a family becomes its champion
                new_route = True
        if new_route:
            restore_fallback(req.family)
        return {"loaded": key, "path": str(Path(path).resolve()), "pool": state.pool.loaded(),
                "route": state.router.get(req.family).as_dict()}

    @app.post("/admin/adapters/unload")
    def admin_unload(req: VersionRequest, request: Request):
        admin(request)
        key = f"{req.family}@{req.version}"
        with lock:
            if req.version not in state.families.get(req.family, {}):
                raise APIError(404, f"adapter {key} is not loaded", param="version", code="model_not_found")
            try:
                route = state.router.get(req.family)
                in_use = req.version in (route.champion, route.challenger, route.fallback)
            except UnknownFamily:
                in_use = False
            if in_use or (state.rollout is not None and state.rollout.is_active(req.family)
                          and req.version in state.rollout.weight(req.family)[:2]):
                raise APIError(409, f"{key} is routed to (champion, challenger or fallback); route the family "
                                    f"elsewhere before unloading it", code="adapter_in_use")
            path = state.families[req.family].pop(req.version)  # new requests can no longer be routed to it
            if not drained.wait_for(lambda: key not in inflight, timeout=UNLOAD_DRAIN_S):  # releases the lock
                state.families[req.family][req.version] = path
                raise APIError(409, f"{key} still has {inflight[key]} request(s) in flight after "
                                    f"{UNLOAD_DRAIN_S:.0f} s; try the unload again", code="adapter_busy")
            try:
                state.pool.unload(key)
            except AdapterNotLoaded:
                pass  # already evicted by the pool's LRU
        return {"unloaded": key, "pool": state.pool.loaded()}

    @app.post("/admin/router/fallback")
    def admin_fallback(req: FallbackRequest, request: Request):
        admin(request)
        if req.fallback not in (None, BASE) and req.fallback not in known_versions(req.family):
            raise APIError(404, f"fallback version {req.fallback} of {req.family} is not loaded", param="fallback")
        try:
            route = state.router.set_fallback(req.family, req.fallback).as_dict()
        except UnknownFamily:
            raise APIError(404, f"family {req.family!r} has no route", param="family") from None
        if req.fallback is None and state.fallback is not None and state.fallback.release(req.family):
            log.warning("operator cleared the drift fallback of %s", req.family)
        return route

    def fallback_policy() -> FallbackPolicy:
        if state.fallback is None:
            raise APIError(409, "this server has no fallback policy (FallbackConfig.enabled)", code="fallback_disabled")
        return state.fallback

    @app.post("/admin/drift")
    def admin_drift(req: DriftVerdict, request: Request):
        """One monitoring window's drift verdict about a family's champion; severe drift engages its fallback."""
        admin(request)
        policy = fallback_policy()
        try:
            champion = state.router.get(req.family).champion
        except UnknownFamily:
            raise APIError(404, f"family {req.family!r} has no route", param="family") from None
        follow_champion(req.family, champion)
        active = state.rollout is not None and state.rollout.is_active(req.family)
        decision = policy.observe(req.family, champion, req.drift, severe=req.severe, details=req.details,
                                  version=req.version, defer=active)
        error = engage_fallback(req.family) if decision["engage"] else None
        return {"decision": decision, "error": error, "route": state.router.get(req.family).as_dict(),
                "drift": policy.status(req.family)}

    @app.get("/admin/fallback")
    def admin_fallback_status(request: Request):
        admin(request)
        return fallback_policy().status()

    def controller() -> RolloutController:
        if state.rollout is None:
            raise APIError(409, "this server has no rollout controller", code="rollout_disabled")
        return state.rollout

    @app.post("/admin/rollout/start")
    def admin_rollout_start(req: RolloutStartRequest, request: Request):
        admin(request)
        ctl = controller()
        overrides = {k: v for k, v in (("steps", req.steps), ("requests_per_step", req.requests_per_step),
                                       ("gradual_rollback", req.gradual_rollback)) if v is not None}
        try:
            config = RolloutConfig(**{**ctl.config.as_dict(), **overrides}) if overrides else None
        except ValueError as e:
            raise APIError(400, f"invalid rollout settings: {e}", code="invalid_value") from None
        return start_rollout(req.family, req.challenger, req.champion, config, req.offline_nll)

    def start_rollout(family: str, challenger: str | None = None, champion: str | None = None,
                      config: RolloutConfig | None = None, offline_nll: float | None = None) -> dict:
        """Check the challenger's train/serve parity, then start its canary against the serving champion (or the
        fallback taking the champion's share); APIError with the reason otherwise."""
        ctl = controller()
        try:
            route = state.router.get(family)
        except UnknownFamily:
            raise APIError(404, f"family {family!r} has no route", param="family") from None
        champion = champion or route.champion
        if challenger is None:
            if state.registry is None:
                raise APIError(400, "send 'challenger' (this server has no registry to read the challenger alias "
                                    "from)", param="challenger")
            try:
                challenger = state.registry.alias(family, "challenger")
            except Exception as e:
                raise APIError(400, f"cannot read the challenger of {family} from the registry: {e}",
                               param="challenger", code="registry_error") from None
            if challenger is None:
                raise APIError(409, f"the registry has no challenger for {family}; register one (or send "
                                    f"'challenger')", param="challenger", code="no_challenger")
        for name, v in (("champion", champion), ("challenger", challenger)):
            try:
                ensure_version(family, v)
            except Exception as e:
                raise APIError(404, f"{name} {family}@{v} is not loaded; load it first ({e})", param=name,
                               code="model_not_found") from None
        versions = known_versions(family)
        parity = {"passed": None, "reason": f"no {GOLDEN_FILE} next to the challenger adapter"}
        golden_path = versions[challenger] / GOLDEN_FILE
        if golden_path.is_file():
            g = load_golden(golden_path)
            parity = check_parity(state.pool, f"{family}@{challenger}", g.prompts, g.logits, g.mask,
                                  **state.parity_thresholds)
            if not parity["passed"]:
                raise APIError(409, f"train/serve parity check failed for {family}@{challenger}: "
                                    f"{'; '.join(parity['failures'])}", code="parity_failed", extra={"parity": parity})
        elif state.require_parity:
            raise APIError(409, f"{family}@{challenger} has no {GOLDEN_FILE}; a parity check is required "
                                f"before a rollout", code="parity_missing")
        try:
            status = ctl.start(family, champion, challenger, offline_nll=offline_nll, config=config,
                               baseline=route.fallback)
        except RolloutError as e:
            raise APIError(409, str(e), code="rollout_conflict") from None
        return {"rollout": status, "parity": parity}

    @app.post("/admin/rollout/abort")
    def admin_rollout_abort(req: RolloutAbortRequest, request: Request):
        admin(request)
        try:
            return {"rollout": controller().abort(req.family, req.reason)}
        except RolloutError as e:
            raise APIError(409, str(e), code="rollout_conflict") from None

    @app.get("/admin/rollout/status")
    def admin_rollout_status(request: Request, family: str | None = None):
        admin(request)
        try:
            return controller().status(family)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), param="family") from None

    return app


class BackgroundServer:
    """uvicorn serving an app from a daemon thread; start() returns the base URL once it accepts connections."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self, timeout: float = 30.0) -> str:
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"uvicorn exited before it started on {self.config.host}:{self.config.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start within {timeout}s")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(timeout)
