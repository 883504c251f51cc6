"""The schedules of the flows: Prefect deployments of pipelines/flows.py per family, built from a ScheduleConfig.

Part of the flow layer (ARCHITECTURE.md): with pipelines/flows.py the only module of pipelines/ that imports Prefect,
always inside a function, so importing this module (and the CLI, and infra/prefect_deployments.py over it) pulls in
no Prefect. Used by `adapterops schedules serve` and by the deployment entry point `python -m infra.prefect_deployments
show|apply|serve`. Building the deployments talks to no server; only apply_deployments() and serve() do, each call
with a bounded timeout and an error that names the Prefect server.

Per family (the deployment's name is the family):
  monitor-check/<family>        pipelines.flows.monitor_check every `monitor_interval` seconds (900); its verdicts go
                                to the model server at `server_url` (POST /admin/drift), when one is configured
  reference-ppl-check/<family>  pipelines.flows.reference_ppl every `ppl_interval` seconds (3600)
  retrain-on-drift/<family>     pipelines.flows.retrain on `retrain_cron` (02:00 UTC nightly) shifted by the family's
                                jitter (a fixed offset within `retrain_jitter` minutes, from a hash of its name, so a
                                fleet's retrains do not all start at once), and on every `adapterops.drift.alert`
                                event of the family (pipelines.flows.emit_drift_event)

Each deployment allows one run at a time and cancels a run that would start while one is active
(ConcurrencyLimitConfig(limit=1, collision_strategy=CANCEL_NEW), enforced by the Prefect server when the run is
proposed as Pending): at most one retrain per family, alerts during it absorbed, other families never blocked. The
work pool's own limit (`pool_concurrency`, set by `apply`) bounds the runs of all families together.

Run:  python -c "from pipelines.schedules import jitter_minutes; print(jitter_minutes('support-assistant', 60))"
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import CONFIG_DIR

RETRAIN_CRON = "0 2 * * *"  # nightly, off-peak for serving; UTC so a DST change never skips or doubles a run
RETRAIN_TIMEZONE = "UTC"
RETRAIN_JITTER_MIN = 60  # 100 families spread over an hour: ~2 retrains start in any one minute, not 100
MONITOR_INTERVAL_S = 900  # a 15-minute window holds >= min_window requests on a family with real traffic
PPL_INTERVAL_S = 3600
DRIFT_EVENT = "adapterops.drift.alert"  # pipelines.flows.emit_drift_event
DEFAULT_POOL = "adapterops"
PREFECT_TIMEOUT_S = 30.0  # each Prefect API request (a healthy server answers in well under a second)
PREFECT_RETRIES = 2  # Prefect's client default is 5 with exponential back-off: over a minute before a dead server


class PrefectUnavailable(RuntimeError):
    """The Prefect server did not answer (or refused a request); the message says which URL and what to do."""


def _env(name: str) -> dict:
    return {"env": name}


@dataclass
class ScheduleConfig:
    """What runs when: the schedule settings of every family's deployments. Each field also comes from the
    environment variable in its metadata (from_env), which is how the worker's `apply` receives them."""

    families: list[str] = field(default_factory=list, metadata=_env("ADAPTEROPS_FAMILY"))
    """Family to monitor and retrain, one deployment of each flow per family; default: the lifecycle config's family."""
    monitor_interval: int = field(default=MONITOR_INTERVAL_S, metadata=_env("ADAPTEROPS_MONITOR_INTERVAL"))
    """Seconds between drift checks (default 900)."""
    ppl_interval: int = field(default=PPL_INTERVAL_S, metadata=_env("ADAPTEROPS_PPL_INTERVAL"))
    """Seconds between reference-perplexity checks (default 3600)."""
    retrain_cron: str = field(default=RETRAIN_CRON, metadata=_env("ADAPTEROPS_RETRAIN_CRON"))
    """Retraining schedule, cron in UTC (default '0 2 * * *' nightly; '0 2 * * 0' weekly), shifted per family by the
    jitter."""
    retrain_jitter: int = field(default=RETRAIN_JITTER_MIN, metadata=_env("ADAPTEROPS_RETRAIN_JITTER"))
    """Minutes: each family's retrain starts at a fixed offset in [0, N) after the cron's time, from a hash of its
    name, so a fleet's retrains do not all start together (default 60; 0: all at the cron's time)."""
    retrain_config: str = field(default=str(CONFIG_DIR / "demo.yaml"), metadata=_env("ADAPTEROPS_RETRAIN_CONFIG"))
    """Lifecycle YAML with the retrain, merge and drift settings (default configs/demo.yaml)."""
    data_dir: str = field(default="", metadata=_env("ADAPTEROPS_DATA_DIR"))
    """Retraining data, <dir>/<family>/{new,champion}/{train,val}.jsonl (default WORKDIR/data)."""
    alert_webhook: str = field(default="", metadata=_env("ADAPTEROPS_ALERT_WEBHOOK"))
    """URL that drift and perplexity alerts are POSTed to, besides the log and WORKDIR/alerts.jsonl (default: none)."""
    server_url: str = field(default="", metadata=_env("ADAPTEROPS_SERVER_URL"))
    """The model server the monitor's verdicts go to (POST /admin/drift: its fallback policy); default: none here,
    so the monitor run reads $ADAPTEROPS_SERVER_URL where it runs."""
    pool_concurrency: int | None = field(default=None, metadata=_env("ADAPTEROPS_POOL_CONCURRENCY"))
    """Most flow runs the work pool runs at once, all families together (set on the pool by `apply`; default: the
    pool's own setting, unlimited when `apply` creates it)."""

    def __post_init__(self) -> None:
        from registry.names import validate_name

        self.families = [validate_name("family", f) for f in dict.fromkeys(f.strip() for f in self.families)]
        for name in ("monitor_interval", "ppl_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 second, got {getattr(self, name)}")
        if not 0 <= self.retrain_jitter <= 1440:
            raise ValueError(f"retrain_jitter is a window in minutes and must be in [0, 1440], got "
                             f"{self.retrain_jitter}")
        if self.pool_concurrency is not None and self.pool_concurrency < 1:
            raise ValueError(f"pool_concurrency must be at least 1 run (or unset), got {self.pool_concurrency}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ScheduleConfig:
        """The fields named by their environment variables; unset or empty ones keep their defaults."""
        values: dict = {}
        for f in dataclasses.fields(cls):
            var = f.metadata["env"]
            raw = env.get(var, "").strip()
            if not raw:
                continue
            if f.name == "families":
                values[f.name] = [x for x in raw.split(",") if x.strip()]
            elif f.name in ("monitor_interval", "ppl_interval"):
                values[f.name] = _seconds(env, var, f.default)
            elif f.name in ("retrain_jitter", "pool_concurrency"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not a whole number") from None
            else:
                values[f.name] = raw
        try:
            return cls(**values)
        except ValueError as e:
            given = ", ".join(f.metadata["env"] for f in dataclasses.fields(cls) if f.name in values)
            raise ValueError(f"{e} (settings from the environment: {given or 'none'})") from None


def families(env: Mapping[str, str], default: str) -> list[str]:
    """ADAPTEROPS_FAMILY: one family or a comma-separated list (default: the config's family)."""
    names = [f for f in env.get("ADAPTEROPS_FAMILY", "").split(",") if f.strip()] or [default]
    return ScheduleConfig(families=names).families


def _seconds(env: Mapping[str, str], var: str, default: int) -> int:
    raw = env.get(var, "") or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a whole number of seconds") from None
    if value < 1:
        raise ValueError(f"{var}={value}: a schedule interval must be at least 1 second")
    return value


# -- cron jitter -------------------------------------------------------------------------------------------------

def jitter_minutes(family: str, window: int) -> int:
    """The family's fixed offset in [0, window) minutes: sha256 of its name (not Python's salted hash()), so every
    process, every `apply` and every restart gives the family the same time. 0 when window is 0."""
    if window <= 0:
        return 0
    return int.from_bytes(hashlib.sha256(family.encode()).digest()[:8], "big") % window


def jittered_cron(cron: str, family: str, window: int) -> tuple[str, int]:
    """(cron shifted by the family's offset, the offset in minutes). The minute must be one number; with one
    number for the hour as well the offset may pass into later hours (a time past midnight wraps to the start of the
    same day, so a weekly cron keeps its day); with an hour pattern ('*', '*/6', '1,13') only the minute moves, by an
    offset within the hour."""
    fields = cron.split()
    if window <= 0 or len(fields) != 5:
        return cron, 0
    minute, hour = fields[0], fields[1]
    if not minute.isdigit():
        raise ValueError(f"retrain cron {cron!r}: the jitter shifts the minute, which must be one number (e.g. "
                         "'0 2 * * *'); set the jitter window to 0 (ADAPTEROPS_RETRAIN_JITTER, --retrain-jitter) to "
                         "keep this cron as it is")
    if hour.isdigit():
        offset = jitter_minutes(family, window)
        total = (int(hour) * 60 + int(minute) + offset) % 1440
        fields[0], fields[1] = str(total % 60), str(total // 60)
    else:
        offset = jitter_minutes(family, min(window, 60))
        fields[0] = str((int(minute) + offset) % 60)
    return " ".join(fields), offset


# -- deployment parameters ---------------------------------------------------------------------------------------

def workspace_parameter(env: Mapping[str, str]) -> dict:
    """The Workspace every flow receives, as the plain mapping pipelines.workspace.Workspace.coerce accepts."""
    from pipelines.profile import load_profile

    profile = load_profile(env.get("ADAPTEROPS_PROFILE", "production"), env)
    return {"root": env.get("ADAPTEROPS_WORKDIR", "/data/work"),
            "base_path": env.get("ADAPTEROPS_BASE_DIR", "/models/base"), "tracking_uri": profile.tracking_uri,
            "init_store_uri": profile.init_store_uri, "s3_endpoint_url": profile.s3_endpoint_url}


def _lifecycle(schedule: ScheduleConfig):
    from pipelines.lifecycle import load_config

    return load_config(Path(schedule.retrain_config))


def retrain_parameters(env: Mapping[str, str], family: str | None = None,
                       schedule: ScheduleConfig | None = None) -> dict:
    """Default parameters of a family's retrain deployment: the Workspace, configs and data windows.

    The data paths name the files the ingestion job keeps current on the shared work volume, per family: the newest
    labelled window (<data>/<family>/new/) and the data the champion was trained on (<data>/<family>/champion/, the
    replay buffer's source and the forgetting gate's old categories); with `data_dir` the flow prefers the current
    champion's own record (<data>/<family>/versions/<v>/, written by `adapterops build` and earlier retrains).
    """
    from dataclasses import asdict

    schedule = schedule or ScheduleConfig.from_env(env)
    cfg = _lifecycle(schedule)
    family = family or (schedule.families or [cfg.family])[0]
    workdir = env.get("ADAPTEROPS_WORKDIR", "/data/work")
    root = Path(schedule.data_dir or f"{workdir}/data")
    data = root / family
    return {
        "ws": workspace_parameter(env),
        "family": family,
        "name": None,  # scheduled runs are named after the family and their start time (pipelines.flows.retrain)
        "init_cfg": asdict(cfg.init), "train_cfg": asdict(cfg.retrain), "merge_cfg": asdict(cfg.merge),
        "new_train": str(data / "new" / "train.jsonl"), "new_val": str(data / "new" / "val.jsonl"),
        "old_train": str(data / "champion" / "train.jsonl"), "old_val": str(data / "champion" / "val.jsonl"),
        "replay_ratio": cfg.replay_ratio, "replay_strategy": cfg.replay_strategy,
        "reference_prompts": cfg.reference_prompts, "seed": cfg.seed,
        # the <data> root: the retrain replays what the current champion was trained on (<data>/<family>/versions/)
        "data_dir": str(root),
        # the demo's config says how long its responses are; a production LifecycleConfig leaves the flow's default
        **({"max_tokens": cfg.traffic.max_tokens} if hasattr(cfg, "traffic") else {}),
    }


def monitor_parameters(env: Mapping[str, str], family: str, schedule: ScheduleConfig | None = None) -> dict:
    """Parameters of a family's monitor check: the config's drift settings, the alert webhook and the model server
    its verdicts go to (None: the run reads $ADAPTEROPS_SERVER_URL where it runs)."""
    schedule = schedule or ScheduleConfig.from_env(env)
    cfg = _lifecycle(schedule)
    return {"ws": workspace_parameter(env), "family": family, "drift": cfg.drift.as_dict(),
            "webhook_url": schedule.alert_webhook, "server_url": schedule.server_url or None}


# -- deployments -------------------------------------------------------------------------------------------------

def _check_cron(cron: str) -> None:
    from prefect.schedules import Cron

    try:
        Cron(cron, timezone=RETRAIN_TIMEZONE)
    except ValueError:
        raise ValueError(f"retrain cron {cron!r} (ADAPTEROPS_RETRAIN_CRON, --retrain-cron) is not a cron expression; "
                         "give 5 fields (minute hour day-of-month month day-of-week) in UTC, e.g. '0 2 * * *' nightly "
                         "or '0 2 * * 0' weekly") from None


def build_deployments(env: Mapping[str, str] | None = None, schedule: ScheduleConfig | None = None) -> list:
    """The RunnerDeployments, built offline (no API calls); apply_deployments() or serve() make them live.
    `env` gives the workspace (ADAPTEROPS_WORKDIR, _BASE_DIR, _PROFILE) and, without `schedule`, the schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from pipelines.flows import monitor_check, reference_ppl, retrain

    env = os.environ if env is None else env
    schedule = schedule or ScheduleConfig.from_env(env)
    _check_cron(schedule.retrain_cron)
    common = {
        # one run per deployment at a time; a run proposed while one is active is cancelled, not queued
        "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        # a module path resolves from the installed package, whatever directory the worker runs in
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    cfg = _lifecycle(schedule)
    ws = workspace_parameter(env)
    out = []
    for family in schedule.families or families({}, cfg.family):
        cron, offset = jittered_cron(schedule.retrain_cron, family, schedule.retrain_jitter)
        drift = DeploymentEventTrigger(
            name=f"retrain-{family}-on-drift-alert",
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": f"adapterops.family.{family}"},
            # the deployment's parameters, with a run name that says which alert started it
            parameters={"name": f"drift-{family}-{{{{ event.occurred.strftime('%Y%m%dT%H%M%S') }}}}"},
        )
        out += [
            monitor_check.to_deployment(
                name=family, schedules=[Interval(schedule.monitor_interval)],
                parameters=monitor_parameters(env, family, schedule), tags=["adapterops", "monitor", family],
                description=f"Drift check of {family}'s champion over the requests logged since the last check.",
                **common),
            reference_ppl.to_deployment(
                name=family, schedules=[Interval(schedule.ppl_interval)],
                parameters={"ws": ws, "family": family,
                            "reference_windows": cfg.merge.reference_windows,  # as the versions' gates measured
                            "webhook_url": schedule.alert_webhook},
                tags=["adapterops", "monitor", family],
                description=f"Reference-text perplexity of {family}'s champion against its rolling window.",
                **common),
            retrain.to_deployment(
                name=family, schedules=[Cron(cron, timezone=RETRAIN_TIMEZONE)], triggers=[drift],
                parameters=retrain_parameters(env, family, schedule), tags=["adapterops", "retrain", family],
                description=f"Replay-buffer retraining of {family}, warm-started from the champion; the result "
                            f"becomes challenger. Cron {schedule.retrain_cron!r} + {offset} min jitter "
                            f"(window {schedule.retrain_jitter} min).",
                **common),
        ]
    return out


def describe(deployments, schedule: ScheduleConfig | None = None) -> str:
    """One line per deployment: entry point, schedules, triggers, concurrency (and, given the schedule, the retrain
    cron's per-family jitter)."""
    lines = []
    for d in deployments:
        sched = ", ".join(f"cron {s.schedule.cron} {s.schedule.timezone}" if hasattr(s.schedule, "cron")
                          else f"every {s.schedule.interval.total_seconds():g}s" for s in d.schedules or [])
        if schedule is not None and d.flow_name == "retrain-on-drift":
            _, offset = jittered_cron(schedule.retrain_cron, d.name, schedule.retrain_jitter)
            sched += f" (jitter +{offset} min of {schedule.retrain_cron!r}, window {schedule.retrain_jitter} min)"
        trig = ", ".join(sorted(e for t in d.triggers for e in t.expect))
        limit = f"{d.concurrency_limit} ({d.concurrency_options.collision_strategy.value})" \
            if d.concurrency_options else str(d.concurrency_limit or "-")
        lines.append(f"{d.flow_name}/{d.name}: {d.entrypoint}; schedules: {sched or '-'}; triggers: {trig or '-'}; "
                     f"concurrency: {limit}")
    return "\n".join(lines)


# -- talking to the Prefect server -------------------------------------------------------------------------------

def api_url() -> str:
    """The Prefect API this process talks to ($PREFECT_API_URL or Prefect's settings); empty: none configured."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or ""


def check_server(url: str, timeout: float = 10.0) -> None:
    """PrefectUnavailable unless the Prefect server at `url` answers /health within `timeout` seconds."""
    import httpx

    try:
        ok = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
        why = "it answered /health with an error"
    except httpx.HTTPError as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise PrefectUnavailable(f"the Prefect server at {url} is not answering ({why}); start it (the compose "
                                 "service prefect-server, or `prefect server start`) or point PREFECT_API_URL at "
                                 "a running one")


@contextlib.contextmanager
def bounded_client_settings(timeout: float = PREFECT_TIMEOUT_S, retries: int = PREFECT_RETRIES):
    """Prefect client calls inside the block wait at most `timeout` s per request with at most `retries` retries
    (Prefect's defaults, 60 s and 5 retries with back-off, keep a caller waiting minutes on a dead server); an
    HTTP failure leaves as PrefectUnavailable naming the server."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    url = api_url()
    settings = {PREFECT_API_REQUEST_TIMEOUT: min(timeout, PREFECT_API_REQUEST_TIMEOUT.value()),
                PREFECT_CLIENT_MAX_RETRIES: min(retries, PREFECT_CLIENT_MAX_RETRIES.value())}
    try:
        with temporary_settings(updates=settings):
            yield
    except (httpx.HTTPError, PrefectHTTPStatusError) as e:
        raise PrefectUnavailable(f"the Prefect server at {url or '(Prefect temporary server)'} failed a request "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check that it is up and "
                                 "PREFECT_API_URL names it, then run the command again") from None


def ensure_work_pool(name: str, concurrency_limit: int | None = None) -> dict:
    """The process work pool `name`, created if missing; with `concurrency_limit`, set to run at most that many
    flow runs at once (Prefect's WorkPool.concurrency_limit, enforced by the server). Returns what was done."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with bounded_client_settings(), get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            from prefect.workers.process import ProcessWorker

            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", concurrency_limit=concurrency_limit,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return {"pool": name, "action": "created", "concurrency_limit": concurrency_limit}
        if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
            return {"pool": name, "action": "updated", "concurrency_limit": concurrency_limit,
                    "was": pool.concurrency_limit}
        return {"pool": name, "action": "unchanged", "concurrency_limit": pool.concurrency_limit}


def apply_deployments(deployments: list, pool: str, concurrency_limit: int | None = None) -> list[str]:
    """Register the deployments into work pool `pool` (created or updated first: ensure_work_pool); one line each."""
    url = api_url()
    if url:
        check_server(url)
    done = ensure_work_pool(pool, concurrency_limit)
    lines = [f"work pool {pool}: {done['action']}, concurrency limit {done['concurrency_limit'] or 'none'}"]
    with bounded_client_settings():
        for d in deployments:
            lines.append(f"applied {d.flow_name}/{d.name}: {d.apply(work_pool_name=pool)}")
    return lines


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
                raise PrefectUnavailable(f"the local Prefect server exited with status {proc.returncode} before it "
                                         f"was ready; see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PrefectUnavailable(f"the local Prefect server did not answer {url}/health within "
                                         f"{startup_timeout:.0f} s; see {log_path}")
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
    interrupted (SIGINT/SIGTERM); schedules are paused on the way out.

    The server is checked first (check_server: 10 s), so a dead one fails at once, by name. The runner itself keeps
    Prefect's own bounds (60 s per request, 5 retries with back-off): it and the flow runs it starts (which inherit
    its settings) must ride out a busy server, where the tighter bounds of bounded_client_settings() would fail
    runs that a slow answer only delays."""
    from prefect import serve as prefect_serve

    url = api_url()
    if url:
        check_server(url)
    prefect_serve(*deployments)
