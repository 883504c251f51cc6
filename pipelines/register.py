"""Stage 4, register: one MLflow run per adapter version (params, loss curves, gate report) and a registry version
with full lineage tags. Uses MLFLOW_TRACKING_URI unless a URI is passed.

Run:  adapterops registry list|show|promote|rollback|history  (registration itself runs inside the flows)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from pipelines import manifest


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = obj if isinstance(obj, (int, float, str, bool)) or obj is None else json.dumps(obj)
    return out


def lineage_tags(train_dir: Path, merge_dir: Path, parent_version: str | None, data_counts: dict) -> dict[str, str]:
    tm, mm = manifest.read(train_dir), manifest.read(merge_dir)
    gates = {g["name"]: g["passed"] for g in mm["gates"]}
    return {
        "base_sha256": tm["inputs"]["base_sha256"],
        "dataset_sha256": tm["inputs"]["train_sha256"],
        "val_sha256": tm["inputs"]["val_sha256"],
        "dataset_categories": json.dumps(data_counts, sort_keys=True),
        "init_key": tm["inputs"]["init_key"],
        "parent_version": parent_version or "",
        "method": tm["method"],
        "rank": str(tm["rank"]),
        "train_config_sha256": hashlib.sha256(json.dumps(tm["config"], sort_keys=True).encode()).hexdigest(),
        "code_version": tm["code_version"],
        "gates": json.dumps(gates, sort_keys=True),
        "quantize": mm["config"]["quantize"],
    }


def log_run(client, rid: str, train_dir: Path, merge_dir: Path) -> None:
    """Fill the MLflow run of a version: config as params, loss curves and gate values as metrics."""
    from mlflow.entities import Metric, Param

    tm, mm = manifest.read(train_dir), manifest.read(merge_dir)
    params = _flatten("train", tm["config"], {})
    params.update({"method": tm["method"], "rank": tm["rank"], "quantize": mm["config"]["quantize"],
                   "init_key": tm["inputs"]["init_key"]})
    params.update({f"data.{k}": v for k, v in tm["data"]["train_categories"].items()})
    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", p["train_loss"], now, p["step"]) for p in tm["curve"]]
    metrics += [Metric("lr", p["lr"], now, p["step"]) for p in tm["curve"]]
    metrics += [Metric("val_loss", e["val_loss"], now, e["step"]) for e in tm["evals"]]
    metrics += [Metric(f"final.{k}", float(v), now, 0) for k, v in tm["metrics"].items()
                if isinstance(v, (int, float)) and v is not None]
    metrics += [Metric(f"gate.{g['name']}", g["value"], now, 0) for g in mm["gates"]]
    metrics += [Metric(f"health.{c['name']}", float(c["value"]), now, 0) for c in tm["health"]["checks"]
                if isinstance(c["value"], (int, float))]
    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(plist), 90):
        client.log_batch(rid, params=plist[i : i + 90])
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])


def run(registry, family: str, train_dir: Path, merge_dir: Path, monitoring_dir: Path | None = None,
        parent_version: str | None = None, log=print):
    """Register the adapter in `train_dir` (gated by `merge_dir`) as a new version of `family`; on any failure the
    version's MLflow run is marked FAILED before the error goes up."""
    tm, mm = manifest.read(train_dir), manifest.read(merge_dir)
    client = registry.client
    rid = registry.create_run(f"adapterops-{family}", run_name=f"{family}-{tm['method']}-{tm['fingerprint'][:8]}")
    try:
        info = _register(registry, rid, family, train_dir, merge_dir, monitoring_dir, parent_version, tm, mm)
    except BaseException as e:
        _mark_failed(client, rid, e, log)
        raise
    client.set_terminated(rid, "FINISHED")
    log(f"register: {family} v{info.version} (run {rid[:8]}, gates {'passed' if mm['gates_passed'] else 'FAILED'})")
    return info


def _mark_failed(client, rid: str, error: BaseException, log) -> None:
    """A registration that failed leaves its MLflow run FAILED, not RUNNING; if the backend is down too, say so."""
    try:
        client.set_terminated(rid, "FAILED")
    except Exception as e:  # noqa: BLE001 - the original error is the one to raise
        log(f"register: run {rid} could not be marked FAILED ({' '.join(str(e).split())[:200]}); it stays RUNNING "
            f"until the backend is back: `mlflow runs` or the UI can end it")


def _register(registry, rid, family, train_dir, merge_dir, monitoring_dir, parent_version, tm, mm):
    from serving.parity import GOLDEN_FILE

    client = registry.client
    log_run(client, rid, train_dir, merge_dir)
    publish = Path(merge_dir).parent / "publish" / "adapter"
    if publish.exists():
        shutil.rmtree(publish)
    shutil.copytree(Path(train_dir) / "adapter", publish)
    shutil.copy(Path(merge_dir) / "golden" / GOLDEN_FILE, publish / GOLDEN_FILE)  # serving's parity check reads it
    artifacts = {"adapter": publish, "adapter_native": Path(train_dir) / "adapter_native",
                 "golden": Path(merge_dir) / "golden", "gates": Path(merge_dir) / "gates.json",
                 "gates_report": Path(merge_dir) / "gates.md", "train_manifest": Path(train_dir) / "manifest.json"}
    if monitoring_dir is not None:
        artifacts["monitoring"] = Path(monitoring_dir)
    tags = lineage_tags(train_dir, merge_dir, parent_version, tm["data"]["train_categories"])
    return registry.register(family, rid, artifacts=artifacts, tags=tags, gates_passed=bool(mm["gates_passed"]))


def pending_challenger(registry, family: str, champion: str) -> str | None:
    """The challenger version retrained from `champion` that still awaits its canary, or None.

    The rule behind flows.retrain's skip: while such a challenger is pending, the drift that keeps alerting against
    the old champion is what it was trained for, and another retrain would replace it before it was ever judged.
    """
    challenger = registry.alias(family, "challenger")
    if challenger is not None and registry.get(family, challenger).tags.get("parent_version") == champion:
        return challenger
    return None
