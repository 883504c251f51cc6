"""The registry half of the bad-input matrix (issue 16 items 8-10), on a real MLflow registry (SQLite in tmp):
corrupt intent and audit tags, alias moves interrupted at every step as readers see them, `registry verify`,
`registry recover`, `registry ping`, base bindings at registration and a truncated init-cache index that `warm`
repairs. Each case asserts the one line, the exit code and that nothing was written or lost.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from pipelines import cli
from registry.versions import (
    AUDIT_PREFIX,
    FAMILY_TAG_KEY,
    FAMILY_TAG_VALUE,
    INTENT_TAG,
    AdapterRegistry,
    BaseMismatch,
    RegistryError,
    SimulatedCrash,
)

from registry_fixtures import make_adapter

pytestmark = pytest.mark.integration

BASE = "ab12" * 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def templates(uri, tmp_path_factory):
    """Three registered versions whose artifacts the tests' families point at (no re-upload per test)."""
    reg = AdapterRegistry(uri)
    tmp = tmp_path_factory.mktemp("templates")
    family = f"template-{uuid.uuid4().hex[:6]}"
    return [reg.register(family, reg.create_run("adapters"), {"adapter": make_adapter(tmp / f"a{s}", s)},
                         {"base_sha256": BASE}, True) for s in (1, 2, 3)]


@pytest.fixture
def family(uri, templates):
    """A fresh family of three versions, v1 champion."""
    reg = AdapterRegistry(uri)
    name = f"fam-{uuid.uuid4().hex[:8]}"
    reg.client.create_registered_model(name, tags={FAMILY_TAG_KEY: FAMILY_TAG_VALUE})
    for v in templates:
        reg.client.create_model_version(name, v.source, run_id=v.run_id, tags=v.tags)
    reg.promote(name, "1", actor="setup")
    return name


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def state(reg, family):
    rm = reg.client.get_registered_model(family)
    return {k: str(v) for k, v in rm.aliases.items()}, dict(rm.tags)


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("error: "):].rstrip("\n")


# -- corrupt intent record: every alias operation and reader says how to clear it ----------------------------------

CORRUPT_INTENTS = {
    "truncated-json": '{"id": "abc", "op": "prom',
    "not-an-object": '["promote"]',
    "missing-fields": '{"op": "promote"}',
    "bad-move": json.dumps({"id": "x" * 32, "op": "promote", "family": "f", "from_version": "1", "to_version": "2",
                            "actor": "a", "reason": "", "ts": 0, "audit_key": "audit.000009",
                            "moves": [["teleport", "champion", "2"]]}),
    "unknown-alias": json.dumps({"id": "x" * 32, "op": "promote", "family": "f", "from_version": "1",
                                 "to_version": "2", "actor": "a", "reason": "", "ts": 0, "audit_key": "audit.000009",
                                 "moves": [["set", "king", "2"]]}),
    "binary": "\x00\x01\x02garbage",
}
COMMANDS = {
    "list": ["list", "{f}"], "show": ["show", "{f}", "1"], "history": ["history", "{f}"],
    "promote": ["promote", "{f}", "2", "--wait", "0"], "rollback": ["rollback", "{f}", "--wait", "0"],
    "recover": ["recover", "{f}", "--wait", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("corruption", list(CORRUPT_INTENTS))
def test_corrupt_intent_is_one_line_saying_how_to_clear_it(uri, family, capsys, corruption, command):
    reg = AdapterRegistry(uri)
    reg.client.set_registered_model_tag(family, INTENT_TAG, CORRUPT_INTENTS[corruption])
    before = state(reg, family)
    argv = [a.format(f=family) for a in COMMANDS[command]]
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", uri, *argv)
    if command in ("list", "show", "history"):  # readers go on with the aliases as they are, and say why
        assert code == 0 and out and err.startswith("note: ") and err.count("\n") == 1, err
        line = err[len("note: "):]
        assert AdapterRegistry(uri).aliases(family) == {"champion": "1"}
    else:
        line = one_line(err)
        assert code == 2 and out == ""
    assert f"the intent record of {family} (registered-model tag 'adapterops.intent') is unreadable" in line
    assert f"`adapterops registry recover {family} --discard-intent`" in line
    assert state(reg, family) == before, "a refused request changes nothing (no alias, lease or audit record)"


def test_discard_intent_clears_a_corrupt_intent_and_nothing_else(uri, family, capsys):
    reg = AdapterRegistry(uri)
    reg.client.set_registered_model_tag(family, INTENT_TAG, CORRUPT_INTENTS["truncated-json"])
    aliases, tags = state(reg, family)
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "recover", family, "--discard-intent")
    assert (code, out) == (0, f"{family}: no unfinished alias move; nothing to do\n")
    assert state(reg, family) == (aliases, {k: v for k, v in tags.items() if k != INTENT_TAG})
    assert run_cli(capsys, "registry", "--tracking-uri", uri, "promote", family, "2")[0] == 0
    assert reg.aliases(family) == {"champion": "2", "previous": "1"}


def test_discard_intent_never_discards_a_readable_one(uri, family):
    reg = AdapterRegistry(uri, lease_seconds=0.2)
    with pytest.raises(SimulatedCrash):
        reg.promote(family, "2", actor="ci", _fail_after_step=2)
    import time

    time.sleep(0.3)
    rec = AdapterRegistry(uri).recover(family, discard_unreadable_intent=True)
    assert rec is not None and rec.op == "promote"
    assert AdapterRegistry(uri).aliases(family) == {"champion": "2", "previous": "1"}


# -- corrupt audit records ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["not json", "{\"op\": \"promote\"}", "[]", "{\"op\": 1, \"extra\": 2}"])
def test_corrupt_audit_record_is_one_line_and_does_not_block_promote(uri, family, capsys, value):
    reg = AdapterRegistry(uri)
    reg.client.set_registered_model_tag(family, f"{AUDIT_PREFIX}000001", value)
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", uri, "history", family)
    line = one_line(err)
    assert code == 2 and out == "" and f"audit record 'audit.000001' of {family} is unreadable" in line
    assert "restore that registered-model tag's JSON" in line
    assert run_cli(capsys, "registry", "--tracking-uri", uri, "promote", family, "2")[0] == 0
    tags = state(reg, family)[1]
    assert tags[f"{AUDIT_PREFIX}000001"] == value, "the damaged record is left as it is, not overwritten"
    assert json.loads(tags[f"{AUDIT_PREFIX}000002"])["to_version"] == "2"


def test_audit_tag_with_a_non_numeric_suffix_does_not_break_numbering(uri, family, capsys):
    reg = AdapterRegistry(uri)
    reg.client.set_registered_model_tag(family, f"{AUDIT_PREFIX}note", json.dumps({"hand": "written"}))
    assert run_cli(capsys, "registry", "--tracking-uri", uri, "promote", family, "2")[0] == 0
    assert f"{AUDIT_PREFIX}000002" in state(reg, family)[1]


# -- readers never see half of an alias move -----------------------------------------------------------------------

PROMOTE_STEPS, ROLLBACK_STEPS = 6, 5


def _crash(uri, family, op, step):
    crashing = AdapterRegistry(uri, lease_seconds=600)
    if op == "promote":
        AdapterRegistry(uri).set_challenger(family, "2", actor="setup")
        with pytest.raises(SimulatedCrash):
            crashing.promote(family, "2", actor="ci", reason="canary won", _fail_after_step=step)
        return {"champion": "2", "previous": "1"}
    AdapterRegistry(uri).promote(family, "2", actor="setup")
    with pytest.raises(SimulatedCrash):
        crashing.rollback(family, actor="ci", reason="bad", _fail_after_step=step)
    return {"champion": "1"}


@pytest.mark.parametrize(("op", "step"), [("promote", s) for s in range(1, PROMOTE_STEPS)] +
                         [("rollback", s) for s in range(1, ROLLBACK_STEPS)])
def test_readers_see_the_move_whole_after_a_crash_at_any_step(uri, family, capsys, op, step):
    expected = _crash(uri, family, op, step)
    reader = AdapterRegistry(uri)
    before = state(reader, family)
    assert reader.aliases(family) == expected
    assert reader.alias(family, "champion") == expected["champion"]
    assert reader.alias(family, "previous") == expected.get("previous")
    assert reader.pending(family)["op"] == op
    versions = {v.version: v.aliases for v in reader.list_versions(family)}
    assert [v for v, a in versions.items() if "champion" in a] == [expected["champion"]]
    assert reader.get(family, expected["champion"]).aliases.count("champion") == 1
    last = reader.history(family)[-1]
    assert (last.op, last.actor, last.to_version) == (op, "ci", expected["champion"]), "its audit record is shown"
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", uri, "list", family)
    assert code == 0 and err.startswith(f"note: an alias move of {family} is unfinished ({op}") and err.count("\n") == 1
    assert f"`adapterops registry recover {family}` completes it" in err
    assert state(reader, family) == before, "readers write nothing (the lease of the dead holder stays)"


def test_registry_recover_completes_the_move(uri, family, capsys):
    expected = _crash(uri, family, "promote", 3)
    reg = AdapterRegistry(uri)
    # the crashed holder is this process (alive), so its lease is live until it expires: recover refuses at once
    code, _, err = run_cli(capsys, "registry", "--tracking-uri", uri, "recover", family, "--wait", "0")
    assert code == 2 and "another alias operation is in flight: promote by ci" in one_line(err)
    _, leases = reg.in_flight(family)
    for lease in leases:
        reg.client.delete_registered_model_tag(family, lease.tag)  # as if it expired
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "recover", family)
    assert code == 0 and out == f"recovered: promote of {family} v1 -> v2 by ci completed\n"
    raw = reg.client.get_registered_model(family)
    assert {k: str(v) for k, v in raw.aliases.items()} == expected and INTENT_TAG not in raw.tags
    assert [h.op for h in reg.history(family) if h.actor == "ci"] == ["promote"]
    assert run_cli(capsys, "registry", "--tracking-uri", uri, "recover", family)[1].endswith("nothing to do\n")


# -- registry verify -------------------------------------------------------------------------------------------------

def _stored(info, name: str) -> Path:
    return Path(info.source) / name


def test_verify_all_ok(uri, family, capsys):
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "verify", family)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(v, "adapter", "ok") for v in ("1", "2", "3")]
    assert out.splitlines()[-1] == "3 ok, 0 with problems"


def test_verify_reports_mismatch_and_missing_and_exits_1(uri, tmp_path, capsys):
    reg = AdapterRegistry(uri)
    family = f"verify-{uuid.uuid4().hex[:6]}"
    infos = [reg.register(family, reg.create_run("verify"), {"adapter": make_adapter(tmp_path / f"a{s}", s),
                                                             "report": _file(tmp_path / f"r{s}.json")},
                          {"base_sha256": BASE}, True) for s in (1, 2)]
    weights = _stored(infos[0], "adapter") / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" + weights.read_bytes()[1:])  # one byte flipped in the store
    shutil.rmtree(_stored(infos[1], "report"))
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "verify", family, "--json")
    assert code == 1
    got = {(r["version"], r["artifact"]): r["status"] for r in json.loads(out)["artifacts"]}
    assert got == {("1", "adapter"): "MISMATCH", ("1", "report"): "ok", ("2", "adapter"): "ok",
                   ("2", "report"): "missing"}
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "verify", family, "2")
    assert code == 1 and "missing" in out and "MISMATCH" not in out
    assert not (tmp_path / "downloads").exists()


def _file(path: Path) -> Path:
    path.write_text(json.dumps({"kl": 0.01}))
    return path


@pytest.mark.parametrize(("argv", "needle"), [
    (["verify", "no-such-family"], "no adapter family 'no-such-family'"),
    (["verify", "{f}", "9"], "has no version 9"),
    (["verify", "{f}", "x"], "'x' of '{f}' is not a version number"),
    (["verify", "../x"], "invalid family name '../x'"),
    (["show", "{f}", "0x1"], "is not a version number"),
    (["promote", "{f}", "-1"], "is not a version number"),
    (["history", "a b"], "invalid family name 'a b'"),
    (["recover", "no-such-family"], "no adapter family 'no-such-family'"),
])
def test_verify_and_friends_refuse_bad_names(uri, family, capsys, argv, needle):
    reg = AdapterRegistry(uri)
    before = state(reg, family)
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", uri, *[a.format(f=family) for a in argv])
    assert code == 2 and out == "" and needle.format(f=family) in one_line(err)
    assert state(reg, family) == before


def test_ping_answers_with_a_real_query(uri, capsys):
    code, out, _ = run_cli(capsys, "registry", "--tracking-uri", uri, "ping")
    assert code == 0 and out.startswith(f"ok: {uri} answered a registry query in ")
    assert AdapterRegistry(uri).ping()["ok"] is True


def test_read_only_commands_never_create_a_database(tmp_path, capsys):
    db = tmp_path / "mlfow.db"  # a typo of mlflow.db
    for argv in (["list"], ["show", "f", "1"], ["history", "f"], ["verify", "f"], ["ping"]):
        code, _, err = run_cli(capsys, "registry", "--tracking-uri", f"sqlite:///{db}", *argv)
        assert code == 2 and f"no registry at {db}" in one_line(err)
    assert not db.exists() and list(tmp_path.iterdir()) == []


def test_corrupt_sqlite_file_is_one_line_and_left_as_it_is(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)  # right header, garbage pages
    data = db.read_bytes()
    code, out, err = run_cli(capsys, "registry", "--tracking-uri", f"sqlite:///{db}", "list")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "database" in line and ("restore it from a backup" in line or "unreadable" in line), line
    assert db.read_bytes() == data


# -- base bindings at registration ------------------------------------------------------------------------------------

def test_register_checks_the_binding_inside_the_adapter(uri, tmp_path):
    from registry.binding import write_binding

    reg = AdapterRegistry(uri)
    family = f"bind-{uuid.uuid4().hex[:6]}"
    other = write_binding(make_adapter(tmp_path / "other", 1), "cd34" * 16, "plain")
    native = make_adapter(tmp_path / "native", 2)
    write_binding(native, BASE, "pissa_residual", "pissa", "init-cache/k")
    for adapter, needle in ((tmp_path / "other", "was trained on base sha256:cd34cd34cd34"),
                            (native, "it is the PiSSA adapter as trained")):
        with pytest.raises(BaseMismatch, match=needle):
            reg.register(family, reg.create_run("bind"), {"adapter": adapter}, {"base_sha256": BASE}, True)
    assert family not in reg.families(), "nothing was registered"
    assert other["base"] == "plain"
    good = write_binding(make_adapter(tmp_path / "good", 3), BASE, "plain") and tmp_path / "good"
    info = reg.register(family, reg.create_run("bind"), {"adapter": good}, {"base_sha256": "sha256:" + BASE}, True)
    resolved = reg.resolve(f"{family}@{info.version}", tmp_path / "dl", expected_base_sha256=BASE)
    assert (resolved.path / "adapterops.json").is_file()


def test_failed_registration_marks_its_run_failed(uri, tmp_path):
    """pipelines.register.run: a registration refused half way leaves its MLflow run FAILED, not RUNNING."""
    from pipelines import register

    train, merge = tmp_path / "train", tmp_path / "merge"
    make_adapter(train / "adapter", 1)
    (train / "adapter_native").mkdir()
    (train / "manifest.json").write_text(json.dumps({
        "kind": "adapter", "fingerprint": "f" * 16, "method": "lora", "rank": 4, "code_version": "c",
        "inputs": {"base_sha256": BASE, "train_sha256": "1" * 64, "val_sha256": "2" * 64, "init_key": "k"},
        "config": {"steps": 1}, "data": {"train_categories": {"A": 1}}, "curve": [], "evals": [], "metrics": {},
        "health": {"checks": []}}))
    (merge / "golden").mkdir(parents=True)
    (merge / "golden" / "parity_golden.safetensors").write_bytes(b"x")
    (merge / "manifest.json").write_text(json.dumps({"kind": "merged", "gates": [], "config": {"quantize": "none"},
                                                      "gates_passed": True}))
    reg = AdapterRegistry(uri)
    with pytest.raises(RegistryError, match="artifact 'gates' at .* does not exist"):
        register.run(reg, f"fail-{uuid.uuid4().hex[:6]}", train, merge, log=lambda *a: None)
    runs = [r for e in reg.client.search_experiments() if e.name.startswith("adapterops-fail-")
            for r in reg.client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FAILED"]


# -- a truncated init-cache index: `init-cache warm` repairs it -----------------------------------------------------

def test_init_cache_warm_repairs_a_truncated_index(tmp_path, capsys):
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    argv = ["init-cache", "warm", "--method", "lora", "--rank", "2", "--targets", "q_proj", "--store", str(store),
            "--scratch", str(scratch), "--base", str(REPO / "models" / "tiny-llama")]
    code, out, _ = run_cli(capsys, *argv)
    first = json.loads(out.splitlines()[-1])
    assert code == 0 and first["hit"] is False
    index = store / first["key"] / "_index.json"
    index.write_text(index.read_text()[:40])
    code, out, err = run_cli(capsys, "init-cache", "verify", "--store", str(store))
    assert code == 1 and "_index.json is unreadable" in out and err == ""
    code, out, _ = run_cli(capsys, *argv)
    again = json.loads(out.splitlines()[-1])
    assert code == 0 and again["key"] == first["key"] and again["hit"] is False, "evicted and rebuilt"
    assert "is corrupt" in out and "evicting and recomputing" in out
    assert run_cli(capsys, "init-cache", "verify", "--store", str(store))[:2] == (0, f"{first['key']}: ok\n")
    code, out, _ = run_cli(capsys, *argv)
    assert json.loads(out.splitlines()[-1])["hit"] is True
