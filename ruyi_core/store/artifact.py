"""Artifacts: a prefix of files plus a manifest.json written LAST. Only prefixes with a manifest are trusted,
so a killed upload stays invisible; every download is checked against the manifest's sha256s."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

from minio.error import S3Error
from pydantic import ValidationError

from ruyi_core.measure import code_version
from ruyi_core.spec import StoreSpec
from ruyi_core.store.client import (
    IntegrityError, StoreError, Transfer, TransferStats, describe, hash_file, make_client, parse_endpoint,
)
from ruyi_core.store.manifest import MANIFEST, FileEntry, InputRef, Manifest

_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
_ATTEMPTS = 3  # reads and writes that another writer of the same artifact can make stale: tried again


class _Rewritten(StoreError):
    """An artifact's manifest changed while its files were being read (a StoreError: store errors pass through
    _errors unchanged)."""


def clean_key(key: str, what: str = "key") -> str:
    """A '/'-separated object key without '.', '..' or empty segments (also keeps downloads inside their
    destination folder)."""
    k = key.strip("/")
    if k and ("\\" in k or any(p in ("", ".", "..") for p in k.split("/"))):
        raise StoreError(f"invalid {what} {key!r}: use '/'-separated names without '.', '..' or '//'")
    return k


def _safe_rel(path: str) -> bool:
    try:
        return bool(path) and clean_key(path) == path
    except StoreError:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ArtifactStore:
    """Artifacts and single files in one bucket of any S3 (MinIO in production, SeaweedFS locally)."""

    def __init__(self, client, spec: StoreSpec, endpoint: str, secret_key: str):
        self.client, self.spec, self.bucket, self.endpoint = client, spec, spec.bucket, endpoint
        self._secret = secret_key  # only to refuse metadata that would leak it
        self.stats = TransferStats()
        self.part_size = spec.part_size_mb << 20
        self.transfer = Transfer(client, part_size=self.part_size, parallel=spec.parallel_parts,
                                 retries=spec.retries, stats=self.stats)
        self._code_version: str | None = None

    def __repr__(self) -> str:
        return f"ArtifactStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    @classmethod
    def from_spec(cls, spec: StoreSpec, env: Mapping[str, str] | None = None, *,
                  create_bucket: bool = True) -> ArtifactStore:
        """Connect, check reachability and credentials up front, and create the bucket if missing
        (create_bucket=False: a missing bucket is an error, for read-only lookups)."""
        env = os.environ if env is None else env
        endpoint, secure = parse_endpoint(env.get("RUYI_S3_ENDPOINT") or spec.endpoint, spec.secure)
        access, secret = env.get("RUYI_S3_ACCESS_KEY"), env.get("RUYI_S3_SECRET_KEY")
        if not access or not secret:
            raise StoreError("no object store credentials: set RUYI_S3_ACCESS_KEY and RUYI_S3_SECRET_KEY "
                             "(for the local server: `set -a; source .ruyi/s3/s3.env; set +a`)")
        client = make_client(endpoint, access, secret, secure=secure, region=spec.region,
                             pool_size=2 * spec.parallel_parts + 2, read_timeout_s=spec.read_timeout_s)
        store = cls(client, spec, endpoint, secret)
        # no retries here: a wrong endpoint or key should fail in seconds, not after minutes of backoff
        with store._errors(f"opening bucket {spec.bucket!r}"):
            if not client.bucket_exists(spec.bucket):
                if not create_bucket:
                    raise StoreError(f"bucket {spec.bucket!r} does not exist at {endpoint}: "
                                     "check the URI or store.bucket")
                try:
                    client.make_bucket(spec.bucket, location=spec.region)
                except S3Error as e:
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        return store

    # ---- names ----------------------------------------------------------------------------------------
    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{clean_key(key)}"

    def split(self, uri_or_key: str) -> tuple[str, str]:
        """(bucket, key) of an s3:// URI, or of a key in this store's bucket."""
        s = str(uri_or_key)
        if s.startswith("s3://"):
            bucket, _, key = s[5:].partition("/")
            if not bucket:
                raise StoreError(f"invalid URI {s!r}: expected s3://<bucket>/<key>")
            return bucket, clean_key(key)
        if "://" in s:
            raise StoreError(f"invalid URI {s!r}: only s3://<bucket>/<key> URIs or plain keys are supported")
        return self.bucket, clean_key(s)

    def normalize_uri(self, uri_or_key: str) -> str:
        """The canonical s3://bucket/key form (no trailing slash) of a URI or a key in this bucket."""
        return self.uri(*reversed(self.split(uri_or_key)))

    def _artifact(self, uri_or_key: str) -> tuple[str, str, str]:
        bucket, key = self.split(uri_or_key)
        if not key:
            raise StoreError(f"{uri_or_key!r} names a whole bucket: an artifact needs a prefix "
                             "such as runs/<id>/<stage>")
        return bucket, key, self.uri(key, bucket)

    @contextlib.contextmanager
    def _errors(self, what: str, bucket: str | None = None) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            raise describe(e, self.endpoint, what, bucket or self.bucket) from e

    def _code(self) -> str:
        if self._code_version is None:
            self._code_version = code_version()
        return self._code_version

    # ---- artifacts ------------------------------------------------------------------------------------
    def read_manifest(self, uri: str) -> Manifest | None:
        return self._read_manifest(*self._artifact(uri))[0]

    def _read_manifest(self, bucket: str, key: str, uri: str) -> tuple[Manifest | None, str]:
        """The manifest and its ETag (what a conditional rewrite names), or (None, "")."""
        with self._errors(f"reading the manifest of {uri}", bucket):
            try:
                resp = self.transfer.retry(self.client.get_object, bucket, f"{key}/{MANIFEST}")
            except S3Error as e:
                if e.code in _MISSING:
                    return None, ""
                raise
            try:
                raw, etag = resp.read(), resp.headers.get("ETag", "")
            finally:
                resp.close()
                resp.release_conn()
        try:
            return Manifest.model_validate_json(raw), etag
        except ValidationError as e:
            first = e.errors()[0]
            raise IntegrityError(f"{uri}/{MANIFEST} is not a valid manifest "
                                 f"({'.'.join(map(str, first['loc'])) or 'json'}: {first['msg']}): "
                                 "re-upload the artifact") from None

    def has_artifact(self, uri: str) -> bool:
        bucket, key, uri = self._artifact(uri)
        with self._errors(f"checking {uri}", bucket):
            return self.transfer.stat(bucket, f"{key}/{MANIFEST}") is not None

    def list_artifacts(self, prefix: str = "") -> list[str]:
        """URIs of the artifacts (prefixes holding a manifest.json) at or under `prefix`."""
        bucket, key = self.split(prefix)
        with self._errors(f"listing {self.uri(key, bucket) if key else 's3://' + bucket}", bucket):
            names = self.transfer.retry(lambda: [o.object_name for o in self.client.list_objects(
                bucket, prefix=f"{key}/" if key else "", recursive=True)])
        tail = f"/{MANIFEST}"
        return sorted(self.uri(n[: -len(tail)], bucket) for n in names if n.endswith(tail))

    def delete_artifact(self, uri: str) -> None:
        """Manifest first (from then on it is no longer a complete artifact), then its files."""
        bucket, key, uri = self._artifact(uri)
        with self._errors(f"deleting {uri}", bucket):
            self.transfer.retry(self.client.remove_object, bucket, f"{key}/{MANIFEST}")
            names = self.transfer.retry(lambda: [o.object_name for o in self.client.list_objects(
                bucket, prefix=f"{key}/", recursive=True)])
            for name in names:
                self.transfer.retry(self.client.remove_object, bucket, name)

    def put_artifact(self, prefix: str, local_dir: str | Path, *, stage: str, spec_hash: str, identity: str = "",
                     inputs: Iterable[str] = (), metadata: Mapping[str, Any] | None = None,
                     build_seconds: float | None = None, build_peak_mib: float | None = None) -> Manifest:
        """Upload every file under `local_dir` to `<prefix>/<relpath>`, then `<prefix>/manifest.json` LAST, with
        a conditional write: of concurrent writers of one artifact the first complete manifest wins and the others
        return it. An artifact already there from the same build (the same stage identity; without one, the same
        content) is kept and returned, its missing files uploaded again; one from another build is replaced."""
        bucket, key, uri = self._artifact(prefix)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"{local_dir} is not a directory: put_artifact uploads a folder")
        paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
        rels = [p.relative_to(local_dir).as_posix() for p in paths]
        if MANIFEST in rels:
            raise StoreError(f"{local_dir / MANIFEST} would be overwritten by the artifact's manifest: rename it")
        meta = self._clean_metadata(metadata)
        created = _now()
        with self._errors(f"uploading {uri}", bucket):
            refs = [InputRef(uri=self._artifact(u)[2], content_sha256=self._input(u, uri).content_sha256())
                    for u in dict.fromkeys(inputs)]
            with ThreadPoolExecutor(self.spec.parallel_parts, thread_name_prefix="ruyi-hash") as pool:
                hashed = list(pool.map(hash_file, paths))
            files = [FileEntry(path=r, size=n, sha256=h) for r, (h, n, _) in zip(rels, hashed)]
            items = list(zip(paths, files, (m for *_, m in hashed)))
            content = (stage, spec_hash, identity, files, refs, meta)

            def manifest() -> Manifest:  # ours, completed now
                return Manifest(uri=uri, stage=stage, spec_hash=spec_hash, identity=identity,
                                build_seconds=build_seconds, build_peak_mib=build_peak_mib,
                                code_version=self._code(), created_at=created, completed_at=_now(), files=files,
                                inputs=refs, metadata=meta)

            existing, etag = self._read_manifest(bucket, key, uri)
            if existing is not None and existing.same_build(identity, content):
                return self._keep(bucket, key, uri, (existing, etag), items, content, manifest)
            if existing is not None:
                # another build: hide it first, so a crash mid-rewrite never leaves a manifest over mixed files
                self.transfer.retry(self.client.remove_object, bucket, f"{key}/{MANIFEST}")
            self._upload_files(bucket, key, items)
            ours = manifest()
            if self._write_manifest(bucket, key, ours, None):
                return ours
            # another writer completed this artifact first: theirs stands when it is the same build
            return self._keep(bucket, key, uri, self._read_manifest(bucket, key, uri), items, content, lambda: ours)

    def _input(self, uri: str, consumer: str) -> Manifest:
        m = self.read_manifest(uri)
        if m is None:
            raise StoreError(f"input {uri} is not an artifact (no {MANIFEST}): upload it before {consumer}")
        return m

    def _keep(self, bucket: str, key: str, uri: str, found: tuple[Manifest | None, str],
              items: list[tuple[Path, FileEntry, int]], content: tuple, ours: Callable[[], Manifest]) -> Manifest:
        """The stored manifest `found`, of the same build, instead of ours. Where its files are ours too they are
        uploaded again (restoring any removed since). A stage whose output is not a pure function of its identity
        leaves the stored files alone while they are intact; when they are not (our upload replaced some, or
        they were damaged), ours are uploaded and our manifest replaces theirs, conditionally."""
        existing, etag = found
        if existing is None or not existing.same_build(content[2], content):
            raise StoreError(f"another writer stored a different build of {uri} while this one uploaded it: "
                             "run the stage again")
        if existing.files == content[3]:
            self._upload_files(bucket, key, items)  # skips what is stored intact
            return existing
        if all(self.transfer.is_intact(bucket, f"{key}/{f.path}", f.sha256, f.size) for f in existing.files):
            return existing
        self._upload_files(bucket, key, items)
        if self._write_manifest(bucket, key, manifest := ours(), etag):
            return manifest
        raise StoreError(f"{uri} kept changing while this writer stored it: run the stage again")

    def _write_manifest(self, bucket: str, key: str, manifest: Manifest, etag: str | None) -> bool:
        body = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True).encode()
        return self._put_if(bucket, f"{key}/{MANIFEST}", body, etag)

    def _clean_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            text = json.dumps(dict(metadata or {}), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError(f"artifact metadata must be JSON-serialisable ({e})") from None
        if self._secret and self._secret in text:
            raise StoreError("artifact metadata contains the object store's secret key: remove it")
        return json.loads(text)

    def _upload_one(self, transfer: Transfer, bucket: str, obj: str, path: Path, f: FileEntry,
                    mtime_ns: int) -> None:
        if transfer.is_intact(bucket, obj, f.sha256, f.size):
            self.stats.add(files_skipped=1)
            return
        transfer.upload(bucket, obj, path, f.sha256, f.size, mtime_ns)
        self.stats.add(files_uploaded=1)

    def _upload_files(self, bucket: str, key: str, items: list[tuple[Path, FileEntry, int]]) -> None:
        # small files side by side (latency-bound); large ones one at a time, each with parallel parts; the first
        # failure stops the others (Transfer.run_all), so a silent store fails this within one call's retries
        files = self.transfer.batch()
        small = [it for it in items if it[1].size <= self.part_size]
        large = [it for it in items if it[1].size > self.part_size]
        files.run_all(lambda it: self._upload_one(files, bucket, f"{key}/{it[1].path}", *it), small, "ruyi-files")
        for p, f, m in large:
            self._upload_one(files, bucket, f"{key}/{f.path}", p, f, m)

    def get_artifact(self, uri: str, local_dir: str | Path, only: Collection[str] | None = None) -> Manifest:
        """Download a completed artifact (`only` these of its files) into `local_dir`, verifying every file's
        size and sha256. A manifest rewritten while we read (another writer completing the same artifact) is
        read again, never taken for damage."""
        bucket, key, uri = self._artifact(uri)
        for _ in range(_ATTEMPTS):
            found = self._read_manifest(bucket, key, uri)
            if found[0] is None:
                raise StoreError(f"no artifact at {uri}: it has no {MANIFEST} (never completed, or a wrong URI)")
            try:
                self._download(bucket, key, uri, found, Path(local_dir), only)
            except _Rewritten:
                continue
            return found[0]
        raise IntegrityError(f"{uri} kept changing while it was downloaded (other writers?): run again; nothing "
                             "was removed")

    def _download(self, bucket: str, key: str, uri: str, found: tuple[Manifest, str], local_dir: Path,
                  only: Collection[str] | None) -> None:
        manifest = found[0]
        files = [f for f in manifest.files if only is None or f.path in only]
        if only is not None and len(files) != len(set(only)):
            raise StoreError(f"{uri} has no {', '.join(sorted(set(only) - {f.path for f in files}))}")
        for f in files:
            if not _safe_rel(f.path):
                raise IntegrityError(f"{uri}/{MANIFEST} lists an unsafe path {f.path!r}: refusing to download")
            (local_dir / f.path).parent.mkdir(parents=True, exist_ok=True)

        transfer = self.transfer.batch()  # the first failure stops the other files (Transfer.run_all)

        def one(f: FileEntry) -> None:
            get = (bucket, f"{key}/{f.path}", local_dir / f.path, f.size, f.sha256)
            try:
                transfer.download(*get, label=f"{uri}/{f.path}")
            except IntegrityError:
                try:  # once more: bytes damaged on the way are not damaged in the store
                    transfer.download(*get, label=f"{uri}/{f.path}")
                except IntegrityError as e:
                    if self._read_manifest(bucket, key, uri) != found:
                        raise _Rewritten from None  # not damage: the artifact was rewritten meanwhile
                    self._quarantine(bucket, key, f.path)
                    raise IntegrityError(f"{str(e).split('; re-upload')[0]}; removed it and the artifact's "
                                         f"manifest, so running the stage that built {uri} again rebuilds "
                                         "it") from None

        with self._errors(f"downloading {uri}", bucket):
            transfer.run_all(one, [f for f in files if f.size <= self.part_size], "ruyi-files")
            for f in files:
                if f.size > self.part_size:
                    one(f)

    def _quarantine(self, bucket: str, key: str, path: str) -> None:
        """A stored object that fails its manifest twice: remove it and the manifest (the manifest first, so the
        artifact is never complete-looking without it); the next upload of the artifact writes it again."""
        with contextlib.suppress(Exception):
            self.client.remove_object(bucket, f"{key}/{MANIFEST}")
            self.client.remove_object(bucket, f"{key}/{path}")

    # ---- single objects -------------------------------------------------------------------------------
    def put_file(self, local_path: str | Path, key: str) -> FileEntry:
        """Upload one file (streaming, skipped when already stored intact); returns its entry."""
        bucket, k = self.split(key)
        if not k:
            raise StoreError(f"{key!r} names a whole bucket: put_file needs an object key")
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StoreError(f"{local_path} is not a file")
        sha, size, mtime = hash_file(local_path)
        entry = FileEntry(path=k, size=size, sha256=sha)
        with self._errors(f"uploading {self.uri(k, bucket)}", bucket):
            self._upload_one(self.transfer, bucket, k, local_path, entry, mtime)
        return entry

    # ---- small shared objects, updated with conditional writes (no lost updates) ------------------------------

    def read_object(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of a small object in this bucket, or None when there is none."""
        with self._errors(f"reading {self.uri(key)}"):
            try:
                resp = self.transfer.retry(self.client.get_object, self.bucket, clean_key(key))
            except S3Error as e:
                if e.code in _MISSING:
                    return None
                raise
            try:
                return resp.read(), resp.headers.get("ETag", "")
            finally:
                resp.close()
                resp.release_conn()

    def write_object_if(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write `key` only if it is still as read: absent (`etag` None) or unchanged (that ETag). False when
        another writer got there first (S3 conditional writes: MinIO, SeaweedFS and AWS honour them)."""
        with self._errors(f"writing {self.uri(key)}"):
            return self._put_if(self.bucket, clean_key(key), data, etag)

    def _put_if(self, bucket: str, obj: str, data: bytes, etag: str | None) -> bool:
        cond = {"If-None-Match": "*"} if etag is None else {"If-Match": etag}
        try:
            # private: the public put_object turns If-Match / If-None-Match into user metadata (test_private_apis)
            self.client._put_object(bucket, obj, data, headers={"Content-Type": "application/json", **cond})
        except S3Error as e:
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_folder(self, uri: str, local_dir: str | Path) -> list[str]:
        """A folder of objects into `local_dir`: an artifact (every file checked against its manifest) or a plain
        prefix as `mc cp -r` / `aws s3 cp --recursive` leave it (each object checked against its recorded sha256
        when it has one). Returns the relative paths."""
        if self.has_artifact(uri):
            return [f.path for f in self.get_artifact(uri, local_dir).files]
        uris = self.list_objects(uri)
        if not uris:
            raise StoreError(f"no objects under {self.normalize_uri(uri)}: upload the folder there first")
        prefix = self.normalize_uri(uri).rstrip("/") + "/"
        rels = [u[len(prefix):] for u in uris]
        for u, rel in zip(uris, rels):
            self.get_file(u, Path(local_dir) / rel)
        return rels

    def etag(self, uri: str) -> str:
        """An object's ETag: it changes when the object does."""
        bucket, key = self.split(uri)
        with self._errors(f"reading {self.uri(key, bucket)}", bucket):
            return self.transfer.retry(self.client.stat_object, bucket, key).etag

    def list_objects(self, uri: str) -> list[str]:
        """URIs of the objects under a prefix, sorted."""
        bucket, key = self.split(uri)
        key = key.rstrip("/")
        with self._errors(f"listing {self.uri(key, bucket)}", bucket):
            names = self.transfer.retry(lambda: [o.object_name for o in self.client.list_objects(
                bucket, prefix=f"{key}/", recursive=True)])
        return sorted(self.uri(n, bucket) for n in names)

    def get_file(self, key_or_uri: str, local_path: str | Path) -> FileEntry:
        """Download one object; verified against the sha256 in its metadata when it has one."""
        bucket, k = self.split(key_or_uri)
        uri = self.uri(k, bucket)
        local_path = Path(local_path)
        with self._errors(f"downloading {uri}", bucket):
            found = self.transfer.stat(bucket, k) if k else None
            if found is None:
                raise StoreError(f"no object at {uri}: check the key")
            size, sha = found
            local_path.parent.mkdir(parents=True, exist_ok=True)
            got = self.transfer.download(bucket, k, local_path, size, sha, label=uri)
        return FileEntry(path=k, size=size, sha256=got)
