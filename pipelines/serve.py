"""Stage 5, serve: an OpenAI-compatible server over a workspace's registry, with the canary wired to the registry.

Run:  adapterops serve --workdir work/demo --host 127.0.0.1 --port 8000   (ADAPTEROPS_API_KEY guards /admin)

A canary that passes promotes the challenger through the registry (champion -> previous, challenger -> champion);
one that fails clears the challenger alias, with the analysis as the reason in the audit trail. With a fallback
config (configs/fallback.yaml, `enabled: true`), POST /admin/drift verdicts route a family with severe drift to its
fallback until a new champion arrives. Rollout and fallback state live in the work dir (the rollout state, the
fallback state and the prediction log in the profile's `state_db_url` when it names one: every replica sees one
canary, one log, one fallback per family), so a restarted server resumes both (load_champions loads every version
they route to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.workspace import Workspace

log = logging.getLogger("adapterops.serve")

ENGINES = ("builtin", "vllm", "pool")


@dataclass
class EngineSpec:
    """Which engine runs the model behind the control plane.

    builtin: in process, concurrent requests batched, adapters mixed in a batch (the embedded default).
    vllm: one or more vLLM OpenAI servers (`vllm_urls`), or one started and supervised here (`vllm_launch`, from
    `vllm_python`, default the .venv-vllm that `make vllm-venv` creates). pool: the old one-request-at-a-time PEFT
    pool (greedy only), kept as a reference."""

    kind: str = "builtin"
    device: str = "cpu"
    max_loras: int = 8
    max_lora_rank: int = 64
    vllm_urls: list[str] = field(default_factory=list)
    vllm_launch: bool = False
    vllm_python: str | None = None
    vllm_timeout_s: float = 60.0

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"unknown engine {self.kind!r}; choose one of {', '.join(ENGINES)}")
        if self.kind == "vllm" and not self.vllm_urls and not self.vllm_launch:
            raise ValueError("--engine vllm needs --vllm-url URL (a running vLLM server, repeatable for replicas) or "
                             "--vllm-launch (start one here)")
        if self.kind != "vllm" and (self.vllm_urls or self.vllm_launch):
            raise ValueError(f"--vllm-url/--vllm-launch apply to --engine vllm, not {self.kind}")


def make_engine(spec: EngineSpec, base_path: Path):
    """The engine `spec` names over the base at base_path; the caller closes it (a launched vLLM stops with it)."""
    if spec.kind == "pool":
        from serving.pool import AdapterPool, PoolEngine

        return PoolEngine(AdapterPool(base_path))
    if spec.kind == "builtin":
        from serving.builtin import BuiltinEngine

        return BuiltinEngine(base_path, device=spec.device, max_loras=spec.max_loras,
                             max_lora_rank=spec.max_lora_rank)
    from serving.vllm_engine import VLLMEngine

    urls = list(spec.vllm_urls)
    server = None
    if spec.vllm_launch:
        from serving.vllm_launch import VLLMServer

        server = VLLMServer(base_path, python=spec.vllm_python, max_loras=spec.max_loras,
                            max_lora_rank=spec.max_lora_rank)
        log.warning("starting a vLLM server for %s (its log: %s); this takes a minute or more", base_path,
                    server.log_path)
        urls.append(server.start())
    try:
        engine = VLLMEngine(urls, base_path, max_lora_rank=server.max_lora_rank if server else spec.max_lora_rank,
                            timeout_s=spec.vllm_timeout_s)
    except Exception:
        if server is not None:
            server.stop()
        raise
    if server is not None:
        server.supervise()  # a vLLM that dies is started again (bounded); the engine reloads the adapters
        engine.owned_servers = [server]  # stopped by engine.close()
    return engine


def registry_callbacks(reg):
    def on_promote(family: str, version: str) -> None:
        reg.promote(family, version, actor="canary", reason="canary analysis passed at every traffic step")

    def on_rollback(family: str, version: str, reason: str) -> None:
        if reg.alias(family, "challenger") == version:
            reg.clear_challenger(family, actor="canary", reason=f"canary of v{version} rolled back: {reason}")

    return on_promote, on_rollback


def build_state(ws: Workspace, rollout_cfg, api_key: str | None, fallback_cfg=None,
                auto_canary_poll_s: float | None = None, engine=None, auto_canary_without_feedback: bool = False):
    """fallback_cfg: serving.fallback.FallbackConfig; None or `enabled: false` leaves drift verdicts unanswered.
    auto_canary_poll_s: start the canary of each new registry challenger (e.g. from a scheduled retrain); it
    promotes only with users' feedback on both arms unless auto_canary_without_feedback.
    engine: a serving.engine.Engine, or an EngineSpec (default: the built-in engine on the CPU)."""
    from monitoring.sql_log import open_prediction_log
    from serving.control import ServerState
    from serving.fallback_shared import open_fallback_policy
    from serving.rollout_shared import open_rollout_controller
    from serving.router import Router

    reg = ws.registry()
    on_promote, on_rollback = registry_callbacks(reg)
    # ws.state_db_url (the profile's state_db_url): canary state and prediction log shared by every replica
    controller = open_rollout_controller(ws.rollout_state_target, rollout_cfg, on_promote, on_rollback)
    policy = None
    if fallback_cfg is not None and fallback_cfg.enabled:
        # shared by every replica in the state database when there is one, else a file in the work dir
        policy = open_fallback_policy(fallback_cfg, ws.state_db_url or ws.root / "fallback-state.json")
    if engine is None or isinstance(engine, EngineSpec):
        engine = make_engine(engine or EngineSpec(), ws.base_path)
    return ServerState(engine=engine, router=Router(), rollout=controller,
                       log=open_prediction_log(ws.prediction_log_target), api_key=api_key, registry=reg,
                       adapter_cache=ws.root / "serving-cache", require_parity=True, fallback=policy,
                       auto_canary_poll_s=auto_canary_poll_s,
                       auto_canary_without_feedback=auto_canary_without_feedback)


def load_champions(state, ws: Workspace) -> list[str]:
    """Load every family's champion (verified download, base hash checked) and route to it; also the versions that
    a rollout in progress or an engaged fallback (from before a restart) routes to."""
    from serving.control import load_from_registry
    from serving.router import BASE

    reg = ws.registry()
    wanted: dict[str, list[str]] = {}
    for family in reg.families():
        version = reg.alias(family, "champion")
        if version is not None:
            state.router.set(family, version)
            wanted.setdefault(family, []).append(version)
    if state.rollout is not None:
        for family, ro in state.rollout.status()["rollouts"].items():
            if state.rollout.is_active(family):
                wanted.setdefault(family, []).extend([ro["champion"], ro["challenger"]])
    if state.fallback is not None:
        for family, version in state.fallback.engaged().items():
            wanted.setdefault(family, []).append(version)
    loaded = []
    for family, versions in wanted.items():
        for version in dict.fromkeys(versions):
            if version == BASE or version in state.families.get(family, {}):
                continue
            state.families.setdefault(family, {})[version] = load_from_registry(state, family, version)
            loaded.append(f"{family}@{version}")
    return loaded


def serve(ws: Workspace, host: str, port: int, api_key: str | None, rollout_cfg=None, fallback_cfg=None,
          auto_canary_poll_s: float | None = None, engine: EngineSpec | None = None,
          auto_canary_without_feedback: bool = False) -> None:
    import uvicorn

    from serving.app import create_app
    from serving.rollout import RolloutConfig

    state = build_state(ws, rollout_cfg or RolloutConfig(), api_key, fallback_cfg, auto_canary_poll_s,
                        engine=engine or EngineSpec(), auto_canary_without_feedback=auto_canary_without_feedback)
    try:
        loaded = load_champions(state, ws)
        log.warning("serving %s on http://%s:%d through the %s engine (%s)", ", ".join(loaded) or "the base model "
                    "only", host, port, state.engine.name,
                    "admin endpoints enabled" if state.api_key else "admin endpoints disabled: set ADAPTEROPS_API_KEY")
        uvicorn.run(create_app(state), host=host, port=port, log_level="warning")
    finally:
        close = getattr(state.rollout, "close", None)  # the shared controller gives its driver lease up
        if close is not None:
            close()
        close = getattr(state.fallback, "close", None)  # the shared fallback policy stops its poller
        if close is not None:
            close()
        state.engine.close()
