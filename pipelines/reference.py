"""Monitoring reference of a version: what its traffic statistics look like on its own training distribution.

Captured when a version is registered, by running validation prompts through the SAME serving code path that
production requests take (serving.pool.AdapterPool.complete), so monitors compare like with like. Holds:
reference.jsonl (prompt + per-request logit statistics + embedding max-cos) and train_index.npy (MiniLM embeddings of
the training prompts, the index the embedding-similarity monitor measures new prompts against).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import manifest
from pipelines.data import read_jsonl


def run(pool, key: str, adapter_dir: Path, train_data: Path, val_data: Path, out: Path, n_prompts: int = 200,
        max_tokens: int = 16, encoder=None, log=print) -> Path:
    """Write the reference for adapter `key` (loaded into `pool` from `adapter_dir`) to `out`."""
    import numpy as np
    from monitoring.drift import EMBEDDING_STAT
    from monitoring.embeddings import EmbeddingIndex, embed, load_encoder
    from registry.hashing import sha256_file, tree_hash

    inputs = {"adapter_sha256": tree_hash(Path(adapter_dir)), "train_sha256": sha256_file(Path(train_data)),
              "val_sha256": sha256_file(Path(val_data)), "base_sha256": pool.base_sha256}
    config = {"n_prompts": n_prompts, "max_tokens": max_tokens}
    fp = manifest.fingerprint("monitoring_reference", config, inputs)
    if manifest.reusable(out, "monitoring_reference", fp) is not None:
        return Path(out)
    encoder = encoder or load_encoder()
    train_prompts = [e.prompt for e in read_jsonl(Path(train_data))]
    index = EmbeddingIndex(embed(encoder, train_prompts))
    prompts = [e.prompt for e in read_jsonl(Path(val_data))][:n_prompts]
    pool.load(key, Path(adapter_dir))
    max_cos = index.max_cosine(embed(encoder, prompts))
    rows = []
    for prompt, mc in zip(prompts, max_cos):
        c = pool.complete(prompt, key, max_tokens=max_tokens)
        rows.append({"prompt": prompt, **c.stats, EMBEDDING_STAT: float(mc)})
    with manifest.staging(out) as tmp:
        with open(tmp / "reference.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        index.save(tmp / "train_index.npy")
        means = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k != "prompt"}
        manifest.write(tmp, "monitoring_reference", config, inputs, means=means, key=key)
    log(f"reference: {len(rows)} requests for {key} ({', '.join(f'{k}={v:.3f}' for k, v in means.items())})")
    return Path(out)
