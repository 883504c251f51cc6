"""Content hashes for files, directory trees and base models.

Everything in `registry/` identifies artifacts by content: a directory's hash is the sha256 over its sorted manifest
(relative posix path -> file sha256), so it does not depend on where the tree lives or on mtimes.

    from registry.hashing import tree_hash
    tree_hash(Path("runs/adapter"))  # '3f1c…'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_files(root: Path) -> list[str]:
    """Relative posix paths of every file under root (hidden ones included), sorted.

    Symlinks to files count as files (their target's content is hashed); empty directories are not represented.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; pass the artifact directory to hash")
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def tree_manifest(root: Path) -> dict[str, str]:
    """Relative posix path -> sha256 for every file under root, in sorted path order."""
    root = Path(root)
    return {rel: sha256_file(root / rel) for rel in tree_files(root)}


def manifest_hash(manifest: dict[str, str]) -> str:
    """The sha256 that `tree_hash` computes, from an already built manifest."""
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(f"{manifest[rel]}  {rel}\n".encode())
    return h.hexdigest()


def tree_hash(root: Path) -> str:
    """sha256 over the sorted manifest: same files with the same bytes give the same hash wherever they live."""
    return manifest_hash(tree_manifest(root))


def model_weights_hash(model_dir: Path) -> str:
    """sha256 over the bytes of `model_dir/*.safetensors`, in sorted name order.

    Identifies a base model by its weights alone (config and tokenizer edits do not change it). For a single-file model
    it equals `sha256_file(model.safetensors)`.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_dir}; the base model must be saved as safetensors "
            "(save_pretrained(..., safe_serialization=True))"
        )
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
