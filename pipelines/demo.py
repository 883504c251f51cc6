"""The demo's plain (Prefect-free) pieces; the flow that chains them is flows.demo, its configuration is the
lifecycle's (pipelines/lifecycle.py: LifecycleConfig, re-exported here as DemoConfig).

Run:  adapterops demo --workdir work/demo --summary-json work/demo/summary.json [--config configs/demo.yaml]

The story: v1 (PiSSA, cache miss) trained on the "before" categories becomes champion and is served; "before"
traffic keeps the monitors quiet; "after" traffic (new categories) fires them; the alert retrains (new data + replay,
warm start from v1, cache hit) into v2, whose canary promotes it; a bad v3 (the wrong dataset in the job, a
data mix-up: trained on travel/restaurant dialogues instead of support tickets) passes the offline gates, which
check merge fidelity and forgetting, not answer relevance, but loses the canary on user feedback and is rolled back.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import write_json
from pipelines.data import CATEGORIES_AFTER, CATEGORIES_BEFORE, load_bitext, splits, write_jsonl
from pipelines.lifecycle import DEFAULT_CONFIG, LifecycleConfig, TrafficConfig, load_config  # noqa: F401

DemoConfig = LifecycleConfig
"""The demo runs on the lifecycle's configuration (pipelines/lifecycle.py); the old name stays importable."""


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


def window_rows(log, family: str, after_id: int) -> tuple[list[dict], int]:
    log.flush()
    rows = log.query(family=family, after_id=after_id)
    return rows, (rows[-1]["id"] if rows else after_id)


def alert_records(phase: str, result: dict) -> list[dict]:
    return [{"phase": phase, "monitor": t["name"], "statistic": t["statistic"], "p_value": t["p_value"],
             "threshold": t["threshold"], "fired": t["fired"]} for t in result["tests"]]


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
