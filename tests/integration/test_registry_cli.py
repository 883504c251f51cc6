"""`adapterops registry list|show|history|promote|rollback` on a real MLflow registry (SQLite in tmp): readable
tables with lineage and audit, the same facts as --json, and bad input as one `error:` paragraph with exit code 2.

Versions carry the tags that pipelines.register.lineage_tags derives from train/merge manifests, so the CLI is checked
against what the pipeline really writes.
"""

import json
import re
import socket
import time
import uuid

import pytest

from pipelines import cli
from pipelines.register import lineage_tags
from registry.versions import AdapterRegistry, SimulatedCrash

from registry_fixtures import make_adapter

pytestmark = pytest.mark.integration

BASE = "ab12" * 16
CATEGORIES = {"ACCOUNT": 20, "ORDER": 10}


def _manifests(root, seed, gates):
    """Train and merge manifests with the fields lineage_tags reads (written by hand: no training here)."""
    train, merge = root / f"train{seed}", root / f"merge{seed}"
    train.mkdir(parents=True)
    merge.mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({
        "inputs": {"base_sha256": BASE, "train_sha256": f"{seed}" * 64, "val_sha256": f"{seed}a" * 32,
                   "init_key": f"init-{seed}"},
        "method": "pissa", "rank": 4, "config": {"steps": 10 * seed, "lr": 1e-3}, "code_version": f"c0de{seed}",
        "data": {"train_categories": CATEGORIES}}))
    (merge / "manifest.json").write_text(json.dumps({
        "gates": [{"name": name, "passed": ok, "value": 0.1} for name, ok in gates.items()],
        "config": {"quantize": "nf4"}, "gates_passed": all(gates.values())}))
    return train, merge


@pytest.fixture(scope="module")
def registry_with_history(tmp_path_factory):
    """v1 (first), v2 (warm start from v1), v3 (failed a gate); v1 promoted, v2 canaried and promoted, rolled back."""
    tmp = tmp_path_factory.mktemp("cli")
    uri = f"sqlite:///{tmp}/mlflow.db"
    reg = AdapterRegistry(uri)
    family = f"cli-{uuid.uuid4().hex[:6]}"
    specs = [(1, None, {"merge_fidelity": True, "nf4_kl": True}), (2, "1", {"merge_fidelity": True, "nf4_kl": True}),
             (3, "2", {"merge_fidelity": True, "nf4_kl": False})]
    tags = {}
    for seed, parent, gates in specs:
        train, merge = _manifests(tmp, seed, gates)
        tags[str(seed)] = lineage_tags(train, merge, parent, CATEGORIES)
        run_id = reg.create_run("adapters")
        reg.register(family, run_id, {"adapter": make_adapter(tmp / f"a{seed}", seed)}, tags[str(seed)],
                     all(gates.values()))
    reg.promote(family, "1", actor="alice", reason="first release")
    reg.set_challenger(family, "2", actor="rollout", reason="canary 10%")
    reg.promote(family, "2", actor="rollout", reason="canary won at every step")
    reg.rollback(family, actor="oncall", reason="p99 latency regression")
    return uri, family, tags


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _section(text, title):
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_show_prints_lineage_gates_artifacts_and_audit(registry_with_history, capsys):
    uri, family, tags = registry_with_history
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "show", family, "2")
    assert code == 0
    assert out.splitlines()[0] == f"{family} v2   aliases: -   gates: passed"
    lineage = _section(out, "Lineage")
    values = {line[:line.index("  ", 2)].strip(): line[line.index("  ", 2):].strip() for line in lineage}
    t = tags["2"]
    assert values == {
        "base model": t["base_sha256"],
        "dataset": t["dataset_sha256"],
        "categories": "2 categories, 30 examples: ACCOUNT 20, ORDER 10",
        "validation set": t["val_sha256"],
        "init cache key": "init-2",
        "parent version": "v1 (warm start)",
        "training config": t["train_config_sha256"],
        "code version": "c0de2",
        "recipe": "method pissa, rank 4, quantize nf4",
    }
    assert len({len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in lineage}) == 1, "values aligned"
    assert [line.split() for line in _section(out, "Gates: passed")] == [["merge_fidelity", "pass"], ["nf4_kl", "pass"]]
    reg = AdapterRegistry(uri)
    (artifact,) = _section(out, "Artifacts (tree sha256, checked on every download)")
    assert artifact.split() == ["adapter", reg.get(family, "2").tags["sha256.adapter"]]
    audit = _section(out, "Alias history of v2 (# as in `registry history`)")
    assert audit[0].split() == ["#", "when", "(UTC)", "op", "from", "to", "who", "why"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in audit[1:]]
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("2", "set_challenger", "-", "2", "rollout", "canary 10%"),
        ("3", "promote", "1", "2", "rollout", "canary won at every step"),
        ("4", "rollback", "2", "1", "oncall", "p99 latency regression"),
    ]

    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "show", family, "3")
    assert out.splitlines()[0] == f"{family} v3   aliases: -   gates: FAILED"
    assert [line.split() for line in _section(out, "Gates: FAILED")] == [["merge_fidelity", "pass"], ["nf4_kl", "FAIL"]]
    never = ["  (never promoted, rolled back or canaried)"]
    assert _section(out, "Alias history of v3 (# as in `registry history`)") == never
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "show", family, "1")
    assert "parent version   none: trained from the init cache entry" in out


def test_history_and_list_tables(registry_with_history, capsys):
    uri, family, _ = registry_with_history
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "history", family)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{family}: champion v1"
    header, *rows = lines[2:]
    assert header.split() == ["#", "when", "(UTC)", "op", "from", "to", "who", "why"]
    parsed = [re.split(r"\s{2,}", r.strip()) for r in rows]
    assert [p[0] for p in parsed] == ["1", "2", "3", "4"]
    assert [tuple(p[2:]) for p in parsed] == [
        ("promote", "-", "1", "alice", "first release"),
        ("set_challenger", "-", "2", "rollout", "canary 10%"),
        ("promote", "1", "2", "rollout", "canary won at every step"),
        ("rollback", "2", "1", "oncall", "p99 latency regression"),
    ]
    for p in parsed:
        assert abs(time.mktime(time.strptime(p[1], "%Y-%m-%d %H:%M:%S")) - time.mktime(time.gmtime())) < 600
    assert {r.index(p[2]) for r, p in zip(rows, parsed)} == {header.index("op")}, "the op column is aligned"

    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "list", family)
    header, *rows = out.splitlines()
    assert header.split() == ["family", "version", "aliases", "gates", "method", "base", "parent", "created", "(UTC)"]
    assert [r.split()[:7] for r in rows] == [
        [family, "1", "champion", "pass", "pissa", BASE[:12], "-"],
        [family, "2", "-", "pass", "pissa", BASE[:12], "v1"],
        [family, "3", "-", "FAIL", "pissa", BASE[:12], "v2"],
    ]


def test_json_output_matches_the_registry(registry_with_history, capsys):
    uri, family, tags = registry_with_history
    reg = AdapterRegistry(uri)
    _, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "show", family, "2", "--json")
    d = json.loads(out)
    assert (d["family"], d["version"], d["gates_passed"], d["aliases"]) == (family, "2", True, [])
    assert d["lineage"]["dataset_categories"] == CATEGORIES and d["lineage"]["parent_version"] == "1"
    assert d["lineage"]["base_sha256"] == tags["2"]["base_sha256"]
    assert d["gates"] == {"merge_fidelity": True, "nf4_kl": True}
    assert d["artifacts"] == {"adapter": reg.get(family, "2").tags["sha256.adapter"]}
    assert [(h["op"], h["actor"]) for h in d["history"]] == [("set_challenger", "rollout"), ("promote", "rollout"),
                                                             ("rollback", "oncall")]
    _, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "history", family, "--json")
    h = json.loads(out)
    assert h["aliases"] == reg.aliases(family) == {"champion": "1"}
    assert [r["reason"] for r in h["records"]] == [r.reason for r in reg.history(family)]
    assert h["in_flight"] == {"intent": None, "leases": []}
    _, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "list", family, "--json")
    assert [(v["version"], v["aliases"], v["gates_passed"]) for v in json.loads(out)] == [
        ("1", ["champion"], True), ("2", [], True), ("3", [], False)]


def test_promote_and_rollback_through_the_cli(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = AdapterRegistry(uri)
    family = "cli-ops"
    for seed in (1, 2):
        reg.register(family, reg.create_run("adapters"), {"adapter": make_adapter(tmp_path / f"a{seed}", seed)},
                     {"base_sha256": BASE}, True)
    base = ["registry", "--tracking-uri", uri]
    assert run_cli(capsys, *base, "promote", family, "1", "--actor", "ann", "--reason", "first")[:2] == (
        0, f"promote: {family} champion v- -> v1 by ann\n")
    code, out, _ = run_cli(capsys, *base, "promote", family, "2", "--actor", "ann", "--json")
    assert code == 0 and {k: json.loads(out)[k] for k in ("op", "from_version", "to_version")} == {
        "op": "promote", "from_version": "1", "to_version": "2"}
    noop = run_cli(capsys, *base, "promote", family, "2")
    assert noop[:2] == (0, f"{family} v2 is already the champion; nothing changed\n")
    assert run_cli(capsys, *base, "rollback", family, "--reason", "bad")[:2] == (
        0, f"rollback: {family} champion v2 -> v1 by {reg.history(family)[-1].actor}\n")
    assert reg.aliases(family) == {"champion": "1"}

    # another promotion in flight (this process crashed half way, so its lease is live): refused at once with --wait 0
    holder = AdapterRegistry(uri, lease_seconds=120)
    with pytest.raises(SimulatedCrash):
        holder.promote(family, "2", actor="deployer", _fail_after_step=1)
    code, _, err = run_cli(capsys, *base, "rollback", family, "--wait", "0")
    assert code == 2 and err.startswith(f"error: cannot rollback {family}: another alias operation is in flight: "
                                        "promote by deployer (pid ")
    code, out, _ = run_cli(capsys, *base, "history", family)
    assert "UNFINISHED: promote v1 -> v2 by deployer" in out and "lease: promote by deployer (pid" in out


@pytest.mark.parametrize("argv, message", [
    (["show", "no-such-family", "1"], "error: no adapter family 'no-such-family'"),
    (["show", "a;rm -rf ~", "1"], "error: invalid family name 'a;rm -rf ~'"),
    (["history", "../etc"], "error: invalid family name '../etc'"),
    (["list", "$(id)"], "error: invalid family name '$(id)'"),
    (["promote", "fam/x", "1"], "error: invalid family name 'fam/x'"),
])
def test_bad_names_are_one_error_paragraph(registry_with_history, capsys, argv, message):
    uri, family, _ = registry_with_history
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", uri, *argv)
    assert (code, out) == (2, "") and err.startswith(message) and err.count("\n") == 1
    assert AdapterRegistry(uri).families() == [family]


def test_bad_versions_and_refusals_leave_the_registry_untouched(registry_with_history, capsys):
    uri, family, _ = registry_with_history
    reg = AdapterRegistry(uri)
    before = (reg.aliases(family), reg.history(family))
    for argv, message in [
        (["show", family, "1;2"], "is not a version number"),
        (["promote", family, "9"], f"adapter family '{family}' has no version 9 (it has: 1, 2, 3)"),
        (["promote", family, "3"], "its gates failed"),
        (["promote", family, "../1"], "is not a version number"),
        (["rollback", family], "has no previous version to return to"),
    ]:
        code, _, err = run_cli(capsys, "registry", "--tracking-uri", uri, *argv)
        assert code == 2 and message in err, err
    assert (reg.aliases(family), reg.history(family)) == before


def test_unreachable_registry_is_a_clear_error_in_bounded_time(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code, _, err = run_cli(capsys, "registry", "--tracking-uri", f"http://127.0.0.1:{port}", "list")
    assert code == 2 and time.monotonic() - t0 < 10
    assert err.startswith(f"error: MLflow backend http://127.0.0.1:{port} is unreachable after 3 tries")
    assert err.rstrip().endswith("start it or fix MLFLOW_TRACKING_URI")
