"""Deployment entry point for the adapterops schedules: registers (or serves) the Prefect deployments that
pipelines/schedules.py builds, with the settings of this process's environment.

Run:  python -m infra.prefect_deployments show                      print the deployments; contacts no server
      python -m infra.prefect_deployments apply --pool adapterops [--pool-concurrency N]
                                                                    create/update the work pool, register them
      python -m infra.prefect_deployments show --retrain-jitter 30  any ScheduleConfig field as a flag
      python -m infra.prefect_deployments serve                     run them from this process (no work pool)
      adapterops schedules serve --workdir work/demo                 the same `serve`, with a local Prefect server

What is deployed, when it runs and why (per family: monitor check, reference perplexity, retrain on a jittered cron
and on drift alerts; one run per deployment at a time) is documented in pipelines/schedules.py, which holds the code;
this module only reads the environment (pipelines.schedules.ScheduleConfig.from_env: ADAPTEROPS_FAMILY,
ADAPTEROPS_MONITOR_INTERVAL, ADAPTEROPS_RETRAIN_CRON, ADAPTEROPS_RETRAIN_JITTER, ADAPTEROPS_POOL_CONCURRENCY,
ADAPTEROPS_SERVER_URL, ...; the workspace from ADAPTEROPS_WORKDIR, ADAPTEROPS_BASE_DIR and
configs/profiles/<ADAPTEROPS_PROFILE>.yaml) and calls it. Importing it talks to no Prefect server and imports no
Prefect; only `apply` and `serve` contact the server, with bounded timeouts.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.schedules import (  # noqa: F401 - re-exported: the deployment API as operators and tests know it
    DEFAULT_POOL,
    DRIFT_EVENT,
    MONITOR_INTERVAL_S,
    PPL_INTERVAL_S,
    RETRAIN_CRON,
    RETRAIN_JITTER_MIN,
    RETRAIN_TIMEZONE,
    PrefectUnavailable,
    ScheduleConfig,
    _seconds,
    apply_deployments,
    build_deployments,
    describe,
    families,
    local_server,
    monitor_parameters,
    retrain_parameters,
    serve,
    workspace_parameter,
)


def main(argv: list[str] | None = None) -> int:
    from pipelines.options import Options

    p = argparse.ArgumentParser(prog="python -m infra.prefect_deployments", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["show", "apply", "serve"])
    p.add_argument("--pool", default=DEFAULT_POOL, help="work pool for `apply` (default adapterops)")
    # every ScheduleConfig field is a flag too; a flag wins over its environment variable
    opts = Options(ScheduleConfig, override=True, dest_prefix="schedule_",
                   title="schedules (pipelines.schedules.ScheduleConfig; a flag wins over its ADAPTEROPS_* variable)",
                   flags={"families": ("--family",), "retrain_config": ("--config",)},
                   helps={"pool_concurrency": "`apply`: the work pool runs at most N flow runs at once, all families "
                                              "together (default $ADAPTEROPS_POOL_CONCURRENCY; unset: the pool's own "
                                              "setting, unlimited when `apply` creates it)"})
    opts.add_to(p)
    args = p.parse_args(argv)
    if args.action == "serve" and not os.environ.get("PREFECT_API_URL"):
        # Prefect's temporary server would accept the deployments but never fire their schedules
        p.error("serve needs PREFECT_API_URL (a Prefect server with its scheduler running); without one, use "
                "`adapterops schedules serve`, which starts a local server")
    try:
        schedule = opts.build(args, base=ScheduleConfig.from_env(os.environ))
        deployments = build_deployments(os.environ, schedule)
        if args.action == "show":
            print(describe(deployments, schedule))
        elif args.action == "apply":
            print("\n".join(apply_deployments(deployments, args.pool, schedule.pool_concurrency)))
        else:
            serve(deployments)
    except (ValueError, PrefectUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
