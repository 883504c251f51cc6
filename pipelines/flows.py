"""The Prefect layer: with pipelines/schedules.py (their deployments) and infra/, the only code that imports Prefect
(tests/unit/test_import_rules.py). Tasks wrap the plain stage functions; flows order, retry, cache and schedule them,
and hold no logic of their own (the demo's pieces are in pipelines/demo.py, the monitor's in pipelines/monitor_jobs.py).

Every stage runs without Prefect (pipelines.<stage>.run); here Prefect adds run tracking, retries where a retry can
help (registry calls), and events. Flow parameters are plain values (paths, dicts) so runs show up readably in the UI.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pipelines import init_cache, merge_quantize, reference, register, replay, train
from pipelines.config import from_dict
from pipelines.data import champion_training_data, read_jsonl, record_version_data, write_jsonl
from pipelines.workspace import Workspace


def _log():
    try:
        return get_run_logger().info
    except Exception:  # outside a run context (a stage called directly)
        return logging.getLogger("adapterops").info


@task(cache_policy=NO_CACHE)
def warm_init_cache(ws: Workspace, cfg: init_cache.InitConfig) -> init_cache.InitResult:
    return init_cache.run(cfg, ws.base_path, ws.init_store(), ws.root / "init-local", log=_log())


@task(cache_policy=NO_CACHE)
def train_adapter(ws: Workspace, cfg: train.TrainConfig, entry: Path, train_data: Path, val_data: Path, out: Path,
                  parent: Path | None = None) -> Path:
    return train.run(cfg, ws.base_path, entry, train_data, val_data, out, parent=parent, log=_log())


@task(cache_policy=NO_CACHE)
def merge_and_gate(ws: Workspace, cfg: merge_quantize.MergeConfig, adapter: Path, val_data: Path, out: Path,
                   old_val_data: Path | None = None, champion_adapter: Path | None = None) -> Path:
    return merge_quantize.run(cfg, ws.base_path, adapter, val_data, out, old_val_data=old_val_data,
                              champion_adapter=champion_adapter, log=_log())


@task(cache_policy=NO_CACHE)
def capture_reference(ws: Workspace, key: str, adapter: Path, train_data: Path, val_data: Path, out: Path,
                      n_prompts: int, max_tokens: int) -> Path:
    return reference.run(ws.reference_pool(), key, adapter, train_data, val_data, out, n_prompts=n_prompts,
                         max_tokens=max_tokens, log=_log())


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_version(ws: Workspace, family: str, train_dir: Path, merge_dir: Path, monitoring_dir: Path,
                     parent_version: str | None) -> dict:
    info = register.run(ws.registry(), family, train_dir, merge_dir, monitoring_dir, parent_version, log=_log())
    return {"family": info.family, "version": info.version, "run_id": info.run_id}


@flow(name="build-adapter-version", validate_parameters=False)
def build_version(ws: Workspace, family: str, name: str, init_cfg: dict, train_cfg: dict, merge_cfg: dict,
                  train_data: Path, val_data: Path, reference_prompts: int = 200, max_tokens: int = 16,
                  parent_dir: Path | None = None, parent_version: str | None = None,
                  old_val_data: Path | None = None) -> dict:
    """init cache -> train -> merge + quantize + gates -> monitoring reference -> register. Returns a summary."""
    icfg = from_dict(init_cache.InitConfig, init_cfg, "init")
    tcfg = from_dict(train.TrainConfig, train_cfg, "train")
    mcfg = from_dict(merge_quantize.MergeConfig, merge_cfg, "merge")
    init = warm_init_cache(ws, icfg)
    run_dir = ws.root / "runs" / name
    adapter_dir = train_adapter(ws, tcfg, init.path, train_data, val_data, run_dir / "train", parent=parent_dir)
    champion_adapter = (parent_dir / "adapter") if (parent_dir and old_val_data) else None
    merged = merge_and_gate(ws, mcfg, adapter_dir / "adapter", val_data, run_dir / "merged",
                            old_val_data=old_val_data, champion_adapter=champion_adapter)
    ref = capture_reference(ws, f"{family}@{name}", adapter_dir / "adapter", train_data, val_data,
                            run_dir / "monitoring", reference_prompts, max_tokens)
    info = register_version(ws, family, adapter_dir, merged, ref, parent_version)
    return {**info, "init_key": init.key, "init_hit": init.hit, "run_dir": str(run_dir),
            "adapter_path": str(adapter_dir / "adapter"), "train_dir": str(adapter_dir),
            "gates_report": str(merged / "gates.md"), "gates_passed": True, "method": icfg.method}


@task(cache_policy=NO_CACHE)
def build_retrain_dataset(ws: Workspace, new_data: Path, old_data: Path, ratio: float, strategy: str, seed: int,
                          out: Path) -> Path:
    mixed = replay.mix(read_jsonl(new_data), read_jsonl(old_data), ratio=ratio, strategy=strategy, seed=seed)
    return write_jsonl(mixed, out)


def emit_drift_event(family: str, result: dict, version: str | None = None) -> None:
    """The `adapterops.drift.alert` Prefect event on resource `adapterops.family.<family>`: the retrain
    deployments' trigger (infra/prefect_deployments.py)."""
    emit_event(event="adapterops.drift.alert", resource={"prefect.resource.id": f"adapterops.family.{family}"},
               payload={"family": family, "version": version, "status": result.get("status"),
                        "reason": result.get("reason")})


@flow(name="retrain-on-drift", validate_parameters=False)
def retrain(ws: Workspace, family: str, name: str | None, init_cfg: dict, train_cfg: dict, merge_cfg: dict,
            new_train: Path, new_val: Path, old_train: Path, old_val: Path, replay_ratio: float = 0.2,
            replay_strategy: str = "category_balanced", reference_prompts: int = 200, max_tokens: int = 16,
            seed: int = 0, skip_if_challenger_pending: bool = True, data_dir: str | None = None) -> dict:
    """Incremental retraining: new data + a replay buffer of old data, warm-started from the champion.

    data_dir (the <data> root of infra/README.md's layout): the old data is what the *current* champion was trained
    on, <data>/<family>/versions/<champion>/, when that was recorded (by `adapterops build` or an earlier retrain;
    old_* otherwise), and the new version's training data (the mix) and val data (the champion's + the new) are
    recorded there in turn, so a challenger the canary promotes later is replayed by the retrain after it.

    The same gates run, plus a forgetting gate on the old categories; the result is registered and becomes the
    challenger (the canary decides whether it becomes champion). `ws` may be the plain dict a deployment run passes;
    `name` None (scheduled runs) names the run after the family and the time it starts.

    While a challenger retrained from the current champion awaits its canary, another retrain is skipped (returns
    {"skipped": True, "reason": ...}): the drift that keeps alerting against the old champion is what that challenger
    was trained for, and retraining again would replace it before it was ever judged. skip_if_challenger_pending=False
    retrains anyway.
    """
    import time

    ws = Workspace.coerce(ws)
    new_train, new_val, old_train, old_val = map(Path, (new_train, new_val, old_train, old_val))
    missing = [f"{k}={p}" for k, p in (("new_train", new_train), ("new_val", new_val), ("old_train", old_train),
                                       ("old_val", old_val)) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"retrain of {family}: missing data {', '.join(missing)}; new_* is the newest labelled "
                                "window, old_* the champion's training data (see infra/README.md, \"Data\")")
    name = name or time.strftime(f"retrain-{family}-%Y%m%dT%H%M%S", time.gmtime())
    reg = ws.registry()
    champion = reg.alias(family, "champion")
    if champion is None:
        raise RuntimeError(f"{family} has no champion to warm-start from; build and promote a first version")
    challenger = register.pending_challenger(reg, family, champion) if skip_if_challenger_pending else None
    if challenger is not None:
        reason = (f"skipped: challenger v{challenger}, retrained from champion v{champion}, awaits its canary "
                  f"(`adapterops rollout start`); its outcome decides what the next retrain starts from")
        _log()(f"retrain {family}: {reason}")
        return {"family": family, "skipped": True, "reason": reason, "challenger": challenger,
                "parent_version": champion}
    family_dir = Path(data_dir) / family if data_dir else None
    if family_dir is not None:
        old_train, old_val, where = champion_training_data(family_dir, champion, old_train, old_val)
        _log()(f"retrain {family}: replaying champion v{champion}'s data from {where}")
    parent_dir = ws.fetch_version(family, champion)
    data = build_retrain_dataset(ws, new_train, old_train, replay_ratio, replay_strategy, seed,
                                 ws.root / "data" / f"retrain-{name}.jsonl")
    summary = build_version(ws, family, name, init_cfg, train_cfg, merge_cfg, data, new_val, reference_prompts,
                            max_tokens, parent_dir=parent_dir, parent_version=champion, old_val_data=old_val)
    if family_dir is not None:  # val: the champion's and the new window's, so the next old-categories gate sees both
        val_all = write_jsonl(read_jsonl(old_val) + read_jsonl(new_val), ws.root / "data" / f"retrain-{name}-val.jsonl")
        summary["version_data"] = str(record_version_data(family_dir, summary["version"], data, val_all))
    reg.set_challenger(family, summary["version"], actor="retrain-flow", reason=f"retrained after drift ({name})")
    return {**summary, "parent_version": champion, "replay_ratio": replay_ratio}


PREDICTION_LOG = "predictions.db"  # under the work dir (local profile); Workspace.prediction_log_target


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def fetch_reference(ws: Workspace, family: str, version: str) -> Path:
    """The version's monitoring reference (reference.jsonl + train_index.npy), downloaded and hash-verified."""
    return ws.registry().download(family, version, "monitoring", ws.root / "downloads")


@task(cache_policy=NO_CACHE)
def drift_check(reference_dir: Path, rows: list[dict], drift_cfg: dict, report: Path,
                log_path: Path | None = None) -> dict:
    """pipelines.monitor_jobs.check_window on a window read from the prediction log at `log_path`: the rows' stored
    embeddings are reused, the missing ones embedded once and written back there."""
    from monitoring.drift import DriftConfig
    from monitoring.embeddings import load_encoder
    from monitoring.sql_log import open_prediction_log
    from pipelines.monitor_jobs import check_window

    cfg = from_dict(DriftConfig, drift_cfg, "drift")
    encoder = load_encoder() if any(r.get("embedding") is None for r in rows) else None
    if log_path is None or ("://" not in str(log_path) and not Path(log_path).is_file()):
        return check_window(reference_dir, rows, cfg, encoder, report)
    log = open_prediction_log(log_path)  # the file, or the database the serving replicas share
    try:
        return check_window(reference_dir, rows, cfg, encoder, report, log=log)
    finally:
        log.close()


def alert_sinks(ws: Workspace, webhook_url: str = "") -> list:
    """Where scheduled monitors send alerts: the log, <workdir>/alerts.jsonl and, if configured, a webhook."""
    from monitoring.alerts import JsonFileSink, LogSink, WebhookSink

    return [LogSink(), JsonFileSink(ws.root / "alerts.jsonl")] + ([WebhookSink(webhook_url)] if webhook_url else [])


@task(cache_policy=NO_CACHE)
def send_drift_alert(ws: Workspace, family: str, version: str, result: dict, details: dict,
                     webhook_url: str = "") -> list[str]:
    """Alert to alert_sinks(), then the Prefect event that triggers the family's retrain deployment. Returns the
    sinks that failed (a dead webhook does not stop the event)."""
    from monitoring.alerts import Alert, dispatch

    alert = Alert(family=family, monitor="drift", severity="warning", message=result["reason"],
                  details={"version": version, "tests": result["tests"], **details})
    errors = dispatch(alert, alert_sinks(ws, webhook_url))
    emit_drift_event(family, result, version)
    return errors


def report_verdict_to_server(server_url: str, family: str, version: str, result: dict,
                             api_key: str | None = None) -> dict:
    """Send one window's verdict to the model server's fallback policy (POST /admin/drift), so that a severe drift
    engages the fallback without anyone calling it by hand, and an "ok" window resets the policy's streak. Returns
    {"sent": True, "decision": ...} or {"sent": False, "error": ...}: a server that is down never fails the monitor."""
    from serving.client import AdminAPIError, AdminClient

    key = api_key if api_key is not None else os.environ.get("ADAPTEROPS_API_KEY")
    try:
        with AdminClient(server_url, key) as client:
            answer = client.report_drift(family, result, version=version)
    except (AdminAPIError, OSError, ValueError) as e:
        return {"sent": False, "error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 - httpx transport errors and the like: the monitor's verdict stands
        return {"sent": False, "error": f"{type(e).__name__}: {e}"}
    return {"sent": True, "decision": answer.get("decision"), "error": answer.get("error")}


@flow(name="monitor-check", validate_parameters=False)
def monitor_check(ws: Workspace, family: str, drift: dict | None = None, max_window: int = 500,
                  webhook_url: str = "", server_url: str | None = None) -> dict:
    """One scheduled drift check of `family`'s champion: the requests logged since the previous check against the
    champion's monitoring reference (KS, embedding similarity and the novelty tail count, Holm;
    pipelines.monitor_jobs.check_window). Prompt embeddings stored in the prediction log are reused; the missing ones
    are embedded once and written back.

    A window below `drift.min_window` requests is "insufficient_data": no alert, and it stays open (the next check
    sees these requests plus newer ones). A larger one is tested on its newest `max_window` requests and closed. An
    alert (drift in `drift.consecutive` windows in a row) goes to the log, <workdir>/alerts.jsonl, the webhook and
    the `adapterops.drift.alert` event, which starts the family's retrain deployment. Every tested verdict also goes
    to the model server at `server_url` (None: $ADAPTEROPS_SERVER_URL; empty: nowhere), whose fallback policy
    engages the fallback once the drift is severe (serving/fallback.py) and resets its streak on an "ok" window.
    """
    from monitoring.drift import DriftConfig

    from pipelines.monitor_jobs import advance_streak, read_monitor_state, read_window, write_monitor_state

    ws = Workspace.coerce(ws)
    log = _log()
    cfg = from_dict(DriftConfig, drift or {}, "drift")
    if max_window < cfg.min_window:
        raise ValueError(f"max_window={max_window} is below drift.min_window={cfg.min_window}: no window could "
                         "ever be tested; raise max_window")
    reg = ws.registry()
    # a scheduled family that has no version yet (its first build has not run) is nothing to monitor, not an error
    version = reg.alias(family, "champion") if family in reg.families() else None
    out = {"family": family, "version": version, "drift": False, "alert": False, "tests": []}
    if version is None:
        reason = f"{family} has no champion in {ws.tracking_uri}: nothing is served to monitor yet"
        log(f"monitor [{family}]: insufficient_data - {reason}")
        return {**out, "status": "insufficient_data", "reason": reason}
    state = read_monitor_state(ws, family, version)
    rows = read_window(ws.prediction_log_target, family, version, state["last_id"])
    if len(rows) < cfg.min_window:
        reason = (f"{len(rows)} requests to {family}@{version} logged since the last tested window (after id "
                  f"{state['last_id']}); min_window={cfg.min_window}: no test, no alert, the window stays open")
        log(f"monitor [{family}]: insufficient_data - {reason}")
        return {**out, "status": "insufficient_data", "reason": reason, "window": {"n": len(rows)}}

    window = rows[-max_window:]
    span = {"n": len(window), "first_id": window[0]["id"], "last_id": window[-1]["id"],
            "skipped": len(rows) - len(window)}
    report = ws.root / "reports" / family / f"monitor-v{version}-{span['last_id']}.html"
    result = drift_check(fetch_reference(ws, family, version), window, cfg.as_dict(), report,
                         ws.prediction_log_target)
    reg.attach_report(family, version, report)
    fire, streak = advance_streak(state["streak"], cfg.consecutive, result)
    log(f"monitor [{family}@{version}]: {result['status']} over ids {span['first_id']}..{span['last_id']} "
        f"(streak {streak}/{cfg.consecutive}) - {result['reason']}")
    errors = send_drift_alert(ws, family, version, result, {"window": span, "report": str(report)},
                              webhook_url) if fire else []
    write_monitor_state(ws, family, {"version": version, "last_id": span["last_id"], "streak": streak})
    server_url = os.environ.get("ADAPTEROPS_SERVER_URL", "") if server_url is None else server_url
    fallback = report_verdict_to_server(server_url, family, version, result) if server_url else None
    if fallback is not None and not fallback["sent"]:
        log(f"monitor [{family}@{version}]: the verdict did not reach the server at {server_url} "
            f"({fallback['error']}); its fallback policy did not see this window")
    return {**out, **result, "alert": fire, "alert_errors": errors, "window": span, "streak": streak,
            "report": str(report), "fallback": fallback}


@flow(name="reference-ppl-check", validate_parameters=False)
def reference_ppl(ws: Workspace, family: str, reference_windows: int | None = None, webhook_url: str = "") -> dict:
    """Scheduled reference-perplexity check of `family`'s champion: pipelines.monitor_jobs.reference_ppl_check
    (fixed reference text, rolling window, alert on a configured rise). `reference_windows` must be the merge
    config's that gated the versions (None: MergeConfig's default). An alert goes to alert_sinks() and, as the
    `adapterops.reference_ppl.alert` event, to Prefect (no retrain trigger: retraining on new data does not undo
    forgetting of the base's general text)."""
    from pipelines.monitor_jobs import reference_ppl_check

    ws = Workspace.coerce(ws)
    result = reference_ppl_check(ws, family, sinks=alert_sinks(ws, webhook_url), windows=reference_windows)
    _log()(f"reference perplexity [{family}]: {result.get('status')} - {result.get('reason')}")
    if result.get("alert"):
        emit_event(event="adapterops.reference_ppl.alert",
                   resource={"prefect.resource.id": f"adapterops.family.{family}"},
                   payload={"family": family, "version": result.get("version"), "reason": result.get("reason")})
    return result


@flow(name="adapterops-demo", validate_parameters=False)
def demo(cfg, ws: Workspace, summary_json: Path, engine=None) -> dict:
    """The whole lifecycle on the tiny base, in the order pipelines/demo.py tells it; the pieces are its functions.
    `cfg` is a pipelines.demo.DemoConfig."""
    import secrets

    from pipelines import demo as story
    from pipelines.data import read_jsonl

    log, clock, fam = _log(), story.Clock(), cfg.family
    init_d, merge_d, t = asdict(cfg.init), asdict(cfg.merge), cfg.traffic
    with clock.stage("data"):
        data = story.prepare_data(ws.root, cfg.seed)
    reg = ws.registry()

    # 1. v1: PiSSA init (miss) -> train on "before" -> merge + nf4 -> gates -> register -> champion
    with clock.stage("build_v1"):
        v1 = build_version(ws, fam, "v1", init_d, asdict(cfg.train_v1), merge_d, data["before"]["train"],
                           data["before"]["val"], cfg.reference_prompts, t.max_tokens)
        reg.promote(fam, v1["version"], actor="demo", reason="first version: no champion to canary against")
    versions = {v1["version"]: v1}

    # 2. serve the champion; "before" traffic must keep the monitors quiet, "after" traffic must fire them
    api_key = secrets.token_hex(16)
    with clock.stage("serve_start"):
        server, url, state = story.start_server(ws, cfg, api_key, engine)
    session, drift_checks, alerts = None, {}, []
    try:
        session = story.DemoSession(url, api_key, cfg, state, clock, log)
        session.load(v1["version"], f"{fam}@champion")
        for phase, n in (("before", t.before_requests), ("after", t.after_requests)):
            session.traffic_phase(phase, data[phase]["test"], n)
            report = ws.root / "reports" / f"drift-{phase}.html"
            result = drift_checks[phase] = session.monitor(phase, Path(v1["run_dir"]) / "monitoring", report, reg,
                                                           v1["version"])
            alerts += story.alert_records(phase, result)
            if result["drift"]:
                story.send_drift_alert(ws, fam, phase, result, report)
                emit_drift_event(fam, result)

        # 3. the alert triggers retraining: "after" data + replay of "before", warm start from v1 (cache hit)
        if not drift_checks["after"]["drift"]:
            raise RuntimeError("the monitors did not fire on the shifted traffic; no retraining was triggered")
        with clock.stage("retrain_v2"):
            v2 = retrain(ws, fam, "v2", init_d, asdict(cfg.retrain), merge_d, data["after"]["train"],
                         data["after"]["val"], data["before"]["train"], data["before"]["val"], cfg.replay_ratio,
                         cfg.replay_strategy, cfg.reference_prompts, t.max_tokens, cfg.seed)
        versions[v2["version"]] = v2
        canary_prompts = read_jsonl(data["after"]["test"])
        session.canary(v2["version"], "canary_v2", canary_prompts)

        # 4. a bad v3 (a data mix-up: the job trained on travel/restaurant dialogues instead of support tickets,
        #    from the cached init) passes the offline gates, which check merge fidelity and forgetting, not answer
        #    relevance; the canary's user feedback must catch it
        with clock.stage("build_v3_bad"):
            v3 = build_version(ws, fam, "v3-bad", init_d, asdict(cfg.bad), merge_d, data["bad"]["train"],
                               data["bad"]["val"], cfg.reference_prompts, t.max_tokens)
            reg.set_challenger(fam, v3["version"], actor="demo", reason="deliberately bad: trained on the wrong dataset")
        versions[v3["version"]] = v3
        session.canary(v3["version"], "canary_v3", canary_prompts)
    finally:
        if session is not None:
            session.close()
        server.stop()
        state.engine.close()
        state.log.close()

    summary = story.build_summary(ws, reg, cfg, versions, session, state.engine.name, drift_checks, alerts, clock)
    story.write_summary(summary, Path(summary_json))
    print("\n" + story.summary_table(summary) + "\n", flush=True)
    return summary
