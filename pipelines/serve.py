"""Stage 5, serve: an OpenAI-compatible server over a workspace's registry, with the canary wired to the registry.

Run:  adapterops serve --workdir work/demo --host 127.0.0.1 --port 8000   (ADAPTEROPS_API_KEY guards /admin)

A canary that passes promotes the challenger through the registry (champion -> previous, challenger -> champion);
one that fails clears the challenger alias, with the analysis as the reason in the audit trail. With a fallback
config (configs/fallback.yaml, `enabled: true`), POST /admin/drift verdicts route a family with severe drift to its
fallback until a new champion arrives. Rollout and fallback state live in the work dir, so a restarted server
resumes both (load_champions loads every version they route to).
"""

from __future__ import annotations

import logging

from pipelines.workspace import Workspace

log = logging.getLogger("adapterops.serve")


def registry_callbacks(reg):
    def on_promote(family: str, version: str) -> None:
        reg.promote(family, version, actor="canary", reason="canary analysis passed at every traffic step")

    def on_rollback(family: str, version: str, reason: str) -> None:
        if reg.alias(family, "challenger") == version:
            reg.clear_challenger(family, actor="canary", reason=f"canary of v{version} rolled back: {reason}")

    return on_promote, on_rollback


def build_state(ws: Workspace, rollout_cfg, api_key: str | None, fallback_cfg=None,
                auto_canary_poll_s: float | None = None):
    """fallback_cfg: serving.fallback.FallbackConfig; None or `enabled: false` leaves drift verdicts unanswered.
    auto_canary_poll_s: start the canary of each new registry challenger (e.g. from a scheduled retrain)."""
    from monitoring.store import PredictionLog
    from serving.app import ServerState
    from serving.fallback import FallbackPolicy
    from serving.pool import AdapterPool
    from serving.rollout import RolloutController
    from serving.router import Router

    reg = ws.registry()
    on_promote, on_rollback = registry_callbacks(reg)
    controller = RolloutController(ws.root / "rollout-state.json", rollout_cfg, on_promote, on_rollback)
    policy = None
    if fallback_cfg is not None and fallback_cfg.enabled:
        policy = FallbackPolicy(fallback_cfg, ws.root / "fallback-state.json")
    return ServerState(pool=AdapterPool(ws.base_path), router=Router(), rollout=controller,
                       log=PredictionLog(ws.root / "predictions.db"), api_key=api_key, registry=reg,
                       adapter_cache=ws.root / "serving-cache", require_parity=True, fallback=policy,
                       auto_canary_poll_s=auto_canary_poll_s)


def load_champions(state, ws: Workspace) -> list[str]:
    """Load every family's champion (verified download, base hash checked) and route to it; also the versions that
    a rollout in progress or an engaged fallback (from before a restart) routes to."""
    from serving.app import load_from_registry
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
          auto_canary_poll_s: float | None = None) -> None:
    import uvicorn
    from serving.app import create_app
    from serving.rollout import RolloutConfig

    state = build_state(ws, rollout_cfg or RolloutConfig(), api_key, fallback_cfg, auto_canary_poll_s)
    loaded = load_champions(state, ws)
    log.warning("serving %s on http://%s:%d (%s)", ", ".join(loaded) or "the base model only", host, port,
                "admin endpoints enabled" if api_key else "admin endpoints disabled: set ADAPTEROPS_API_KEY")
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")
