"""Stage 5, serve: an OpenAI-compatible server over a workspace's registry, with the canary wired to the registry.

Run:  adapterops serve --workdir work/demo --host 127.0.0.1 --port 8000   (ADAPTEROPS_API_KEY guards /admin)

A canary that passes promotes the challenger through the registry (champion -> previous, challenger -> champion);
one that fails clears the challenger alias, with the analysis as the reason in the audit trail.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.workspace import Workspace

log = logging.getLogger("adapterops.serve")


def registry_callbacks(reg):
    def on_promote(family: str, version: str) -> None:
        reg.promote(family, version, actor="canary", reason="canary analysis passed at every traffic step")

    def on_rollback(family: str, version: str, reason: str) -> None:
        if reg.alias(family, "challenger") == version:
            reg.clear_challenger(family, actor="canary", reason=f"canary of v{version} rolled back: {reason}")

    return on_promote, on_rollback


def build_state(ws: Workspace, rollout_cfg, api_key: str | None):
    from monitoring.store import PredictionLog
    from serving.app import ServerState
    from serving.pool import AdapterPool
    from serving.rollout import RolloutController
    from serving.router import Router

    reg = ws.registry()
    on_promote, on_rollback = registry_callbacks(reg)
    controller = RolloutController(ws.root / "rollout-state.json", rollout_cfg, on_promote, on_rollback)
    return ServerState(pool=AdapterPool(ws.base_path), router=Router(), rollout=controller,
                       log=PredictionLog(ws.root / "predictions.db"), api_key=api_key, registry=reg,
                       adapter_cache=ws.root / "serving-cache", require_parity=True)


def load_champions(state, ws: Workspace) -> list[str]:
    """Load every family's champion (verified download, base hash checked) and route to it."""
    loaded = []
    reg = ws.registry()
    for family in reg.families():
        version = reg.alias(family, "champion")
        if version is None:
            continue
        resolved = reg.resolve(f"{family}@{version}", state.adapter_cache, expected_base_sha256=state.pool.base_sha256)
        state.pool.load(f"{family}@{version}", resolved.path, base_sha256=resolved.base_sha256)
        state.families.setdefault(family, {})[version] = Path(resolved.path).resolve()
        state.router.set(family, version)
        loaded.append(f"{family}@{version}")
    return loaded


def serve(ws: Workspace, host: str, port: int, api_key: str | None, rollout_cfg=None) -> None:
    import uvicorn
    from serving.app import create_app
    from serving.rollout import RolloutConfig

    state = build_state(ws, rollout_cfg or RolloutConfig(), api_key)
    loaded = load_champions(state, ws)
    log.warning("serving %s on http://%s:%d (%s)", ", ".join(loaded) or "the base model only", host, port,
                "admin endpoints enabled" if api_key else "admin endpoints disabled: set ADAPTEROPS_API_KEY")
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")
