"""The base binding inside an adapter directory: which base model (by content hash) its weights apply to.

An adapter is only correct on the base it was trained for, and a directory gets copied away from the training manifest
that names that base. So training writes `adapterops.json` beside `adapter_config.json` (PEFT and vLLM ignore other
files), and whoever merges, registers or serves the adapter checks it against the base at hand:

    {"format": 1, "base_sha256": "ab12…", "base": "plain", "method": "pissa", "init_key": "init-cache/…"}

`base` is `plain` (the base model as it is on disk: what `adapter/` is exported for) or `pissa_residual` (the adapter
as PiSSA trained it, `adapter_native/`: correct only on the residual W - BA of that init-cache entry, wrong on the
plain base, so every plain-base consumer refuses it).

    write_binding(out / "adapter", base_sha256=h, base="plain", method="lora", init_key=key)
    check_binding(Path("copied/adapter"), model_weights_hash(base_dir))   # raises BindingMismatch, or returns it
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.atomic import write_json

log = logging.getLogger(__name__)

BINDING_FILE = "adapterops.json"
BASES = ("plain", "pissa_residual")


class BindingMismatch(ValueError):
    """The adapter directory is bound to another base than the one it would be applied to (or is unreadable)."""


def _norm(sha: str | None) -> str:
    return (sha or "").strip().lower().removeprefix("sha256:")


def write_binding(adapter_dir: Path, base_sha256: str, base: str = "plain", method: str = "",
                  init_key: str = "") -> dict:
    if base not in BASES:
        raise ValueError(f"binding base {base!r} is not one of {BASES}")
    binding = {"format": 1, "base_sha256": _norm(base_sha256), "base": base, "method": method, "init_key": init_key}
    if base == "pissa_residual":
        binding["note"] = (f"PiSSA adapter as trained: its weights apply to the residual base of init-cache entry "
                           f"{init_key} (base minus the top singular directions), NOT to the plain base; merge or "
                           f"serve the sibling adapter/ (exported against the plain base) instead")
    write_json(Path(adapter_dir) / BINDING_FILE, binding)
    return binding


def read_binding(adapter_dir: Path) -> dict | None:
    """The directory's binding, or None for an adapter written before bindings existed (callers warn, then fall back
    to the training manifest). BindingMismatch when the file is there but unreadable."""
    path = Path(adapter_dir) / BINDING_FILE
    if not path.is_file():
        return None
    try:
        binding = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(binding, dict) or binding.get("base") not in BASES or not _norm(binding.get("base_sha256")):
            raise ValueError("needs 'base_sha256' and 'base' (plain or pissa_residual)")
    except (ValueError, UnicodeDecodeError) as e:
        raise BindingMismatch(f"{path} is unreadable ({' '.join(str(e).split())[:120]}); restore the adapter "
                              "directory from its training output") from None
    return binding


def check_binding(adapter_dir: Path, base_sha256: str, what: str = "use") -> dict | None:
    """Refuse (BindingMismatch) an adapter bound to another base, or to the PiSSA residual, for a plain-base `what`
    (merge, register, serve). Returns the binding; None (with a warning) for a directory without one."""
    binding = read_binding(adapter_dir)
    if binding is None:
        log.warning("%s has no %s (written before base bindings): cannot check its base here; falling back to the "
                    "training manifest beside it, if any", adapter_dir, BINDING_FILE)
        return None
    if binding["base"] == "pissa_residual":
        raise BindingMismatch(
            f"cannot {what} {adapter_dir} on a plain base: it is the PiSSA adapter as trained, bound to the residual "
            f"base of init-cache entry {binding.get('init_key') or '?'} ({BINDING_FILE}); use the sibling adapter/ "
            "directory, exported against the plain base"
        )
    if _norm(binding["base_sha256"]) != _norm(base_sha256):
        remedy = {"merge": "merge it into the base it was trained on"}.get(what, "use the base it was trained on")
        raise BindingMismatch(
            f"cannot {what} {adapter_dir}: it was trained on base sha256:{_norm(binding['base_sha256'])[:12]} (its "
            f"{BINDING_FILE}), but this base is sha256:{_norm(base_sha256)[:12]}; {remedy}, or retrain the adapter "
            "on this one"
        )
    return binding
