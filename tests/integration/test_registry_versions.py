"""registry.versions.AdapterRegistry against real MLflow on three backends: SQLite in tmp, PostgreSQL on 127.0.0.1
directly, and an MLflow tracking server (PostgreSQL + artifacts proxied to moto S3: the production profile)."""

import json
import multiprocessing
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.hashing import manifest_hash, sha256_file, tree_hash, tree_manifest
from registry.store import CorruptArtifact
from registry.versions import (
    AUDIT_PREFIX,
    FAMILY_TAG_KEY,
    FAMILY_TAG_VALUE,
    INTENT_TAG,
    LEASE_PREFIX,
    AdapterRegistry,
    BaseMismatch,
    CorruptVersionArtifact,
    RegistryBusy,
    RegistryError,
    SimulatedCrash,
)

from registry_fixtures import (  # noqa: F401  (fixtures)
    alias_worker,
    crashing_promote,
    make_adapter,
    mlflow_server,
    moto_endpoint,
    postgres_uri,
)

pytestmark = pytest.mark.integration

BASE = "sha256:" + "ab12" * 16
OTHER_BASE = "sha256:" + "cd34" * 16


@dataclass
class Backend:
    name: str
    uri: str
    artifact_location: str | None
    """Passed to create_run: where runs keep artifacts (None: next to the SQLite file / the server's proxy)."""
    bucket: str | None = None
    """The S3 bucket behind the tracking server's artifact proxy."""
    s3_endpoint: str | None = None

    def stored_file(self, source: str, rel: str) -> Path | tuple[str, str]:
        """Where a version's artifact file really lies: a local path, or (bucket, key) behind the server."""
        if self.bucket is None:
            return Path(source) / rel
        return self.bucket, "mlflow/" + source.removeprefix("mlflow-artifacts:/").lstrip("/") + "/" + rel

    def tamper(self, source: str, rel: str, data: bytes) -> None:
        where = self.stored_file(source, rel)
        if isinstance(where, Path):
            assert where.is_file()
            where.write_bytes(data)
        else:
            import boto3

            s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")
            s3.head_object(Bucket=where[0], Key=where[1])  # it is there before we overwrite it
            s3.put_object(Bucket=where[0], Key=where[1], Body=data)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def pg_artifacts(tmp_path_factory):
    """Where the Postgres-backed runs keep artifacts (MLflow's default would be ./mlruns in the cwd)."""
    return str(tmp_path_factory.mktemp("pg-artifacts"))


BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("http", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> Backend:
    """Each backend's fixtures are only started by the tests that run on it (the server takes ~10 s)."""
    if request.param == "sqlite":
        return Backend("sqlite", request.getfixturevalue("sqlite_uri"), None)
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("postgres_uri"), request.getfixturevalue("pg_artifacts"))
    uri, bucket = request.getfixturevalue("mlflow_server")
    return Backend("http", uri, None, bucket, request.getfixturevalue("moto_endpoint"))


@pytest.fixture
def reg(backend):
    return AdapterRegistry(backend.uri)


@pytest.fixture(scope="module")
def sqlite_reg(sqlite_uri):
    return AdapterRegistry(sqlite_uri)


@pytest.fixture
def family():
    return f"fam-{uuid.uuid4().hex[:8]}"


def register(reg, family, tmp_path, seed, gates=True, base=BASE, artifact_location=None):
    if artifact_location is None and reg.tracking_uri.startswith("postgresql"):
        raise AssertionError("direct PostgreSQL runs need an artifact_location (else MLflow writes ./mlruns)")
    run_id = reg.create_run("adapters", artifact_location=artifact_location)
    adapter = make_adapter(tmp_path / f"adapter{seed}", seed)
    report = tmp_path / f"report{seed}" / "gate_report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"kl": 0.01 * seed, "passed": gates}))
    tags = {"base_sha256": base, "data_sha256": "d" * 64}
    return reg.register(family, run_id, {"adapter": adapter, "gate_report": report}, tags, gates)


@pytest.fixture
def add(reg, backend, family, tmp_path):
    """add(seed, gates=True, base=BASE) -> a new version of `family` on the test's backend."""
    return lambda seed, gates=True, base=BASE: register(reg, family, tmp_path, seed, gates, base,
                                                        backend.artifact_location)


def aliases(reg, family):
    return {k: str(v) for k, v in reg.client.get_registered_model(family).aliases.items()}


def family_tags(reg, family):
    return dict(reg.client.get_registered_model(family).tags)


def state(reg, family):
    """Everything an alias operation may change: aliases and the family's tags (intent, leases, audit)."""
    return aliases(reg, family), family_tags(reg, family)


def test_register_records_lineage_hashes_and_gates(reg, add, family, tmp_path):
    v1 = add(1)
    v2 = add(2, gates=False)
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


def test_register_refusals(sqlite_reg, family, tmp_path):
    reg = sqlite_reg
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


def test_promote_rollback_and_history(reg, add, family):
    for seed in (1, 2, 3):
        add(seed)
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
    tags = family_tags(reg, family)
    assert INTENT_TAG not in tags and not [k for k in tags if k.startswith(LEASE_PREFIX)], "no lease left behind"
    assert reg.in_flight(family) == (None, [])


def test_rollback_onto_the_challenger_clears_it(reg, add, family):
    for seed in (1, 2):
        add(seed)
    reg.promote(family, "1")
    reg.promote(family, "2")
    reg.set_challenger(family, "1", reason="re-test the old version")
    reg.rollback(family)
    assert aliases(reg, family) == {"champion": "1"}


def test_failed_gates_are_refused(reg, add, family):
    add(1)
    add(2, gates=False)
    reg.promote(family, "1")
    before = state(reg, family)
    with pytest.raises(RegistryError, match=r"refusing to make .* v2 champion: its gates failed"):
        reg.promote(family, "2")
    with pytest.raises(RegistryError, match="gates failed"):
        reg.set_challenger(family, "2")
    with pytest.raises(RegistryError, match="is the champion"):
        reg.set_challenger(family, "1")
    assert state(reg, family) == before  # refused requests leave no alias, intent, lease or audit record


def test_version_from_another_base_is_refused(reg, add, family, tmp_path):
    add(1)
    add(2, base=OTHER_BASE)
    reg.promote(family, "1")
    before = state(reg, family)
    expected = (rf"refusing to make {family} v2 champion: it was trained on base sha256:cd34cd34cd34…, but champion "
                r"v1 runs on base sha256:ab12ab12ab12…, which the servers have loaded")
    with pytest.raises(BaseMismatch, match=expected):
        reg.promote(family, "2")
    with pytest.raises(BaseMismatch, match="v2 challenger: it was trained on base"):
        reg.set_challenger(family, "2")
    with pytest.raises(BaseMismatch, match="trained on base sha256:cd34"):
        reg.resolve(f"{family}@2", tmp_path / "cache", expected_base_sha256=BASE)
    assert state(reg, family) == before and not (tmp_path / "cache").exists()
    rec = reg.promote(family, "2", reason="servers moved to the new base", allow_base_change=True)
    assert (rec.from_version, rec.to_version) == ("1", "2")


def test_resolve_verifies_hashes_and_base(reg, add, family, tmp_path):
    add(1)
    add(2)
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


def test_tampered_stored_artifact_is_refused(reg, backend, add, family, tmp_path):
    v = add(1)
    reg.promote(family, "1")
    backend.tamper(v.source, "adapter/adapter_model.safetensors", b"evil weights")
    dest_root = tmp_path / "cache"
    with pytest.raises(CorruptVersionArtifact, match="stored copy was modified or damaged, so nothing was loaded"):
        reg.resolve(f"{family}@champion", dest_root)
    with pytest.raises(CorruptArtifact):  # also catchable as the store's error
        reg.download(family, "1", "adapter", dest_root)
    assert not (dest_root / family / "1" / "adapter").exists()
    assert [p.name for p in (dest_root / family / "1").iterdir()] == []  # no partial download left


def test_verify_rehashes_every_stored_artifact(reg, backend, add, family):
    """`registry verify`: fresh downloads of every recorded artifact, re-hashed; a flipped stored byte is MISMATCH."""
    v1, _ = add(1), add(2)
    assert {(r["version"], r["artifact"], r["status"]) for r in reg.verify(family)} == {
        ("1", "adapter", "ok"), ("1", "gate_report", "ok"), ("2", "adapter", "ok"), ("2", "gate_report", "ok")}
    backend.tamper(v1.source, "adapter/adapter_model.safetensors", b"evil weights")
    rows = {(r["version"], r["artifact"]): r["status"] for r in reg.verify(family)}
    assert rows[("1", "adapter")] == "MISMATCH" and rows[("2", "adapter")] == "ok"
    assert [r["status"] for r in reg.verify(family, "2")] == ["ok", "ok"]


def test_missing_stored_artifact_is_a_clear_error(reg, backend, add, family, tmp_path):
    import shutil

    import boto3

    v = add(1)
    where = backend.stored_file(v.source, "adapter")
    if isinstance(where, Path):
        shutil.rmtree(where)
    else:
        s3 = boto3.client("s3", endpoint_url=backend.s3_endpoint, region_name="us-east-1")
        for obj in s3.list_objects_v2(Bucket=where[0], Prefix=where[1] + "/")["Contents"]:
            s3.delete_object(Bucket=where[0], Key=obj["Key"])
    dest_root = tmp_path / "cache"
    with pytest.raises(RegistryError, match=rf"artifact 'adapter' of {family} v1 cannot be downloaded from .*"
                                            "re-register the adapter from its training output"):
        reg.resolve(f"{family}@1", dest_root)
    assert [p.name for p in (dest_root / family / "1").iterdir()] == []  # no partial download left


def test_artifacts_on_s3_round_trip_and_tamper(sqlite_uri, moto_endpoint, tmp_path, monkeypatch):  # noqa: F811
    """Run artifacts straight in an S3 bucket (moto) from the client, versions in the SQL registry."""
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


def test_unknown_names_and_dangling_aliases(reg, add, family, tmp_path):
    with pytest.raises(RegistryError, match=f"no adapter family '{family}'.*register a version first"):
        reg.get(family, "1")
    add(1)
    add(2)
    add(3)
    with pytest.raises(RegistryError, match=r"has no version 9 \(it has: 1, 2, 3\)"):
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
    reg.promote(family, "2")
    reg.client.delete_model_version(family, "1")  # someone deletes the rollback target behind our back
    before = state(reg, family)
    with pytest.raises(RegistryError, match=r"cannot roll back .*no previous version to return to \(the version it "
                                            r"last pointed at, v1, was deleted\); promote a known-good version"):
        reg.rollback(family)
    assert state(reg, family) == before

    reg.client.delete_model_version(family, "2")  # ... and the serving version
    with pytest.raises(RegistryError, match=r"has no 'champion' alias \(versions it pointed at were deleted: 1, 2\)"):
        reg.resolve(f"{family}@champion", tmp_path)
    with pytest.raises(RegistryError, match=r"has no version 2 \(it has: 3\)"):
        reg.promote(family, "2")
    assert family_tags(reg, family) == before[1], "refusals write no intent, lease or audit record"


BAD_NAMES = ["../etc", "a/b", "a\\b", "x;rm -rf ~", "$(id)", "`id`", "a b", "fam|cat", "fam&", "-rf", ".hidden", ""]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_with_path_separators_or_shell_metacharacters_are_refused(sqlite_reg, bad, tmp_path):
    reg = sqlite_reg
    before = reg.families()
    calls = [lambda: reg.get(bad, "1"), lambda: reg.promote(bad, "1"), lambda: reg.rollback(bad),
             lambda: reg.set_challenger(bad, "1"), lambda: reg.history(bad), lambda: reg.recover(bad),
             lambda: reg.list_versions(bad), lambda: reg.resolve(f"{bad}@champion", tmp_path / "cache")]
    for call in calls:
        with pytest.raises(ValueError, match=r"invalid (family name|adapter ref) "):
            call()
    assert reg.families() == before and not (tmp_path / "cache").exists()


def test_bad_version_and_alias_strings_are_refused(reg, add, family, tmp_path):
    add(1)
    before = state(reg, family)
    for bad in ("1;2", "../1", "v1", "1 ", "$(id)"):
        with pytest.raises(RegistryError, match="is not a version number"):
            reg.promote(family, bad)
    with pytest.raises(ValueError, match="invalid alias name"):
        reg.resolve(f"{family}@champ/../x", tmp_path)
    with pytest.raises(ValueError, match="version numbers start at 1"):
        reg.resolve(f"{family}@0", tmp_path)
    assert state(reg, family) == before


def test_unreachable_backend_fails_fast_with_a_clear_error():
    t0 = time.monotonic()
    expected = r"MLflow backend postgresql://postgres@127\.0\.0\.1:9/x is unreachable after 2 tries.*TRACKING_URI"
    with pytest.raises(RegistryError, match=expected):
        AdapterRegistry("postgresql://postgres@127.0.0.1:9/x", retries=2)
    assert time.monotonic() - t0 < 15
    with pytest.raises(RegistryError, match="file store"):
        AdapterRegistry("/tmp/mlruns")


def test_unreachable_tracking_server_fails_fast_with_a_clear_error():
    import socket

    with socket.socket() as s:  # a port that was just free and that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    expected = (rf"MLflow backend http://127\.0\.0\.1:{port} is unreachable after 3 tries: .*Connection refused.*"
                r"start it or fix MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match=expected):
        AdapterRegistry(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


def test_tracking_uri_from_environment(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    assert AdapterRegistry().tracking_uri == sqlite_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="set MLFLOW_TRACKING_URI"):
        AdapterRegistry()


# -- crash safety: kill promote / rollback after every step, recover from a fresh client --------------------------

PROMOTE_STEPS = 6  # write intent, set previous, set champion, delete challenger, write audit, clear intent
ROLLBACK_STEPS = 5  # write intent, set champion, delete previous, write audit, clear intent
CRASH_LEASE_S = 0.3  # the crashed "process" is this one, so its lease is only abandoned once it expires


def _wait_for_leases_to_expire(reg, family):
    _, leases = reg.in_flight(family)
    assert leases, "a crashed operation leaves its lease"
    time.sleep(max(0.0, max(lease.expires for lease in leases) - time.time()) + 0.05)


@pytest.fixture(scope="module")
def templates(backend, tmp_path_factory):
    """Three registered versions per backend that the crash tests copy into fresh families (no re-upload)."""
    reg = AdapterRegistry(backend.uri)
    family, tmp = f"template-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("templates")
    return [register(reg, family, tmp, seed, artifact_location=backend.artifact_location) for seed in (1, 2, 3)]


def _family_from(reg, templates, family):
    """A new family whose versions point at the templates' artifacts (MLflow calls only: the setup, not the test)."""
    reg.client.create_registered_model(family, tags={FAMILY_TAG_KEY: FAMILY_TAG_VALUE})
    for v in templates:
        reg.client.create_model_version(family, v.source, run_id=v.run_id, tags=v.tags)


def _crash_and_recover(backend, templates, op, step, recover_with="recover"):
    reg = AdapterRegistry(backend.uri)
    family = f"crash-{op}-{step}-{uuid.uuid4().hex[:6]}"
    _family_from(reg, templates, family)
    reg.promote(family, "1", actor="setup")
    crashing = AdapterRegistry(backend.uri, lease_seconds=CRASH_LEASE_S)
    if op == "promote":
        reg.set_challenger(family, "2", actor="setup")
        expected = {"champion": "2", "previous": "1"}
        with pytest.raises(SimulatedCrash, match=f"after step {step}"):
            crashing.promote(family, "2", actor="ci", reason="canary won", _fail_after_step=step)
    else:
        reg.promote(family, "2", actor="setup")
        reg.set_challenger(family, "3", actor="setup")
        expected = {"champion": "1", "challenger": "3"}
        with pytest.raises(SimulatedCrash, match=f"after step {step}"):
            crashing.rollback(family, actor="ci", reason="bad canary", _fail_after_step=step)
    total = PROMOTE_STEPS if op == "promote" else ROLLBACK_STEPS
    _wait_for_leases_to_expire(reg, family)

    fresh = AdapterRegistry(backend.uri)  # a new process on the same database
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
    assert fresh.in_flight(family) == (None, []), "the abandoned lease is removed"
    ops = [h.op for h in fresh.history(family) if h.actor == "ci"]
    assert ops == [op], "the interrupted operation is recorded exactly once"


@pytest.mark.parametrize("step", range(1, PROMOTE_STEPS + 1))
def test_promote_crash_at_every_step_recovers(backend, templates, step):
    _crash_and_recover(backend, templates, "promote", step)


@pytest.mark.parametrize("step", range(1, ROLLBACK_STEPS + 1))
def test_rollback_crash_at_every_step_recovers(backend, templates, step):
    _crash_and_recover(backend, templates, "rollback", step)


def test_next_operation_completes_an_unfinished_promote(backend, templates):
    _crash_and_recover(backend, templates, "promote", 2, recover_with="next-op")


# -- serialisation: one alias operation per family at a time, across processes -------------------------------------

def test_live_lease_refuses_other_operations_with_a_clear_error(sqlite_reg, sqlite_uri, family, tmp_path):
    reg = sqlite_reg
    for seed in (1, 2, 3):
        register(reg, family, tmp_path, seed)
    reg.promote(family, "1", actor="setup")
    holder = AdapterRegistry(sqlite_uri, lease_seconds=120)
    with pytest.raises(SimulatedCrash):  # this process still runs, so its lease is live: nobody may step in
        holder.promote(family, "2", actor="slow-deployer", reason="x", _fail_after_step=2)
    before = state(reg, family)
    impatient = AdapterRegistry(sqlite_uri, lease_wait_seconds=0)
    holder_re = r"another alias operation is in flight: promote by slow-deployer \(pid \d+ on .+, since .+ UTC, lease "
    for call in (lambda: impatient.promote(family, "3"), lambda: impatient.rollback(family),
                 lambda: impatient.set_challenger(family, "3"), lambda: impatient.recover(family)):
        with pytest.raises(RegistryBusy, match=holder_re + r".*its lease expires at .* UTC and the next promote/"):
            call()
    with pytest.raises(RegistryError, match="is not a version number"):  # bad input is named before the lease
        impatient.promote(family, "x;y")
    t0 = time.monotonic()
    with pytest.raises(RegistryBusy, match="waited 1 s"):
        AdapterRegistry(sqlite_uri, lease_wait_seconds=1).promote(family, "3")
    assert 1.0 <= time.monotonic() - t0 < 10
    assert state(reg, family) == before, "refused calls change nothing"

    # the holder finds its lease gone once someone took over, and stops before its next step
    (lease,) = reg.in_flight(family)[1]
    reg.client.delete_registered_model_tag(family, lease.tag)
    with pytest.raises(RegistryBusy, match="lost its lease"):
        holder._run(reg.in_flight(family)[0], lease, skip=2, fail_after=None)
    assert aliases(reg, family) == before[0]
    assert reg.recover(family).to_version == "2" and aliases(reg, family) == {"champion": "2", "previous": "1"}


def test_killed_holder_on_this_host_is_recovered_without_waiting_for_expiry(sqlite_reg, sqlite_uri, family,
                                                                            tmp_path):
    reg = sqlite_reg
    for seed in (1, 2):
        register(reg, family, tmp_path, seed)
    reg.promote(family, "1", actor="setup")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=crashing_promote, args=(sqlite_uri, family, "2", 2))
    child.start()
    child.join(timeout=180)
    assert child.exitcode == 3, "the child should have died half way through its promotion"
    intent, (lease,) = reg.in_flight(family)
    assert intent["op"] == "promote" and lease.pid == child.pid and lease.expires > time.time() + 400
    rec = AdapterRegistry(sqlite_uri, lease_wait_seconds=0).recover(family)
    assert (rec.op, rec.actor, rec.to_version) == ("promote", "killed", "2")
    assert aliases(reg, family) == {"champion": "2", "previous": "1"} and reg.in_flight(family) == (None, [])


PLANS = {  # name: (seconds it waits for a busy family, its operations); w2 and w3 refuse at once
    "w0": (60, [("promote", "2"), ("rollback", None), ("promote", "3")]),
    "w1": (60, [("promote", "3"), ("promote", "4"), ("rollback", None)]),
    "w2": (0, [("promote", "4"), ("rollback", None), ("promote", "2")]),
    "w3": (0, [("rollback", None), ("promote", "2"), ("promote", "4")]),
}


def _replay(records, start):
    """The aliases the audit trail implies, checking that each record starts where the previous one ended."""
    a = dict(start)
    for r in records:
        assert a.get("champion") == r.from_version, f"{r} does not start from champion v{a.get('champion')}"
        if r.op == "promote":
            a["previous"] = r.from_version
            a["champion"] = r.to_version
        else:
            assert r.op == "rollback" and a.get("previous") == r.to_version, r
            a["champion"] = r.to_version
            a.pop("previous")
    return a


@pytest.mark.parametrize("which", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_promotions_and_rollbacks_from_processes(which, request, tmp_path):
    uri = request.getfixturevalue("sqlite_uri" if which == "sqlite" else "postgres_uri")
    location = None if which == "sqlite" else request.getfixturevalue("pg_artifacts")
    reg = AdapterRegistry(uri)
    family = f"race-{uuid.uuid4().hex[:8]}"
    for seed in (1, 2, 3, 4):
        register(reg, family, tmp_path, seed, artifact_location=location)
    reg.promote(family, "1", actor="setup")

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(PLANS)), ctx.Queue()
    procs = [ctx.Process(target=alias_worker, args=(uri, family, name, plan, wait, barrier, results))
             for name, (wait, plan) in PLANS.items()]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    done = []
    for name, rows in outcomes.items():
        for status, op, version, detail in rows:
            if status == "ok":
                done.append(detail)
                continue
            busy = status == "RegistryBusy" and PLANS[name][0] == 0 and (
                f"cannot {op} {family}: another alias operation is in flight: " in detail
                and "its lease expires at" in detail)
            nothing_to_undo = status == "RegistryError" and op == "rollback" and "no previous version" in detail
            assert busy or nothing_to_undo, f"{name}: {op} {version} failed unclearly: {status}: {detail}"

    history = [h for h in reg.history(family) if h.actor != "setup"]
    audited = [d for d in done if d["op"] != "noop"]
    assert sorted((h.op, h.from_version, h.to_version, h.actor, h.ts) for h in history) == sorted(
        (d["op"], d["from_version"], d["to_version"], d["actor"], d["ts"]) for d in audited
    ), "the audit trail holds exactly the operations that reported success"
    assert history == sorted(history, key=lambda h: h.ts), "audit records are in the order the operations ran"
    final = aliases(reg, family)
    assert _replay(history, {"champion": "1"}) == final
    assert [v.version for v in reg.list_versions(family) if "champion" in v.aliases] == [final["champion"]]
    keys = sorted(k for k in family_tags(reg, family) if k.startswith(AUDIT_PREFIX))
    assert keys == [f"{AUDIT_PREFIX}{i:06d}" for i in range(1, len(keys) + 1)]
    assert reg.in_flight(family) == (None, [])
    assert sum(PLANS[n][0] > 0 and s == "RegistryBusy" for n, rows in outcomes.items() for s, *_ in rows) == 0, \
        "callers that wait are serialised, not refused"
