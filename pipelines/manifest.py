"""Artifact manifests: every stage output directory carries manifest.json saying what made it.

A stage is idempotent through its manifest: if the output directory exists and its manifest's fingerprint
(kind + config + input hashes) matches, the stage returns it instead of recomputing. Outputs are written to a
sibling temp directory and renamed into place, so a crash never leaves a half-written directory that a later run
could mistake for a good one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common.atomic import write_json
from pipelines.config import REPO_ROOT

MANIFEST = "manifest.json"


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fingerprint(kind: str, config: dict, inputs: dict) -> str:
    payload = json.dumps({"kind": kind, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def read(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}; it is not an adapterops artifact directory")
    return json.loads(f.read_text())


def reusable(out: Path, kind: str, fp: str) -> dict | None:
    """The existing manifest if `out` already holds this exact artifact, else None."""
    try:
        m = read(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return m if m.get("kind") == kind and m.get("fingerprint") == fp else None


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a temp directory next to `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write(directory: Path, kind: str, config: dict, inputs: dict, **extra: Any) -> dict:
    m = {
        "kind": kind,
        "fingerprint": fingerprint(kind, config, inputs),
        "config": config,
        "inputs": inputs,
        "code_version": code_version(),
        "created": time.time(),
        **extra,
    }
    write_json(Path(directory) / MANIFEST, m, default=str)
    return m
