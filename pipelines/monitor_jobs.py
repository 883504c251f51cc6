"""Monitoring jobs that schedules run: plain functions over a workspace (pipelines/flows.py wraps them in Prefect).

The drift monitor's pieces (flows.monitor_check orders them): where it stopped (read_monitor_state /
write_monitor_state), the window of requests logged since (read_window), its verdict and Evidently report against
the version's monitoring reference (check_window) and the streak rule that turns a drifted window into an alert
(advance_streak).

Where the monitor's state (last tested id, drift streak) lives follows the prediction log: with the workspace's
state database (Workspace.state_db_url / ADAPTEROPS_STATE_DB_URL, PostgreSQL in production, or sqlite:///path) a
`monitor_state` table there, one row per family, so every worker that runs a family's check continues the one
streak; without it <workdir>/monitoring/<family>/drift_state.json (the local default, one worker). A write never
moves a family's window backwards for the same champion (a worker that tested an older window does not undo a
newer one). Prefect's per-deployment concurrency limit keeps two checks of one family from running at once; the
table only makes the state they hand over shared.

reference_ppl_check: the champion's perplexity on the fixed reference text (pipelines.data.REFERENCE_TEXT, measured
as the merge stage's forgetting gate measures it), appended to a rolling history and compared with the value
recorded for that version when it was built and promoted (monitoring.reference_ppl.decide). Alerts go to the log and
<workdir>/alerts.jsonl unless other sinks are given.

Run:  python -c "from pipelines.monitor_jobs import reference_ppl_check; from pipelines.workspace import Workspace; \
print(reference_ppl_check(Workspace.create('work/demo', 'models/tiny-llama'), 'support-assistant'))"
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from common.atomic import write_json
from monitoring.drift import DriftConfig
from monitoring.reference_ppl import PplCheckConfig, PplMeasurement, append_history, decide, load_history
from pipelines.data import REFERENCE_TEXT
from pipelines.workspace import Workspace

BASE_PPL_TOLERANCE = 1e-3
"""Largest relative difference between the base's reference perplexity now and the one the gates recorded for a
version: above it the text, its windowing or the base differ, and the two numbers are not comparable."""


def reference_perplexity(base_path: Path, adapter_dir: Path | None, text: Path = REFERENCE_TEXT,
                         windows: int | None = None) -> float:
    """Perplexity of the base (adapter_dir None) or base + PEFT adapter on `text`, exactly as the forgetting gate
    measures it (pipelines.lm.reference_perplexity, `windows` 128-token windows of the text's tail)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipelines.lm import load_base
    from pipelines.lm import reference_perplexity as measure
    from pipelines.merge_quantize import MergeConfig

    windows = MergeConfig().reference_windows if windows is None else windows
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = load_base(Path(base_path))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return measure(model.eval(), tokenizer, Path(text), windows)


def text_key(text: Path, windows: int) -> str:
    """What makes two reference perplexities comparable: the text's bytes and how many windows are measured."""
    from registry.hashing import sha256_file

    return hashlib.sha256(f"{sha256_file(Path(text))}:{windows}:128".encode()).hexdigest()


def _state_dir(ws: Workspace, family: str) -> Path:
    return ws.root / "monitoring" / family


def _monitor_state_path(ws: Workspace, family: str) -> Path:
    return _state_dir(ws, family) / "drift_state.json"


def read_monitor_state(ws: Workspace, family: str, version: str) -> dict:
    """Where the scheduled monitor of `family` stopped: the last prediction-log id it tested and its drift streak.

    A new champion starts a fresh state: its windows are compared with its own reference, so the old streak means
    nothing for it. With ws.state_db_url the state is the family's row of the shared `monitor_state` table.
    """
    url = getattr(ws, "state_db_url", "")  # anything with a .root (a bare namespace in tests) keeps the file
    if url:
        state = _StateDB.get(url).read(family)
    else:
        path = _monitor_state_path(ws, family)
        state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("version") != version:
        return {"version": version, "last_id": 0, "streak": 0}
    return {"version": state["version"], "last_id": int(state["last_id"]), "streak": int(state["streak"])}


def write_monitor_state(ws: Workspace, family: str, state: dict) -> bool:
    """Record where the monitor of `family` stopped ({"version", "last_id", "streak"}). Returns False (nothing
    written) when the shared table already holds a later window of the same version, written by another worker."""
    url = getattr(ws, "state_db_url", "")
    if url:
        return _StateDB.get(url).write(family, state)
    write_json(_monitor_state_path(ws, family), state)
    return True


class MonitorStateUnavailable(RuntimeError):
    """The state database that holds the monitors' drift streaks cannot be reached (or refused the operation)."""


class _StateDB:
    """The `monitor_state` table on a database URL (SQLAlchemy Core, the engine settings of monitoring.sql_log:
    bounded connect, pool and statement waits). One instance per URL and process."""

    _open: dict[str, "_StateDB"] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, connect_timeout_s: float = 5.0, statement_timeout_s: float = 30.0):
        import sqlalchemy as sa
        from monitoring.sql_log import create_tables, describe, make_db_engine

        self.url, self.name = url, describe(url)
        self._engine = make_db_engine(url, connect_timeout_s, statement_timeout_s)
        md = sa.MetaData()
        self.table = sa.Table(
            "monitor_state", md,
            sa.Column("family", sa.Text, primary_key=True),
            sa.Column("version", sa.Text, nullable=False),
            sa.Column("last_id", sa.BigInteger, nullable=False),
            sa.Column("streak", sa.Integer, nullable=False),
            sa.Column("updated_ts", sa.Float(53), nullable=False),
            sa.Column("updated_by", sa.Text, nullable=False),
        )
        try:
            create_tables(self._engine, md)  # workers starting together on a fresh database race here
        except sa.exc.SQLAlchemyError as e:
            self._engine.dispose()
            raise self._unavailable("creating the monitor_state table", e) from None

    @classmethod
    def get(cls, url: str) -> "_StateDB":
        with cls._lock:
            if url not in cls._open:
                cls._open[url] = cls(url)
            return cls._open[url]

    def _unavailable(self, what: str, e: Exception) -> MonitorStateUnavailable:
        orig = getattr(e, "orig", None) or e
        return MonitorStateUnavailable(
            f"monitor state database {self.name} is unreachable ({what}): {type(orig).__name__}: "
            f"{' '.join(str(orig).split())[:300]}; check that the server is up and state_db_url / "
            "ADAPTEROPS_STATE_DB_URL is right (unset it to keep the state in <workdir>/monitoring, one worker)")

    def _run(self, what: str, fn):
        import sqlalchemy as sa

        try:
            with self._engine.begin() as conn:
                return fn(conn)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as e:
            raise self._unavailable(what, e) from None

    def read(self, family: str) -> dict:
        import sqlalchemy as sa

        t = self.table
        stmt = sa.select(t.c.version, t.c.last_id, t.c.streak).where(t.c.family == family)
        row = self._run(f"reading {family}'s state", lambda conn: conn.execute(stmt).first())
        return {} if row is None else {"version": row.version, "last_id": row.last_id, "streak": row.streak}

    def write(self, family: str, state: dict) -> bool:
        import socket

        import sqlalchemy as sa

        t = self.table
        values = {"version": str(state["version"]), "last_id": int(state["last_id"]), "streak": int(state["streak"]),
                  "updated_ts": time.time(), "updated_by": f"{socket.gethostname()}:{os.getpid()}"}
        # one statement, so it is atomic on every backend: a new champion replaces the row; the same champion's
        # window only moves forward
        update = t.update().where(t.c.family == family, sa.or_(t.c.version != values["version"],
                                                                t.c.last_id <= values["last_id"])).values(**values)

        def upsert(conn) -> bool:
            if conn.execute(update).rowcount:
                return True
            if conn.execute(sa.select(t.c.family).where(t.c.family == family)).first() is not None:
                return False  # a later window of this version is already recorded
            conn.execute(t.insert().values(family=family, **values))
            return True

        try:
            return self._run(f"writing {family}'s state", upsert)
        except sa.exc.IntegrityError:  # another worker inserted the family's first row meanwhile
            return self._run(f"writing {family}'s state", lambda conn: bool(conn.execute(update).rowcount))


def read_window(log_path: Path | str, family: str, version: str, after_id: int) -> list[dict]:
    """Requests served by `family`@`version` logged after `after_id`, oldest first (none if nothing was logged).
    log_path: the work dir's SQLite file, or the database URL the serving replicas share (Workspace.
    prediction_log_target)."""
    from monitoring.sql_log import open_prediction_log

    if "://" not in str(log_path) and not Path(log_path).is_file():
        return []
    log = open_prediction_log(log_path)
    try:
        return log.query(family=family, version=version, after_id=after_id)
    finally:
        log.close()


def check_window(reference_dir: Path, rows: list[dict], cfg: DriftConfig, encoder, report: Path, log=None) -> dict:
    """The drift decision for one window of served requests against a version's monitoring reference, plus its
    Evidently report. Rows that carry a stored embedding (PredictionLog.query's "embedding") are not embedded
    again; the others are embedded once here and, with `log` (the PredictionLog they came from), written back so
    no later check embeds them. Both the decision and the report use the same per-request scores."""
    import numpy as np
    import pandas as pd
    from monitoring.check import EMBEDDING_STATS, check_windows, fill_embeddings, load_jsonl
    from monitoring.embeddings import EmbeddingIndex
    from monitoring.logit_stats import REQUEST_STATS
    from monitoring.report import write_evidently_report

    reference = load_jsonl(Path(reference_dir) / "reference.jsonl")
    index = EmbeddingIndex.load(Path(reference_dir) / "train_index.npy")
    rows = fill_embeddings(rows, encoder, log)
    current = [{k: v for k, v in r.items() if k != "embedding"} for r in rows]
    have = [i for i, r in enumerate(rows) if r.get("embedding") is not None]
    if have:
        scores = index.neighbour_stats(np.stack([rows[i]["embedding"] for i in have]), cfg.novelty_k)
        for stat, values in zip(EMBEDDING_STATS, scores):
            for i, v in zip(have, values):
                current[i][stat] = float(v)
    result = check_windows(reference, [current], cfg, encoder=encoder, index=index)[0].as_dict()
    cols = list(REQUEST_STATS) + list(EMBEDDING_STATS)
    versions = sorted({str(r["version"]) for r in rows if r.get("version") is not None})
    stamps = [r["ts"] for r in rows if r.get("ts") is not None]
    ids = [r["id"] for r in rows if r.get("id") is not None]
    window = {"n": len(rows), "first_ts": min(stamps, default=None), "last_ts": max(stamps, default=None),
              "first_id": min(ids, default=None), "last_id": max(ids, default=None)}
    decision = {**result, "version": ",".join(versions) or None, "window": window, "config": cfg.as_dict()}
    write_evidently_report(pd.DataFrame([{k: r.get(k) for k in cols} for r in reference], dtype=float),
                           pd.DataFrame([{k: r.get(k) for k in cols} for r in current], dtype=float),
                           report, title=f"drift report: {report.stem}", decision=decision)
    return result


def advance_streak(streak: int, consecutive: int, result: dict) -> tuple[bool, int]:
    """(alert?, new streak) after one tested window's verdict (check_window's dict), given the streak so far:
    monitoring.drift.ConsecutiveRule, an alert once `consecutive` windows in a row drifted."""
    from monitoring.drift import ConsecutiveRule, DriftResult

    rule = ConsecutiveRule(consecutive)
    rule.streak = streak
    fire = rule.update(DriftResult(result["drift"], result["status"], result["reason"]))
    return fire, rule.streak


def promotion_baseline(ws: Workspace, family: str, version: str, text: Path = REFERENCE_TEXT,
                       windows: int | None = None) -> PplMeasurement:
    """The reference perplexity recorded for `version`: taken once from its registered gate report (measured on
    the same weights before it was promoted) and kept in <workdir>/monitoring/<family>/reference_ppl_baseline.json.

    The gate report also holds the base's perplexity; it is measured again here and must agree, which proves the text,
    its windowing and the base are the ones the recorded value was measured with.
    """
    from pipelines.merge_quantize import MergeConfig

    windows = MergeConfig().reference_windows if windows is None else windows
    key = text_key(text, windows)
    path = _state_dir(ws, family) / "reference_ppl_baseline.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if str(version) in recorded:
        d = recorded[str(version)]
        return PplMeasurement(d["family"], d["version"], d["perplexity"], d["text_sha256"], d["ts"])
    reg = ws.registry()
    got = reg.download(family, str(version), "gates", ws.root / "downloads")
    report = json.loads((got / "gates.json" if got.is_dir() else got).read_text())
    measured = report.get("measured", {})
    if not all(isinstance(measured.get(k), (int, float)) for k in ("merged_reference_ppl", "base_reference_ppl")):
        raise ValueError(f"the gate report of {family} v{version} records no reference perplexity (measured has "
                         f"{sorted(measured)}); re-run its merge gates to have a value to monitor against")
    base_now = reference_perplexity(ws.base_path, None, text, windows)
    if abs(base_now / measured["base_reference_ppl"] - 1) > BASE_PPL_TOLERANCE:
        raise ValueError(f"the base's reference perplexity is {base_now:.6g} now but "
                         f"{measured['base_reference_ppl']:.6g} in the gate report of {family} v{version}: the "
                         f"reference text ({text}), its windows ({windows}) or the base ({ws.base_path}) differ from "
                         "when the gates ran, so the recorded value cannot be compared; measure with the gate "
                         "settings or re-run the gates")
    info = reg.get(family, str(version))
    baseline = PplMeasurement(family, str(version), measured["merged_reference_ppl"], key, info.created)
    recorded[str(version)] = baseline.as_dict()
    write_json(path, recorded, sort_keys=True)
    return baseline


def reference_ppl_check(workspace: Workspace | dict, family: str, cfg: PplCheckConfig | None = None,
                        sinks: list | None = None, text: Path = REFERENCE_TEXT, windows: int | None = None) -> dict:
    """Measure the champion's reference perplexity, add it to the rolling history, decide, alert on a rise.

    Returns the verdict (monitoring.reference_ppl.PplVerdict.as_dict()) plus "perplexity" (this measurement),
    "history" (the JSONL file) and "alert_errors" (sinks that failed). A family without a champion gives
    status "insufficient_data" (nothing to check, no alert). `sinks` default: LogSink and <workdir>/alerts.jsonl.
    """
    from monitoring.alerts import Alert, JsonFileSink, LogSink, dispatch

    from pipelines.merge_quantize import MergeConfig

    ws = Workspace.coerce(workspace)
    cfg = cfg or PplCheckConfig()
    windows = MergeConfig().reference_windows if windows is None else windows
    history_path = _state_dir(ws, family) / "reference_ppl.jsonl"
    champion = ws.registry().alias(family, "champion")
    if champion is None:
        return {"status": "insufficient_data", "alert": False, "reason": f"{family} has no champion; nothing to "
                "check, no alert", "family": family, "version": None, "baseline": None, "rolling": None, "rise": None,
                "threshold": cfg.max_rise, "results": [], "perplexity": None, "history": str(history_path),
                "alert_errors": []}
    baseline = promotion_baseline(ws, family, champion, text, windows)
    adapter = ws.fetch_version(family, champion) / "adapter"
    now = PplMeasurement(family, champion, reference_perplexity(ws.base_path, adapter, text, windows),
                         text_key(text, windows))
    append_history(history_path, now)
    verdict = decide(baseline, load_history(history_path, family), cfg)
    errors: list[str] = []
    if verdict.alert:
        sinks = [LogSink(), JsonFileSink(ws.root / "alerts.jsonl")] if sinks is None else sinks
        errors = dispatch(Alert(family, "reference_ppl", "warning", verdict.reason, verdict.as_dict()), sinks)
    return {**verdict.as_dict(), "perplexity": now.as_dict()["perplexity"], "history": str(history_path),
            "alert_errors": errors}
