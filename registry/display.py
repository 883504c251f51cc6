"""Human-readable tables and JSON views of adapter versions and audit trails (what `adapterops registry` prints).

Pure functions of `VersionInfo` / `AuditRecord` values: no MLflow calls, so the CLI decides what to fetch.

Run:  adapterops registry list [NAME] | show NAME VERSION | history NAME   (each with --json)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from registry.versions import AuditRecord, Lease, VersionInfo

LINEAGE = {
    # tag written by pipelines.register.lineage_tags -> label
    "base_sha256": "base model",
    "dataset_sha256": "dataset",
    "dataset_categories": "categories",
    "val_sha256": "validation set",
    "init_key": "init cache key",
    "parent_version": "parent version",
    "train_config_sha256": "training config",
    "code_version": "code version",
    "method": "method",
    "rank": "rank",
    "quantize": "quantize",
}
JSON_TAGS = ("dataset_categories", "gates")
"""Tags that hold JSON objects: shown parsed."""
_REGISTRY_TAGS = ("gates_passed", "gates")


def utc(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded (reasons can be long)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    return ["  ".join([*(f"{str(c):{w}}" for c, w in zip(r, widths)), str(r[-1])]).rstrip() for r in [headers, *rows]]


def _json_tag(tags: dict[str, str], key: str):
    try:
        return json.loads(tags[key]) if key in tags else None
    except ValueError:
        return tags[key]  # written by hand: shown as it is


def version_dict(v: VersionInfo) -> dict:
    """A version as JSON: lineage, gate verdicts and artifact hashes apart, the remaining tags under `tags`."""
    lineage = {k: (_json_tag(v.tags, k) if k in JSON_TAGS else v.tags[k]) for k in LINEAGE if k in v.tags}
    artifacts = {k.removeprefix("sha256."): h for k, h in sorted(v.tags.items()) if k.startswith("sha256.")}
    known = set(LINEAGE) | set(_REGISTRY_TAGS)
    return {
        "family": v.family,
        "version": v.version,
        "aliases": v.aliases,
        "created": v.created,
        "created_utc": utc(v.created),
        "run_id": v.run_id,
        "source": v.source,
        "gates_passed": v.gates_passed(),
        "gates": _json_tag(v.tags, "gates") or {},
        "lineage": lineage,
        "artifacts": artifacts,
        "tags": {k: t for k, t in sorted(v.tags.items()) if k not in known and not k.startswith("sha256.")},
    }


def _gates_word(v: VersionInfo) -> str:
    return "pass" if v.gates_passed() else "FAIL"


def _parent(v: VersionInfo) -> str:
    p = v.tags.get("parent_version")
    return f"v{p}" if p else "-"


def render_list(versions: list[VersionInfo]) -> str:
    if not versions:
        return "no adapter versions registered"
    rows = [[v.family, v.version, ",".join(v.aliases) or "-", _gates_word(v), v.tags.get("method", "-"),
             _short_hash(v.tags.get("base_sha256")), _parent(v), utc(v.created)] for v in versions]
    return "\n".join(table(["family", "version", "aliases", "gates", "method", "base", "parent", "created (UTC)"],
                           rows))


def _short_hash(value: str | None) -> str:
    v = (value or "").removeprefix("sha256:")
    return v[:12] if v else "-"


def _categories(raw) -> str:
    if not isinstance(raw, dict):
        return str(raw)
    total = sum(n for n in raw.values() if isinstance(n, int))
    listed = ", ".join(f"{k} {n}" for k, n in sorted(raw.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(raw)} categories, {total} examples: {listed}"


def render_show(v: VersionInfo, history: list[AuditRecord]) -> str:
    """Everything known about one version: lineage, gates, artifact hashes, alias moves that involved it."""
    d = version_dict(v)
    out = [f"{v.family} v{v.version}   aliases: {', '.join(v.aliases) or '-'}   "
           f"gates: {'passed' if v.gates_passed() else 'FAILED'}",
           f"  created  {d['created_utc']} UTC",
           f"  run      {v.run_id or '-'}",
           f"  source   {v.source}", "", "Lineage"]
    lin = d["lineage"]
    rows = []
    for key, label in LINEAGE.items():
        if key in ("method", "rank", "quantize"):
            continue
        if key == "dataset_categories":
            value = _categories(lin[key]) if key in lin else "- (not recorded)"
        elif key == "parent_version":
            value = (f"v{lin[key]} (warm start)" if lin.get(key) else "none: trained from the init cache entry"
                     ) if key in lin else "- (not recorded)"
        else:
            value = lin.get(key) or "- (not recorded)"
        rows.append([f"  {label}", value])
    recipe = ", ".join(f"{k} {lin[k]}" for k in ("method", "rank", "quantize") if k in lin)
    rows.append(["  recipe", recipe or "- (not recorded)"])
    out += table(["", ""], rows)[1:]

    gates = d["gates"]
    out += ["", f"Gates: {'passed' if v.gates_passed() else 'FAILED'}"]
    if isinstance(gates, dict) and gates:
        out += table(["", ""], [[f"  {name}", "pass" if ok else "FAIL"] for name, ok in sorted(gates.items())])[1:]
    else:
        out.append("  (no per-gate verdicts recorded)")

    out += ["", "Artifacts (tree sha256, checked on every download)"]
    out += table(["", ""], [[f"  {name}", h] for name, h in d["artifacts"].items()])[1:] or ["  (none)"]

    mine = [(i, r) for i, r in enumerate(history, start=1) if v.version in (r.from_version, r.to_version)]
    out += ["", f"Alias history of v{v.version} (# as in `registry history`)"]
    out += ["  " + line for line in _history_rows(mine)] if mine else ["  (never promoted, rolled back or canaried)"]
    if d["tags"]:
        out += ["", "Other tags"]
        out += table(["", ""], [[f"  {k}", t] for k, t in d["tags"].items()])[1:]
    return "\n".join(out)


def _history_rows(numbered: list[tuple[int, AuditRecord]]) -> list[str]:
    rows = [[str(i), utc(r.ts), r.op, r.from_version or "-", r.to_version or "-", r.actor, r.reason or "-"]
            for i, r in numbered]
    return table(["#", "when (UTC)", "op", "from", "to", "who", "why"], rows)


def render_history(family: str, aliases: dict[str, str], records: list[AuditRecord],
                   intent: dict | None = None, leases: list[Lease] | None = None) -> str:
    """The audit trail (who, when, why, from, to), the aliases it led to, and any operation still in flight."""
    now = ", ".join(f"{a} v{aliases[a]}" for a in ("champion", "previous", "challenger") if a in aliases)
    out = [f"{family}: {now or 'no aliases set'}", ""]
    out += (_history_rows(list(enumerate(records, start=1))) if records
            else ["(no promotions, rollbacks or canaries yet)"])
    if intent:
        out += ["", f"UNFINISHED: {intent['op']} v{intent.get('from_version') or '-'} -> "
                    f"v{intent.get('to_version') or '-'} by {intent.get('actor')} at {utc(intent.get('ts'))} UTC "
                    "(the next promote/rollback completes it)"]
    for lease in leases or []:
        out.append(f"lease: {lease.describe()}, expires {utc(lease.expires)} UTC")
    return "\n".join(out)


def history_dict(family: str, aliases: dict[str, str], records: list[AuditRecord],
                 intent: dict | None = None, leases: list[Lease] | None = None) -> dict:
    return {"family": family, "aliases": aliases, "records": [asdict(r) for r in records],
            "in_flight": {"intent": intent, "leases": [asdict(lease) for lease in leases or []]}}
