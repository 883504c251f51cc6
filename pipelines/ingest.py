"""Ingestion: the prediction log's recent requests that got good feedback (and, optionally, a labelled dataset the user
provides) become the newest labelled window the retrain flows read, `<data>/<family>/new/{train,val}.jsonl`.

    from pipelines.ingest import IngestConfig, run
    out = run(IngestConfig(family="support", since="7d", min_feedback=0.7), ws)   # -> <data>/support/new

The log is the workspace's (Workspace.prediction_log_target: the shared state database, PostgreSQL in production,
else <workdir>/predictions.db), read with its public API (monitoring.sql_log.open_prediction_log(...).query), so the
SQLite file and the shared database give the same result.

CLI contract (pipelines/cli.py wires it from IngestConfig; every flag is a field of the same name):

    adapterops ingest --family F [--since 7d|36h|90m|2026-12-01T00:00:00Z|0] [--min-feedback 0.7]
                      [--extra labelled.jsonl] [--val-fraction 0.1] [--min-examples 32] [--data-dir DIR]
                      [--workdir W] [--profile local|production|PATH] [--json]

    exit 0: written; prints the manifest (run's `manifest.json`).
    exit 2 (a CLI error, one paragraph): NotEnoughData (fewer examples than --min-examples: the counts say why),
    a missing or malformed --extra file (DataError naming the file and line), an unreachable log (its URL), bad
    options (ValueError / ConfigError).

What becomes a training example (the rules, in order):
1. Only requests of `family` (any version or route), logged at or after `since`, that were answered (no error, a
   non-empty response) and got feedback.
2. Feedback >= `min_feedback` (scores are in [0, 1]: thumbs up = 1.0): the served response is the target. Below it,
   the response is never a target; if no good response exists for the same prompt, the prompt goes to
   `rejected.jsonl` (prompt, the bad response, its score, the request id) for a person to label and pass back as
   --extra. Requests without feedback are skipped (the log cannot tell a good answer from a bad one).
3. Dedup by prompt (exact text): among good responses the highest score wins, then the newest. A prompt in the
   --extra dataset (human-labelled) wins over the log's.
4. Split by a hash of the prompt (pipelines.data's rule: the same prompt always lands in the same split, so no
   leakage across runs): `val_fraction` to val; at least one example in each.
5. Fewer than `min_examples` after all this: NotEnoughData, and nothing is written (the previous window stays).

Output, in <data>/<family>/new/ (<data> = data_dir, else $ADAPTEROPS_DATA_DIR, else <workdir>/data):
train.jsonl, val.jsonl (pipelines.data.Example lines; logged requests get category "traffic", --extra keeps its own),
rejected.jsonl, manifest.json (source, window, counts, thresholds, sha256 of each file). Each file is written
atomically (common.atomic: a temp file beside it, fsync, os.replace), so a retrain that reads meanwhile sees the old
file or the new one; manifest.json is written last, and its sha256 entries say whether train/val are the ones it
describes (a crash between two files leaves a train/val pair from two windows, which those hashes reveal).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common.atomic import write_text
from pipelines.data import Example, category_counts, read_jsonl
from pipelines.workspace import Workspace

LOGGED_CATEGORY = "traffic"
"""The category of examples taken from the prediction log (the log records none)."""
PAGE = 5000
"""Rows read from the log per query."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class NotEnoughData(RuntimeError):
    """Fewer usable examples than the configured minimum: nothing was written."""


def parse_since(since: str, now: float) -> float:
    """`since` as seconds since the epoch: a duration back from `now` ("7d", "36h", "90m", "30s", "2w"), an ISO
    8601 time ("2026-12-01", "2026-12-01T06:00:00Z"; no zone = UTC), or "0" / "all" (the whole log)."""
    text = str(since).strip()
    if text in ("0", "all"):
        return 0.0
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since {since!r} is neither a duration (7d, 36h, 90m, 30s, 2w), an ISO time "
                         "(2026-12-01T06:00:00Z) nor 0/all") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@dataclass
class IngestConfig:
    """What `adapterops ingest` turns into retrain data."""

    family: str
    """Only requests of this family are read."""
    since: str = "7d"
    """Oldest request to read: a duration back from now (7d, 36h, 90m), an ISO time, or 0/all."""
    min_feedback: float = 0.7
    """Lowest feedback score whose response is a training target (scores are in [0, 1]; 0.7 keeps thumbs-up and
    clearly positive ratings, not neutral ones)."""
    extra: Path | None = None
    """A labelled prompt/response JSONL to add (wins over the log on a shared prompt)."""
    val_fraction: float = 0.1
    """Share of prompts (by hash) that go to val.jsonl."""
    min_examples: int = 32
    """Fewer examples than this (train + val) is refused: a retrain on a handful of requests would mostly measure
    noise."""
    data_dir: Path | None = None
    """<data>; None = $ADAPTEROPS_DATA_DIR, else <workdir>/data."""

    def __post_init__(self) -> None:
        from registry.names import validate_name

        validate_name("family", self.family)
        parse_since(self.since, time.time())  # refused on construction, not half way
        if isinstance(self.min_feedback, bool) or not 0.0 <= float(self.min_feedback) <= 1.0:
            raise ValueError(f"min_feedback must be in [0, 1] (feedback scores are), got {self.min_feedback!r}")
        self.min_feedback = float(self.min_feedback)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if isinstance(self.min_examples, bool) or self.min_examples < 2:
            raise ValueError(f"min_examples must be >= 2 (one train and one val example at least), got "
                             f"{self.min_examples!r}")
        self.extra = None if self.extra in (None, "") else Path(self.extra)
        self.data_dir = None if self.data_dir in (None, "") else Path(self.data_dir)


def _prompt_hash(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64


def split(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split by a hash of the prompt; with two or more examples each side gets one at least
    (the prompts with the lowest / highest hash move over). Order within a split: by prompt hash."""
    ranked = sorted(examples, key=lambda e: (_prompt_hash(e.prompt), e.prompt))
    n_val = sum(_prompt_hash(e.prompt) < val_fraction for e in ranked)
    if len(ranked) >= 2:
        n_val = min(max(n_val, 1), len(ranked) - 1)
    return ranked[n_val:], ranked[:n_val]


def read_log(target: str, family: str, since_ts: float) -> list[dict]:
    """Rows of `family` logged at or after `since_ts` from the prediction log at `target` (a SQLite path or a
    database URL), oldest first, paged by id. No file at a plain path: a clear error (nothing was ever logged)."""
    from monitoring.sql_log import open_prediction_log

    if "://" not in str(target) and not Path(target).is_file():
        raise FileNotFoundError(f"no prediction log at {target}: nothing was served from this work dir (or the "
                                "servers log to a shared database: set state_db_url / ADAPTEROPS_STATE_DB_URL)")
    log = open_prediction_log(target)
    rows, after = [], 0
    try:
        while True:
            page = log.query(family=family, after_id=after, limit=PAGE)
            rows += [r for r in page if r["ts"] >= since_ts]
            if len(page) < PAGE:
                return rows
            after = page[-1]["id"]
    finally:
        log.close()


def select(rows: list[dict], min_feedback: float) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """(good: prompt -> best good row, rejected: prompt -> worst row of prompts with no good row, counts)."""
    counts = {"read": len(rows), "errors": 0, "no_feedback": 0, "good": 0, "bad": 0}
    good: dict[str, dict] = {}
    bad: dict[str, dict] = {}
    for r in rows:
        if r.get("error") or not (r.get("response") or "").strip():
            counts["errors"] += 1
            continue
        if r.get("feedback") is None:
            counts["no_feedback"] += 1
            continue
        if r["feedback"] >= min_feedback:
            counts["good"] += 1
            best = good.get(r["prompt"])
            if best is None or (r["feedback"], r["ts"], r["id"]) > (best["feedback"], best["ts"], best["id"]):
                good[r["prompt"]] = r
        else:
            counts["bad"] += 1
            worst = bad.get(r["prompt"])
            if worst is None or r["feedback"] < worst["feedback"]:
                bad[r["prompt"]] = r
    rejected = {p: r for p, r in bad.items() if p not in good}
    return good, rejected, counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items)


def run(cfg: IngestConfig, ws: Workspace, now: float | None = None, log=print) -> Path:
    """Write <data>/<family>/new/{train,val,rejected}.jsonl + manifest.json from the log (and cfg.extra); returns
    that directory. NotEnoughData (nothing written) below cfg.min_examples."""
    from monitoring.sql_log import describe

    now = time.time() if now is None else now
    since_ts = parse_since(cfg.since, now)
    extra = read_jsonl(cfg.extra) if cfg.extra is not None else []  # DataError names the file and line
    target = ws.prediction_log_target
    source = describe(target) if "://" in target else target
    rows = read_log(target, cfg.family, since_ts)
    good, rejected, counts = select(rows, cfg.min_feedback)

    by_prompt: dict[str, Example] = {p: Example(p, r["response"], LOGGED_CATEGORY) for p, r in good.items()}
    extra_prompts = {e.prompt for e in extra}
    extra_overrides = sum(p in by_prompt for p in extra_prompts)
    extra_dupes = len(extra) - len(extra_prompts)
    for e in extra:  # a prompt repeated in the extra file: its last line wins
        by_prompt[e.prompt] = e
    rejected = {p: r for p, r in rejected.items() if p not in by_prompt}
    examples = list(by_prompt.values())
    counts.update(logged_prompts=len(good), extra=len(extra), extra_duplicates=extra_dupes,
                  extra_overrides_log=extra_overrides, examples=len(examples), rejected_prompts=len(rejected))
    window = {"since": cfg.since, "since_ts": since_ts, "until_ts": now,
              "first_ts": min((r["ts"] for r in rows), default=None), "last_ts": max((r["ts"] for r in rows),
                                                                                     default=None),
              "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}
    if len(examples) < cfg.min_examples:
        raise NotEnoughData(
            f"ingest {cfg.family}: {len(examples)} examples, min_examples={cfg.min_examples}; from {source} since "
            f"{cfg.since}: {counts['read']} requests, {counts['no_feedback']} without feedback, {counts['errors']} "
            f"errors/empty, {counts['bad']} rated below min_feedback={cfg.min_feedback}, {len(good)} distinct good "
            f"prompts" + (f", plus {len(extra)} from {cfg.extra}" if cfg.extra else "") + ". Nothing was written. "
            "Widen --since, collect more feedback, lower --min-feedback, or add labelled data with --extra")

    train_set, val_set = split(examples, cfg.val_fraction)
    out = _data_dir(ws, cfg) / cfg.family / "new"
    files = {
        "train": write_text(out / "train.jsonl", _jsonl([e.as_dict() for e in train_set])),
        "val": write_text(out / "val.jsonl", _jsonl([e.as_dict() for e in val_set])),
        "rejected": write_text(out / "rejected.jsonl", _jsonl(
            [{"prompt": p, "response": r["response"], "feedback": r["feedback"], "request_id": r["request_id"],
              "version": r["version"], "id": r["id"]} for p, r in sorted(rejected.items())])),
    }
    manifest = {
        "kind": "ingest", "family": cfg.family, "created_ts": now,
        "source": {"prediction_log": source, "extra": str(cfg.extra) if cfg.extra else None,
                   "extra_sha256": _sha256(cfg.extra) if cfg.extra else None},
        "window": window,
        "config": {"since": cfg.since, "min_feedback": cfg.min_feedback, "val_fraction": cfg.val_fraction,
                   "min_examples": cfg.min_examples},
        "counts": {**counts, "train": len(train_set), "val": len(val_set)},
        "categories": {"train": category_counts(train_set), "val": category_counts(val_set)},
        "versions": dict(sorted(Counter(str(r["version"]) for r in good.values()).items())),
        "files": {k: {"path": p.name, "sha256": _sha256(p)} for k, p in files.items()},
    }
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"ingest {cfg.family}: {len(train_set)} train / {len(val_set)} val examples ({len(good)} from the log, "
        f"{len(extra)} extra), {len(rejected)} rejected prompts -> {out}")
    return out


def _data_dir(ws: Workspace, cfg: IngestConfig) -> Path:
    if cfg.data_dir is not None:
        return cfg.data_dir
    return Path(os.environ["ADAPTEROPS_DATA_DIR"]) if os.environ.get("ADAPTEROPS_DATA_DIR") else ws.root / "data"


__all__ = ["IngestConfig", "NotEnoughData", "parse_since", "read_log", "run", "select", "split"]
