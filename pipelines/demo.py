"""The demo's plain (Prefect-free) pieces: its data, its server and the admin calls that drive it, the monitoring
of its traffic, the canaries and the summary. The flow that orders them is flows.demo; its configuration is
DemoConfig (the lifecycle's config plus the story's own sections: pipelines/lifecycle.py, re-exported here).

Run:  adapterops demo --workdir work/demo --summary-json work/demo/summary.json [--config configs/demo.yaml]

The story: v1 (PiSSA, cache miss) trained on the "before" categories becomes champion and is served; "before"
traffic keeps the monitors quiet; "after" traffic (new categories) fires them; the alert retrains (new data + replay,
warm start from v1, cache hit) into v2, whose canary promotes it; a bad v3 (the wrong dataset in the job, a
data mix-up: trained on travel/restaurant dialogues instead of support tickets) passes the offline gates, which
check merge fidelity and forgetting, not answer relevance, but loses the canary on user feedback and is rolled back.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from common.atomic import write_json
from pipelines.data import CATEGORIES_AFTER, CATEGORIES_BEFORE, load_bitext, splits, write_jsonl
from pipelines.lifecycle import DEFAULT_CONFIG, DemoConfig, LifecycleConfig, TrafficConfig  # noqa: F401
from pipelines.lifecycle import load_config as _load_any


def load_config(path: Path | None) -> DemoConfig:
    """The demo's config (None: configs/demo.yaml)."""
    return _load_any(path, DemoConfig)


def prepare_data(root: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """before/ and after/ train/val/test JSONL files (deterministic), plus the bad v3's wrong training set."""
    from pipelines.data import load_dialogue

    examples = load_bitext()
    out: dict[str, dict[str, Path]] = {}
    for phase, cats in (("before", CATEGORIES_BEFORE), ("after", CATEGORIES_AFTER)):
        s = splits(examples, cats)
        out[phase] = {name: write_jsonl(rows, root / "data" / phase / f"{name}.jsonl") for name, rows in s.items()}
    # the mix-up replaces the whole dataset, so train AND val come from the wrong source (the training health check
    # catches a wrong train set alone: its validation loss diverges)
    n_train, n_val = (len(out["after"][k].read_text().splitlines()) for k in ("train", "val"))
    wrong = load_dialogue(n=n_train + n_val, seed=seed)
    out["bad"] = {"train": write_jsonl(wrong[:n_train], root / "data" / "bad" / "train.jsonl"),
                  "val": write_jsonl(wrong[n_train:], root / "data" / "bad" / "val.jsonl")}
    return out


class Clock:
    """Seconds per named stage, summed over repeats: `with clock.stage("monitor"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(clock.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 2)

        return _Stage()


def start_server(ws, cfg: LifecycleConfig, api_key: str, engine=None):
    """The model server on a free loopback port, in this process: (server, url, serving state)."""
    from serving.app import BackgroundServer, create_app

    from pipelines.serve import EngineSpec, build_state

    state = build_state(ws, cfg.rollout, api_key, engine=engine or EngineSpec())
    server = BackgroundServer(create_app(state))
    try:
        return server, server.start(), state
    except BaseException:
        state.engine.close()
        raise


def window_rows(log, family: str, after_id: int) -> tuple[list[dict], int]:
    log.flush()
    rows = log.query(family=family, after_id=after_id)
    return rows, (rows[-1]["id"] if rows else after_id)


def alert_records(phase: str, result: dict) -> list[dict]:
    return [{"phase": phase, "monitor": t["name"], "statistic": t["statistic"], "p_value": t["p_value"],
             "threshold": t["threshold"], "fired": t["fired"]} for t in result["tests"]]


class DemoSession:
    """The running demo server as its operator and users see it: admin calls (load, canary, status), simulated
    traffic judged by similarity to the reference answers, and the drift monitor over the logged requests."""

    def __init__(self, url: str, api_key: str, cfg: DemoConfig, state, clock: Clock, log=print):
        import httpx

        from monitoring.embeddings import load_encoder

        from pipelines import traffic

        self.url, self.cfg, self.state, self.clock, self.log = url, cfg, state, clock, log
        self.family = cfg.family
        self.admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
        self.encoder = load_encoder()
        self.judge = traffic.SimilarityJudge(self.encoder)
        self.last_id = 0
        self.rollouts: list[dict] = []

    def close(self) -> None:
        self.admin.close()

    def load(self, version: str, ref: str) -> None:
        r = self.admin.post("/admin/adapters/load", json={"family": self.family, "version": version, "ref": ref})
        r.raise_for_status()

    def send(self, examples, user_prefix: str, stop=None) -> list[dict]:
        from pipelines import traffic

        t = self.cfg.traffic
        return traffic.send(self.url, self.family, examples, t.clients, t.max_tokens, judge=self.judge, stop=stop,
                            user_prefix=user_prefix)

    def traffic_phase(self, phase: str, test_data: Path, n: int) -> None:
        """`n` requests sampled from the phase's test set; any failed request is an error."""
        from pipelines.data import read_jsonl, sample

        with self.clock.stage(f"traffic_{phase}"):
            sent = self.send(sample(read_jsonl(test_data), n, self.cfg.seed), user_prefix=phase)
            errors = [s for s in sent if s.get("error")]
            if errors:
                raise RuntimeError(f"{len(errors)} {phase} requests failed, first: {errors[0]['error']}")

    def monitor(self, phase: str, reference_dir: Path, report: Path, registry, version: str) -> dict:
        """The requests logged since the last check against the version's monitoring reference
        (pipelines.monitor_jobs.check_window); the report is attached to the version in the registry."""
        from pipelines.monitor_jobs import check_window

        with self.clock.stage("monitor"):
            rows, self.last_id = window_rows(self.state.log, self.family, self.last_id)
            result = check_window(reference_dir, rows, self.cfg.drift, self.encoder, report, log=self.state.log)
            registry.attach_report(self.family, version, report)
        self.log(f"monitor [{phase}]: {result['status']} - {result['reason']}")
        return result

    def canary(self, challenger: str, stage: str, prompts: list) -> str:
        """Load the challenger, start its canary and send traffic until the rollout ends; returns its outcome."""
        fam, t = self.family, self.cfg.traffic
        with self.clock.stage(stage):
            self.load(challenger, f"{fam}@{challenger}")
            r = self.admin.post("/admin/rollout/start", json={"family": fam, "challenger": challenger})
            r.raise_for_status()
            self.log(f"canary {fam}@{challenger}: started (parity {r.json()['parity'].get('passed')})")

            def finished() -> bool:
                return self.status().get("status") not in ("running", "rolling_back")

            repeated = prompts * (1 + t.canary_max_requests // len(prompts))
            self.send(repeated[: t.canary_max_requests], user_prefix=f"canary-{challenger}", stop=finished)
            status = self.status()
        outcome = status.get("status")
        self.log(f"canary {fam}@{challenger}: {outcome} ({status.get('reason', '')})")
        self.rollouts.append({"version": challenger, "outcome": outcome, "reason": status.get("reason"),
                              "steps": status.get("history", [])})
        return outcome

    def status(self) -> dict:
        return self.admin.get("/admin/rollout/status", params={"family": self.family}).json()


def send_drift_alert(ws, family: str, phase: str, result: dict, report: Path) -> None:
    """The drift alert to the log and <workdir>/alerts.jsonl."""
    from monitoring.alerts import Alert, JsonFileSink, LogSink, dispatch

    alert = Alert(family=family, monitor="drift", severity="warning", message=result["reason"],
                  details={"phase": phase, "tests": result["tests"], "report": str(report)})
    dispatch(alert, [LogSink(), JsonFileSink(ws.root / "alerts.jsonl")])


def build_summary(ws, registry, cfg: DemoConfig, versions: dict, session: DemoSession, engine_name: str,
                  drift_checks: dict, alerts: list, clock: Clock) -> dict:
    fam = cfg.family
    return {
        "family": fam, "base_model_path": str(ws.base_path), "workdir": str(ws.root),
        "engine": engine_name,
        "champion": registry.alias(fam, "champion"),
        "versions": [{"version": v["version"], "method": v["method"], "gates_passed": v["gates_passed"],
                      "adapter_path": v["adapter_path"], "init_hit": v["init_hit"], "init_key": v["init_key"],
                      "parent_version": v.get("parent_version"), "gates_report": v["gates_report"]}
                     for v in versions.values()],
        "alerts": alerts, "drift_checks": drift_checks, "rollouts": session.rollouts,
        "init_cache": {"hits": sum(v["init_hit"] for v in versions.values()),
                       "misses": sum(not v["init_hit"] for v in versions.values())},
        "stage_seconds": clock.seconds, "mlflow_tracking_uri": ws.tracking_uri,
        "history": [asdict(h) for h in registry.history(fam)],
    }


def summary_table(summary: dict) -> str:
    lines = [f"adapterops demo: family {summary['family']}, champion v{summary['champion']}", "",
             f"{'version':8} {'method':7} {'gates':6} {'init':5} {'outcome':12} adapter"]
    outcomes = {r["version"]: r["outcome"] for r in summary["rollouts"]}
    for v in summary["versions"]:
        outcome = outcomes.get(v["version"], "champion (first)" if v["version"] == "1" else "-")
        lines.append(f"v{v['version']:7} {v['method']:7} {'pass' if v['gates_passed'] else 'FAIL':6} "
                     f"{'hit' if v['init_hit'] else 'miss':5} {outcome:12} {v['adapter_path']}")
    lines += ["", "drift checks:"]
    for phase, res in summary["drift_checks"].items():
        fired = [t["name"] for t in res["tests"] if t["fired"]]
        lines.append(f"  {phase:7} status={res['status']:17} fired={','.join(fired) or '-'}")
    lines += ["", "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()), "",
              "where to look:",
              f"  mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}",
              f"  gate reports: {summary['workdir']}/runs/*/merged/gates.md",
              f"  drift reports: {summary['workdir']}/reports/",
              f"  alerts: {summary['workdir']}/alerts.jsonl",
              f"  registry: adapterops registry history {summary['family']} "
              f"(with MLFLOW_TRACKING_URI={summary['mlflow_tracking_uri']})"]
    return "\n".join(lines)


def write_summary(summary: dict, path: Path) -> Path:
    return write_json(path, summary, default=str)
