"""registry.store.S3Store against a real S3 API (moto server on 127.0.0.1)."""

import os
import time

import boto3
import pytest

from registry.hashing import tree_manifest
from registry.store import ArtifactNotFound, CorruptArtifact, S3Store, StoreUnreachable, open_store

from registry_fixtures import moto_endpoint  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(moto_endpoint):  # noqa: F811
    name = f"b{time.time_ns()}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _src(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_round_trip_with_multipart(moto_endpoint, bucket, tmp_path):  # noqa: F811
    big = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MB: multipart parts must be >= 5 MiB except the last
    src = _src(tmp_path / "src", {"adapter_config.json": b"{}", "weights/big.safetensors": big})
    store = S3Store(
        bucket, "cache", endpoint_url=moto_endpoint, multipart_threshold=5 << 20, multipart_chunksize=5 << 20
    )
    entry = store.put_dir("init-cache/k1", src, meta={"base": "abc"})
    assert entry["files"] == tree_manifest(src) and entry["meta"] == {"base": "abc"}

    obj_key = f"cache/init-cache/k1/{entry['upload_id']}/weights/big.safetensors"
    head = store.client.head_object(Bucket=bucket, Key=obj_key)
    assert "-" in head["ETag"].strip('"'), "the big file should have gone up as a multipart upload"
    assert head["Metadata"]["sha256"] == entry["files"]["weights/big.safetensors"]

    assert store.exists("init-cache/k1") and not store.exists("init-cache/k2")
    assert [e["key"] for e in store.list()] == ["init-cache/k1"]
    assert store.verify("init-cache/k1") == []
    out = store.get_dir("init-cache/k1", tmp_path / "out")
    assert tree_manifest(out) == tree_manifest(src)

    # a second put of the same key keeps the first entry (conditional index write / existence check)
    assert store.put_dir("init-cache/k1", _src(tmp_path / "other", {"x": b"y"})) == entry


def test_entries_without_index_are_invisible(moto_endpoint, bucket, tmp_path):  # noqa: F811
    store = open_store(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    assert isinstance(store, S3Store)
    store.put_dir("k", _src(tmp_path / "src", {"f": b"1"}))
    store.client.delete_object(Bucket=bucket, Key="p/k/_index.json")
    assert not store.exists("k") and store.list() == []
    with pytest.raises(ArtifactNotFound, match="no artifact 'k'"):
        store.get_dir("k", tmp_path / "out")


def test_tampered_object_is_refused(moto_endpoint, bucket, tmp_path):  # noqa: F811
    store = S3Store(bucket, endpoint_url=moto_endpoint)
    entry = store.put_dir("k", _src(tmp_path / "src", {"a": b"good", "b": b"fine"}))
    store.client.put_object(Bucket=bucket, Key=f"k/{entry['upload_id']}/a", Body=b"evil")
    dest = tmp_path / "dest"
    with pytest.raises(CorruptArtifact, match="file 'a' has sha256"):
        store.get_dir("k", dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    assert len(store.verify("k")) == 1 and store.verify("k")[0].startswith("a: sha256")

    store.client.delete_object(Bucket=bucket, Key=f"k/{entry['upload_id']}/b")
    assert "b: missing" in store.verify("k")
    store.delete("k")
    assert not store.exists("k")
    assert list(store._list_keys("k/")) == []


def test_endpoint_url_from_environment(moto_endpoint, bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    store = open_store(f"s3://{bucket}")
    assert store.endpoint_url == moto_endpoint
    store.put_dir("e", _src(tmp_path / "src", {"f": b"1"}))
    assert store.exists("e")


def test_missing_bucket_says_create_it(moto_endpoint, tmp_path):  # noqa: F811
    store = S3Store("no-such-bucket", endpoint_url=moto_endpoint)
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist.*create it"):
        store.put_dir("k", _src(tmp_path / "src", {"f": b"1"}))


def test_unreachable_endpoint_fails_fast_and_says_what_to_do(moto_endpoint, tmp_path):  # noqa: F811
    store = S3Store("b", endpoint_url="http://127.0.0.1:9", max_attempts=2, connect_timeout=1)
    t0 = time.monotonic()
    expected = r"S3 endpoint http://127\.0\.0\.1:9 is unreachable: .*start it or fix AWS_ENDPOINT_URL"
    with pytest.raises(StoreUnreachable, match=expected):
        store.exists("k")
    assert time.monotonic() - t0 < 10


def test_concurrent_writers_of_one_key_agree_on_one_entry(moto_endpoint, bucket, tmp_path):  # noqa: F811
    import threading

    store = S3Store(bucket, "race", endpoint_url=moto_endpoint)
    srcs = [_src(tmp_path / f"s{i}", {"a": bytes([i]) * 1000, "b": b"same"}) for i in range(4)]
    results, errors, barrier = [], [], threading.Barrier(len(srcs))

    def write(s):
        try:
            barrier.wait()
            results.append(store.put_dir("k", s))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    winner = store.index("k")
    assert all(r == winner for r in results)
    assert store.verify("k") == []
    upload_dirs = {k.split("/")[2] for k in store._list_keys("race/k/") if not k.endswith("_index.json")}
    assert upload_dirs == {winner["upload_id"]}, "losers must remove their uploads"
