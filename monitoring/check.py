"""`adapterops monitor check`: compare one or more windows of logged requests with a reference window.

Inputs are JSONL files, one request per line, each with at least "prompt" and, if serving logged them, the logit
stats (prompt_nll, gen_entropy, gen_max_prob), "embedding_max_cos" and "embedding_novelty" (kNN novelty), or the
prompt's "embedding" itself. Missing embedding stats are computed here with MiniLM against an index: the adapter's
training prompts (--index) or, without one, the reference prompts themselves (the reference's own values then
leave each prompt out). The verdict comes from `drift.detect`: KS tests and the novelty tail count under Holm.
Windows read from the prediction log (`log_window`) reuse the embeddings stored with the rows and store the ones
they had to compute, so no prompt is embedded twice. A window of another adapter version than the reference's is
refused (`check_versions`).

    python -m monitoring.check --reference ref.jsonl --current cur.jsonl [--current cur2.jsonl] \
        [--index train_prompts.jsonl] --json out.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from common.atomic import write_json
from common.jsonl import read_jsonl
from monitoring.drift import DRIFT_TESTS, EMBEDDING_STAT, NOVELTY_STAT, DriftConfig, DriftResult, detect
from monitoring.embeddings import EmbeddingIndex, embed, load_encoder


def _request_row(row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object per line, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f'row has no string "prompt" (keys: {sorted(row)}); every request row needs the prompt text')
    return row


def load_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (common.jsonl's reader); blank lines are skipped. Each row must be an object with a
    string "prompt"; a bad line raises ValueError naming `path:line`."""
    return read_jsonl(path, _request_row)


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


EMBEDDING_STATS = tuple(s for s, t in DRIFT_TESTS.items() if t.needs == "embedding")
"""The stats computed from a prompt's embedding against an index (max-cos and kNN novelty): the DRIFT_TESTS
entries that need an embedding."""


def _stored_vector(row: dict) -> np.ndarray | None:
    """The embedding a row carries ("embedding": the prediction log's stored one, or a list in a JSONL row)."""
    v = row.get("embedding")
    if v is None:
        return None
    try:
        arr = np.asarray(v, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None
    return arr if arr.size and np.isfinite(arr).all() else None


def _vectors(rows: list[dict], encoder, memo: dict) -> list[np.ndarray | None]:
    """One embedding per row: the stored one, else the prompt embedded with `encoder` (each distinct prompt once,
    across calls sharing `memo`), else None (no encoder)."""
    out = [_stored_vector(r) for r in rows]
    if encoder is not None:
        todo = list(dict.fromkeys(r["prompt"] for r, v in zip(rows, out) if v is None and r["prompt"] not in memo))
        if todo:
            memo.update(zip(todo, embed(encoder, todo)))
    return [v if v is not None else memo.get(r["prompt"]) for r, v in zip(rows, out)]


def _not_finite(cols: dict[str, np.ndarray], stats) -> np.ndarray:
    return np.any([~np.isfinite(cols[s]) for s in stats], axis=0)


def fill_embeddings(rows: list[dict], encoder, log=None) -> list[dict]:
    """Rows (from `PredictionLog.query`) with "embedding" set for every row: the stored one is kept, the missing
    ones are embedded here (each distinct prompt once) and, with `log`, written back to the prediction log by row
    "id", so the next check (or an overlapping window) reuses them. Returns new row dicts; the input is untouched."""
    rows = [dict(r) for r in rows]
    missing = [i for i, r in enumerate(rows) if _stored_vector(r) is None]
    if not missing or encoder is None:
        return rows
    vectors = _vectors([rows[i] for i in missing], encoder, {})
    for i, v in zip(missing, vectors):
        rows[i]["embedding"] = v
    if log is not None:
        ids = [(rows[i]["id"], v) for i, v in zip(missing, vectors) if rows[i].get("id") is not None]
        if ids:
            log.set_embeddings([i for i, _ in ids], np.stack([v for _, v in ids]))
    return rows


def check_windows(reference_rows: list[dict], current_windows: list[list[dict]], cfg: DriftConfig,
                  encoder=None, index: EmbeddingIndex | None = None,
                  reference_version: str | None = None) -> list[DriftResult]:
    """One DriftResult per current window.

    The embedding stats (EMBEDDING_STATS that `cfg.stats` names) of a row are kept when the row carries finite
    values. Otherwise they are computed from the row's embedding: the stored one ("embedding", as the prediction log
    returns it), else the prompt embedded with `encoder` (each distinct prompt once, across all windows), scored
    against `index`, or against the reference prompts when `index` is None (leave-one-out for the reference rows
    themselves). Rows with neither stay NaN, and a stat with too few values is reported as not tested.
    The null of the novelty tail count is the leave-one-out novelty of the index's own prompts
    (`EmbeddingIndex.self_novelty`: ~1000 training prompts calibrate the tail far better than 200 reference rows),
    or, without an index, the reference rows' leave-one-out novelty.
    Rows of another version than the reference's are refused (`check_versions`).
    """
    if not reference_rows:
        raise ValueError("the reference window has no rows; pass a reference of at least "
                         f"{cfg.min_window} requests")
    check_versions(reference_rows, current_windows, reference_version)
    ref_cols = rows_to_columns(reference_rows, cfg.stats)
    cur_cols = [rows_to_columns(w, cfg.stats) for w in current_windows]

    wanted = [s for s in EMBEDDING_STATS if s in cfg.stats]
    given_index = index
    if wanted:
        # With an index the novelty null comes from the index itself, not from the reference rows' values.
        ref_wanted = [s for s in wanted if not (s == NOVELTY_STAT and given_index is not None)]
        ref_missing = _not_finite(ref_cols, ref_wanted) if ref_wanted else np.zeros(len(reference_rows), bool)
        cur_missing = [_not_finite(c, wanted) for c in cur_cols]
        need_ref_index = index is None and any(m.any() for m in cur_missing)
        memo: dict[str, np.ndarray] = {}
        need_ref = bool(ref_missing.any()) or need_ref_index
        if encoder is not None:  # one encoder call for every prompt that has no stored embedding, all windows
            rows = (list(reference_rows) if need_ref else []) + [w[i] for w, m in zip(current_windows, cur_missing)
                                                                for i in np.flatnonzero(m)]
            _vectors(rows, encoder, memo)
        if need_ref:
            ref_vecs = _vectors(reference_rows, encoder, memo)
            have = np.array([v is not None for v in ref_vecs], dtype=bool)
            if have.any():
                ref_emb = np.stack([v for v in ref_vecs if v is not None])
                if index is None:
                    index = EmbeddingIndex(ref_emb) if len(ref_emb) >= 2 else None
                    scores = index.neighbour_stats(ref_emb, cfg.novelty_k, exclude_self=True) if index else None
                else:
                    scores = index.neighbour_stats(ref_emb, cfg.novelty_k)
                if scores is not None:
                    _assign(ref_cols, wanted, scores, np.flatnonzero(have), ref_missing)
        if NOVELTY_STAT in wanted and given_index is not None:
            # The novelty null: the index's own leave-one-out novelty (its prompts are exchangeable with traffic of
            # the distribution it was built from), a far larger sample than the reference rows.
            ref_cols[NOVELTY_STAT] = given_index.self_novelty(cfg.novelty_k).astype(np.float64)
        for w, c, m in zip(current_windows, cur_cols, cur_missing):
            if not m.any() or index is None:
                continue
            rows_idx = np.flatnonzero(m)
            vecs = _vectors([w[i] for i in rows_idx], encoder, memo)
            ok = [j for j, v in enumerate(vecs) if v is not None]
            if ok:
                scores = index.neighbour_stats(np.stack([vecs[j] for j in ok]), cfg.novelty_k)
                _assign(c, wanted, scores, rows_idx[ok], m)

    return [detect(ref_cols, c, cfg) for c in cur_cols]


def _assign(cols: dict[str, np.ndarray], wanted, scores: tuple[np.ndarray, np.ndarray], rows_idx: np.ndarray,
            missing: np.ndarray) -> None:
    """Write (max-cos, novelty) scores of `rows_idx` into `cols`, only where a row's value was not given."""
    by_stat = {EMBEDDING_STAT: scores[0], NOVELTY_STAT: scores[1]}  # EmbeddingIndex.neighbour_stats' order
    for s in wanted:
        col = cols[s]
        for i, v in zip(rows_idx, by_stat[s]):
            if missing[i] and not np.isfinite(col[i]):
                col[i] = float(v)


def log_window(log, family: str, version: str, index: EmbeddingIndex, encoder=None, after_id: int = 0,
               limit: int | None = None, novelty_k: int = 5) -> tuple[list[dict], int]:
    """A window of one adapter version's logged requests, ready for `check_windows`; returns (rows, last id seen).

    Each row gets "embedding_max_cos" and "embedding_novelty" against `index` from the embedding stored with it
    (PredictionLog's `embedding` column), so a check never embeds a prompt that was embedded before. Rows logged
    without an embedding are embedded here, once, with `encoder`, and the embeddings are written back to the log for
    the windows that read them later; without an encoder their stats stay NaN (left out of the embedding tests).
    """
    if version is None or str(version) == "":
        raise ValueError(f"log_window needs the adapter version whose traffic to check (family {family!r}); "
                         "windows mixing versions cannot be compared with one version's reference")
    log.flush()
    rows = log.query(family=family, version=str(version), after_id=after_id, limit=limit)
    last = rows[-1]["id"] if rows else after_id
    rows = fill_embeddings(rows, encoder, log)
    have = [i for i, r in enumerate(rows) if r["embedding"] is not None]
    max_cos, novelty = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    if have:
        dims = {rows[i]["embedding"].shape[0] for i in have}
        if dims != {index.dim}:
            raise ValueError(f"logged embeddings have dimension(s) {sorted(dims)} but the index has {index.dim}; "
                             "they were made by another encoder: re-embed the prompts or rebuild the index with it")
        max_cos[have], novelty[have] = index.neighbour_stats(np.stack([rows[i]["embedding"] for i in have]),
                                                             novelty_k)
    out = []
    for r, mc, nv in zip(rows, max_cos, novelty):
        row = {k: v for k, v in r.items() if k != "embedding"}
        row[EMBEDDING_STAT] = float(mc)
        row[NOVELTY_STAT] = float(nv)
        out.append(row)
    return out, last


def _needs_embeddings(rows_sets: list[list[dict]], stats=(EMBEDDING_STAT,)) -> bool:
    """Whether some row lacks a finite value of one of `stats` and carries no embedding to compute it from."""
    for rows in rows_sets:
        for row in rows:
            for stat in stats:
                v = row.get(stat)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    if _stored_vector(row) is None:
                        return True
                    break
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
    wanted = [s for s in EMBEDDING_STATS if s in cfg.stats]
    if use_embeddings and wanted:
        if index_prompts is not None or _needs_embeddings([ref_rows, *windows], wanted):
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
    write_json(Path(json_out), out, allow_nan=False)
    return out


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
    parser.add_argument("--novelty-quantile", type=float, default=d.novelty_quantile,
                        help="the novelty tail count counts window prompts above this quantile of the index's "
                             "leave-one-out novelty")
    parser.add_argument("--no-embeddings", action="store_true", help="do not load the embedding model")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when any window drifted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterops monitor check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = DriftConfig(alpha=args.alpha, min_window=args.min_window,
                      novelty_quantile=getattr(args, "novelty_quantile", DriftConfig.novelty_quantile))
    out = run_check(args.reference, args.current, args.json_out, index_prompts=args.index, cfg=cfg,
                    use_embeddings=not args.no_embeddings)
    for r in out["results"]:
        print(f"{r['current']}: {r['status']} - {r['reason']}")
    return 1 if (out["drift"] and args.fail_on_drift) else 0


if __name__ == "__main__":
    sys.exit(main())
