"""OpenAI-compatible HTTP surface over the control plane (serving/control.py): HTTP only, no decisions.

    state = ServerState(engine=BuiltinEngine(base_dir), router=Router(), rollout=controller, log=PredictionLog(db),
                        api_key="secret")
    server = BackgroundServer(create_app(state)); url = server.start()      # uvicorn on 127.0.0.1, in a thread
    openai.OpenAI(base_url=f"{url}/v1", api_key="-").completions.create(model="support-assistant", prompt="...")
    server.stop()

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as OpenAI's SSE chunks with `stream: true`;
`temperature`, `top_p`, `seed`, `stop`, `max_tokens` / `max_completion_tokens`, `logprobs` in OpenAI's shapes),
GET /v1/models, POST /v1/feedback, GET /health (vLLM's: 200 and no body while the engine serves), /healthz, /readyz,
/metrics, and the /admin endpoints (Bearer api_key) for adapters, router fallback, drift verdicts and rollouts.

`model` is a family (routed: champion, or the challenger for its traffic share while a rollout runs; the family's
fallback takes the champion's share while one is set), `family@3` (pinned to a version) or "base" (adapters
disabled). The response id is the request id that the prediction log and POST /v1/feedback use. Endpoints are plain
`def`s run in a thread pool large enough for the engine's batch, so concurrent requests reach the engine together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.control import (  # noqa: F401  (re-exported: the names callers of the server use)
    CHAT_STOP,
    APIError,
    ControlPlane,
    ServerState,
    Target,
    load_from_registry,
    render_chat,
)
from serving.engine import Generation, StreamDelta, TokenLogprob

log = logging.getLogger(__name__)

HTTP_THREADS = 256
MAX_BODY_BYTES = 1 << 20
"""Largest request body taken (1 MiB: 250x the default prompt limit); larger ones get 413 before they are read."""


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length or, when chunked, as soon as the
    bytes received pass it (the body is read here, at most `limit` bytes of it, and handed on whole), so a huge body
    never sits in memory."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.limit:
            return await self._reject(send, declared)
        if declared is not None:  # within the limit: the server enforces Content-Length itself
            return await self.app(scope, receive, send)
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                return await self._reject(send, seen)
            if not message.get("more_body", False):
                break
        body, done = b"".join(parts), False

        async def replay():
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send, size: int):
        if self.on_reject is not None:
            self.on_reject()
        body = json.dumps(APIError(413, f"the request body has more than {self.limit} bytes ({size} seen); send a "
                                        f"smaller request", code="body_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
"""Requests served at once: a batching engine decodes them together, so the thread pool must not be the limit."""


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    user: str | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1


class CompletionRequest(_Req):
    prompt: str
    logprobs: int | None = None
    """OpenAI completions: the number of top alternatives per token (0: the chosen token's only)."""
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Req):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


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


# ---------------------------------------------------------------------- OpenAI shapes


def _stops(stop: str | list[str] | None, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    if stop is None:
        return default
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(default + stops))


def _params(req: _Req, max_tokens: int | None, logprobs: int | None, stop: tuple[str, ...]) -> dict:
    kw: dict[str, Any] = {"max_tokens": 16 if max_tokens is None else max_tokens, "stop": stop}
    for name in ("temperature", "top_p", "seed"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if logprobs is not None:
        kw["logprobs"] = logprobs
    return kw


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:  # OpenAI's content parts: only text ones can reach a text model
        if part.get("type") != "text":
            raise APIError(400, f"message content part of type {part.get('type')!r} is not supported; send text",
                           param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def completion_logprobs(tokens: list[TokenLogprob] | None, k: int) -> dict | None:
    """OpenAI completions' logprobs: tokens, token_logprobs, top_logprobs (a dict per token), text_offset."""
    if tokens is None:
        return None
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top[:k]) for t in tokens] if k else None, "text_offset": offsets}


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(tokens: list[TokenLogprob] | None, k: int) -> dict | None:
    """OpenAI chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    if tokens is None:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token),
                         "top_logprobs": [{"token": a, "logprob": lp, "bytes": _bytes(a)} for a, lp in t.top[:k]]}
                        for t in tokens], "refusal": None}


def usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Strip:
    """Streams text with the whitespace at both ends removed, as the non-streamed chat answer has it: leading
    whitespace is dropped, trailing whitespace is held back until more text follows it."""

    def __init__(self):
        self.started = False
        self.held = ""

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def create_app(state: ServerState | ControlPlane, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    control = state if isinstance(state, ControlPlane) else ControlPlane(state)
    st = control.state

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, HTTP_THREADS)
        control.start()
        try:
            yield
        finally:
            control.stop()

    app = FastAPI(title="adapterops serving", version="0.2.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes,
                       on_reject=lambda: control.metrics.rejected.labels("body_too_large").inc())
    app.state.serving = st
    app.state.control = control
    app.state.metrics = control.metrics

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            err = APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
        else:
            param = ".".join(loc) or None
            err = APIError(400, f"invalid request: {param or 'body'}: {first.get('msg', 'malformed')}", param=param,
                           code="invalid_value")
        control.metrics.rejected.labels(err.code).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def admin(request: Request) -> None:
        control.check_admin(request.headers.get("authorization"))

    # ------------------------------------------------------------------ OpenAI endpoints

    def stream_response(kind: str, rid: str, target: Target, deltas: Iterator[StreamDelta], k: int | None,
                        include_usage: bool) -> StreamingResponse:
        created = int(time.time())
        model = target.served_model
        chat = kind == "chatcmpl"
        obj = "chat.completion.chunk" if chat else "text_completion"
        strip = _Strip() if chat else None

        def chunk(choice: dict | None, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [] if choice is None else [{"index": 0, **choice}], "adapterops": target.meta(),
                    **extra}
            return _sse(body)

        def events() -> Iterator[str]:
            final = None
            try:
                if chat:
                    yield chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
                for d in deltas:
                    final = d.final or final
                    text = strip(d.text) if strip else d.text
                    if not text and not d.logprobs:
                        continue
                    if chat:
                        yield chunk({"delta": {"content": text},
                                     "logprobs": chat_logprobs(d.logprobs, k or 0) if k is not None else None,
                                     "finish_reason": None})
                    else:
                        yield chunk({"text": text,
                                     "logprobs": completion_logprobs(d.logprobs, k or 0) if k is not None else None,
                                     "finish_reason": None})
            except Exception as exc:  # after the headers: the error travels as an event, then the stream ends
                err = exc if isinstance(exc, APIError) else APIError(
                    503 if "Engine" in type(exc).__name__ else 500, f"the stream of {rid} failed: "
                    f"{type(exc).__name__}: {exc}", type="server_error", code="stream_failed")
                yield _sse(err.body())
                yield "data: [DONE]\n\n"
                return
            reason = final.finish_reason if final is not None else "stop"
            if chat:
                yield chunk({"delta": {}, "logprobs": None, "finish_reason": reason})
            else:
                yield chunk({"text": "", "logprobs": None, "finish_reason": reason})
            if include_usage and final is not None:
                yield chunk(None, usage=usage(final))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        if req.echo:
            raise control.reject("invalid_value", APIError(400, "echo=true is not supported; send echo=false",
                                                           param="echo", code="invalid_value"))
        params = control.validate(req.prompt, _params(req, req.max_tokens, req.logprobs, _stops(req.stop)), req.n)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            rid, target, deltas = control.stream("cmpl", req.model, req.prompt, params, req.user)
            return stream_response("cmpl", rid, target, deltas, req.logprobs, include_usage)
        rid, target, g = control.complete("cmpl", req.model, req.prompt, params, req.user)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": target.served_model,
                "choices": [{"index": 0, "text": g.text,
                             "logprobs": completion_logprobs(g.logprobs, req.logprobs or 0),
                             "finish_reason": g.finish_reason}],
                "usage": usage(g), "adapterops": target.meta()}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        messages = [{"role": m.role, "content": _message_text(m)} for m in req.messages]
        try:
            prompt = render_chat(control.tokenizer, messages)
        except APIError as e:
            raise control.reject(e.code or "invalid_value", e) from None
        if req.top_logprobs is not None and not req.logprobs:
            raise control.reject("invalid_value", APIError(400, "top_logprobs needs logprobs=true",
                                                           param="top_logprobs", code="invalid_value"))
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = control.validate(prompt, _params(req, max_tokens, k, _stops(req.stop, CHAT_STOP)), req.n)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            rid, target, deltas = control.stream("chatcmpl", req.model, prompt, params, req.user)
            return stream_response("chatcmpl", rid, target, deltas, k, include_usage)
        rid, target, g = control.complete("chatcmpl", req.model, prompt, params, req.user)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": target.served_model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text.strip(), "refusal": None},
                             "logprobs": chat_logprobs(g.logprobs, k or 0) if k is not None else None,
                             "finish_reason": g.finish_reason}],
                "usage": usage(g), "adapterops": target.meta()}

    @app.get("/v1/models")
    def models():
        return control.models()

    @app.post("/v1/feedback")
    def feedback(req: FeedbackRequest):
        return control.feedback(req.id, req.score)

    # ------------------------------------------------------------------ health, metrics

    @app.get("/health")
    def health():
        control.health()  # 503 with the reason when the engine is down
        return Response(status_code=200)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        return control.ready()

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(control.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ admin

    @app.post("/admin/adapters/load")
    def admin_load(req: LoadRequest, request: Request):
        admin(request)
        return control.load_adapter(req.family, req.version, req.path, req.ref, req.base_sha256)

    @app.post("/admin/adapters/unload")
    def admin_unload(req: VersionRequest, request: Request):
        admin(request)
        return control.unload_adapter(req.family, req.version)

    @app.post("/admin/router/fallback")
    def admin_fallback(req: FallbackRequest, request: Request):
        admin(request)
        return control.set_fallback(req.family, req.fallback)

    @app.post("/admin/drift")
    def admin_drift(req: DriftVerdict, request: Request):
        """One monitoring window's drift verdict about a family's champion; severe drift engages its fallback."""
        admin(request)
        return control.drift(req.family, req.drift, req.severe, req.version, req.details)

    @app.get("/admin/fallback")
    def admin_fallback_status(request: Request):
        admin(request)
        return control.fallback_policy().status()

    @app.post("/admin/rollout/start")
    def admin_rollout_start(req: RolloutStartRequest, request: Request):
        admin(request)
        config = control.rollout_config(req.steps, req.requests_per_step, req.gradual_rollback)
        return control.start_rollout(req.family, req.challenger, req.champion, config, req.offline_nll)

    @app.post("/admin/rollout/abort")
    def admin_rollout_abort(req: RolloutAbortRequest, request: Request):
        admin(request)
        return control.abort_rollout(req.family, req.reason)

    @app.get("/admin/rollout/status")
    def admin_rollout_status(request: Request, family: str | None = None):
        admin(request)
        return control.rollout_status(family)

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
