"""`adapterops monitor check`: compare one or more windows of logged requests with a reference window.

Inputs are JSONL files, one request per line, each with at least "prompt" and, if serving logged them, the logit
stats (prompt_nll, gen_entropy, gen_max_prob) and "embedding_max_cos". Missing max-cos values are computed here
with MiniLM against an index: the adapter's training prompts (--index) or, without one, the reference prompts
themselves (the reference's own values then leave each prompt out). The verdict comes from `drift.detect`.
Windows read from the prediction log (`log_window`) reuse the embeddings stored with the rows and store the ones
they had to compute, so no prompt is embedded twice. A window of another adapter version than the reference's is
refused (`check_versions`).

    python -m monitoring.check --reference ref.jsonl --current cur.jsonl [--current cur2.jsonl] \
        [--index train_prompts.jsonl] --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from monitoring.drift import EMBEDDING_STAT, DriftConfig, DriftResult, detect
from monitoring.embeddings import EmbeddingIndex, embed, load_encoder


def load_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; blank lines are skipped. Each row must be an object with a string "prompt"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or remove "
                                 "that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{lineno}: row has no string "prompt" (keys: {sorted(row)}); every '
                                 'request row needs the prompt text')
            rows.append(row)
    return rows


def rows_to_columns(rows: list[dict], stats) -> dict[str, np.ndarray]:
    """{stat: float64 array, one value per row}; a row without the stat (or with null) gives NaN."""
    cols = {}
    for stat in stats:
        values = np.full(len(rows), np.nan, dtype=np.float64)
        for i, row in enumerate(rows):
            v = row.get(stat)
            if v is None:
                continue
            try:
                values[i] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"row {i}: {stat}={v!r} is not a number") from None
        cols[stat] = values
    return cols


def check_versions(reference_rows: list[dict], current_windows: list[list[dict]],
                   reference_version: str | None = None) -> str | None:
    """Refuse to compare a window with the reference of another adapter version; returns the reference's version.

    The reference's version is `reference_version`, else the one "version" its rows carry (None when they carry
    none). Current rows that carry a "version" must match it: a window of v3 traffic tested against v2's reference
    measures the version change, not drift, and would raise a false alarm.
    """
    ref_versions = {str(r["version"]) for r in reference_rows if r.get("version") is not None}
    if reference_version is not None:
        reference_version = str(reference_version)
        if ref_versions - {reference_version}:
            raise ValueError(f"the reference rows are of version(s) {sorted(ref_versions)}, not {reference_version}; "
                             "use that version's own monitoring reference")
    elif len(ref_versions) > 1:
        raise ValueError(f"the reference mixes rows of versions {sorted(ref_versions)}; a reference describes one "
                         "adapter version, recapture it for the version you monitor")
    else:
        reference_version = next(iter(ref_versions), None)
    if reference_version is None:
        return None
    for k, rows in enumerate(current_windows):
        other = sorted({str(r["version"]) for r in rows if r.get("version") is not None} - {reference_version})
        if other:
            n = sum(1 for r in rows if r.get("version") is not None and str(r["version"]) != reference_version)
            raise ValueError(f"current window {k} has {n} rows of version(s) {other}, but the reference is of version "
                             f"{reference_version}; select that version's rows (PredictionLog.query(version=...)) or "
                             "compare with the other version's reference")
    return reference_version


def check_windows(reference_rows: list[dict], current_windows: list[list[dict]], cfg: DriftConfig,
                  encoder=None, index: EmbeddingIndex | None = None,
                  reference_version: str | None = None) -> list[DriftResult]:
    """One DriftResult per current window.

    Rows that already carry a finite "embedding_max_cos" keep it. For the others, if `encoder` is given, each
    distinct prompt is embedded once (across all windows) and scored against `index`, or against the reference
    prompts when `index` is None (leave-one-out for the reference rows themselves). Without an encoder those rows
    stay NaN, and the embedding stat is reported as not tested when too few values remain.
    Rows of another version than the reference's are refused (`check_versions`).
    """
    if not reference_rows:
        raise ValueError("the reference window has no rows; pass a reference of at least "
                         f"{cfg.min_window} requests")
    check_versions(reference_rows, current_windows, reference_version)
    ref_cols = rows_to_columns(reference_rows, cfg.stats)
    cur_cols = [rows_to_columns(w, cfg.stats) for w in current_windows]

    if EMBEDDING_STAT in cfg.stats and encoder is not None:
        ref_missing = ~np.isfinite(ref_cols[EMBEDDING_STAT])
        cur_missing = [~np.isfinite(c[EMBEDDING_STAT]) for c in cur_cols]
        need_ref_index = index is None and any(m.any() for m in cur_missing)
        need_ref = bool(ref_missing.any()) or need_ref_index

        prompts = [r["prompt"] for r in reference_rows] if need_ref else []
        for w, m in zip(current_windows, cur_missing):
            prompts += [w[i]["prompt"] for i in np.flatnonzero(m)]
        unique = list(dict.fromkeys(prompts))
        vectors = embed(encoder, unique)
        row_of = {p: i for i, p in enumerate(unique)}

        if need_ref:
            ref_emb = vectors[[row_of[r["prompt"]] for r in reference_rows]]
            if index is None:
                index = EmbeddingIndex(ref_emb)
                ref_cos = index.max_cosine(ref_emb, exclude_self=True)
            else:
                ref_cos = index.max_cosine(ref_emb)
            ref_cols[EMBEDDING_STAT][ref_missing] = ref_cos[ref_missing]
        for w, c, m in zip(current_windows, cur_cols, cur_missing):
            if m.any():
                c[EMBEDDING_STAT][m] = index.max_cosine(vectors[[row_of[w[i]["prompt"]] for i in np.flatnonzero(m)]])

    return [detect(ref_cols, c, cfg) for c in cur_cols]


def log_window(log, family: str, version: str, index: EmbeddingIndex, encoder=None, after_id: int = 0,
               limit: int | None = None) -> tuple[list[dict], int]:
    """A window of one adapter version's logged requests, ready for `check_windows`; returns (rows, last id seen).

    Each row gets "embedding_max_cos" against `index` from the embedding stored with it (PredictionLog's
    `embedding` column), so a check never embeds a prompt that was embedded before. Rows logged without an
    embedding are embedded here, once, with `encoder`, and the embeddings are written back to the log for the
    windows that read them later; without an encoder their max-cos stays NaN (left out of the embedding test).
    """
    if version is None or str(version) == "":
        raise ValueError(f"log_window needs the adapter version whose traffic to check (family {family!r}); "
                         "windows mixing versions cannot be compared with one version's reference")
    log.flush()
    rows = log.query(family=family, version=str(version), after_id=after_id, limit=limit)
    last = rows[-1]["id"] if rows else after_id
    missing = [i for i, r in enumerate(rows) if r["embedding"] is None]
    if missing and encoder is not None:
        vectors = embed(encoder, [rows[i]["prompt"] for i in missing])
        log.set_embeddings([rows[i]["id"] for i in missing], vectors)
        for i, v in zip(missing, vectors):
            rows[i]["embedding"] = v
    have = [i for i, r in enumerate(rows) if r["embedding"] is not None]
    max_cos = np.full(len(rows), np.nan)
    if have:
        dims = {rows[i]["embedding"].shape[0] for i in have}
        if dims != {index.dim}:
            raise ValueError(f"logged embeddings have dimension(s) {sorted(dims)} but the index has {index.dim}; "
                             "they were made by another encoder: re-embed the prompts or rebuild the index with it")
        max_cos[have] = index.max_cosine(np.stack([rows[i]["embedding"] for i in have]))
    out = []
    for r, mc in zip(rows, max_cos):
        row = {k: v for k, v in r.items() if k != "embedding"}
        row[EMBEDDING_STAT] = float(mc)
        out.append(row)
    return out, last


def _needs_embeddings(rows_sets: list[list[dict]]) -> bool:
    for rows in rows_sets:
        for row in rows:
            v = row.get(EMBEDDING_STAT)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return True
    return False


def run_check(reference: Path, currents: list[Path], json_out: Path, index_prompts: Path | None = None,
              cfg: DriftConfig | None = None, use_embeddings: bool = True) -> dict:
    """Run `check_windows` on files and write the verdict to `json_out` (atomically); returns what was written.

    OUT.json = {"drift": any window drifted, "results": [DriftResult.as_dict() + {"current": path}, ...],
    "config": {...}}; with a single current file its "current", "status", "reason" and "tests" are also at the top.
    use_embeddings=False never loads the encoder: only precomputed embedding_max_cos values are tested.
    """
    cfg = cfg or DriftConfig()
    currents = [Path(p) for p in currents]
    if not currents:
        raise ValueError("no current window given; pass at least one --current FILE.jsonl")
    if index_prompts is not None and not use_embeddings:
        raise ValueError("an index of training prompts was given but use_embeddings=False; drop the index or "
                         "enable embeddings")
    if not Path(reference).is_file():
        raise FileNotFoundError(f"reference window {reference} does not exist; pass the monitoring reference of the "
                                "version whose traffic this is (its reference.jsonl, captured at registration)")
    ref_rows = load_jsonl(reference)
    windows = [load_jsonl(p) for p in currents]

    encoder, index = None, None
    if use_embeddings and EMBEDDING_STAT in cfg.stats:
        if index_prompts is not None or _needs_embeddings([ref_rows, *windows]):
            encoder = load_encoder()
        if index_prompts is not None:
            index_rows = load_jsonl(index_prompts)
            if not index_rows:
                raise ValueError(f"index prompts file {index_prompts} has no rows")
            index = EmbeddingIndex(embed(encoder, list(dict.fromkeys(r["prompt"] for r in index_rows))))

    results = check_windows(ref_rows, windows, cfg, encoder=encoder, index=index)
    out = {
        "drift": any(r.drift for r in results),
        "results": [{"current": str(p), **r.as_dict()} for p, r in zip(currents, results)],
        "config": {**cfg.as_dict(), "reference": str(reference), "index_prompts": None if index_prompts is None
                   else str(index_prompts), "use_embeddings": use_embeddings},
    }
    if len(results) == 1:
        only = out["results"][0]
        out.update(current=only["current"], status=only["status"], reason=only["reason"], tests=only["tests"])
    _write_json_atomic(Path(json_out), out)
    return out


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `monitor check` options, for the adapterops CLI to mount."""
    d = DriftConfig()
    parser.add_argument("--reference", type=Path, required=True, help="reference window, JSONL")
    parser.add_argument("--current", type=Path, action="append", required=True,
                        help="current window, JSONL (repeat for several windows)")
    parser.add_argument("--index", type=Path, default=None,
                        help="training prompts, JSONL; embedding similarity is measured against these")
    parser.add_argument("--json", type=Path, required=True, dest="json_out", help="where to write the verdict")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="family-wise false-alarm rate per window")
    parser.add_argument("--min-window", type=int, default=d.min_window,
                        help="fewest values per side for a stat to be tested")
    parser.add_argument("--no-embeddings", action="store_true", help="do not load the embedding model")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when any window drifted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterops monitor check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = DriftConfig(alpha=args.alpha, min_window=args.min_window)
    out = run_check(args.reference, args.current, args.json_out, index_prompts=args.index, cfg=cfg,
                    use_embeddings=not args.no_embeddings)
    for r in out["results"]:
        print(f"{r['current']}: {r['status']} - {r['reason']}")
    return 1 if (out["drift"] and args.fail_on_drift) else 0


if __name__ == "__main__":
    sys.exit(main())
