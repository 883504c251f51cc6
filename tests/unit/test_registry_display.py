"""registry.display: the text and JSON views that `adapterops registry` prints, from hand-made versions/records."""

import json
import subprocess
import sys
from pathlib import Path

from registry.display import history_dict, render_history, render_list, render_show, table, version_dict
from registry.versions import AuditRecord, Lease, VersionInfo

REPO = Path(__file__).resolve().parents[2]


def _version(version="2", **tags):
    base = {"base_sha256": "ab" * 32, "gates_passed": "true", "sha256.adapter": "ef" * 32,
            "gates": json.dumps({"kl": True, "fidelity": True}), "dataset_categories": json.dumps({"A": 3, "B": 5})}
    return VersionInfo("fam", version, "run1", "/art/run1", {**base, **tags}, ["champion"], 1_700_000_000.0)


def test_table_aligns_columns_and_leaves_the_last_unpadded():
    lines = table(["a", "long header", "why"], [["xx", "1", "because"], ["y", "22", ""]])
    assert lines == ["a   long header  why", "xx  1            because", "y   22"]


def test_version_dict_parses_json_tags_and_keeps_hand_written_ones():
    d = version_dict(_version(note="hi", dataset_categories="not json"))
    assert d["gates"] == {"kl": True, "fidelity": True} and d["gates_passed"] is True
    assert d["lineage"] == {"base_sha256": "ab" * 32, "dataset_categories": "not json"}
    assert d["artifacts"] == {"adapter": "ef" * 32} and d["tags"] == {"note": "hi"}
    assert d["created_utc"] == "2023-11-14 22:13:20"


def test_show_marks_failed_gates_missing_lineage_and_unrelated_history():
    v = _version(gates_passed="false", gates=json.dumps({"kl": False, "fidelity": True}), parent_version="")
    history = [AuditRecord("promote", "fam", None, "1", "a", "first", 1.0),
               AuditRecord("set_challenger", "fam", None, "2", "b", "canary", 2.0)]
    out = render_show(v, history)
    assert out.splitlines()[0] == "fam v2   aliases: champion   gates: FAILED"
    assert "  kl        FAIL" in out and "  fidelity  pass" in out
    assert "categories       2 categories, 8 examples: B 5, A 3" in out
    assert "parent version   none: trained from the init cache entry" in out
    assert "init cache key   - (not recorded)" in out
    rows = out.split("Alias history of v2 (# as in `registry history`)\n")[1].splitlines()
    assert rows[1].split()[:3] == ["2", "1970-01-01", "00:00:02"] and len(rows) == 2  # only the record about v2


def test_history_and_list_say_what_is_in_flight_or_empty():
    lease = Lease("0f7a0d9b11", "fam", "promote", "ci", "host1", "scope", 42, 10.0, 70.0)
    intent = {"op": "promote", "from_version": "1", "to_version": "2", "actor": "ci", "ts": 10.0}
    out = render_history("fam", {"champion": "1", "challenger": "2"}, [], intent, [lease])
    assert out.splitlines() == [
        "fam: champion v1, challenger v2", "", "(no promotions, rollbacks or canaries yet)", "",
        "UNFINISHED: promote v1 -> v2 by ci at 1970-01-01 00:00:10 UTC (the next promote/rollback completes it)",
        "lease: promote by ci (pid 42 on host1, since 00:00:10 UTC, lease 0f7a0d9b), expires 1970-01-01 00:01:10 UTC",
    ]
    assert history_dict("fam", {}, [], intent, [lease])["in_flight"]["leases"][0]["pid"] == 42
    assert render_list([]) == "no adapter versions registered"


def test_display_loads_without_mlflow():
    code = "import sys, registry.display; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
