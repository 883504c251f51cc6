"""Prefect deployments of the adapterops flows: what runs when, with which parameters, in which work pool.

Run:  python -m infra.prefect_deployments show                      print the deployments; contacts no server
      python -m infra.prefect_deployments apply --pool adapterops   register them with $PREFECT_API_URL's server
      python -m infra.prefect_deployments serve                     run them from this process (no work pool)
      adapterops schedules serve --workdir work/demo                 the same `serve`, with a local Prefect server

Importing this module, or calling build_deployments(), talks to no Prefect server: only `apply` and `serve` do.
Deployment parameters are plain JSON (the flow's Workspace as a mapping); values come from the environment and
configs/profiles/<ADAPTEROPS_PROFILE>.yaml, read when the deployments are built, not when a run starts.

Defined here, one deployment of each flow per family (deployment name = the family):
  monitor-check/<family>        pipelines.flows.monitor_check every ADAPTEROPS_MONITOR_INTERVAL seconds (900)
  reference-ppl-check/<family>  pipelines.flows.reference_ppl every ADAPTEROPS_PPL_INTERVAL seconds (3600)
  retrain-on-drift/<family>     pipelines.flows.retrain on ADAPTEROPS_RETRAIN_CRON (02:00 UTC nightly), and on
                                every `adapterops.drift.alert` event for the family (pipelines.flows.emit_drift_event)

Each deployment allows one run at a time and cancels a run that would start while one is active
(ConcurrencyLimitConfig(limit=1, collision_strategy=CANCEL_NEW), enforced by the Prefect server when the run is
proposed as Pending). For retraining this is the coalescing rule: at most one retrain per family at a time, and
alerts or cron ticks during a retrain are absorbed by it (their runs end Cancelled, "Deployment concurrency limit
reached."), not queued; other families have their own deployments and are never blocked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "configs" / "profiles"

RETRAIN_CRON = "0 2 * * *"  # nightly, off-peak for serving; UTC so a DST change never skips or doubles a run
RETRAIN_TIMEZONE = "UTC"
MONITOR_INTERVAL_S = 900  # a 15-minute window holds >= min_window requests on a family with real traffic
PPL_INTERVAL_S = 3600
DRIFT_EVENT = "adapterops.drift.alert"  # pipelines.flows.emit_drift_event
DEFAULT_POOL = "adapterops"


def families(env: Mapping[str, str], default: str) -> list[str]:
    """ADAPTEROPS_FAMILY: one family or a comma-separated list (default: the config's family)."""
    from registry.names import validate_name

    names = [f.strip() for f in env.get("ADAPTEROPS_FAMILY", "").split(",") if f.strip()] or [default]
    return [validate_name("family", f) for f in dict.fromkeys(names)]


def _seconds(env: Mapping[str, str], var: str, default: int) -> int:
    raw = env.get(var, "") or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a whole number of seconds") from None
    if value < 1:
        raise ValueError(f"{var}={value}: a schedule interval must be at least 1 second")
    return value


def workspace_parameter(env: Mapping[str, str]) -> dict:
    """The Workspace every flow receives, as the plain mapping pipelines.workspace.Workspace.coerce accepts."""
    from pipelines.profile import load_profile

    profile = load_profile(env.get("ADAPTEROPS_PROFILE", "production"), env)
    return {"root": env.get("ADAPTEROPS_WORKDIR", "/data/work"),
            "base_path": env.get("ADAPTEROPS_BASE_DIR", "/models/base"), "tracking_uri": profile.tracking_uri,
            "init_store_uri": profile.init_store_uri, "s3_endpoint_url": profile.s3_endpoint_url}


def _config(env: Mapping[str, str]):
    from pipelines.config import CONFIG_DIR
    from pipelines.lifecycle import load_config

    return load_config(Path(env.get("ADAPTEROPS_RETRAIN_CONFIG", str(CONFIG_DIR / "demo.yaml"))))


def retrain_parameters(env: Mapping[str, str], family: str | None = None) -> dict:
    """Default parameters of a family's retrain deployment: the Workspace, configs and data windows.

    The data paths name the files the ingestion job keeps current on the shared work volume, per family: the newest
    labelled window (<data>/<family>/new/) and the data the champion was trained on (<data>/<family>/champion/, the
    replay buffer's source and the forgetting gate's old categories).
    """
    from dataclasses import asdict

    cfg = _config(env)
    family = family or families(env, cfg.family)[0]
    workdir = env.get("ADAPTEROPS_WORKDIR", "/data/work")
    data = Path(env.get("ADAPTEROPS_DATA_DIR", f"{workdir}/data")) / family
    return {
        "ws": workspace_parameter(env),
        "family": family,
        "name": None,  # scheduled runs are named after the family and their start time (pipelines.flows.retrain)
        "init_cfg": asdict(cfg.init), "train_cfg": asdict(cfg.retrain), "merge_cfg": asdict(cfg.merge),
        "new_train": str(data / "new" / "train.jsonl"), "new_val": str(data / "new" / "val.jsonl"),
        "old_train": str(data / "champion" / "train.jsonl"), "old_val": str(data / "champion" / "val.jsonl"),
        "replay_ratio": cfg.replay_ratio, "replay_strategy": cfg.replay_strategy,
        "reference_prompts": cfg.reference_prompts, "max_tokens": cfg.traffic.max_tokens, "seed": cfg.seed,
    }


def monitor_parameters(env: Mapping[str, str], family: str) -> dict:
    """Parameters of a family's monitor check: the config's drift settings and the alert webhook, if any."""
    cfg = _config(env)
    return {"ws": workspace_parameter(env), "family": family, "drift": cfg.drift.as_dict(),
            "webhook_url": env.get("ADAPTEROPS_ALERT_WEBHOOK", "")}


def build_deployments(env: Mapping[str, str] | None = None) -> list:
    """The RunnerDeployments, built offline (no API calls); `apply` or `serve` them to make them live."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from pipelines.flows import monitor_check, reference_ppl, retrain

    env = os.environ if env is None else env
    cron = env.get("ADAPTEROPS_RETRAIN_CRON", "") or RETRAIN_CRON
    try:
        Cron(cron, timezone=RETRAIN_TIMEZONE)
    except ValueError:
        raise ValueError(f"retrain cron {cron!r} (ADAPTEROPS_RETRAIN_CRON, --retrain-cron) is not a cron expression; "
                         "give 5 fields (minute hour day-of-month month day-of-week) in UTC, e.g. '0 2 * * *' nightly "
                         "or '0 2 * * 0' weekly") from None
    monitor_every = _seconds(env, "ADAPTEROPS_MONITOR_INTERVAL", MONITOR_INTERVAL_S)
    ppl_every = _seconds(env, "ADAPTEROPS_PPL_INTERVAL", PPL_INTERVAL_S)
    common = {
        # one run per deployment at a time; a run proposed while one is active is cancelled, not queued
        "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        # a module path resolves from the installed package, whatever directory the worker runs in
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    cfg = _config(env)
    out = []
    for family in families(env, cfg.family):
        drift = DeploymentEventTrigger(
            name=f"retrain-{family}-on-drift-alert",
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": f"adapterops.family.{family}"},
            # the deployment's parameters, with a run name that says which alert started it
            parameters={"name": f"drift-{family}-{{{{ event.occurred.strftime('%Y%m%dT%H%M%S') }}}}"},
        )
        out += [
            monitor_check.to_deployment(
                name=family, schedules=[Interval(monitor_every)], parameters=monitor_parameters(env, family),
                tags=["adapterops", "monitor", family],
                description=f"Drift check of {family}'s champion over the requests logged since the last check.",
                **common),
            reference_ppl.to_deployment(
                name=family, schedules=[Interval(ppl_every)],
                parameters={"ws": workspace_parameter(env), "family": family,
                            "reference_windows": cfg.merge.reference_windows,  # as the versions' gates measured
                            "webhook_url": env.get("ADAPTEROPS_ALERT_WEBHOOK", "")},
                tags=["adapterops", "monitor", family],
                description=f"Reference-text perplexity of {family}'s champion against its rolling window.",
                **common),
            retrain.to_deployment(
                name=family, schedules=[Cron(cron, timezone=RETRAIN_TIMEZONE)], triggers=[drift],
                parameters=retrain_parameters(env, family), tags=["adapterops", "retrain", family],
                description=f"Replay-buffer retraining of {family}, warm-started from the champion; the result "
                            "becomes challenger.",
                **common),
        ]
    return out


def describe(deployments) -> str:
    lines = []
    for d in deployments:
        sched = ", ".join(f"cron {s.schedule.cron} {s.schedule.timezone}" if hasattr(s.schedule, "cron")
                          else f"every {s.schedule.interval.total_seconds():g}s" for s in d.schedules or [])
        trig = ", ".join(sorted(e for t in d.triggers for e in t.expect))
        limit = f"{d.concurrency_limit} ({d.concurrency_options.collision_strategy.value})" \
            if d.concurrency_options else str(d.concurrency_limit or "-")
        lines.append(f"{d.flow_name}/{d.name}: {d.entrypoint}; schedules: {sched or '-'}; triggers: {trig or '-'}; "
                     f"concurrency: {limit}")
    return "\n".join(lines)


@contextlib.contextmanager
def local_server(home: Path, startup_timeout: float = 180.0):
    """A full Prefect server on 127.0.0.1 (a free port, its database under `home`) for as long as the block runs;
    yields its API URL.

    Prefect's temporary server (what a flow uses when PREFECT_API_URL is unset) runs no scheduler service, so
    interval and cron schedules would never fire on it; `serve` needs this one, or a server named by PREFECT_API_URL.
    """
    import socket
    import subprocess
    import time

    import httpx

    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        # its own session: a Ctrl+C in the terminal reaches only the caller, which stops the server after the flows
        # it serves have shut down (they still report to it on the way out)
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with status {proc.returncode} before it was "
                                   f"ready; see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not answer {url}/health within {startup_timeout:.0f}"
                                   f" s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(deployments: list) -> None:
    """Register the deployments with $PREFECT_API_URL's server and run their flow runs from this process until
    interrupted (SIGINT/SIGTERM); schedules are paused on the way out."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.prefect_deployments", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["show", "apply", "serve"])
    p.add_argument("--pool", default=DEFAULT_POOL, help="work pool for `apply` (default adapterops)")
    args = p.parse_args(argv)
    if args.action == "serve" and not os.environ.get("PREFECT_API_URL"):
        # Prefect's temporary server would accept the deployments but never fire their schedules
        p.error("serve needs PREFECT_API_URL (a Prefect server with its scheduler running); without one, use "
                "`adapterops schedules serve`, which starts a local server")
    deployments = build_deployments()
    if args.action == "show":
        print(describe(deployments))
    elif args.action == "apply":
        for d in deployments:
            print(f"applied {d.flow_name}/{d.name}: {d.apply(work_pool_name=args.pool)}")
    else:
        serve(deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
