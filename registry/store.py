"""Content-addressed artifact store: a local directory or an S3 bucket, every file sha256-verified on the way out.

An entry is a directory tree stored under a key (e.g. `init-cache/<hash>`). It counts as present only once its
`_index.json` (key, file hashes, meta, creation time) is written, and that is always written last, so a reader never
sees half an entry. Reads verify every file against the index and leave nothing at `dest` on a mismatch.

    store = open_store("s3://adapterops/cache", endpoint_url="http://127.0.0.1:9000")   # or "/var/cache/adapterops"
    store.put_dir("init-cache/3f1c0a", Path("out/init"), meta={"base_sha256": "ab12…"})
    store.get_dir("init-cache/3f1c0a", Path("work/init"))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from registry.hashing import manifest_hash, sha256_file, tree_files, tree_manifest
from registry.names import validate_key

log = logging.getLogger(__name__)

INDEX_NAME = "_index.json"


class CorruptArtifact(Exception):
    """A stored file is missing or its bytes do not match the sha256 in the entry's index."""


class ArtifactNotFound(KeyError):
    """No complete entry (one with an index) under that key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "artifact not found"


class StoreUnreachable(ConnectionError):
    """The storage endpoint did not answer after bounded retries."""


@runtime_checkable
class ArtifactStore(Protocol):
    def put_dir(self, key: str, src: Path, meta: dict | None = None) -> dict: ...
    def get_dir(self, key: str, dest: Path) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def index(self, key: str) -> dict: ...
    def list(self) -> list[dict]: ...
    def verify(self, key: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def _new_index(key: str, manifest: dict[str, str], meta: dict | None) -> dict:
    return {
        "key": key,
        "files": dict(sorted(manifest.items())),
        "tree_sha256": manifest_hash(manifest),
        "meta": dict(meta or {}),
        "created": time.time(),
    }


def _parse_index(raw: bytes, key: str, where: str) -> dict:
    """An entry's index, checked; CorruptArtifact (delete and rebuild: `warm` does) when it cannot be read."""
    try:
        index = json.loads(raw.decode("utf-8"))
        if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
            raise ValueError("not an index object with 'files'")
    except ValueError as e:
        raise CorruptArtifact(
            f"{where} entry {key!r}: its {INDEX_NAME} is unreadable ({' '.join(str(e).split())[:120]}), truncated or "
            "damaged; delete the entry (`adapterops init-cache evict --key ...`) and rebuild it (`init-cache warm` "
            "does both)"
        ) from None
    index.setdefault("key", key)
    return index


def _check_src(src: Path) -> None:
    if not Path(src).is_dir():
        raise NotADirectoryError(f"cannot store {src}: it is not a directory")
    if (Path(src) / INDEX_NAME).exists():
        raise ValueError(f"{src} contains a top-level {INDEX_NAME}, a name the store reserves; rename that file")


def _copy_verified(read_into, rel: str, expected: str, dest_file: Path, where: str) -> None:
    """Write one file via read_into(fileobj) and check its sha256; raise CorruptArtifact on mismatch."""
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    with open(dest_file, "wb") as f:
        read_into(f)
    actual = sha256_file(dest_file)
    if actual != expected:
        raise CorruptArtifact(
            f"{where}: file {rel!r} has sha256 {actual[:12]}…, but the index records {expected[:12]}…; "
            "the stored copy is corrupt or was modified: delete the entry and rebuild it"
        )


def _finish_dest(tmp: Path, dest: Path, index: dict) -> Path:
    """Move a verified temp tree to dest. An existing dest with the same content is reused; other content is refused."""
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        elif dest.is_dir() and tree_manifest(dest) == index["files"]:
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(
                f"{dest} already exists with other content than entry {index['key']!r}; remove it or pick another dest"
            )
    try:
        os.rename(tmp, dest)
    except OSError:
        # a concurrent reader of the same key got there first; its copy was verified too
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest.is_dir() and tree_manifest(dest) == index["files"]):
            raise
    return dest


def _tmp_next_to(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"


class LocalStore:
    """Entries as directories under root: `root/<key>/...files` + `root/<key>/_index.json`.

    Writes go to `root/.tmp/<uuid>` (same filesystem) and are renamed into place in one step; a writer that loses the
    rename to a concurrent writer of the same key keeps the winner's entry and discards its own.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        blocker = next((p for p in [self.root, *self.root.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise NotADirectoryError(
                f"store directory {self.root} cannot be used: {blocker} is a file, not a directory; pass a directory "
                "(or s3://bucket/prefix) as --store"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _dir(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _check_nesting(self, key: str) -> None:
        parts = key.split("/")
        for i in range(1, len(parts)):
            if (self.root.joinpath(*parts[:i]) / INDEX_NAME).exists():
                raise ValueError(f"key {key!r} would nest inside entry {'/'.join(parts[:i])!r}; use a sibling key")

    def exists(self, key: str) -> bool:
        return (self._dir(key) / INDEX_NAME).is_file()

    def index(self, key: str) -> dict:
        path = self._dir(key) / INDEX_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {key!r} in {self!r}; build it and put_dir it first") from None
        return _parse_index(raw, key, f"{self!r}")

    def put_dir(self, key: str, src: Path, meta: dict | None = None) -> dict:
        final = self._dir(key)
        if self.exists(key):
            return self.index(key)
        self._check_nesting(key)
        _check_src(src)
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(exist_ok=True)
        tmp = tmp_root / uuid.uuid4().hex
        try:
            manifest = {}
            for rel in tree_files(src):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(src) / rel, target)
                manifest[rel] = sha256_file(target)
            index = _new_index(key, manifest, meta)
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.exists(key):
                    raise FileExistsError(
                        f"cannot write entry {key!r}: {final} exists but is not a complete entry "
                        "(a namespace of other keys?); pick another key"
                    ) from None
                log.info("entry %s was written concurrently; keeping the other writer's copy", key)
                return self.index(key)
            return index
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_dir(self, key: str, dest: Path) -> Path:
        index = self.index(key)
        src, dest = self._dir(key), Path(dest)
        tmp = _tmp_next_to(dest)
        try:
            for rel, expected in index["files"].items():
                source = src / rel
                if not source.is_file():
                    raise CorruptArtifact(
                        f"{self!r} entry {key!r}: file {rel!r} is missing; delete the entry and rebuild it"
                    )

                def read_into(f, source=source):
                    with open(source, "rb") as s:
                        shutil.copyfileobj(s, f, 1 << 20)

                _copy_verified(read_into, rel, expected, tmp / rel, f"{self!r} entry {key!r}")
            tmp.mkdir(parents=True, exist_ok=True)  # entries may hold no files
            return _finish_dest(tmp, dest, index)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def verify(self, key: str) -> list[str]:
        try:
            index = self.index(key)
        except (ArtifactNotFound, CorruptArtifact) as e:
            return [str(e)]
        d = self._dir(key)
        problems = []
        for rel, expected in index["files"].items():
            if not (d / rel).is_file():
                problems.append(f"{rel}: missing")
            elif (actual := sha256_file(d / rel)) != expected:
                problems.append(f"{rel}: sha256 {actual[:12]}… != indexed {expected[:12]}…")
        for rel in tree_files(d):
            if rel != INDEX_NAME and rel not in index["files"]:
                problems.append(f"{rel}: not in the index")
        return problems

    def list(self) -> list[dict]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if INDEX_NAME in filenames:
                key = Path(dirpath).relative_to(self.root).as_posix()
                try:
                    out.append(_parse_index((Path(dirpath) / INDEX_NAME).read_bytes(), key, f"{self!r}"))
                except CorruptArtifact as e:
                    out.append({"key": key, "files": {}, "meta": {}, "corrupt": str(e)})
                dirnames[:] = []
        return sorted(out, key=lambda e: e["key"])

    def delete(self, key: str) -> None:
        d = self._dir(key)
        if not d.exists():
            raise ArtifactNotFound(f"no artifact {key!r} in {self!r}; nothing to delete")
        trash = self.root / ".tmp" / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(d, trash)  # readers see the entry vanish at once, never half of it
        shutil.rmtree(trash, ignore_errors=True)


class S3Store:
    """Entries in an S3 bucket: `<prefix>/<key>/<upload-id>/<file>` objects + `<prefix>/<key>/_index.json`.

    Each upload writes its files under its own id, then the index last (with If-None-Match where the endpoint supports
    it), so the index is the commit point: readers ignore keys without one and never mix files of two writers.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client=None,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if client is None:
            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                config=Config(
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,  # per socket read, not per transfer: big files are fine
                ),
            )
        self.client = client
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize, max_concurrency=4
        )

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one boto3 call, turning connection and setup failures into errors that say what to do."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        try:
            return fn(*args, **kwargs)
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
            endpoint = self.endpoint_url or "AWS S3"
            raise StoreUnreachable(
                f"S3 endpoint {endpoint} is unreachable: {e}; start it or fix AWS_ENDPOINT_URL"
            ) from e
        except NoCredentialsError as e:
            raise PermissionError(
                f"no S3 credentials for {self!r} ({what}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from e
        except (ClientError, S3UploadFailedError) as e:
            code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None
            if code == "NoSuchBucket" or (code is None and "NoSuchBucket" in str(e)):
                raise FileNotFoundError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS S3'}; create it first"
                ) from e
            raise

    def _entry_prefix(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}/" if self.prefix else f"{key}/"

    def _index_key(self, key: str) -> str:
        return self._entry_prefix(key) + INDEX_NAME

    @staticmethod
    def _is_missing(err) -> bool:
        return err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def _list_keys(self, prefix: str):
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    # -- ArtifactStore --------------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._index_key(key))
            return True
        except ClientError as e:
            if self._is_missing(e):
                return False
            raise

    def index(self, key: str) -> dict:
        from botocore.exceptions import ClientError

        try:
            body = self._call("get index", self.client.get_object, Bucket=self.bucket, Key=self._index_key(key))
        except ClientError as e:
            if self._is_missing(e):
                raise ArtifactNotFound(f"no artifact {key!r} in {self!r}; build it and put_dir it first") from None
            raise
        return _parse_index(body["Body"].read(), key, f"{self!r}")

    def put_dir(self, key: str, src: Path, meta: dict | None = None) -> dict:
        from botocore.exceptions import ClientError

        if self.exists(key):
            return self.index(key)
        _check_src(src)
        manifest = tree_manifest(src)
        upload_id = uuid.uuid4().hex
        base = self._entry_prefix(key) + upload_id + "/"
        for rel, digest in manifest.items():
            self._call(
                "upload",
                self.client.upload_file,
                str(Path(src) / rel),
                self.bucket,
                base + rel,
                ExtraArgs={"Metadata": {"sha256": digest}},
                Config=self.transfer,
            )
        index = _new_index(key, manifest, meta) | {"upload_id": upload_id}
        body = json.dumps(index, indent=1).encode()
        try:
            self._call(
                "put index", self.client.put_object, Bucket=self.bucket, Key=self._index_key(key), Body=body,
                IfNoneMatch="*",
            )
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                log.info("entry %s was written concurrently; keeping the other writer's copy", key)
                self._delete_prefix(base)
                return self.index(key)
            if code in ("NotImplemented", "InvalidArgument"):  # endpoints without conditional writes
                self._call("put index", self.client.put_object, Bucket=self.bucket, Key=self._index_key(key), Body=body)
            else:
                raise
        return index

    def _object_key(self, key: str, index: dict, rel: str) -> str:
        return self._entry_prefix(key) + index["upload_id"] + "/" + rel

    def get_dir(self, key: str, dest: Path) -> Path:
        from botocore.exceptions import ClientError

        index = self.index(key)
        dest = Path(dest)
        tmp = _tmp_next_to(dest)
        where = f"{self!r} entry {key!r}"
        try:
            for rel, expected in index["files"].items():
                obj_key = self._object_key(key, index, rel)

                def read_into(f, obj_key=obj_key):
                    self._call("download", self.client.download_fileobj, self.bucket, obj_key, f, Config=self.transfer)

                try:
                    _copy_verified(read_into, rel, expected, tmp / rel, where)
                except ClientError as e:
                    if self._is_missing(e):
                        raise CorruptArtifact(
                            f"{where}: file {rel!r} is missing; delete the entry and rebuild it"
                        ) from e
                    raise
            tmp.mkdir(parents=True, exist_ok=True)
            return _finish_dest(tmp, dest, index)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def verify(self, key: str) -> list[str]:
        from botocore.exceptions import ClientError

        try:
            index = self.index(key)
        except (ArtifactNotFound, CorruptArtifact) as e:
            return [str(e)]
        problems = []
        for rel, expected in index["files"].items():
            h = hashlib.sha256()
            try:
                obj_key = self._object_key(key, index, rel)
                body = self._call("get", self.client.get_object, Bucket=self.bucket, Key=obj_key)
                for chunk in body["Body"].iter_chunks(1 << 20):
                    h.update(chunk)
            except ClientError as e:
                if self._is_missing(e):
                    problems.append(f"{rel}: missing")
                    continue
                raise
            if h.hexdigest() != expected:
                problems.append(f"{rel}: sha256 {h.hexdigest()[:12]}… != indexed {expected[:12]}…")
        return problems

    def list(self) -> list[dict]:
        root = f"{self.prefix}/" if self.prefix else ""
        out = []
        for obj_key in self._list_keys(root):
            if obj_key.endswith("/" + INDEX_NAME):
                key = obj_key[len(root) : -len(INDEX_NAME) - 1]
                try:
                    out.append(self.index(key))
                except CorruptArtifact as e:
                    out.append({"key": key, "files": {}, "meta": {}, "corrupt": str(e)})
                except (ArtifactNotFound, ValueError):
                    continue  # deleted meanwhile, or a foreign object
        return sorted(out, key=lambda e: e["key"])

    def _delete_prefix(self, prefix: str) -> None:
        keys = list(self._list_keys(prefix))
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})

    def delete(self, key: str) -> None:
        if not self.exists(key):
            raise ArtifactNotFound(f"no artifact {key!r} in {self!r}; nothing to delete")
        # index first: from here on readers see no entry, then the files go
        self._call("delete index", self.client.delete_object, Bucket=self.bucket, Key=self._index_key(key))
        self._delete_prefix(self._entry_prefix(key))


def open_store(uri: str, endpoint_url: str | None = None) -> ArtifactStore:
    """Open a store by URI: "/path" or "file:///path" -> LocalStore; "s3://bucket/prefix" -> S3Store.

    The S3 endpoint is endpoint_url, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS itself.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URI {uri!r} names no bucket; use s3://<bucket>/<prefix>")
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(Path(uri))
    raise ValueError(f"unsupported store URI {uri!r}: use a directory path, file:///path or s3://bucket/prefix")
