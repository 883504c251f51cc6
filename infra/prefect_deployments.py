"""Prefect deployments of the adapterops flows: what runs when, with which parameters, in which work pool.

Run:  python -m infra.prefect_deployments show                      print the deployments; contacts no server
      python -m infra.prefect_deployments apply --pool adapterops   register them with $PREFECT_API_URL's server
      python -m infra.prefect_deployments serve                     run them from this process (no work pool)

Importing this module, or calling build_deployments(), talks to no Prefect server: only `apply` and `serve` do.
Deployment parameters are plain JSON (the flow's Workspace as a mapping); values come from the environment and
configs/profiles/<ADAPTEROPS_PROFILE>.yaml, read when the deployments are built, not when a run starts.

Defined here:
  retrain-nightly   pipelines.flows.retrain at 02:00 UTC, plus the same deployment triggered by the
                    `adapterops.drift.alert` event that pipelines.flows.emit_drift_event emits.
Not defined yet:
  a periodic monitor check: there is no monitor-check flow in pipelines/flows.py (only the `adapterops monitor
  check` CLI), and deployments point at flows. Add the flow there, then a deployment here with
  `interval=timedelta(minutes=15)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "configs" / "profiles"

RETRAIN_CRON = "0 2 * * *"  # nightly, off-peak for serving; UTC so a DST change never skips or doubles a run
RETRAIN_TIMEZONE = "UTC"
DRIFT_EVENT = "adapterops.drift.alert"  # pipelines.flows.emit_drift_event
DEFAULT_POOL = "adapterops"

def retrain_parameters(env: Mapping[str, str]) -> dict:
    """Default parameters of the retrain deployment: a Workspace mapping, the family, configs and data windows.

    The data paths name the files the ingestion job keeps current on the shared work volume: the newest labelled
    window (new_*) and the data the champion was trained on (old_*, the replay buffer's source).
    """
    from dataclasses import asdict

    from pipelines.config import CONFIG_DIR
    from pipelines.demo import load_config

    from pipelines.profile import load_profile

    profile = load_profile(env.get("ADAPTEROPS_PROFILE", "production"), env)
    workdir = env.get("ADAPTEROPS_WORKDIR", "/data/work")
    data = Path(env.get("ADAPTEROPS_DATA_DIR", f"{workdir}/data"))
    cfg = load_config(Path(env.get("ADAPTEROPS_RETRAIN_CONFIG", str(CONFIG_DIR / "demo.yaml"))))
    return {
        "ws": {"root": workdir, "base_path": env.get("ADAPTEROPS_BASE_DIR", "/models/base"),
               "tracking_uri": profile.tracking_uri, "init_store_uri": profile.init_store_uri,
               "s3_endpoint_url": profile.s3_endpoint_url},
        "family": env.get("ADAPTEROPS_FAMILY", cfg.family),
        "name": None,  # scheduled runs are named after their start time (pipelines.flows.retrain)
        "init_cfg": asdict(cfg.init), "train_cfg": asdict(cfg.retrain), "merge_cfg": asdict(cfg.merge),
        "new_train": str(data / "new" / "train.jsonl"), "new_val": str(data / "new" / "val.jsonl"),
        "old_train": str(data / "champion" / "train.jsonl"), "old_val": str(data / "champion" / "val.jsonl"),
        "replay_ratio": cfg.replay_ratio, "replay_strategy": cfg.replay_strategy, "seed": cfg.seed,
    }


def build_deployments(env: Mapping[str, str] | None = None) -> list:
    """The RunnerDeployments, built offline (no API calls); `apply` or `serve` them to make them live."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from pipelines.flows import retrain

    env = os.environ if env is None else env
    params = retrain_parameters(env)
    drift = DeploymentEventTrigger(
        name="retrain-on-drift-alert",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "adapterops.family.*"},
        # every alert starts a run; concurrency_limit=1 below queues repeats instead of racing them
        parameters={**params, "family": "{{ event.payload.family }}",
                    "name": "drift-{{ event.occurred.strftime('%Y%m%dT%H%M%S') }}"},
    )
    return [
        retrain.to_deployment(
            name="retrain-nightly",
            schedules=[Cron(RETRAIN_CRON, timezone=RETRAIN_TIMEZONE)],
            triggers=[drift],
            parameters=params,
            concurrency_limit=1,  # two retrains of one family would race for the challenger alias
            tags=["adapterops", "retrain"],
            description="Replay-buffer retraining warm-started from the champion; the result becomes challenger.",
            # a module path resolves from the installed package, whatever directory the worker runs in
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]


def describe(deployments) -> str:
    lines = []
    for d in deployments:
        sched = ", ".join(f"cron {s.schedule.cron} {s.schedule.timezone}" for s in d.schedules or [])
        trig = ", ".join(sorted(e for t in d.triggers for e in t.expect))
        lines.append(f"{d.flow_name}/{d.name}: {d.entrypoint}; schedules: {sched or '-'}; triggers: {trig or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.prefect_deployments", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["show", "apply", "serve"])
    p.add_argument("--pool", default=DEFAULT_POOL, help="work pool for `apply` (default adapterops)")
    args = p.parse_args(argv)
    deployments = build_deployments()
    if args.action == "show":
        print(describe(deployments))
    elif args.action == "apply":
        for d in deployments:
            print(f"applied {d.flow_name}/{d.name}: {d.apply(work_pool_name=args.pool)}")
    else:
        from prefect import serve

        serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
