"""Replay buffer vs none: old-category validation loss after incremental retraining on the new categories.

Run:  python -m bench.run replay_eval              (~10 min on 2 busy cores; reuses drift_eval's v1 adapter if there)
      python -m bench.run replay_eval --seeds 0 1 --steps 100

v1 is the adapter drift_eval trains (PiSSA r8 on a seeded half of the "before" categories' training split; trained
here with the same function when missing). Each retrain warm-starts from v1 (pipelines.train.run with parent=v1,
the same cached init) on the "after" categories' training split for --steps steps, either mixed with a
category-balanced replay buffer of v1's training data (pipelines.replay.mix, ratio 0.2: the product default) or with
no replay. Both retrains take the same number of optimizer steps. Loss = mean response-token NLL
(pipelines.train.eval_loss) on the full old-category (before) validation split and on the new-category (after)
validation split, for v1 and each retrain. Target: replay within +2% of v1 on the old categories; no replay shows
the forgetting.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import BENCH_DIR, write_result
from bench.drift_eval import BASE, ensure_adapter, load_pools

NAME = "replay_eval"
REPO = BENCH_DIR.parent


def val_loss(init_entry: Path, train_dir: Path, rows, pad_id: int) -> float:
    """Validation loss of a trained adapter exactly as training measures it (base + cached residual + adapter)."""
    from pipelines.lm import build_model
    from pipelines.train import eval_loss

    model = build_model(BASE, init_entry, adapter=Path(train_dir) / "adapter_native", trainable=False)
    return eval_loss(model, rows, pad_id)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run replay_eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=REPO / "work" / "bench" / NAME)
    p.add_argument("--v1-workdir", type=Path, default=REPO / "work" / "bench" / "drift_eval",
                   help="where drift_eval keeps (or this bench trains) the v1 adapter")
    p.add_argument("--v1-steps", type=int, default=120, help="v1's training steps (as drift_eval)")
    p.add_argument("--steps", type=int, default=100, help="retraining steps (the demo's retrain: 100)")
    p.add_argument("--ratio", type=float, default=0.2, help="replay share of the retraining mix")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)

    from pipelines import init_cache, lm, manifest, replay, train
    from pipelines.data import CATEGORIES_AFTER, CATEGORIES_BEFORE, load_bitext, splits, write_jsonl
    from registry.store import LocalStore
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    v1_train, _ = load_pools(0, 0, None)
    v1_dir = ensure_adapter(args.v1_workdir, v1_train, args.v1_steps)
    init = init_cache.run(init_cache.InitConfig(), BASE, LocalStore(args.v1_workdir / "init-cache"),
                          args.v1_workdir / "init-local", log=print)
    if not init.hit:
        raise RuntimeError("the init cache missed after v1 was trained from it; the retrains must warm-start from "
                           "the same cached init")
    examples = load_bitext()
    before, after = splits(examples, CATEGORIES_BEFORE), splits(examples, CATEGORIES_AFTER)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    pad = tokenizer.pad_token_id
    old_rows = lm.tokenize(before["val"], tokenizer, 128)
    new_rows = lm.tokenize(after["val"], tokenizer, 128)
    new_val = write_jsonl(after["val"], args.workdir / "data" / "after-val.jsonl")

    v1_old, v1_new = val_loss(init.path, v1_dir, old_rows, pad), val_loss(init.path, v1_dir, new_rows, pad)
    rows = [{"case": "v1 (trained on before; no retraining)", "seed": "-", "old_val_loss": round(v1_old, 4),
             "old_rise_vs_v1": 0.0, "new_val_loss": round(v1_new, 4), "train_s": None}]
    rises: dict[str, list[float]] = {"replay": [], "none": []}
    new_loss: dict[str, list[float]] = {"replay": [], "none": []}
    for seed in args.seeds:
        for kind, ratio in (("replay", args.ratio), ("none", 0.0)):
            mixed = replay.mix(after["train"], v1_train, ratio=ratio, seed=seed) if ratio else list(after["train"])
            data = write_jsonl(mixed, args.workdir / "data" / f"retrain-{kind}-s{seed}.jsonl")
            cfg = train.TrainConfig(steps=args.steps, batch_size=8, max_len=128, eval_every=args.steps, seed=seed)
            out = train.run(cfg, BASE, init.path, data, new_val, args.workdir / f"retrain-{kind}-s{seed}",
                            parent=v1_dir, log=print)
            secs = manifest.read(out)["metrics"]["seconds"]  # the training's own time, also when reused
            old = val_loss(init.path, out, old_rows, pad)
            rises[kind].append(old / v1_old - 1)
            new_loss[kind].append(val_loss(init.path, out, new_rows, pad))
            label = (f"retrain on after + replay {ratio:.0%} (category-balanced)" if ratio
                     else "retrain on after, no replay")
            rows.append({"case": label, "seed": seed, "old_val_loss": round(old, 4),
                         "old_rise_vs_v1": round(old / v1_old - 1, 4),
                         "new_val_loss": round(new_loss[kind][-1], 4), "train_s": round(secs, 1)})
            print(rows[-1], flush=True)

    rep, none = statistics.mean(rises["replay"]), statistics.mean(rises["none"])
    notes = [
        f"Old-category validation loss vs v1 (mean over seeds {args.seeds}): replay {rep:+.2%}, no replay "
        f"{none:+.2%}. Target: replay within +2% of v1 -> " + ("met" if rep <= 0.02 else "NOT met") + "; no replay "
        + ("shows the forgetting." if none > max(rep, 0.0) + 0.01 else "does not show clear forgetting here."),
        f"v1: {v1_dir} ({len(v1_train)} before training examples, {args.v1_steps} steps). Retrains: {args.steps} "
        f"steps, batch 8, warm-started from v1 with the same cached PiSSA init; {len(after['train'])} after "
        f"examples (+ {replay.n_old_for(len(after['train']), args.ratio)} replayed before examples in the replay "
        f"runs). Old val: {len(old_rows)} before-category validation examples; new val: {len(new_rows)} after.",
        f"Both retrains take the same number of steps, so the replay run sees fewer new examples: its new-category "
        f"loss is {statistics.mean(new_loss['replay']) / statistics.mean(new_loss['none']) - 1:+.2%} vs no replay "
        f"(v1, never trained on them: {v1_new / statistics.mean(new_loss['none']) - 1:+.0%}), what replay costs on the "
        "new task.",
    ]
    write_result(NAME, {
        "title": "Replay buffer vs none: forgetting of the old categories after retraining",
        "description": ("Warm-started retraining of a before-category adapter on the after categories, with a 20% "
                        "category-balanced replay buffer of its old training data and without; validation loss on "
                        "the old and the new categories."),
        "command": "python -m bench.run replay_eval", "rows": rows, "notes": notes})
    print(f"replay_eval: done in {time.perf_counter() - t_start:.0f}s", flush=True)
