"""registry.versions.AdapterRegistry against real MLflow (SQLite in tmp; PostgreSQL on 127.0.0.1 for crash tests)."""

import json
import time
import uuid

import pytest

from registry.hashing import manifest_hash, sha256_file, tree_hash, tree_manifest
from registry.store import CorruptArtifact
from registry.versions import (
    AdapterRegistry,
    BaseMismatch,
    CorruptVersionArtifact,
    RegistryError,
    SimulatedCrash,
)

from registry_fixtures import make_adapter, moto_endpoint, postgres_uri  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

BASE = "sha256:" + "ab12" * 16
OTHER_BASE = "sha256:" + "cd34" * 16


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def reg(sqlite_uri):
    return AdapterRegistry(sqlite_uri)


@pytest.fixture
def family():
    return f"fam-{uuid.uuid4().hex[:8]}"


def register(reg, family, tmp_path, seed, gates=True, base=BASE, artifact_location=None):
    run_id = reg.create_run("adapters", artifact_location=artifact_location)
    adapter = make_adapter(tmp_path / f"adapter{seed}", seed)
    report = tmp_path / f"report{seed}" / "gate_report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"kl": 0.01 * seed, "passed": gates}))
    tags = {"base_sha256": base, "data_sha256": "d" * 64}
    return reg.register(family, run_id, {"adapter": adapter, "gate_report": report}, tags, gates)


def aliases(reg, family):
    return {k: str(v) for k, v in reg.client.get_registered_model(family).aliases.items()}


def test_register_records_lineage_hashes_and_gates(reg, family, tmp_path):
    v1 = register(reg, family, tmp_path, 1)
    v2 = register(reg, family, tmp_path, 2, gates=False)
    assert (v1.version, v2.version) == ("1", "2")
    assert v1.tags["base_sha256"] == BASE and v1.tags["data_sha256"] == "d" * 64
    assert v1.tags["sha256.adapter"] == tree_hash(tmp_path / "adapter1")
    report = tmp_path / "report1" / "gate_report.json"
    assert v1.tags["sha256.gate_report"] == manifest_hash({"gate_report.json": sha256_file(report)})
    assert v1.gates_passed() and not v2.gates_passed() and v2.tags["gates_passed"] == "false"
    assert v1.run_id and v1.source == reg.client.get_run(v1.run_id).info.artifact_uri
    assert abs(v1.created - time.time()) < 120
    assert [v.version for v in reg.list_versions(family)] == ["1", "2"]
    assert reg.get(family, "1").tags == v1.tags
    assert family in reg.families()
    artifacts = {f.path for f in reg.client.list_artifacts(v1.run_id)}
    assert artifacts == {"adapter", "gate_report"}


def test_register_refusals(reg, family, tmp_path):
    run_id = reg.create_run("adapters")
    adapter = make_adapter(tmp_path / "a")
    with pytest.raises(RegistryError, match="no 'adapter' entry"):
        reg.register(family, run_id, {"weights": adapter}, {"base_sha256": BASE}, True)
    (tmp_path / "notpeft").mkdir()
    with pytest.raises(RegistryError, match="not a PEFT adapter directory"):
        reg.register(family, run_id, {"adapter": tmp_path / "notpeft"}, {"base_sha256": BASE}, True)
    with pytest.raises(RegistryError, match="tag 'base_sha256'.*missing"):
        reg.register(family, run_id, {"adapter": adapter}, {"other": "x"}, True)
    with pytest.raises(RegistryError, match="set by the registry itself"):
        reg.register(family, run_id, {"adapter": adapter}, {"base_sha256": BASE, "gates_passed": "true"}, False)
    with pytest.raises(RegistryError, match="run 'nope' not found"):
        reg.register(family, "nope", {"adapter": adapter}, {"base_sha256": BASE}, True)
    with pytest.raises(ValueError, match="invalid family name '../etc'"):
        reg.register("../etc", run_id, {"adapter": adapter}, {"base_sha256": BASE}, True)
    with pytest.raises(ValueError, match="invalid artifact name"):
        reg.register(family, run_id, {"adapter": adapter, "bad/name": adapter}, {"base_sha256": BASE}, True)
    assert family not in reg.families()


def test_promote_rollback_and_history(reg, family, tmp_path):
    for seed in (1, 2, 3):
        register(reg, family, tmp_path, seed)
    assert reg.alias(family, "champion") is None
    reg.promote(family, "1", actor="alice", reason="first release")
    assert aliases(reg, family) == {"champion": "1"}
    reg.set_challenger(family, "2", actor="rollout", reason="canary 10%")
    assert reg.alias(family, "challenger") == "2"
    rec = reg.promote(family, "2", actor="rollout", reason="canary won")
    assert (rec.op, rec.from_version, rec.to_version) == ("promote", "1", "2")
    assert aliases(reg, family) == {"champion": "2", "previous": "1"}  # challenger cleared: it was v2
    assert [v.aliases for v in reg.list_versions(family)] == [["previous"], ["champion"], []]

    rec = reg.rollback(family, actor="oncall", reason="p99 latency regression")
    assert (rec.op, rec.from_version, rec.to_version) == ("rollback", "2", "1")
    assert aliases(reg, family) == {"champion": "1"}
    with pytest.raises(RegistryError, match="no previous version to return to"):
        reg.rollback(family)

    hist = reg.history(family)
    assert [(h.op, h.from_version, h.to_version, h.actor, h.reason) for h in hist] == [
        ("promote", None, "1", "alice", "first release"),
        ("set_challenger", None, "2", "rollout", "canary 10%"),
        ("promote", "1", "2", "rollout", "canary won"),
        ("rollback", "2", "1", "oncall", "p99 latency regression"),
    ]
    assert all(h.ts > 0 for h in hist) and hist == sorted(hist, key=lambda h: h.ts)

    noop = reg.promote(family, "1", actor="alice")
    assert noop.op == "noop" and "already the champion" in noop.reason
    assert len(reg.history(family)) == 4

    reg.set_challenger(family, "3")
    rec = reg.clear_challenger(family, reason="canary aborted")
    assert rec.op == "clear_challenger" and reg.alias(family, "challenger") is None


def test_rollback_onto_the_challenger_clears_it(reg, family, tmp_path):
    for seed in (1, 2):
        register(reg, family, tmp_path, seed)
    reg.promote(family, "1")
    reg.promote(family, "2")
    reg.set_challenger(family, "1", reason="re-test the old version")
    reg.rollback(family)
    assert aliases(reg, family) == {"champion": "1"}


def test_failed_gates_are_refused(reg, family, tmp_path):
    register(reg, family, tmp_path, 1)
    register(reg, family, tmp_path, 2, gates=False)
    reg.promote(family, "1")
    with pytest.raises(RegistryError, match=r"refusing to make .* v2 champion: its gates failed"):
        reg.promote(family, "2")
    with pytest.raises(RegistryError, match="gates failed"):
        reg.set_challenger(family, "2")
    with pytest.raises(RegistryError, match="is the champion"):
        reg.set_challenger(family, "1")
    assert aliases(reg, family) == {"champion": "1"}


def test_resolve_verifies_hashes_and_base(reg, family, tmp_path):
    register(reg, family, tmp_path, 1)
    register(reg, family, tmp_path, 2)
    reg.promote(family, "2")
    cache = tmp_path / "cache"

    r = reg.resolve(f"{family}@champion", cache, expected_base_sha256=BASE.removeprefix("sha256:"))
    assert (r.family, r.version, r.base_sha256) == (family, "2", BASE)
    assert r.path == cache / family / "2" / "adapter"
    assert tree_manifest(r.path) == tree_manifest(tmp_path / "adapter2")
    assert reg.resolve(family, cache).version == "2"  # bare family -> champion
    assert reg.resolve(f"{family}@1", cache).path == cache / family / "1" / "adapter"

    # base mismatch: refused before anything is downloaded
    with pytest.raises(BaseMismatch) as e:
        reg.resolve(f"{family}@1", tmp_path / "cache2", expected_base_sha256=OTHER_BASE)
    assert str(e.value) == (
        f"adapter {family} v1 was trained on base sha256:ab12ab12ab12…, but the loaded base is "
        "sha256:cd34cd34cd34…; retrain or load the matching base"
    )
    assert not (tmp_path / "cache2").exists()

    # a tampered local copy is not reused: it is replaced by a verified download
    (r.path / "adapter_model.safetensors").write_bytes(b"tampered")
    again = reg.resolve(f"{family}@champion", cache)
    assert tree_hash(again.path) == again.tags["sha256.adapter"]

    # other artifacts come the same way
    report = reg.download(family, "2", "gate_report", cache)
    assert (report / "gate_report.json").is_file()
    with pytest.raises(RegistryError, match=r"has no artifact 'nope' \(it has: adapter, gate_report\)"):
        reg.download(family, "2", "nope", cache)


def test_tampered_stored_artifact_is_refused(reg, family, tmp_path):
    v = register(reg, family, tmp_path, 1)
    reg.promote(family, "1")
    from pathlib import Path

    stored = Path(v.source) / "adapter" / "adapter_model.safetensors"
    assert stored.is_file()
    stored.write_bytes(b"evil weights")
    dest_root = tmp_path / "cache"
    with pytest.raises(CorruptVersionArtifact, match="stored copy was modified or damaged, so nothing was loaded"):
        reg.resolve(f"{family}@champion", dest_root)
    with pytest.raises(CorruptArtifact):  # also catchable as the store's error
        reg.download(family, "1", "adapter", dest_root)
    assert not (dest_root / family / "1" / "adapter").exists()
    assert [p.name for p in (dest_root / family / "1").iterdir()] == []  # no partial download left


def test_artifacts_on_s3_round_trip_and_tamper(sqlite_uri, moto_endpoint, tmp_path, monkeypatch):  # noqa: F811
    """The production layout: run artifacts in an S3 bucket (moto), versions in the SQL registry."""
    import boto3

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    reg = AdapterRegistry(sqlite_uri)
    family = f"s3fam-{uuid.uuid4().hex[:6]}"
    run_id = reg.create_run(f"s3-{family}", artifact_location=f"s3://{bucket}/artifacts")
    v = reg.register(family, run_id, {"adapter": make_adapter(tmp_path / "a", 5)}, {"base_sha256": BASE}, True)
    assert v.source.startswith(f"s3://{bucket}/artifacts/")
    reg.promote(family, v.version)
    r = reg.resolve(f"{family}@champion", tmp_path / "cache", expected_base_sha256=BASE)
    assert tree_manifest(r.path) == tree_manifest(tmp_path / "a")

    key = v.source.removeprefix(f"s3://{bucket}/") + "/adapter/adapter_model.safetensors"
    s3.put_object(Bucket=bucket, Key=key, Body=b"evil")
    with pytest.raises(CorruptVersionArtifact):
        reg.resolve(f"{family}@champion", tmp_path / "cache2")
    assert not (tmp_path / "cache2" / family / v.version / "adapter").exists()


def test_unknown_names_and_dangling_aliases(reg, family, tmp_path):
    with pytest.raises(RegistryError, match=f"no adapter family '{family}'.*register a version first"):
        reg.get(family, "1")
    register(reg, family, tmp_path, 1)
    register(reg, family, tmp_path, 2)
    with pytest.raises(RegistryError, match=r"has no version 9 \(it has: 1, 2\)"):
        reg.get(family, "9")
    with pytest.raises(RegistryError, match="unknown alias 'champ'"):
        reg.resolve(f"{family}@champ", tmp_path)
    with pytest.raises(RegistryError, match="unknown alias"):
        reg.alias(family, "latest")
    with pytest.raises(RegistryError, match="has no 'champion' alias; promote"):
        reg.resolve(family, tmp_path)
    with pytest.raises(ValueError, match="invalid adapter ref"):
        reg.resolve(f"{family}@1@2", tmp_path)

    reg.promote(family, "1")
    reg.client.delete_model_version(family, "1")  # someone deletes the serving version behind our back
    with pytest.raises(RegistryError, match=r"has no 'champion' alias \(versions it pointed at were deleted: 1\)"):
        reg.resolve(f"{family}@champion", tmp_path)


def test_unreachable_backend_fails_fast_with_a_clear_error():
    t0 = time.monotonic()
    expected = r"MLflow backend postgresql://postgres@127\.0\.0\.1:9/x is unreachable after 2 tries.*TRACKING_URI"
    with pytest.raises(RegistryError, match=expected):
        AdapterRegistry("postgresql://postgres@127.0.0.1:9/x", retries=2)
    assert time.monotonic() - t0 < 15
    with pytest.raises(RegistryError, match="file store"):
        AdapterRegistry("/tmp/mlruns")


def test_tracking_uri_from_environment(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    assert AdapterRegistry().tracking_uri == sqlite_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="set MLFLOW_TRACKING_URI"):
        AdapterRegistry()


# -- crash safety: kill promote / rollback after every step, recover from a fresh client --------------------------

PROMOTE_STEPS = 6  # write intent, set previous, set champion, delete challenger, write audit, clear intent
ROLLBACK_STEPS = 5  # write intent, set champion, delete previous, write audit, clear intent


def _crash_and_recover(uri, tmp_path, op, step, recover_with="recover", artifact_location=None):
    reg = AdapterRegistry(uri)
    family = f"crash-{op}-{step}-{uuid.uuid4().hex[:6]}"
    for seed in (1, 2, 3):
        register(reg, family, tmp_path, seed, artifact_location=artifact_location)
    reg.promote(family, "1", actor="setup")
    if op == "promote":
        reg.set_challenger(family, "2", actor="setup")
        expected = {"champion": "2", "previous": "1"}
        with pytest.raises(SimulatedCrash, match=f"after step {step}"):
            reg.promote(family, "2", actor="ci", reason="canary won", _fail_after_step=step)
    else:
        reg.promote(family, "2", actor="setup")
        reg.set_challenger(family, "3", actor="setup")
        expected = {"champion": "1", "challenger": "3"}
        with pytest.raises(SimulatedCrash, match=f"after step {step}"):
            reg.rollback(family, actor="ci", reason="bad canary", _fail_after_step=step)
    total = PROMOTE_STEPS if op == "promote" else ROLLBACK_STEPS

    fresh = AdapterRegistry(uri)  # a new process on the same database
    if recover_with == "recover":
        rec = fresh.recover(family)
        assert (rec is not None) == (step < total)
        if rec is not None:
            assert (rec.op, rec.actor, rec.reason) == (op, "ci", "canary won" if op == "promote" else "bad canary")
    else:  # the next operation completes the unfinished one before doing its own
        fresh.set_challenger(family, "3", actor="next")
        expected = expected | {"challenger": "3"}
    assert aliases(fresh, family) == expected
    assert fresh.recover(family) is None  # idempotent: nothing left to do
    ops = [h.op for h in fresh.history(family) if h.actor == "ci"]
    assert ops == [op], "the interrupted operation is recorded exactly once"


@pytest.mark.parametrize("step", range(1, PROMOTE_STEPS + 1))
def test_promote_crash_at_every_step_recovers_sqlite(sqlite_uri, tmp_path, step):
    _crash_and_recover(sqlite_uri, tmp_path, "promote", step)


@pytest.mark.parametrize("step", range(1, ROLLBACK_STEPS + 1))
def test_rollback_crash_at_every_step_recovers_sqlite(sqlite_uri, tmp_path, step):
    _crash_and_recover(sqlite_uri, tmp_path, "rollback", step)


def test_next_operation_completes_an_unfinished_promote(sqlite_uri, tmp_path):
    _crash_and_recover(sqlite_uri, tmp_path, "promote", 2, recover_with="next-op")


@pytest.fixture(scope="module")
def pg_artifacts(tmp_path_factory):
    """Where the Postgres-backed runs keep artifacts (MLflow's default would be ./mlruns in the cwd)."""
    return str(tmp_path_factory.mktemp("pg-artifacts"))


@pytest.mark.postgres
@pytest.mark.parametrize("step", range(1, PROMOTE_STEPS + 1))
def test_promote_crash_at_every_step_recovers_postgres(postgres_uri, pg_artifacts, tmp_path, step):  # noqa: F811
    _crash_and_recover(postgres_uri, tmp_path, "promote", step, artifact_location=pg_artifacts)


@pytest.mark.postgres
@pytest.mark.parametrize("step", range(1, ROLLBACK_STEPS + 1))
def test_rollback_crash_at_every_step_recovers_postgres(postgres_uri, pg_artifacts, tmp_path, step):  # noqa: F811
    _crash_and_recover(postgres_uri, tmp_path, "rollback", step, artifact_location=pg_artifacts)
