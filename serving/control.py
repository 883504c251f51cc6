"""The serving control plane: every decision about a request and a version, apart from HTTP and from the engine.

    state = ServerState(engine=BuiltinEngine(base_dir), router=Router(), rollout=controller, log=PredictionLog(db))
    control = ControlPlane(state)
    rid, target, gen = control.complete("cmpl", "support-assistant", prompt, SamplingParams(max_tokens=16), user="u1")
    control.start_rollout("support-assistant", "3")          # parity first, then the canary
    control.drift(DriftVerdict(...)); control.feedback(rid, 0.8)

It owns the router's weights (following the canary controller), the registry following (champion alias, auto
canary), the drift fallback, the train/serve parity check before any traffic, the prediction log and the request
metrics. It talks to the model through serving.engine.Engine only (the built-in engine or vLLM servers), so the same
decisions hold whichever engine serves. serving/app.py maps these methods to HTTP; errors are APIError with the HTTP
status and OpenAI-style code they answer with.

`model` is a family (routed: champion, or the challenger for its traffic share while a rollout runs; the family's
fallback takes the champion's share while one is set), `family@3` (pinned to a version) or "base" (adapters off).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.engine import (
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
    StreamDelta,
)
from serving.fallback import FallbackPolicy, FallbackStateUnavailable
from serving.metrics import ServingMetrics
from serving.parity import GOLDEN_FILE, check_engine_parity, load_golden
from serving.rollout import RolloutConfig, RolloutController, RolloutError, RolloutStateUnavailable
from serving.router import BASE, ROUTE_CANARY, ROUTE_CHAMPION, ROUTE_FALLBACK, Router, UnknownFamily

log = logging.getLogger(__name__)

ROUTE_PINNED = "pinned"
ROUTE_BASE = "base"
CHAT_STOP = ("###",)
"""The support format's turn marker: a chat answer ends where the model starts the next turn."""
_RECENT_IDS = 100_000
UNLOAD_DRAIN_S = 60.0  # how long an unload waits for the requests already routed to the adapter


class APIError(Exception):
    """An error answered as OpenAI-style JSON {"error": {message, type, param, code}} with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.extra = (status, message, type, param,
                                                                                   code, extra)

    def body(self) -> dict:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        if self.extra:
            body["error"].update(self.extra)
        return body


@dataclass
class ServerState:
    engine: Any = None
    """serving.engine.Engine that runs the model (built-in or vLLM)."""
    router: Router = field(default_factory=Router)
    rollout: RolloutController | None = None
    log: Any = None
    """monitoring.store.PredictionLog, or None to log nothing."""
    api_key: str | None = None
    """Bearer token of the /admin endpoints; None (or empty) disables them (403)."""
    families: dict[str, dict[str, Path]] = field(default_factory=dict)
    """family -> version -> adapter directory: what may be served (reloaded on demand if the engine evicted it)."""
    max_prompt_chars: int = 4000
    max_tokens_limit: int = 256
    registry: Any = None
    """registry.versions.AdapterRegistry: lets load take {"ref": "family@3"} instead of a path."""
    adapter_cache: Path | None = None
    """dest_root for registry downloads."""
    require_parity: bool = False
    """Refuse a rollout whose challenger has no golden logits (GOLDEN_FILE) to check against."""
    parity_thresholds: dict = field(default_factory=dict)
    """Keyword overrides for check_engine_parity (max_logprob_abs, min_top1)."""
    fallback: FallbackPolicy | None = None
    """Acts on drift verdicts (severe drift -> the family's fallback); None: drift() answers 409."""
    auto_canary_poll_s: float | None = None
    """Every N s, start a canary for each family whose registry `challenger` alias names a version that is not
    serving and not tried yet (a scheduled retrain registers one); None: rollouts start only when asked. Needs
    `registry` and `rollout`."""
    auto_canary_without_feedback: bool = False
    """An automatic canary (auto_canary_poll_s) requires users' feedback to promote (require_feedback: it extends
    its step while either arm has fewer than min_samples scores, saying so in the status), since errors and latency
    alone cannot tell a wrong model from a right one. True: it may promote on error rate and latency alone, and
    its promotion reason says that feedback was not checked."""
    registry_poll_s: float | None = 5.0
    """With a registry: follow its champion aliases this often, so a promote or rollback made anywhere (the CLI,
    another replica's canary) reaches this server's traffic within that time, and a family registered elsewhere
    starts being served; None: only what this server does itself moves its routes."""
    pool: Any = None
    """Deprecated spelling: an AdapterPool given here is served through serving.pool.PoolEngine."""

    def __post_init__(self):
        if self.engine is None and self.pool is not None:
            from serving.pool import PoolEngine

            self.engine = PoolEngine(self.pool)
        if self.engine is None:
            raise ValueError("ServerState needs an engine (serving.builtin.BuiltinEngine or "
                             "serving.vllm_engine.VLLMEngine)")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None  # an empty key must never open the admin API


def _state_unavailable(e: Exception) -> APIError:
    """The shared rollout state database is down: 503 (retry later), not a 500, and the message names it."""
    return APIError(503, str(e), type="server_error", code="rollout_state_unavailable")


class GatesFailed(RuntimeError):
    """The registry says this version failed its offline gates (or does not hold it): it never gets traffic."""


class RefMismatch(ValueError):
    """A load named one version and a registry ref that resolves to another."""


def verify_adapter_dir(path: Path, base_sha256: str | None = None) -> str:
    """Refuse, with the reason, an adapter directory no engine should serve (no or unreadable adapter_config.json,
    no adapter_model.safetensors, weights that are not finite, bound to another base than base_sha256 or to a PiSSA
    residual base); returns its content hash, so a reload after an eviction can check it is still the same bytes."""
    import json

    from registry.hashing import tree_hash

    path = Path(path)
    cfg = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not path.is_dir():
        raise AdapterLoadError(f"{path} is not a directory; give a PEFT adapter directory (adapter_config.json + "
                               f"adapter_model.safetensors)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{cfg} cannot be read as a PEFT adapter config ({type(e).__name__}: {e}); "
                               f"re-export the adapter") from None
    if not weights.is_file():
        raise AdapterLoadError(f"{path} has no adapter_model.safetensors; re-export the adapter with "
                               f"save_pretrained (safetensors only)")
    try:
        import torch
        from safetensors.torch import load_file

        for name, t in load_file(str(weights)).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterLoadError(f"{weights}: tensor {name} holds NaN or infinite values; the adapter is "
                                       f"broken (a diverged run?), retrain it")
    except AdapterLoadError:
        raise
    except Exception as e:  # safetensors raises its own error types on truncated or corrupt files
        raise AdapterLoadError(f"{weights} cannot be read ({type(e).__name__}: {e}); the file is truncated or "
                               f"corrupt: re-download or re-export it") from None
    from registry.binding import BindingMismatch, check_binding

    if base_sha256 is not None:
        try:  # the base the adapter says it was trained on (adapterops.json), when it says
            check_binding(path, base_sha256, "serve")
        except BindingMismatch as e:
            raise AdapterLoadError(str(e)) from None
    return tree_hash(path)


def require_gates(state: ServerState, family: str, version: str) -> None:
    """With a registry, only versions it holds with passed gates may get traffic; GatesFailed otherwise."""
    if state.registry is None or version == BASE:
        return
    try:
        info = state.registry.get(family, version)
    except Exception as e:
        raise GatesFailed(f"{family}@{version} is not a version the registry holds ({type(e).__name__}: {e}); "
                          f"register it (gates run at registration) before serving it") from None
    if not info.gates_passed():
        raise GatesFailed(f"{family}@{version} failed its offline gates (gates_passed="
                          f"{info.tags.get('gates_passed')!r}); it never gets traffic: fix it and register a new "
                          f"version")


def load_from_registry(state: ServerState, family: str, version: str, ref: str | None = None) -> Path:
    """Download `ref` (default family@version), hash-verified and refused (BaseMismatch) when trained on another
    base, RefMismatch when ref names another version, GatesFailed when its gates failed, and load it into the engine
    as family@version; returns its directory. Callers record it in state.families."""
    if state.registry is None or state.adapter_cache is None:
        raise LookupError(f"cannot load {family}@{version}: this server has no registry (and adapter_cache) to "
                          f"resolve it from; load it with a path")
    resolved = state.registry.resolve(ref or f"{family}@{version}", state.adapter_cache,
                                      expected_base_sha256=state.engine.base_sha256)
    if (resolved.family, str(resolved.version)) != (family, str(version)):
        raise RefMismatch(f"ref {ref!r} resolves to {resolved.family}@{resolved.version}, not {family}@{version}; "
                          f"load it under its own family and version")
    if resolved.tags.get("gates_passed") != "true":
        raise GatesFailed(f"{family}@{version} failed its offline gates (gates_passed="
                          f"{resolved.tags.get('gates_passed')!r}); it never gets traffic: fix it and register a new "
                          f"version")
    state.engine.load(f"{family}@{version}", resolved.path, base_sha256=resolved.base_sha256)
    return Path(resolved.path).resolve()


@dataclass
class Target:
    family: str
    version: str
    route: str
    key: str | None  # engine key; None = base

    @property
    def served_model(self) -> str:
        return BASE if self.key is None and self.family == BASE else f"{self.family}@{self.version}"

    def meta(self) -> dict:
        return {"family": self.family, "version": self.version, "route": self.route}


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt of a chat: the tokenizer's chat template over every message (system first), generation prompt on."""
    if not messages:
        raise APIError(400, "messages is empty; send at least one message with role 'user'", param="messages")
    if not any(m.get("role") == "user" for m in messages):
        raise APIError(400, "messages holds no message with role 'user'; send at least one", param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "the served base has no chat template; use /v1/completions with a prompt",
                       code="chat_template_missing")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template raises on a role it does not know
        raise APIError(400, f"cannot render these messages with the base's chat template: {exc}",
                       param="messages") from None


class ControlPlane:
    """Routing, canary, fallback, registry following, parity and logging over one engine."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        self.metrics = ServingMetrics()
        self.metrics.adapters_loaded.set_function(lambda: len(self.engine.loaded()))
        self.metrics.adapter_switches.set_function(lambda: getattr(getattr(self.engine, "pool", self.engine),
                                                                   "switches", 0))
        self.metrics.watch_fallbacks(state.router.families)
        if state.log is not None:
            self.metrics.watch_log(state.log)
        self.metrics.watch_rollout(state.rollout)
        self.metrics.watch_fallback(state.fallback)
        self.lock = threading.RLock()  # guards state.families and composite admin operations
        self.inflight: Counter = Counter()  # engine key -> requests routed to it, not yet answered
        self.drained = threading.Condition(self.lock)  # notified when a key's in-flight count drops to 0
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.digests: dict[str, str] = {}  # engine key -> content hash of a directory loaded by path
        self._tokenizer = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if state.rollout is not None:
            state.rollout.subscribe(self.sync_router)
            for family in state.rollout.status()["rollouts"]:
                if state.rollout.is_active(family):
                    self.sync_router(family)
        for family in state.router.families():
            self.restore_fallback(family)
        if state.fallback is not None and hasattr(state.fallback, "subscribe"):
            state.fallback.subscribe(self.sync_fallback)  # shared: another replica engaged or released one

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the registry poller (champion alias, auto canary) when configured."""
        st = self.state
        cfg = st.fallback.config if st.fallback is not None else None
        intervals = [x for x in (cfg.registry_poll_s if cfg is not None else None, st.auto_canary_poll_s,
                                 st.registry_poll_s) if x]
        if intervals and st.registry is not None and self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll_loop, args=(min(intervals),), name="registry-poll",
                                            daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10.0)
            self._poller = None
        if self.state.rollout is not None:
            self.state.rollout.flush()  # samples since the last periodic save survive a clean shutdown
            close = getattr(self.state.rollout, "close", None)  # a shared controller hands its driver lease over
            if close is not None:
                close()
        close = getattr(self.state.fallback, "close", None)  # a shared fallback policy stops its poller
        if close is not None:
            close()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.base_path)
        return self._tokenizer

    # ------------------------------------------------------------------ admin auth

    def check_admin(self, authorization: str | None) -> None:
        if self.state.api_key is None:
            raise APIError(403, "admin endpoints are disabled: start the server with an api_key",
                           type="permission_error")
        auth = authorization or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), self.state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <api_key>'",
                           type="authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ versions

    def known_versions(self, family: str) -> dict[str, Path]:
        with self.lock:
            return dict(self.state.families.get(family, {}))

    def load_from_registry(self, family: str, version: str, ref: str | None = None) -> Path:
        return load_from_registry(self.state, family, version, ref)

    def ensure_version(self, family: str, version: str) -> None:
        """Make family@version servable: known already, or loaded (verified) from the registry."""
        if version == BASE or version in self.known_versions(family):
            return
        path = self.load_from_registry(family, version)  # outside the lock: requests read state.families
        with self.lock:
            self.state.families.setdefault(family, {})[version] = path

    def load_adapter(self, family: str, version: str, path: str | None = None, ref: str | None = None,
                     base_sha256: str | None = None) -> dict:
        st = self.state
        key = f"{family}@{version}"
        if "@" in family or not family or not version or version == BASE:
            raise APIError(400, f"invalid family/version {key!r}", param="family")
        digest = None
        try:
            if path is not None:
                if ref is not None:
                    raise APIError(400, "send 'path' or 'ref', not both", param="ref")
                digest = verify_adapter_dir(Path(path), self.engine.base_sha256)
                require_gates(st, family, version)
                self.engine.load(key, Path(path), base_sha256=base_sha256)
            elif st.registry is not None:
                if st.adapter_cache is None:
                    raise APIError(400, "the server has a registry but no adapter_cache directory to download into")
                try:
                    path = self.load_from_registry(family, version, ref)
                except (AdapterLoadError, EngineError, GatesFailed):
                    raise
                except RefMismatch as e:
                    raise APIError(400, str(e), param="ref", code="ref_mismatch") from None
                except Exception as e:
                    raise APIError(409 if type(e).__name__ == "BaseMismatch" else 400,
                                   f"cannot resolve {ref or key} in the registry: {e}", code="registry_error") from None
            else:
                raise APIError(400, "send 'path' (this server has no registry to resolve a ref)", param="path")
        except GatesFailed as e:
            raise APIError(409, str(e), param="version", code="gates_failed") from None
        except AdapterLoadError as e:
            raise APIError(400, str(e), param="path" if ref is None and path is not None else "ref",
                           code="adapter_load_failed") from None
        except EngineError as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        new_route = False
        with self.lock:
            st.families.setdefault(family, {})[version] = Path(path).resolve()
            if digest is not None:
                self.digests[key] = digest
            else:
                self.digests.pop(key, None)  # registry copies are re-verified by the registry on reload
            try:
                st.router.get(family)
            except UnknownFamily:
                st.router.set(family, version)  # the first version of a family becomes its champion
                new_route = True
        if new_route:
            self.restore_fallback(family)
        return {"loaded": key, "path": str(Path(path).resolve()), "pool": self.engine.loaded(),
                "route": st.router.get(family).as_dict()}

    def unload_adapter(self, family: str, version: str) -> dict:
        st = self.state
        key = f"{family}@{version}"
        with self.lock:
            if version not in st.families.get(family, {}):
                raise APIError(404, f"adapter {key} is not loaded", param="version", code="model_not_found")
            try:
                route = st.router.get(family)
                in_use = version in (route.champion, route.challenger, route.fallback)
            except UnknownFamily:
                in_use = False
            if in_use or (st.rollout is not None and st.rollout.is_active(family)
                          and version in st.rollout.weight(family)[:2]):
                raise APIError(409, f"{key} is routed to (champion, challenger or fallback); route the family "
                                    f"elsewhere before unloading it", code="adapter_in_use")
            path = st.families[family].pop(version)  # new requests can no longer be routed to it
            if not self.drained.wait_for(lambda: key not in self.inflight, timeout=UNLOAD_DRAIN_S):
                st.families[family][version] = path
                raise APIError(409, f"{key} still has {self.inflight[key]} request(s) in flight after "
                                    f"{UNLOAD_DRAIN_S:.0f} s; try the unload again", code="adapter_busy")
            try:
                self.engine.unload(key)
            except AdapterNotLoaded:
                pass  # already evicted by the engine's LRU
            except EngineError as e:
                st.families[family][version] = path
                raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        return {"unloaded": key, "pool": self.engine.loaded()}

    # ------------------------------------------------------------------ rollout, fallback <-> router

    def sync_router(self, family: str) -> None:
        """Route by the canary controller's weights. A canary started on another replica (shared rollout state)
        may name versions this server has not loaded yet: they are loaded (verified) first; a challenger that
        cannot be gets no traffic here, a champion that cannot be keeps the route as it was."""
        st = self.state
        champion, challenger, weight = st.rollout.weight(family)
        for name, version in (("champion", champion), ("challenger", challenger)):
            if version is None:
                continue
            try:
                self.ensure_version(family, version)
            except Exception as exc:
                log.error("cannot load %s %s@%s that the rollout routes to: %s: %s", name, family, version,
                          type(exc).__name__, exc)
                if name == "champion":
                    return
                challenger, weight = None, 0.0
        if champion is not None:
            st.router.set(family, champion, challenger, weight)
            self.metrics.rollout_weight.labels(family).set(weight)
            if st.fallback is not None and not st.rollout.is_active(family):
                self.follow_champion(family, champion)

    def follow_champion(self, family: str, champion: str) -> None:
        """`champion` serves the family now: a new one releases a fallback engaged for the old one; the same one
        engages a severe drift's fallback that waited for a rollout to end (or failed before)."""
        st = self.state
        try:
            undone = st.fallback.champion_changed(family, champion)
        except FallbackStateUnavailable as e:
            # the shared state cannot say so now: release here a fallback engaged for another champion (the next
            # verdict or champion move stores the reset), keep the rest as last read
            held = st.fallback.engagement(family)
            if held is not None and held["champion"] != champion:
                st.router.set_fallback(family, None)
            log.error("family %s: champion %s not recorded in the fallback state: %s", family, champion, e)
            return
        if undone is not None:
            st.router.set_fallback(family, None)
            log.warning("family %s has a new champion %s: fallback %s released", family, champion, undone["version"])
        elif st.fallback.should_engage(family) and not (st.rollout is not None and st.rollout.is_active(family)):
            self.engage_fallback(family)

    def engage_fallback(self, family: str) -> str | None:
        """Route the family's champion share to the configured fallback; the error, if it could not."""
        st = self.state
        policy = st.fallback
        try:
            version = BASE
            if policy.config.target == "previous":
                if st.registry is None:
                    raise LookupError("fallback target 'previous' needs a registry; this server has none")
                version = st.registry.alias(family, "previous")
                if version is None:
                    raise LookupError(f"the registry has no 'previous' version of {family} (its first champion?); "
                                      f"set fallback target 'base' or promote through the registry")
                self.ensure_version(family, version)
            st.router.set_fallback(family, version)
        except Exception as exc:
            msg = f"cannot engage the fallback of {family}: {type(exc).__name__}: {exc}"
            log.error(msg)
            try:
                policy.mark_failed(family, msg)
            except FallbackStateUnavailable as e:
                log.error("%s", e)
            return msg
        try:
            policy.mark_engaged(family, version)
        except FallbackStateUnavailable as e:
            st.router.set_fallback(family, None)  # not engaged on the other replicas: not here either
            msg = f"cannot engage the fallback of {family}: {e}"
            log.error(msg)
            return msg
        log.warning("family %s is on fallback %s: %s", family, version, policy.status(family)["reason"])
        return None

    def restore_fallback(self, family: str) -> None:
        """Put back a fallback engaged before a restart, unless the family has had a new champion since."""
        st = self.state
        version = st.fallback.engaged().get(family) if st.fallback is not None else None
        if version is None:
            return
        try:
            if st.fallback.champion_changed(family, st.router.get(family).champion) is not None:
                return
            self.ensure_version(family, version)
            st.router.set_fallback(family, version)
        except UnknownFamily:
            return
        except Exception as exc:
            log.error("cannot restore the fallback %s of %s: %s", version, family, exc)
            st.fallback.mark_failed(family, f"restore after restart: {type(exc).__name__}: {exc}")

    def sync_fallback(self, family: str, before: str | None, after: str | None) -> None:
        """Another replica engaged (after: the version) or released (after None) the drift fallback of `family` in
        the shared state: route by it here, for the champion it was engaged for (a replica that serves another
        champion follows the registry first; its next champion change resets the engagement)."""
        st = self.state
        try:
            route = st.router.get(family)
        except UnknownFamily:
            return
        if after is None:
            if before is not None and route.fallback == before:
                st.router.set_fallback(family, None)
                log.warning("family %s: drift fallback %s released (shared fallback state)", family, before)
            return
        held = st.fallback.engagement(family)
        if held is None or held["champion"] != route.champion or route.fallback == after:
            return
        try:
            self.ensure_version(family, after)
            st.router.set_fallback(family, after)
            log.warning("family %s is on fallback %s (engaged by another replica): %s", family, after,
                        held.get("reason"))
        except Exception as exc:
            log.error("cannot route %s to the fallback %s another replica engaged: %s: %s", family, after,
                      type(exc).__name__, exc)

    def set_fallback(self, family: str, fallback: str | None) -> dict:
        st = self.state
        if fallback not in (None, BASE) and fallback not in self.known_versions(family):
            raise APIError(404, f"fallback version {fallback} of {family} is not loaded", param="fallback")
        if fallback not in (None, BASE):
            try:
                require_gates(st, family, fallback)
            except GatesFailed as e:
                raise APIError(409, str(e), param="fallback", code="gates_failed") from None
        try:
            route = st.router.set_fallback(family, fallback).as_dict()
        except UnknownFamily:
            raise APIError(404, f"family {family!r} has no route", param="family") from None
        try:
            if fallback is None and st.fallback is not None and st.fallback.release(family):
                log.warning("operator cleared the drift fallback of %s", family)
        except FallbackStateUnavailable as e:
            raise APIError(503, f"the fallback of {family} is cleared on this replica only: {e}",
                           type="server_error", code="fallback_state_unavailable") from None
        return route

    def fallback_policy(self) -> FallbackPolicy:
        if self.state.fallback is None:
            raise APIError(409, "this server has no fallback policy (FallbackConfig.enabled)", code="fallback_disabled")
        return self.state.fallback

    def drift(self, family: str, drift: bool | None, severe: bool = False, version: str | None = None,
              details: dict | None = None) -> dict:
        """One monitoring window's drift verdict about a family's champion; severe drift engages its fallback."""
        st = self.state
        policy = self.fallback_policy()
        try:
            champion = st.router.get(family).champion
        except UnknownFamily:
            raise APIError(404, f"family {family!r} has no route", param="family") from None
        self.follow_champion(family, champion)
        active = st.rollout is not None and st.rollout.is_active(family)
        try:
            decision = policy.observe(family, champion, drift, severe=severe, details=details or {},
                                      version=version, defer=active)
        except FallbackStateUnavailable as e:
            raise APIError(503, str(e), type="server_error", code="fallback_state_unavailable") from None
        error = self.engage_fallback(family) if decision["engage"] else None
        return {"decision": decision, "error": error, "route": st.router.get(family).as_dict(),
                "drift": policy.status(family)}

    def controller(self) -> RolloutController:
        if self.state.rollout is None:
            raise APIError(409, "this server has no rollout controller", code="rollout_disabled")
        return self.state.rollout

    def rollout_config(self, steps=None, requests_per_step=None, gradual_rollback=None) -> RolloutConfig | None:
        ctl = self.controller()
        overrides = {k: v for k, v in (("steps", steps), ("requests_per_step", requests_per_step),
                                       ("gradual_rollback", gradual_rollback)) if v is not None}
        try:
            return RolloutConfig(**{**ctl.config.as_dict(), **overrides}) if overrides else None
        except ValueError as e:
            raise APIError(400, f"invalid rollout settings: {e}", code="invalid_value") from None

    def auto_canary_config(self) -> RolloutConfig:
        """The rollout settings of an automatic canary: the server's, with require_feedback unless the server was
        started with auto_canary_without_feedback."""
        cfg = self.controller().config
        if self.state.auto_canary_without_feedback or cfg.require_feedback:
            return cfg
        return RolloutConfig(**{**cfg.as_dict(), "require_feedback": True})

    def parity(self, family: str, version: str) -> dict:
        """Train/serve parity of family@version on this engine: its golden prompts' token log-probs vs the golden
        logits stored with the version."""
        golden_path = self.known_versions(family)[version] / GOLDEN_FILE
        if not golden_path.is_file():
            return {"passed": None, "reason": f"no {GOLDEN_FILE} next to the adapter"}
        try:
            return check_engine_parity(self.engine, f"{family}@{version}", load_golden(golden_path),
                                       **self.state.parity_thresholds)
        except EngineError as e:
            raise APIError(503, f"parity check of {family}@{version} could not run: {e}", type="server_error",
                           code="engine_unavailable") from None

    def start_rollout(self, family: str, challenger: str | None = None, champion: str | None = None,
                      config: RolloutConfig | None = None, offline_nll: float | None = None) -> dict:
        """Check the challenger's train/serve parity on this engine, then start its canary against the serving
        champion (or the fallback taking the champion's share); APIError with the reason otherwise."""
        st = self.state
        ctl = self.controller()
        try:
            route = st.router.get(family)
        except UnknownFamily:
            raise APIError(404, f"family {family!r} has no route", param="family") from None
        champion = champion or route.champion
        if challenger is None:
            if st.registry is None:
                raise APIError(400, "send 'challenger' (this server has no registry to read the challenger alias "
                                    "from)", param="challenger")
            try:
                challenger = st.registry.alias(family, "challenger")
            except Exception as e:
                raise APIError(400, f"cannot read the challenger of {family} from the registry: {e}",
                               param="challenger", code="registry_error") from None
            if challenger is None:
                raise APIError(409, f"the registry has no challenger for {family}; register one (or send "
                                    f"'challenger')", param="challenger", code="no_challenger")
        for name, v in (("champion", champion), ("challenger", challenger)):
            try:
                self.ensure_version(family, v)
            except GatesFailed as e:
                raise APIError(409, f"refusing the canary of {family}@{challenger}: {e}", param=name,
                               code="gates_failed") from None
            except Exception as e:
                raise APIError(404, f"{name} {family}@{v} is not loaded; load it first ({e})", param=name,
                               code="model_not_found") from None
        try:
            require_gates(st, family, challenger)
        except GatesFailed as e:
            raise APIError(409, f"refusing the canary of {family}@{challenger}: {e}", param="challenger",
                           code="gates_failed") from None
        parity = self.parity(family, challenger)
        if parity["passed"] is False:
            raise APIError(409, f"train/serve parity check failed for {family}@{challenger} on the "
                                f"{self.engine.name} engine: {'; '.join(parity['failures'])}", code="parity_failed",
                           extra={"parity": parity})
        if parity["passed"] is None and st.require_parity:
            raise APIError(409, f"{family}@{challenger} has no {GOLDEN_FILE}; a parity check is required "
                                f"before a rollout", code="parity_missing")
        try:
            status = ctl.start(family, champion, challenger, offline_nll=offline_nll, config=config,
                               baseline=route.fallback)
        except RolloutError as e:
            raise APIError(409, str(e), code="rollout_conflict") from None
        except RolloutStateUnavailable as e:
            raise _state_unavailable(e) from None
        return {"rollout": status, "parity": parity}

    def abort_rollout(self, family: str, reason: str) -> dict:
        try:
            return {"rollout": self.controller().abort(family, reason)}
        except RolloutError as e:
            raise APIError(409, str(e), code="rollout_conflict") from None
        except RolloutStateUnavailable as e:
            raise _state_unavailable(e) from None

    def rollout_status(self, family: str | None = None) -> dict:
        try:
            return self.controller().status(family)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), param="family") from None
        except RolloutStateUnavailable as e:
            raise _state_unavailable(e) from None

    def _poll_loop(self, interval: float) -> None:
        errors: dict[str, str] = {}
        tried: dict[str, set[str]] = {}  # family -> challengers already started (or refused): never retried
        while not self._stop.wait(interval):
            self.poll_registry(errors, tried)

    def poll_registry(self, errors: dict | None = None, tried: dict | None = None) -> None:
        """While no rollout of a family runs: follow the registry's champion alias (a promotion or rollback made
        elsewhere; a family registered elsewhere is picked up); with auto_canary_poll_s, start the canary of a new
        challenger."""
        st = self.state
        errors = {} if errors is None else errors
        tried = {} if tried is None else tried
        follow = bool(st.registry_poll_s) or st.fallback is not None
        if follow:
            try:
                for family in st.registry.families():
                    if family not in st.router.families() and st.registry.alias(family, "champion") is not None:
                        champion = st.registry.alias(family, "champion")
                        self.ensure_version(family, champion)
                        st.router.set(family, champion)
                        log.warning("registry has a new family %s: serving its champion %s", family, champion)
                errors.pop("", None)
            except Exception as exc:
                if errors.get("") != str(exc):
                    log.warning("registry poll (families) failed: %s: %s", type(exc).__name__, exc)
                errors[""] = str(exc)
        for family, route in st.router.families().items():
            if st.rollout is not None and st.rollout.is_active(family):
                continue
            try:
                champion = st.registry.alias(family, "champion") if follow else None
                if champion is not None and champion != route.champion:
                    self.ensure_version(family, champion)
                    st.router.set(family, champion)
                    log.warning("registry moved the champion of %s: %s -> %s", family, route.champion, champion)
                    if st.fallback is not None:
                        self.follow_champion(family, champion)
                if st.auto_canary_poll_s and st.rollout is not None:
                    challenger = st.registry.alias(family, "challenger")
                    seen = tried.setdefault(family, set())
                    if challenger not in (None, st.router.get(family).champion) and challenger not in seen:
                        seen.add(challenger)
                        try:
                            self.start_rollout(family, challenger, config=self.auto_canary_config())
                            log.warning("registry challenger %s@%s: canary started (%s)", family, challenger,
                                        "may promote on error rate and latency alone: --auto-canary-without-"
                                        "feedback" if st.auto_canary_without_feedback else "promotes only with "
                                        "users' feedback on both arms")
                        except APIError as exc:
                            log.error("registry challenger %s@%s: canary not started: %s", family, challenger, exc)
                errors.pop(family, None)
            except Exception as exc:
                if errors.get(family) != str(exc):  # once per distinct error, not every interval
                    log.warning("registry poll of %s failed: %s: %s", family, type(exc).__name__, exc)
                errors[family] = str(exc)

    # ------------------------------------------------------------------ requests

    def reject(self, reason: str, exc: APIError) -> APIError:
        """Count a request refused before it reached the engine (adapterops_requests_rejected_total)."""
        self.metrics.rejected.labels(reason).inc()
        return exc

    def validate(self, prompt: str, params_kw: dict, n: int = 1) -> SamplingParams:
        st = self.state
        if n != 1:
            raise self.reject("invalid_value", APIError(400, f"n={n} is not supported; this server returns one "
                                                             f"choice", param="n"))
        if len(prompt) > st.max_prompt_chars:
            raise self.reject("prompt_too_large", APIError(
                413, f"the prompt has {len(prompt)} characters, more than the limit of {st.max_prompt_chars}; "
                     f"shorten it", param="prompt", code="prompt_too_large"))
        if not prompt.strip():
            raise self.reject("invalid_value", APIError(400, "the prompt is empty", param="prompt"))
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\\ud800") is not text any tokenizer can take
            raise self.reject("invalid_value", APIError(
                400, f"the prompt is not valid Unicode: {e.reason} at character {e.start} "
                     f"({prompt[e.start]!a}); send UTF-8 text", param="prompt", code="invalid_value")) from None
        max_tokens = params_kw.get("max_tokens", 16)
        if not 1 <= max_tokens <= st.max_tokens_limit:
            raise self.reject("invalid_value", APIError(400, f"max_tokens must be in [1, {st.max_tokens_limit}], "
                                                             f"got {max_tokens}", param="max_tokens",
                                                        code="invalid_value"))
        try:
            return SamplingParams(**params_kw)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise self.reject("invalid_value", APIError(400, str(e), param=param, code="invalid_value")) from None

    def resolve(self, model: str, user: str | None) -> Target:
        st = self.state
        if model == BASE:
            return Target(BASE, BASE, ROUTE_BASE, None)
        family, sep, version = model.partition("@")
        versions = self.known_versions(family)
        if sep:
            if version == BASE:
                return Target(family, BASE, ROUTE_PINNED, None)
            if version not in versions:
                raise APIError(404, f"model {model!r} does not exist: family {family!r} has versions "
                                    f"{sorted(versions)}; see GET /v1/models", param="model", code="model_not_found")
            return Target(family, version, ROUTE_PINNED, model)
        try:
            version, route = st.router.choose(family, user)
        except UnknownFamily:
            raise APIError(404, f"model {model!r} does not exist; use a family, 'family@version' or 'base' "
                                f"(see GET /v1/models)", param="model", code="model_not_found") from None
        if version == BASE:
            return Target(family, BASE, route, None)
        if version not in versions:
            raise APIError(503, f"family {family!r} routes to version {version}, which is not loaded on this server; "
                                f"load it with POST /admin/adapters/load", type="server_error",
                           code="adapter_unavailable")
        return Target(family, version, route, f"{family}@{version}")

    def _route(self, model: str, user: str | None) -> Target:
        try:
            with self.lock:  # routed and counted in one step, so an unload cannot slip in between
                target = self.resolve(model, user)
                if target.key:
                    self.inflight[target.key] += 1
        except APIError as e:
            self.metrics.error("unknown", "unknown", e.code or str(e.status))
            raise self.reject(e.code or str(e.status), e) from None
        return target

    def _release(self, target: Target) -> None:
        if target.key:
            with self.lock:
                self.inflight[target.key] -= 1
                if self.inflight[target.key] <= 0:
                    del self.inflight[target.key]
                    self.drained.notify_all()

    def reload(self, target: Target, missing: AdapterNotLoaded) -> None:
        """Bring back a version the engine evicted (its LRU) or lost (a restarted vLLM), verified as on its first
        load: through the registry (hash-checked copy) when it came from there, else only if its directory still
        holds the same bytes."""
        path = self.known_versions(target.family).get(target.version)
        if path is None:
            raise missing
        with self.lock:
            digest = self.digests.get(target.key)
        if digest is None and self.state.registry is not None and self.state.adapter_cache is not None:
            load_from_registry(self.state, target.family, target.version)
            return
        if digest is not None and verify_adapter_dir(path) != digest:
            raise AdapterLoadError(f"{target.key} was evicted and its directory {path} has changed since it was "
                                   f"loaded; refusing to serve different bytes under the same version: load it again "
                                   f"explicitly")
        self.engine.load(target.key, path)

    def _generate(self, target: Target, request: GenerationRequest) -> Generation:
        [result] = self.engine.generate([request])
        if isinstance(result, AdapterNotLoaded):
            self.reload(target, result)  # evicted by the engine's LRU: bring it back, verified
            [result] = self.engine.generate([request])
        if isinstance(result, Exception):
            raise result
        return result

    def complete(self, kind: str, model: str, prompt: str, params: SamplingParams,
                 user: str | None = None) -> tuple[str, Target, Generation]:
        """Route, generate, count and log one request; APIError (400 context, 503 engine down, 500) otherwise."""
        t0 = time.perf_counter()
        target = self._route(model, user)
        rid = f"{kind}-{uuid.uuid4().hex}"
        try:
            gen = self._generate(target, GenerationRequest(prompt, target.key, params, rid))
        except Exception as exc:
            self._release(target)
            raise self._failed(target, rid, prompt, t0, exc, model) from None
        self._release(target)
        self._finished(target, rid, prompt, gen, (time.perf_counter() - t0) * 1e3)
        return rid, target, gen

    def stream(self, kind: str, model: str, prompt: str, params: SamplingParams,
               user: str | None = None) -> tuple[str, Target, Iterator[StreamDelta]]:
        """Like complete, but the deltas as the engine yields them; logged and counted when the stream ends. Errors
        before the first delta raise here (so HTTP can still answer with a status); later ones end the stream."""
        t0 = time.perf_counter()
        target = self._route(model, user)
        rid = f"{kind}-{uuid.uuid4().hex}"
        request = GenerationRequest(prompt, target.key, params, rid)
        try:
            it = iter(self.engine.stream(request))
            first = next(it)
        except AdapterNotLoaded as exc:
            try:
                self.reload(target, exc)
                it = iter(self.engine.stream(request))
                first = next(it)
            except Exception as exc2:
                self._release(target)
                raise self._failed(target, rid, prompt, t0, exc2, model) from None
        except Exception as exc:
            self._release(target)
            raise self._failed(target, rid, prompt, t0, exc, model) from None

        def deltas() -> Iterator[StreamDelta]:
            final = None
            failed = False
            try:
                delta = first
                while delta is not None:
                    if delta.final is not None:
                        final = delta.final
                    yield delta
                    delta = next(it, None)
            except GeneratorExit:  # the client went away: stop the engine's work for this request too
                failed = True
                close = getattr(it, "close", None)
                if close is not None:
                    close()
                raise
            except Exception as exc:
                failed = True
                self._failed(target, rid, prompt, t0, exc, model)
                raise
            finally:
                self._release(target)
                if not failed and final is not None:
                    self._finished(target, rid, prompt, final, (time.perf_counter() - t0) * 1e3)

        return rid, target, deltas()

    def _failed(self, target: Target, rid: str, prompt: str, t0: float, exc: Exception, model: str) -> APIError:
        """Count, log and turn an engine failure into the APIError to answer with."""
        latency_ms = (time.perf_counter() - t0) * 1e3
        if isinstance(exc, ContextLengthExceeded):
            self.metrics.error(target.family, target.version, "context_length_exceeded")
            return self.reject("context_length_exceeded", APIError(400, str(exc), param="max_tokens",
                                                                   code="context_length_exceeded"))
        if isinstance(exc, ValueError) and not isinstance(exc, AdapterLoadError):
            return self.reject("invalid_value", APIError(400, str(exc), code="invalid_value"))
        if isinstance(exc, EngineError):
            # the engine is down, not the adapter bad: never counted against an arm of a canary (which pauses
            # for want of samples instead of deciding on missing data)
            self.metrics.error(target.family, target.version, "engine_unavailable")
            self.metrics.observe(target.family, target.version, target.route, "503", latency_ms / 1e3, 0)
            return APIError(503, f"the {self.engine.name} engine cannot serve {model!r} now (request {rid}): {exc}",
                            type="server_error", code="engine_unavailable")
        if isinstance(exc, (AdapterLoadError, GatesFailed)):  # an evicted version could not be brought back
            log.error("cannot reload %s for %s: %s", target.key, model, exc)
            self.metrics.observe(target.family, target.version, target.route, "503", latency_ms / 1e3, 0)
            self.metrics.error(target.family, target.version, "adapter_unavailable")
            self.record_request(rid, target, prompt, None, latency_ms, f"{type(exc).__name__}: {exc}")
            return APIError(503, f"{target.key} cannot be served now (request {rid}): {exc}", type="server_error",
                            code="adapter_unavailable")
        log.error("completion failed for %s: %s: %s", model, type(exc).__name__, exc)
        error = f"{type(exc).__name__}: {exc}"
        self.metrics.observe(target.family, target.version, target.route, "500", latency_ms / 1e3, 0)
        self.metrics.error(target.family, target.version, "generation_failed")
        self.record_request(rid, target, prompt, None, latency_ms, error)
        return APIError(500, f"generation failed for {model!r} (request {rid}): {error}", type="server_error",
                        code="generation_failed")

    def _finished(self, target: Target, rid: str, prompt: str, gen: Generation, latency_ms: float) -> None:
        self.metrics.observe(target.family, target.version, target.route, "200", latency_ms / 1e3,
                             gen.completion_tokens)
        self.record_request(rid, target, prompt, gen, latency_ms, None)

    def record_request(self, rid: str, target: Target, prompt: str, gen: Generation | None, latency_ms: float,
                       error: str | None) -> None:
        st = self.state
        with self.lock:
            self.recent_ids[rid] = None
            if len(self.recent_ids) > _RECENT_IDS:
                self.recent_ids.popitem(last=False)
        if (st.rollout is not None and target.route in (ROUTE_CHAMPION, ROUTE_CANARY, ROUTE_FALLBACK)
                and st.rollout.is_active(target.family)):
            st.rollout.record(target.family, target.version, rid, latency_ms, error is not None,
                              gen.response_nll if gen else None)
        if st.log is not None:
            stats = gen.stats if gen else {}
            record = {"request_id": rid, "ts": time.time(), "family": target.family, "version": target.version,
                      "prompt": prompt, "response": gen.text if gen else None,
                      "prompt_nll": stats.get("prompt_nll"), "gen_entropy": stats.get("gen_entropy"),
                      "gen_max_prob": stats.get("gen_max_prob"), "latency_ms": latency_ms, "error": error,
                      # the prediction log stores the champion route as NULL (its default)
                      "route": None if target.route == ROUTE_CHAMPION else target.route}
            try:
                st.log.log(record)  # enqueue only; a background thread writes
            except Exception:
                self.metrics.log_failures.inc()
                log.exception("prediction log refused request %s", rid)

    def feedback(self, request_id: str, score: float) -> dict:
        st = self.state
        if not 0.0 <= score <= 1.0:
            raise APIError(400, f"score must be in [0, 1], got {score}", param="score")
        in_log = bool(st.log.add_feedback(request_id, score)) if st.log is not None else False
        in_rollout = st.rollout.record_feedback(request_id, score) if st.rollout is not None else False
        with self.lock:
            seen = request_id in self.recent_ids
        if not (in_log or in_rollout or seen):
            raise APIError(404, f"no completion with id {request_id!r}; send the 'id' of a completion response",
                           param="id", code="completion_not_found")
        self.metrics.feedback.inc()
        return {"id": request_id, "score": score, "recorded": {"log": in_log, "rollout": in_rollout}}

    # ------------------------------------------------------------------ views

    def models(self) -> dict:
        st = self.state
        loaded = set(self.engine.loaded())
        base = {"path": str(self.engine.base_path), "sha256": self.engine.base_sha256, "engine": self.engine.name}
        data = [{"id": BASE, "object": "model", "created": 0, "owned_by": "adapterops", "adapterops": base}]
        routes = st.router.families()
        with self.lock:
            families = {f: dict(v) for f, v in st.families.items()}
        for family in sorted(set(families) | set(routes)):
            route = routes.get(family)
            versions = sorted(families.get(family, {}), key=lambda v: (len(v), v))
            info = {"champion": route.champion if route else None, "challenger": route.challenger if route else None,
                    "weight": route.weight if route else 0.0, "fallback": route.fallback if route else None,
                    "versions": versions, "loaded": [v for v in versions if f"{family}@{v}" in loaded]}
            if st.fallback is not None:
                info["drift"] = st.fallback.status(family)  # why a fallback is engaged (or pending)
            data.append({"id": family, "object": "model", "created": 0, "owned_by": "adapterops",
                         "adapterops": info})
            for v in versions:
                data.append({"id": f"{family}@{v}", "object": "model", "created": 0, "owned_by": "adapterops",
                             "adapterops": {"loaded": f"{family}@{v}" in loaded}})
        return {"object": "list", "data": data, "base": base,
                "fallbacks": {f: r.fallback for f, r in routes.items() if r.fallback is not None}}

    def ready(self) -> dict:
        missing = []
        for family, route in self.state.router.families().items():
            versions = self.known_versions(family)
            for v in (route.champion, route.challenger, route.fallback):
                if v is not None and v != BASE and v not in versions:
                    missing.append(f"{family}@{v}")
        if missing:
            raise APIError(503, f"routed versions are not loaded: {missing}", type="server_error", code="not_ready")
        try:
            held = set(self.engine.loaded())
            for family, route in self.state.router.families().items():
                for v in (route.champion, route.challenger, route.fallback):
                    key = f"{family}@{v}"
                    if v is not None and v != BASE and key not in held:  # evicted: ready only once it is back
                        try:
                            self.reload(Target(family, v, ROUTE_CHAMPION, key), AdapterNotLoaded(key))
                        except (AdapterLoadError, GatesFailed, AdapterNotLoaded, LookupError) as e:
                            raise APIError(503, f"routed version {key} was evicted and cannot be reloaded: {e}",
                                           type="server_error", code="not_ready") from None
            engine = self.engine.health()
        except EngineError as e:
            raise APIError(503, f"the {self.engine.name} engine is not ready: {e}", type="server_error",
                           code="engine_unavailable") from None
        return {"status": "ready", "base_sha256": self.engine.base_sha256, "loaded": self.engine.loaded(),
                "engine": engine}

    def health(self) -> dict:
        """Liveness of the engine (vLLM's /health answers 200 with no body; ours says which engine)."""
        try:
            return {"status": "ok", **self.engine.health()}
        except EngineError as e:
            raise APIError(503, f"the {self.engine.name} engine is down: {e}", type="server_error",
                           code="engine_unavailable") from None
